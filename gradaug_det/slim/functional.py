"""Channel slicing in plain torch: weights, activations and normalisation layers.

Everything a slimmable layer does at width ``w < 1`` besides choosing how many channels
to keep (:mod:`.channels`): cut the leading block of a weight, keep the leading channels
of an activation (per channel group for ResNeXt layouts), and normalise the kept
channels with the matching slice of a BN / SyncBN / FrozenBN / GN layer. Both the
detectron2 layers (:mod:`.layers`) and the MMDetection adapter
(:mod:`gradaug_det.mmdet`) use these functions; nothing here imports detectron2.
"""
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .channels import slim_channels

__all__ = ["select_channels", "leading_block", "slim_norm", "norm_to_input", "slim_conv2d", "pad_channels"]

_BATCH_NORMS = (nn.modules.batchnorm._BatchNorm,)

# Set by gradaug_det.slim.calibration while it recomputes BN statistics at a sub-width:
# called as ``(norm, x, layout, keep)`` for every sliced training-mode BN.
_bn_recorder = None


def _loaded_types(*paths):
    """Classes ``module:Name`` of modules that are already imported (others cannot have instances)."""
    out = []
    for path in paths:
        module, name = path.split(":")
        mod = sys.modules.get(module)
        if mod is not None and hasattr(mod, name):
            out.append(getattr(mod, name))
    return tuple(out)


def _frozen_batch_norms():
    # detectron2's and torchvision's FrozenBatchNorm2d: fixed statistics and affine buffers
    return _loaded_types("detectron2.layers.batch_norm:FrozenBatchNorm2d", "torchvision.ops.misc:FrozenBatchNorm2d")


def _sync_batch_norms():
    return (nn.SyncBatchNorm,) + _loaded_types("detectron2.layers.batch_norm:NaiveSyncBatchNorm")


class _AllReduceSum(torch.autograd.Function):
    """Sum a tensor over the workers of ``group``; the gradient is summed likewise."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _sync_group(norm: nn.Module):
    """The process group ``norm`` synchronises over, or None when it computes local statistics."""
    if not isinstance(norm, _sync_batch_norms()) or not dist.is_available() or not dist.is_initialized():
        return None
    group = getattr(norm, "process_group", None) or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _sync_batch_norm(x, weight, bias, eps, group, weighted):
    """Training-mode batch norm over the batch of every worker of ``group``.

    Args:
        weighted: weight each worker by its batch size (``nn.SyncBatchNorm``,
            ``NaiveSyncBatchNorm(stats_mode="N")``: the exact global statistics); otherwise
            average the workers' statistics (``NaiveSyncBatchNorm(stats_mode="")``).
    """
    n, c = x.shape[0], x.shape[1]
    compute = x.float() if x.dtype == torch.float16 else x
    mean = compute.mean(dim=[0, 2, 3]) if n > 0 else compute.new_zeros(c) + compute.sum()
    meansqr = (compute * compute).mean(dim=[0, 2, 3]) if n > 0 else compute.new_zeros(c) + compute.sum()
    if weighted:
        vec = torch.cat([mean * n, meansqr * n, mean.new_full((1,), float(n))])
        vec = _AllReduceSum.apply(vec, group)
        total = vec[-1].detach().clamp(min=1)
        mean, meansqr = torch.split(vec[:-1] / total, c)
    else:
        vec = _AllReduceSum.apply(torch.cat([mean, meansqr]), group) / dist.get_world_size(group)
        mean, meansqr = torch.split(vec, c)
    var = (meansqr - mean * mean).clamp(min=0)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    out = compute * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    return out.to(x.dtype)


class _LeadingBlock(torch.autograd.Function):
    """``t[:rows, :cols]`` as a new contiguous tensor, its gradient scattered back in one copy.

    Slicing a weight with two ``narrow`` views costs, per step, a strided copy before the
    convolution and in its backward, plus two zero-filled full-size gradients (one per
    view); this does one copy each way.
    """

    @staticmethod
    def forward(ctx, t, rows, cols):
        ctx.shape, ctx.rows, ctx.cols = t.shape, rows, cols
        return t[:rows, :cols].clone(memory_format=torch.contiguous_format)

    @staticmethod
    def backward(ctx, grad):
        full = grad.new_zeros(ctx.shape)
        full[: ctx.rows, : ctx.cols] = grad
        return full, None, None


def leading_block(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``t[:rows, :cols]`` of a weight, contiguous, with a one-copy backward.

    Under ``torch.jit`` tracing (fvcore FLOP counts, export) it is a plain slice, since
    the tracer rejects custom autograd Functions.
    """
    if (rows, cols) == tuple(t.shape[:2]):
        return t
    if torch.jit.is_tracing():
        return t[:rows, :cols]
    return _LeadingBlock.apply(t, rows, cols)


