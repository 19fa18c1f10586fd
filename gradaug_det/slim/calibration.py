"""Post-hoc BN calibration of a sub-network (as slimmable networks, Yu & Huang 2019, do).

GradAug's sub-networks share one BN layer with sliced parameters; in training they
normalise with batch statistics and never update the running ones, so at evaluation a
width ``w < 1`` normalises with the *full* network's sliced running statistics. The
reference code cannot evaluate a sub-width in eval mode at all. Calibration instead
recomputes, at width ``w``, the running statistics of every BN / SyncBN layer from ``N``
training batches, with fixed weights:

* the model runs in training mode (BN normalises with batch statistics, exactly as in
  a sub-network's training pass) at width ``w`` on each batch, without gradients;
* every BN layer accumulates, over the channels it uses at ``w``, the population
  statistics of its inputs over all batches (fvcore's ``precise_bn`` estimator: mean of
  all N*H*W values per channel, and their biased variance, each batch weighted by its
  size); with several processes the sums are added over all of them first;
* a call without samples (a mask head given 0 RoIs by a batch without objects) adds
  nothing: each batch counts by the samples it actually gave the layer;
* those statistics replace the layer's running statistics in the channels of ``w``; a
  layer that received no sample at all keeps its previous statistics (one warning names
  every such layer).

:func:`calibrated_bn` does this for the duration of a ``with`` block and then restores
every BN buffer, so the full network (width 1.0) and the other widths are unaffected.
fvcore's ``update_bn_stats`` itself cannot be used: a sliced BN layer is not called as a
module (its forward pre-hooks, which fvcore relies on, never run). FrozenBN and GroupNorm
have no statistics to calibrate; a model without trainable-statistics BN is left alone
(one log line).
"""
import contextlib
import itertools
import logging
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from . import functional
from .control import width as width_ctx

__all__ = ["CALIBRATED_SUFFIX", "check_calibration_batches", "batch_norm_layers", "calibrate_bn", "calibrated_bn", "save_bn_buffers", "restore_bn_buffers"]

logger = logging.getLogger(__name__)

#: Suffix naming results evaluated with calibrated BN statistics (``"bbox+bncal"``, ``"0.9+bncal"``).
CALIBRATED_SUFFIX = "+bncal"


def check_calibration_batches(num_batches, key: str = "TEST.BN_CALIBRATION_BATCHES") -> int:
    """Validate a number of calibration batches per width (0 = calibration off).

    Raises:
        ValueError: naming ``key``, if it is not an int >= 0.
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 0:
        raise ValueError(f"{key}={num_batches!r} is invalid: 0 (off) or a number of training batches")
    return num_batches


def batch_norm_layers(model: nn.Module) -> List[nn.modules.batchnorm._BatchNorm]:
    """The BN / SyncBN layers of ``model`` that keep running statistics (FrozenBN, GN excluded)."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def save_bn_buffers(model: nn.Module) -> Dict[nn.Module, Dict[str, torch.Tensor]]:
    """Copies of every BN layer's ``running_mean``, ``running_var``, ``num_batches_tracked``."""
    return {m: {k: b.detach().clone() for k, b in m.named_buffers(recurse=False) if b is not None}
            for m in batch_norm_layers(model)}


def restore_bn_buffers(saved: Dict[nn.Module, Dict[str, torch.Tensor]]) -> None:
    """Write back what :func:`save_bn_buffers` copied."""
    with torch.no_grad():
        for m, buffers in saved.items():
            for k, b in buffers.items():
                getattr(m, k).copy_(b)


