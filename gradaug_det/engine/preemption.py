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
"""
import logging
import signal
from typing import Optional

import torch
import torch.distributed as dist

from detectron2.engine import HookBase
from detectron2.engine.hooks import PeriodicWriter
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter

__all__ = ["PreemptionHook", "TrainingPreempted", "install_signal_handler", "preemption_hook", "preemption_state"]

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
