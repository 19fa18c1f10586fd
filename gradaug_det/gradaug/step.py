"""One GradAug iteration, independent of how a trainer is written.

1. Full network (width 1.0, all blocks) on the original batch; its losses; backward.
2. Each sampled sub-network, widest first: set it, transform the batch, forward, its loss,
   backward — one sub-network's graph alive at a time.
3. Width 1.0 and all blocks restored (also when a pass raises). The caller then takes one
   optimizer step on the summed gradients.

Under DistributedDataParallel every pass but the last runs under ``no_sync()``, so the
gradients are all-reduced exactly once per iteration, after the last backward.
"""
import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Dict, List, Optional

import torch
from torch import nn

from ..slim import depth, residual_blocks, width
from ..utils.parallel import unwrap_model
from .sampler import SubnetSampler, SubnetSpec

__all__ = ["GradAugOutput", "gradaug_step", "subnet_metrics", "check_finite_losses", "describe_pass"]


@dataclass
class GradAugOutput:
    """What one iteration produced (detached losses, for logging)."""

    full_losses: Dict[str, torch.Tensor]
    subnet_losses: List[Dict[str, torch.Tensor]] = field(default_factory=list)
    specs: List[SubnetSpec] = field(default_factory=list)


def _sum(losses: Dict[str, torch.Tensor]) -> torch.Tensor:
    if not losses:
        raise ValueError("a GradAug pass produced no loss; check GRADAUG.SUBNET_LOSS")
    return sum(losses.values())


def describe_pass(index: int, spec: Optional[SubnetSpec]) -> str:
    """How errors name a pass: ``"the full network"`` or ``"sub-network 2 (width 0.9, scale
    0.714, angle 0.0 degrees)"`` (kept blocks for depth sub-networks)."""
    if spec is None:
        return "the full network (width 1.0, all blocks, original input)"
    arch = (f"kept blocks {[i for i, k in enumerate(spec.keep) if k]} of {len(spec.keep)}"
            if spec.keep is not None else f"width {spec.width:g}")
    return f"sub-network {index} ({arch}, scale {spec.scale:g}, angle {spec.angle:g} degrees)"


def check_finite_losses(out: GradAugOutput, finite: torch.Tensor, iteration: Optional[int] = None) -> None:
    """Raise if any pass's loss was not finite (one host sync for all passes).

    Args:
        out: the iteration's detached losses.
        finite: bool tensor, one entry per pass (full network first), on the losses' device.
        iteration: named in the error.

    Raises:
        FloatingPointError: naming the first non-finite pass (full / sub-network i, its
            width or kept blocks, scale and angle), its losses and the iteration.
    """
    if bool(finite.all()):
        return
    first = int((~finite).nonzero()[0])
    losses = out.full_losses if first == 0 else out.subnet_losses[first - 1]
    spec = None if first == 0 else out.specs[first - 1]
    values = ", ".join(f"{k}={float(v):.4g}" for k, v in losses.items())
    at = f"iteration {iteration}" if iteration is not None else "this iteration"
    raise FloatingPointError(
        f"Loss became infinite or NaN at {at} in {describe_pass(first, spec)}: {values}. "
        "No optimizer step was taken.")


def gradaug_step(model: nn.Module, batch, sampler: SubnetSampler, task, *,
                 backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
                 autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                 iteration: Optional[int] = None) -> GradAugOutput:
    """Run the forward and backward passes of one GradAug iteration (no optimizer step).

    Gradients accumulate into ``.grad``; zero them before and step after. Every pass's
    total loss is checked for NaN / Inf (accumulated on the device, one host sync after the
    last pass), like detectron2 checks the full network's, so the caller's optimizer step
    never runs on a non-finite loss.

    Args:
        model: the network, optionally wrapped in DistributedDataParallel.
        batch: one batch from the data loader.
        sampler: draws this iteration's sub-networks.
        task: :class:`~gradaug_det.gradaug.tasks.DetectionTask` or ``ClassificationTask``.
        backward: how to back-propagate a loss (e.g. through an AMP grad scaler).
        autocast: context manager factory wrapping every forward (AMP).
        iteration: the trainer's iteration, named in errors.

    Returns:
        GradAugOutput with the detached losses of every pass and the sampled specs.

    Raises:
        FloatingPointError: a pass's loss is not finite (see :func:`check_finite_losses`).
    """
    net = unwrap_model(model)
    is_ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    specs = sampler.sample(len(residual_blocks(net)) if sampler.sampling == "depth" else 0)
    last = len(specs)

    def sync(i):
        return model.no_sync() if is_ddp and i < last else contextlib.nullcontext()

    with sync(0):
        with autocast():
            full_losses, teacher = task.full_pass(model, batch)
            loss = _sum(full_losses)
        backward(loss)
    out = GradAugOutput({k: v.detach() for k, v in full_losses.items()}, specs=specs)
    finite = [torch.isfinite(loss.detach())]
    del loss

    for i, spec in enumerate(specs, start=1):
        arch = depth(net, spec.keep) if spec.keep is not None else contextlib.nullcontext()
        with sync(i), width(net, spec.width), arch:
            with autocast():
                losses = task.subnet_pass(model, batch, teacher, spec)
                loss = _sum(losses)
            backward(loss)
        out.subnet_losses.append({k: v.detach() for k, v in losses.items()})
        finite.append(torch.isfinite(loss.detach()))
        del loss, losses
    check_finite_losses(out, torch.stack([f.to(finite[0].device) for f in finite]), iteration)
    return out


def subnet_metrics(out: GradAugOutput) -> Dict[str, float]:
    """Flat scalars of the sub-network passes: ``gradaug/sub{i}/{loss|width|scale|...}``."""
    metrics = {}
    total = sum(float(v) for v in out.full_losses.values())
    for i, (spec, losses) in enumerate(zip(out.specs, out.subnet_losses)):
        prefix = f"gradaug/sub{i}/"
        for k, v in losses.items():
            metrics[prefix + k] = float(v)
        sub_total = sum(float(v) for v in losses.values())
        metrics[prefix + "total_loss"] = sub_total
        total += sub_total
        for k, v in spec.describe().items():
            metrics[prefix + k] = float(v)
    metrics["gradaug/all_passes_loss"] = total
    return metrics
