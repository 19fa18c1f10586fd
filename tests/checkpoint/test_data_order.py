"""The training data stream resumes where it stopped: same batches, same augmentations."""
import copy
import itertools
import logging

import numpy as np
import pytest
import torch
from torch import nn

from detectron2.data.samplers import TrainingSampler
from detectron2.engine import SimpleTrainer, hooks

from gradaug_det.checkpoint.checkpointer import GradAugCheckpointer
from gradaug_det.data.resumable import ResumableTrainLoader, resumable_data_hook, upgrade_legacy_data_order


def _dataset(n=23):
    # landscape and portrait images in an irregular pattern, so aspect-ratio buckets wait
    return [{"id": i, "width": 40 if (i * 7) % 3 else 30, "height": 35} for i in range(n)]


def _mapper(d):
    # an augmentation drawing from numpy's global generator, like detectron2's transforms
    return {**d, "flip": float(np.random.rand()), "dropped": d["id"] == 5}


def _drop5(d):
    out = _mapper(d)
    return None if out["dropped"] else out


def _loader(num_workers, grouping=True, mapper=_mapper, seed=11):
    return ResumableTrainLoader(_dataset(), mapper, TrainingSampler(23, seed=seed), batch_size=3,
                                aspect_ratio_grouping=grouping, num_workers=num_workers)


def _key(batch):
    return [(d["id"], d["flip"]) for d in batch]


@pytest.mark.parametrize("num_workers, grouping, mapper", [(0, True, _mapper), (0, False, _mapper),
                                                           (2, True, _drop5)])
def test_resumed_stream_continues_the_same_batches(num_workers, grouping, mapper):
    ref = _loader(num_workers, grouping, mapper)
    it = iter(ref)
    expected, states = [], []
    for _ in range(12):
        expected.append(_key(next(it)))
        states.append(copy.deepcopy(ref.state_dict()))
    assert any(any(w) for s in states for w in s["waiting"]) or not grouping  # buckets did hold images
    for k in (0, 3, 7):  # "killed" after batch k: a fresh loader (another seed) from the saved state
        np.random.seed(k)  # the global generator's state must not matter
        fresh = _loader(num_workers, grouping, mapper, seed=99)
        fresh.load_state_dict(states[k])
        got = [_key(b) for b in itertools.islice(fresh, 12 - k - 1)]
        assert got == expected[k + 1:], k


def test_augmentation_depends_on_position_not_on_workers():
    a = [_key(b) for b in itertools.islice(_loader(0), 6)]
    b = [_key(b) for b in itertools.islice(_loader(2), 6)]
    assert a == b
    flips = [f for batch in a for _, f in batch]
    assert len(set(flips)) == len(flips)  # seeded per position, not one seed for all


def test_global_rng_untouched_by_main_process_mapping():
    np.random.seed(0)
    expected = np.random.rand()
    np.random.seed(0)
    list(itertools.islice(_loader(0), 3))
    assert np.random.rand() == expected


def test_other_batch_size_is_refused():
    ref = _loader(0)
    next(iter(ref))
    other = ResumableTrainLoader(_dataset(), _mapper, TrainingSampler(23, seed=1), batch_size=4)
    with pytest.raises(ValueError, match="SOLVER.IMS_PER_BATCH"):
        other.load_state_dict(ref.state_dict())


class _Recorder(nn.Module):
    """Records each batch and one draw of the global torch generator (which the hook seeds)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.seen = []

    def forward(self, batch):
        self.seen.append((_key(batch), float(torch.rand(()))))
        return {"loss": (self.w ** 2).sum()}


def _train(out, start_from=None, max_iter=6, seed=11):
    """A SimpleTrainer (as the LazyConfig tool's) with the data-order hook; checkpoints after
    iterations 2 and 5. ``start_from``: a checkpoint to resume from."""
    model = _Recorder()
    loader = _loader(0, seed=seed)
    trainer = SimpleTrainer(model, loader, torch.optim.SGD(model.parameters(), lr=0.1))
    checkpointer = GradAugCheckpointer(model, str(out), trainer=trainer)
    trainer.register_hooks([hooks.PeriodicCheckpointer(checkpointer, 3), resumable_data_hook(loader)])
    start = 0
    if start_from is not None:
        checkpointer.load(str(start_from))
        start = trainer.iter + 1
    trainer.train(start, max_iter)
    return model.seen


def _legacy_trainer_state(state):  # GradAugTrainer before ResumableDataHook
    state["trainer"]["data_order"] = state["trainer"].pop("hooks")["ResumableDataHook"]


def _legacy_checkpointable(state):  # the LazyConfig tool before ResumableDataHook
    state["data_order"] = state["trainer"].pop("hooks")["ResumableDataHook"]


def _one_process_entry(state):  # before per-rank states: the saving process's loader state only
    hooks = state["trainer"]["hooks"]
    hooks["ResumableDataHook"] = hooks["ResumableDataHook"]["ranks"][0]


@pytest.mark.parametrize("edit", [None, _legacy_trainer_state, _legacy_checkpointable, _one_process_entry])
def test_hook_resumes_the_stream_from_a_checkpoint(tmp_path, edit):
    """The hook's state is saved in the trainer's checkpoint and restored on resume (also from
    the two layouts written before it); batches and the model's random draws continue."""
    ref = _train(tmp_path / "ref")
    state = torch.load(tmp_path / "ref" / "model_0000002.pth", weights_only=True)
    entry = state["trainer"]["hooks"]["ResumableDataHook"]
    assert entry["world_size"] == 1 and len(entry["ranks"]) == 1
    order = entry["ranks"][0]
    assert state["iteration"] == 2 and order["next_position"] == 9 + sum(len(b) for b in order["waiting"])
    if edit is not None:
        edit(state)
    (tmp_path / "resumed").mkdir()
    torch.save(state, tmp_path / "resumed" / "start.pth")
    resumed = _train(tmp_path / "resumed", start_from=tmp_path / "resumed" / "start.pth", seed=99)
    assert resumed == ref[3:]


def test_hook_warns_when_a_resumed_checkpoint_has_no_data_order(tmp_path):
    ref = _train(tmp_path / "ref")
    state = torch.load(tmp_path / "ref" / "model_0000002.pth", weights_only=True)
    del state["trainer"]["hooks"]
    (tmp_path / "restarted").mkdir()
    torch.save(state, tmp_path / "restarted" / "start.pth")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("gradaug_det.data.resumable")
    logger.addHandler(handler)
    try:
        restarted = _train(tmp_path / "restarted", start_from=tmp_path / "restarted" / "start.pth")
    finally:
        logger.removeHandler(handler)
    assert [r[0] for r in restarted] == [r[0] for r in ref[:3]]  # the stream started again
    assert any("has no data order" in r.getMessage() for r in records)


def test_upgrade_keeps_a_current_data_order_and_other_checkpoints():
    new, old = {"next_position": 4}, {"next_position": 2}
    ckpt = {"model": {}, "trainer": {"iteration": 1, "hooks": {"ResumableDataHook": new}, "data_order": old}}
    assert upgrade_legacy_data_order(ckpt)["trainer"] == {"iteration": 1, "hooks": {"ResumableDataHook": new}}
    weights = {"model": {}, "data_order": old}  # no trainer state: not a training checkpoint
    assert upgrade_legacy_data_order(dict(weights)) == weights
