"""ImageNet pretraining (SlimmableClassifier) resumes exactly: a run resumed with --resume from
its iteration-2 checkpoint, through tools/train_net.py's main, ends with the uninterrupted
run's weights, bit for bit; with CutMix ("GradAug+"), whose generator is checkpointed too."""
import os
import runpy

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join(ROOT, "configs", "imagenet", "quickstart.yaml")
MAX_ITER = 4


@pytest.fixture(scope="module")
def train_net():
    return runpy.run_path(os.path.join(ROOT, "tools", "train_net.py"))


def _train(train_net, out, opts, resume=False):
    args = train_net["get_parser"]().parse_args(
        ["--config-file", QUICKSTART, *(["--resume"] if resume else []), *opts, "DATASETS.TEST", "()",
         "INPUT.CUTMIX.ENABLED", "True", "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.CHECKPOINT_PERIOD", "2",
         "TEST.SLIM_WIDTHS", "[]", "SEED", "5", "OUTPUT_DIR", str(out)])
    train_net["main"](args)
    return torch.load(out / "model_final.pth", weights_only=True)["model"]


def _resume_from(train_net, ckpt, out, opts, edit=None):
    os.makedirs(out)
    state = torch.load(ckpt, weights_only=True)
    if edit is not None:
        edit(state)
    torch.save(state, out / "model_0000001.pth")
    (out / "last_checkpoint").write_text("model_0000001.pth")
    return _train(train_net, out, opts, resume=True)


def _equal(a, b):
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


def test_resumed_classifier_run_equals_the_uninterrupted_run(tmp_path, train_net, tiny_imagefolder, tiny_cls_opts):
    ref = _train(train_net, tmp_path / "ref", tiny_cls_opts)
    ckpt = tmp_path / "ref" / "model_0000001.pth"  # saved after iterations 0 and 1
    state = torch.load(ckpt, weights_only=True)
    assert state["iteration"] == 1
    # 2 iterations x 4 images of the stream were used; nothing waits (no aspect-ratio grouping)
    assert state["trainer"]["hooks"]["ResumableDataHook"]["world_size"] == 1
    (order,) = state["trainer"]["hooks"]["ResumableDataHook"]["ranks"]
    assert order["next_position"] == 8 and order["waiting"] == [[], []]
    assert "gradaug_batch_fn" in state["trainer"]["_trainer"]  # CutMix's generator
    assert not _equal(state["model"], ref)  # iterations 2 and 3 changed the weights

    resumed = _resume_from(train_net, ckpt, tmp_path / "resumed", tiny_cls_opts)
    assert _equal(resumed, ref)

    # control: without CutMix's generator state the resumed run mixes other boxes
    def drop_cutmix(s):
        del s["trainer"]["_trainer"]["gradaug_batch_fn"]

    other = _resume_from(train_net, ckpt, tmp_path / "no_cutmix_state", tiny_cls_opts, edit=drop_cutmix)
    assert not _equal(other, ref)
