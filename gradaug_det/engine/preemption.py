"""Preemption inside the training loop: the signal sets a flag; a hook acts on it after the step.

Slurm sends ``SIGUSR2`` (submitit's ``--signal=USR2@N``) to every task before it stops the
job. Saving from a signal handler in the middle of a step is unsafe (half-applied optimizer
step, ranks at different iterations, collectives interrupted), so while the training loop
runs the handler (:func:`install_signal_handler`) only sets a flag. :class:`PreemptionHook`
(a detectron2 hook, appended by the trainers through :func:`preemption_hook`) agrees on the
flag across ranks after every step (one all-reduce of one number), saves a checkpoint of
that step -- all ranks at the same iteration -- and stops the loop with
:class:`TrainingPreempted`. The job (:class:`gradaug_det.launch.slurm.TrainingJob`) then
requeues. Outside the training loop the signal goes straight to submitit's handler.

:class:`MMEnginePreemptionHook` is the same for mmengine's loops (``tools/mmdet_train.py``
registers it inside a job): it checks before each iteration and also saves and restores
every rank's RNG states, so the resumed run ends at an uninterrupted run's weights.
"""
import logging
import os
import random
import signal
from typing import Optional

import torch
import torch.distributed as dist

from detectron2.engine import HookBase
from detectron2.engine.hooks import PeriodicWriter
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter

__all__ = ["PreemptionHook", "MMEnginePreemptionHook", "TrainingPreempted", "install_signal_handler",
           "mmengine_preemption_hook", "preemption_hook", "preemption_state"]

logger = logging.getLogger(__name__)


class TrainingPreempted(BaseException):
    """Raised by :class:`PreemptionHook` after it saved the checkpoint of ``iteration``.

    A ``BaseException`` (like ``KeyboardInterrupt``): detectron2's training loop lets it
    through without logging it as a failure, and still runs the hooks' ``after_train``.
    """

    def __init__(self, iteration: int):
        super().__init__(f"preempted: checkpoint saved after iteration {iteration}")
        self.iteration = iteration


class _PreemptionState:
    """The flag shared by the signal handler and :class:`PreemptionHook` (one per process)."""

    def __init__(self, signum: int, submitit_handler):
        self.signum = signum
        self.submitit_handler = submitit_handler  # submitit's checkpoint-and-requeue handler
        self.requested = False
        self.in_loop = False

    def on_signal(self, signum, frame):
        if self.in_loop:
            if not self.requested:
                logger.warning("Received %s: saving a checkpoint after the current iteration, then requeueing",
                               signal.Signals(signum).name)
            self.requested = True
        elif callable(self.submitit_handler):
            # not training (building, loading, evaluating): nothing half-done to save
            self.submitit_handler(signum, frame)


_STATE: Optional[_PreemptionState] = None


def install_signal_handler() -> _PreemptionState:
    """Route submitit's preemption signal to the flag (keeps submitit's handler for later).

    Called once per task by :class:`gradaug_det.launch.slurm.TrainingJob`; from then on
    :func:`preemption_hook` returns a hook.

    Returns:
        The process's preemption state (:func:`preemption_state`).
    """
    global _STATE
    from submitit import JobEnvironment  # optional dependency (the slurm extra)

    signum = getattr(signal, "SIG" + JobEnvironment.USR_SIG)
    _STATE = _PreemptionState(signum, signal.getsignal(signum))
    signal.signal(signum, _STATE.on_signal)
    return _STATE


def preemption_state() -> Optional[_PreemptionState]:
    """The state :func:`install_signal_handler` installed in this process, or None."""
    return _STATE


def _any_rank(flag: bool) -> bool:
    """True if ``flag`` is set on any rank (one all-reduce; every rank must call it)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class PreemptionHook(HookBase):
    """After each step: if the preemption signal reached any rank, save and stop.

    Every rank takes part in the decision (one all-reduce per step), so all stop after the
    same iteration. The checkpoint is ``model_<iter>.pth`` written like detectron2's
    ``PeriodicCheckpointer`` writes it (``iteration`` plus whatever the checkpointer's
    checkpointables hold: model, optimizer, scheduler, trainer state). On the last iteration
    it does not stop: training ends normally. Register it last (after the LR scheduler hook).
    A step that includes a periodic evaluation ends only after it: the signal delay
    (``tools/submit.py --signal-delay``) must cover a step, an evaluation and a checkpoint.

    Args:
        checkpointer: the trainer's checkpointer (``trainer.checkpointer``).
    """

    def __init__(self, checkpointer):
        self.checkpointer = checkpointer

    def before_train(self):
        if _STATE is not None:
            _STATE.in_loop = True

    def after_train(self):
        if _STATE is not None:
            _STATE.in_loop = False

    def after_step(self):
        if _STATE is None:
            return
        stop = _any_rank(_STATE.requested)
        it = self.trainer.iter
        if it + 1 >= self.trainer.max_iter:
            # the training steps are done: a signal from now on (final checkpoint, evaluation)
            # goes to submitit's handler at once; a request during this step is dropped
            _STATE.in_loop = False
            return
        if not stop:
            return
        self.checkpointer.save(f"model_{it:07d}", iteration=it)
        comm.synchronize()  # the file is written (rank 0) before any rank leaves
        self._forget_printed_iteration(it)
        raise TrainingPreempted(it)

    def _forget_printed_iteration(self, it: int) -> None:
        """Let detectron2's ``PeriodicWriter.after_train`` print iteration ``it`` again.

        After a stop, ``after_train`` writes the stopped iteration once more. When a
        ``CommonMetricPrinter`` printed it in this step and no iteration time is recorded yet
        (``IterationTimer``'s first iterations of a run), its ETA estimate divides by the
        iterations since its last write, zero: the ``ZeroDivisionError`` would replace
        :class:`TrainingPreempted` and the job would fail instead of requeueing. Forgetting
        that write makes the printer print the line without an ETA.
        """
        # detectron2's private fields (as in detectron2 0.6-0.7): the hooks, their writers, the last write
        writers = [w for h in self.trainer._hooks if isinstance(h, PeriodicWriter) for w in h._writers]
        for writer in writers:
            last = getattr(writer, "_last_write", None)  # (iteration, time) or None
            if isinstance(writer, CommonMetricPrinter) and last is not None and last[0] == it:
                writer._last_write = None


def preemption_hook(checkpointer) -> Optional[PreemptionHook]:
    """The :class:`PreemptionHook` when running in a
    :class:`~gradaug_det.launch.slurm.TrainingJob`, else None.

    Trainers append it to their hooks (detectron2's ``register_hooks`` skips None), so a
    run outside submitit pays nothing.
    """
    return PreemptionHook(checkpointer) if _STATE is not None else None


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
        if _STATE is not None:
            _STATE.in_loop = True

    def after_train(self, runner) -> None:
        if _STATE is not None:
            _STATE.in_loop = False

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if self._restore is not None:
            _set_rng_states(self._restore)
            self._restore = None
        if _STATE is None:
            return
        if runner.iter + 1 >= runner.max_iters:
            # the last iteration: a signal from now on (its step, the final checkpoint and
            # evaluation) goes to submitit's handler at once
            stop = _any_rank(_STATE.requested)
            _STATE.in_loop = False
            if not stop:
                return
        elif not _any_rank(_STATE.requested):
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
    return MMEnginePreemptionHook() if _STATE is not None else None
