"""The detectron2 side of preemption: :class:`PreemptionHook`, appended by the trainers through
:func:`preemption_hook`, agrees on the signal's flag (:mod:`gradaug_det.utils.preemption`)
across ranks after every step (one all-reduce of one number), saves a checkpoint of that step
-- all ranks at the same iteration -- and stops the loop with :class:`TrainingPreempted`. The
job (:class:`gradaug_det.launch.slurm.TrainingJob`) then requeues.
"""
import logging
from typing import Optional

from detectron2.engine import HookBase
from detectron2.engine.hooks import PeriodicWriter
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter

from ..utils.parallel import any_rank
from ..utils.preemption import TrainingPreempted, install_signal_handler, preemption_state

__all__ = ["PreemptionHook", "TrainingPreempted", "install_signal_handler", "preemption_hook", "preemption_state"]

logger = logging.getLogger(__name__)


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
        if preemption_state() is not None:
            preemption_state().in_loop = True

    def after_train(self):
        if preemption_state() is not None:
            preemption_state().in_loop = False

    def after_step(self):
        if preemption_state() is None:
            return
        stop = any_rank(preemption_state().requested)
        it = self.trainer.iter
        if it + 1 >= self.trainer.max_iter:
            # the training steps are done: a signal from now on (final checkpoint, evaluation)
            # goes to submitit's handler at once; a request during this step is dropped
            preemption_state().in_loop = False
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
    return PreemptionHook(checkpointer) if preemption_state() is not None else None
