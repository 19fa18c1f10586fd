"""Preemption, framework-free: the signal sets a flag that a training loop's hook acts on.

Slurm sends ``SIGUSR2`` (submitit's ``--signal=USR2@N``) to every task before it stops the
job. Saving from a signal handler in the middle of a step is unsafe (half-applied optimizer
step, ranks at different iterations, collectives interrupted), so while the training loop
runs the handler (:func:`install_signal_handler`) only sets a flag; the loop's hook
(:class:`gradaug_det.engine.preemption.PreemptionHook` for detectron2,
:class:`gradaug_det.mmdet.preemption.MMEnginePreemptionHook` for mmengine) agrees on it across
ranks (:func:`gradaug_det.utils.parallel.any_rank`), saves a checkpoint and raises :class:`TrainingPreempted`. Outside the
training loop the signal goes straight to submitit's handler.
"""
import logging
import signal
from typing import Optional

__all__ = ["TrainingPreempted", "install_signal_handler", "preemption_state"]

logger = logging.getLogger(__name__)


class TrainingPreempted(BaseException):
    """Raised by a preemption hook after it saved the checkpoint of ``iteration``.

    A ``BaseException`` (like ``KeyboardInterrupt``): detectron2's training loop lets it
    through without logging it as a failure, and still runs the hooks' ``after_train``.
    """

    def __init__(self, iteration: int):
        super().__init__(f"preempted: checkpoint saved after iteration {iteration}")
        self.iteration = iteration


class _PreemptionState:
    """The flag shared by the signal handler and the loop's preemption hook (one per process)."""

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
