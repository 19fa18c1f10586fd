"""Preemption for mmengine's training loops (``tools/mmdet_train.py`` inside a ``tools/submit.py``
job): :class:`MMEnginePreemptionHook` acts on the signal's flag
(:mod:`gradaug_det.utils.preemption`) before each iteration, saves a checkpoint with every
rank's RNG states and stops the loop, so the requeued run ends at an uninterrupted run's weights.
"""
import logging
import os
import random
from typing import Optional

import torch
import torch.distributed as dist

from ..utils.parallel import any_rank
from ..utils.preemption import TrainingPreempted, preemption_state

__all__ = ["MMEnginePreemptionHook", "mmengine_preemption_hook"]

logger = logging.getLogger(__name__)


try:
    from mmengine.hooks import Hook as _MMEngineHook
except ModuleNotFoundError:  # the detectron2 path needs no mmengine
    _MMEngineHook = object


def _rng_states() -> dict:
    """This process's RNG states: ``random``, ``numpy``, ``torch`` (CPU, and the current CUDA device)."""
    import numpy as np

    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict) -> None:
    """Restore what :func:`_rng_states` returned."""
    import numpy as np

    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(states["numpy"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


class MMEnginePreemptionHook(_MMEngineHook):
    """:class:`PreemptionHook` for mmengine's training loops (``tools/mmdet_train.py``).

    Before each iteration every rank takes part in the decision (one all-reduce); if the
    signal reached any rank, the iterations done are saved (``iter_<n>.pth`` in the work dir,
    ``last_checkpoint`` naming it, as mmengine's ``CheckpointHook`` writes them, so
    ``--resume`` finds it) and :class:`TrainingPreempted` stops the loop. The check runs
    where the next iteration's batch is already loaded, so the checkpoint also holds every
    rank's RNG states at that point (key ``gradaug_rng``, one entry per rank); a run resumed
    from it restores them at the same point of its first iteration, after mmengine advanced
    the data loader past the trained batches: the RoI samplers and any other draw continue
    as in an uninterrupted run. The iteration's batch is loaded again by the resumed run.
    After the last iteration starts the signal goes to submitit's handler at once.
    """

    priority = "VERY_LOW"
    RNG_KEY = "gradaug_rng"

    def __init__(self):
        self._pending_rng: Optional[list] = None  # all ranks' states, for the checkpoint being saved
        self._restore: Optional[dict] = None  # this rank's states, for the first resumed iteration

    def before_train(self, runner) -> None:
        if preemption_state() is not None:
            preemption_state().in_loop = True

    def after_train(self, runner) -> None:
        if preemption_state() is not None:
            preemption_state().in_loop = False

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if self._restore is not None:
            _set_rng_states(self._restore)
            self._restore = None
        if preemption_state() is None:
            return
        if runner.iter + 1 >= runner.max_iters:
            # the last iteration: a signal from now on (its step, the final checkpoint and
            # evaluation) goes to submitit's handler at once
            stop = any_rank(preemption_state().requested)
            preemption_state().in_loop = False
            if not stop:
                return
        elif not any_rank(preemption_state().requested):
            return
        done = runner.iter
        mine = _rng_states()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
        else:
            everyone = [mine]
        self._pending_rng = everyone
        filename = f"iter_{done}.pth"
        try:
            runner.save_checkpoint(runner.work_dir, filename, meta=dict(epoch=runner.epoch, iter=done),
                                   by_epoch=False)
        finally:
            self._pending_rng = None
        if runner.rank == 0:
            with open(os.path.join(runner.work_dir, "last_checkpoint"), "w") as f:
                f.write(os.path.join(runner.work_dir, filename))
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # the files are written (rank 0) before any rank leaves
        raise TrainingPreempted(done)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if self._pending_rng is not None:
            checkpoint[self.RNG_KEY] = self._pending_rng

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        states = checkpoint.get(self.RNG_KEY)
        if states is None:
            return
        if len(states) != runner.world_size:
            logger.warning("The checkpoint holds the RNG states of %d processes, this run has %d: they are not "
                           "restored (the run continues with other random draws)", len(states), runner.world_size)
            return
        self._restore = states[runner.rank]


def mmengine_preemption_hook() -> Optional[MMEnginePreemptionHook]:
    """The :class:`MMEnginePreemptionHook` when running in a :class:`~gradaug_det.launch.slurm.TrainingJob`, else None
    (``tools/mmdet_train.py`` registers it with ``runner.register_hook``)."""
    return MMEnginePreemptionHook() if preemption_state() is not None else None
