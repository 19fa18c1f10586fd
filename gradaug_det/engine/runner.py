"""detectron2 ``SimpleTrainer`` / ``AMPTrainer`` whose ``run_step`` is a GradAug iteration.

These are what a LazyConfig training script, or any project with its own loop built on
detectron2's trainers, uses directly::

    trainer = GradAugSimpleTrainer(model, data_loader, optimizer,
                                   sampler=SubnetSampler(...), task=DetectionTask(model))
"""
import contextlib
import time

import numpy as np
import torch

from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from ..gradaug import GradAugOutput, SubnetSampler, gradaug_step, subnet_metrics

__all__ = ["GradAugSimpleTrainer", "GradAugAMPTrainer", "subnet_metrics"]


class _GradAugRunStep:
    """``run_step`` shared by the plain and the AMP GradAug trainers."""

    def _setup_gradaug(self, sampler: SubnetSampler, task) -> None:
        self.sampler = sampler
        self.task = task

    def _backward(self, loss):
        loss.backward()

    def _autocast(self):
        return contextlib.nullcontext()

    def _optimizer_step(self):
        self.optimizer.step()

    def run_step(self):
        """One GradAug iteration: full pass, sub-network passes, one optimizer step."""
        assert self.model.training, f"[{type(self).__name__}] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        self.optimizer.zero_grad()
        out = gradaug_step(self.model, data, self.sampler, self.task,
                           backward=self._backward, autocast=self._autocast, iteration=self.iter)
        self.after_backward()
        # total_loss and the per-loss scalars are the full network's, as in detectron2;
        # sub-network passes are logged under "gradaug/" and never added to total_loss.
        self._write_metrics(out.full_losses, data_time)
        self._write_subnet_metrics(out)
        self._optimizer_step()

    def _write_subnet_metrics(self, out: GradAugOutput) -> None:
        if (self.iter + 1) % self.gather_metric_period != 0:
            return
        gathered = comm.gather(subnet_metrics(out))
        if comm.is_main_process():
            storage = get_event_storage()
            keys = gathered[0].keys()
            storage.put_scalars(cur_iter=self.iter, **{k: float(np.mean([g[k] for g in gathered])) for k in keys})

    def _batch_fn(self):
        """The task's stateful batch transform (CutMix's generator), or None."""
        fn = getattr(self.task, "batch_fn", None)
        return fn if hasattr(fn, "state_dict") and hasattr(fn, "load_state_dict") else None

    def state_dict(self):
        """detectron2's, plus the sub-network sampler's generator and the task's batch
        transform's (CutMix) generator, so a resumed run draws what the uninterrupted did."""
        ret = super().state_dict()
        ret["gradaug_sampler"] = self.sampler.state_dict()
        if self._batch_fn() is not None:
            ret["gradaug_batch_fn"] = self._batch_fn().state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "gradaug_sampler" in state_dict:
            self.sampler.load_state_dict(state_dict["gradaug_sampler"])
        if "gradaug_batch_fn" in state_dict and self._batch_fn() is not None:
            self._batch_fn().load_state_dict(state_dict["gradaug_batch_fn"])


class GradAugSimpleTrainer(_GradAugRunStep, SimpleTrainer):
    """``SimpleTrainer`` running a GradAug iteration per step.

    Args:
        model, data_loader, optimizer: as for ``SimpleTrainer``.
        sampler: the :class:`SubnetSampler` (its state is checkpointed with the trainer).
        task: a ``DetectionTask`` or ``ClassificationTask``.
        **kwargs: other ``SimpleTrainer`` arguments.
    """

    def __init__(self, model, data_loader, optimizer, *, sampler, task, **kwargs):
        super().__init__(model, data_loader, optimizer, **kwargs)
        self._setup_gradaug(sampler, task)


class GradAugAMPTrainer(_GradAugRunStep, AMPTrainer):
    """``AMPTrainer`` running a GradAug iteration per step.

    Every pass runs under autocast and back-propagates through the grad scaler; the
    scaler steps and updates once per iteration, so gradient clipping inside the
    optimizer (``SOLVER.CLIP_GRADIENTS``) sees the summed, unscaled gradients.
    """

    def __init__(self, model, data_loader, optimizer, *, sampler, task, **kwargs):
        super().__init__(model, data_loader, optimizer, **kwargs)
        self._setup_gradaug(sampler, task)
        param = next(model.parameters())
        self._device_type = param.device.type

    def _backward(self, loss):
        self.grad_scaler.scale(loss).backward()

    def _autocast(self):
        return torch.autocast(device_type=self._device_type, dtype=self.precision)

    def _optimizer_step(self):
        if self.log_grad_scaler:
            get_event_storage().put_scalar("[metric]grad_scaler", self.grad_scaler.get_scale())
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
