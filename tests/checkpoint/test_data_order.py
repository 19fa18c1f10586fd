"""The training data stream resumes where it stopped: same batches, same augmentations."""
import copy
import itertools

import numpy as np
import pytest

from detectron2.data.samplers import TrainingSampler

from gradaug_det.data.resumable import ResumableTrainLoader


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