class _Accumulator:
    """Per-layer sums of the batches' statistics over the channels used at one width."""

    def __init__(self):
        self.stats: Dict[nn.Module, List] = {}  # norm -> [channel index, n, sum(n*mean), sum(n*meansqr)]

    def __call__(self, norm: nn.Module, x: torch.Tensor, layout: int = 1, keep: Optional[int] = None) -> None:
        channels = norm.num_features
        keep = channels // layout if keep is None else keep
        compute = x.detach()
        n = compute.numel() // compute.shape[1] if compute.dim() > 1 and compute.shape[1] else 0
        if n == 0:  # no sample (e.g. a mask head given 0 RoIs): nothing to add, and its mean would be NaN
            return
        if compute.dtype in (torch.float16, torch.bfloat16):
            compute = compute.float()
        dims = [d for d in range(compute.dim()) if d != 1]
        mean = compute.mean(dim=dims).double()
        meansqr = (compute * compute).mean(dim=dims).double()
        entry = self.stats.get(norm)
        if entry is None:
            index = torch.arange(channels, device=x.device).view(layout, -1)[:, :keep].reshape(-1)
            self.stats[norm] = [index, float(n), mean * n, meansqr * n]
            return
        if entry[0].numel() != mean.numel():
            raise RuntimeError(f"a BN layer ran at two widths ({entry[0].numel()} and {mean.numel()} channels) "
                               "in one calibration; calibrate one width at a time")
        entry[1] += n
        entry[2] += mean * n
        entry[3] += meansqr * n

    def hook(self, norm, inputs):
        """Forward pre-hook of a BN layer called as a module (full width, or not slimmed)."""
        self(norm, inputs[0])

    def reduce(self, layers: List[nn.Module]) -> None:
        """Add the sums of every process (the global population), if several run.

        One ``all_reduce`` over all ``layers`` (the same list, in the same order, on every
        process), each as full-width vectors ``[sum(n*mean), sum(n*meansqr), used, n]``, so a
        layer that saw no sample on some process (no entry there) still reduces correctly.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        device = layers[0].running_mean.device
        parts = []
        for norm in layers:
            c = norm.num_features
            vec = torch.zeros(3 * c + 1, dtype=torch.float64, device=device)
            entry = self.stats.get(norm)
            if entry is not None:
                index = entry[0].to(device)
                vec[index] = entry[2].to(device)
                vec[c + index] = entry[3].to(device)
                vec[2 * c + index] = 1.0
                vec[-1] = entry[1]
            parts.append(vec)
        total = torch.cat(parts)
        dist.all_reduce(total)
        self.stats = {}
        for norm, vec in zip(layers, total.split([3 * m.num_features + 1 for m in layers])):
            c = norm.num_features
            n = float(vec[-1])
            if n > 0:
                index = (vec[2 * c:3 * c] > 0).nonzero().flatten().to(norm.running_mean.device)
                self.stats[norm] = [index, n, vec[:c][index.to(device)], vec[c:2 * c][index.to(device)]]

    def write(self) -> int:
        """Set the running statistics of the used channels of every layer that saw a
        sample; returns how many layers."""
        with torch.no_grad():
            for norm, (index, n, s1, s2) in self.stats.items():
                mean = s1 / n
                var = (s2 / n - mean * mean).clamp(min=0)
                norm.running_mean[index] = mean.to(norm.running_mean)
                norm.running_var[index] = var.to(norm.running_var)
        return len(self.stats)


@contextlib.contextmanager
def _event_storage():
    """A scratch detectron2 EventStorage: detectors log training statistics in their forward."""
    try:
        from detectron2.utils.events import EventStorage
    except ImportError:  # plain torch / mmdet models
        yield
        return
    with EventStorage():
        yield


@torch.no_grad()
def calibrate_bn(model: nn.Module, w: float, batches: Iterable[Any], num_batches: int,
                 forward: Optional[Callable[[nn.Module, Any], Any]] = None) -> int:
    """Recompute the running statistics of ``model``'s BN layers at width ``w``, in place.

    Only the channels the sub-network of width ``w`` uses change; call it inside
    :func:`calibrated_bn` (or save the buffers yourself) to keep the full network's.

    Args:
        model: a model with slimmable layers (a DDP wrapper is looked through).
        w: the width, in (0, 1].
        batches: iterable of training inputs, as the model takes them in training
            (a training data loader; each item is passed to ``forward``).
        num_batches: how many batches to run (> 0).
        forward: ``forward(model, batch)``; default ``model(batch)``.

    Returns:
        The number of BN layers calibrated (0 when the model has no BN with running
        statistics: FrozenBN / GN models need no calibration). A layer that received no
        sample in the ``num_batches`` batches (on any process) is not counted and keeps its
        statistics; one warning names those layers.

    Raises:
        ValueError: if ``num_batches`` < 1 or ``batches`` ends before ``num_batches``.
    """
    if num_batches < 1:
        raise ValueError(f"BN calibration needs at least 1 batch, got {num_batches} (TEST.BN_CALIBRATION_BATCHES)")
    model = getattr(model, "module", model)
    layers = batch_norm_layers(model)
    if not layers:
        logger.info("BN calibration skipped: the model has no BN layer with running statistics "
                    "(FrozenBN / GN keep fixed statistics)")
        return 0
    acc = _Accumulator()
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in layers}
    hooks = [m.register_forward_pre_hook(acc.hook) for m in layers]
    previous = functional._bn_recorder
    done = 0
    try:
        model.train()
        for m in layers:
            # in training mode even where the model's train() keeps BN in eval (mmdet's
            # norm_eval=True): only a training-mode BN is recorded
            m.train()
            m.momentum = 0.0  # module forwards leave the running statistics alone
        functional._bn_recorder = acc
        with width_ctx(model, w), _event_storage():
            for batch in itertools.islice(batches, num_batches):
                model(batch) if forward is None else forward(model, batch)
                done += 1
    finally:
        functional._bn_recorder = previous
        for h in hooks:
            h.remove()
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, mode in modes.items():
            m.training = mode
    if done < num_batches:
        raise ValueError(f"BN calibration asked for {num_batches} batches (TEST.BN_CALIBRATION_BATCHES) but the "
                         f"data ended after {done}")
    acc.reduce(layers)
    count = acc.write()
    names = {m: n for n, m in model.named_modules()}
    unseen = [names[m] for m in layers if m not in acc.stats]
    if unseen:
        logger.warning(f"BN calibration at width {w:g}: {len(unseen)} BN layer(s) received no input in {done} "
                       f"batches and keep their previous running statistics: {', '.join(unseen)}")
    logger.info(f"Calibrated the BN statistics of {count} layers at width {w:g} on {done} batches")
    return count


@contextlib.contextmanager
def calibrated_bn(model: nn.Module, w: float, batches: Iterable[Any], num_batches: int,
                  forward: Optional[Callable[[nn.Module, Any], Any]] = None) -> Iterator[int]:
    """Run the body with BN statistics calibrated at width ``w``; restore every BN buffer after.

    The body typically evaluates the model at width ``w`` (eval mode: BN uses the
    calibrated running statistics). On exit, also when the body raises, every BN buffer
    holds again what it held before, so width 1.0 and other widths are unaffected.

    Args:
        model, w, batches, num_batches, forward: as for :func:`calibrate_bn`.

    Yields:
        The number of BN layers calibrated (0: nothing to calibrate).
    """
    saved = save_bn_buffers(getattr(model, "module", model))
    try:
        yield calibrate_bn(model, w, batches, num_batches, forward)
    finally:
        restore_bn_buffers(saved)