def select_channels(t: torch.Tensor, dim: int, layout: int, keep: int) -> torch.Tensor:
    """Keep the leading ``keep`` channels of each of ``layout`` groups along ``dim``."""
    if layout == 1:
        return t.narrow(dim, 0, keep)
    shape = list(t.shape)
    grouped = t.reshape(shape[:dim] + [layout, shape[dim] // layout] + shape[dim + 1 :])
    grouped = grouped.narrow(dim + 1, 0, keep)
    return grouped.reshape(shape[:dim] + [layout * keep] + shape[dim + 1 :])


def slim_norm(norm: nn.Module, x: torch.Tensor, layout: int, keep: int) -> torch.Tensor:
    """Apply ``norm`` to a slimmed activation, slicing its parameters to match.

    * FrozenBN slices its buffers.
    * BN / SyncBN in eval mode normalise with the sliced running statistics; in
      training mode they use batch statistics and never update the running ones
      (GradAug reference semantics for sub-networks). SyncBN (``nn.SyncBatchNorm``,
      detectron2's ``NaiveSyncBatchNorm``) takes those statistics over the batch of
      every worker, as it does at full width.
    * GroupNorm keeps whole groups only (checked at build time by
      :func:`gradaug_det.modeling.resnet.check_slimmable_norms`).

    Args:
        norm: the full-width normalisation module.
        x: activation with ``layout * keep`` channels.
        layout: channel groups of the layout (see module docstring).
        keep: channels kept per layout group.
    """

    def cut(t):
        return None if t is None else select_channels(t, 0, layout, keep)

    if isinstance(norm, _frozen_batch_norms()):
        scale = cut(norm.weight) * (cut(norm.running_var) + norm.eps).rsqrt()
        bias = cut(norm.bias) - cut(norm.running_mean) * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + bias.view(1, -1, 1, 1).to(x.dtype)
    if isinstance(norm, _BATCH_NORMS):
        if norm.training:
            if _bn_recorder is not None:  # post-hoc BN calibration (gradaug_det.slim.calibration)
                _bn_recorder(norm, x, layout, keep)
            group = _sync_group(norm)
            if group is not None:
                weighted = getattr(norm, "_stats_mode", "N") == "N"
                return _sync_batch_norm(x, cut(norm.weight), cut(norm.bias), norm.eps, group, weighted)
            return F.batch_norm(x, None, None, cut(norm.weight), cut(norm.bias), True, 0.0, norm.eps)
        return F.batch_norm(
            x, cut(norm.running_mean), cut(norm.running_var), cut(norm.weight), cut(norm.bias),
            False, 0.0, norm.eps,
        )
    if isinstance(norm, nn.GroupNorm):
        per_group = norm.num_channels // norm.num_groups
        channels = x.shape[1]
        return F.group_norm(x, channels // per_group, cut(norm.weight), cut(norm.bias), norm.eps)
    raise TypeError(f"{type(norm).__name__} cannot be slimmed; use FrozenBN, BN, SyncBN or GN")


def norm_to_input(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a per-channel norm layer to ``x``, slicing it when ``x`` has fewer channels.

    For plain (un-grouped) layouts the kept channels are the leading ones, so the
    incoming channel count says everything: at full width this is ``norm(x)`` itself.
    """
    full = getattr(norm, "num_features", None) or getattr(norm, "num_channels", None)
    if full is None or x.shape[1] == full:
        return norm(x)
    return slim_norm(norm, x, 1, x.shape[1])


def slim_conv2d(conv: nn.Conv2d, x: torch.Tensor, width: float, divisor: int = 1,
                slim_out: bool = True, rule: str = "round", ratio: float = 1.0) -> torch.Tensor:
    """Run ``conv`` as its sub-network of ``width`` on ``x`` (an ``nn.Conv2d``, groups 1).

    The input channels are those of ``x`` (the leading channels the producer kept, or
    all of them for the image); the output keeps
    ``slim_channels(out, width, divisor, rule, ratio)`` leading channels (all when
    ``slim_out`` is False). At width 1.0 with a full input it is ``conv(x)``.

    Args:
        conv: the full-width convolution; weight (C_out, C_in, kH, kW).
        x: (N, c_in, H, W) input, ``c_in <= C_in``.
        width: the width, in (0, 1].
        divisor, rule, ratio: the channel rule's arguments (:func:`slim_channels`).

    Returns:
        (N, c_out, H', W') output.
    """
    cin = x.shape[1]
    cout = slim_channels(conv.out_channels, width, divisor, rule, ratio) if slim_out else conv.out_channels
    if cin == conv.in_channels and cout == conv.out_channels:
        return conv(x)
    if cin > conv.in_channels:
        raise RuntimeError(f"{type(conv).__name__} has {conv.in_channels} input channels, got {cin}")
    weight = leading_block(conv.weight, cout, cin)
    bias = None if conv.bias is None else conv.bias[:cout]
    return conv._conv_forward(x, weight, bias)


def pad_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Zero-pad a slimmed feature map ``x`` (N, c, H, W) to ``channels`` channels."""
    missing = channels - x.shape[1]
    return x if missing == 0 else F.pad(x, (0, 0, 0, 0, 0, missing))
