"""Slimmable convolution: a detectron2 ``Conv2d`` whose active width can shrink.

A :class:`SlimConv2d` has exactly the parameters, buffers and names of
``detectron2.layers.Conv2d`` (``weight``, ``bias``, ``norm.*``), so checkpoints move
freely between stock detectron2 and this project. At width 1.0 it *is* the stock
layer (the same forward code runs). At width ``w < 1`` it slices its weight to the
leading output channels given by :func:`slim_channels` and to the input channels its
producer kept, *before* convolving, so the compute really shrinks.

Channel layout: in ResNeXt-style grouped bottlenecks the channels come in ``G``
groups; a sub-network then keeps the leading channels *of every group* (so that the
grouped convolution stays a true sub-network of the full one). ``in_layout`` /
``out_layout`` give that number of groups (1 = plain leading channels).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from detectron2.layers import Conv2d, FrozenBatchNorm2d, NaiveSyncBatchNorm

from .channels import slim_channels
from .control import SlimmableModule

__all__ = ["SlimConv2d", "slim_norm"]

_BATCH_NORMS = (nn.modules.batchnorm._BatchNorm,)
_SYNC_BATCH_NORMS = (nn.SyncBatchNorm, NaiveSyncBatchNorm)


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
    if not isinstance(norm, _SYNC_BATCH_NORMS) or not dist.is_available() or not dist.is_initialized():
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


def _select(t: torch.Tensor, dim: int, layout: int, keep: int) -> torch.Tensor:
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
        return None if t is None else _select(t, 0, layout, keep)

    if isinstance(norm, FrozenBatchNorm2d):
        scale = cut(norm.weight) * (cut(norm.running_var) + norm.eps).rsqrt()
        bias = cut(norm.bias) - cut(norm.running_mean) * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + bias.view(1, -1, 1, 1).to(x.dtype)
    if isinstance(norm, _BATCH_NORMS):
        if norm.training:
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


class SlimConv2d(Conv2d, SlimmableModule):
    """``detectron2.layers.Conv2d`` with a settable width (see module docstring).

    Attributes:
        width (float): active width, set by :func:`gradaug_det.set_width`.
        slim_in (bool): whether the input channels follow the width (False for the
            stem, whose input is the image).
        slim_out (bool): whether the output channels follow the width.
        in_layout, out_layout (int): channel groups of the input / output layout.
        divisor (int): channel alignment, ``MODEL.SLIMMABLE.CHANNEL_DIVISOR``.
    """

    def __init__(self, *args, slim_in=True, slim_out=True, in_layout=1, out_layout=1, divisor=1,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.width = 1.0
        self.slim_in = slim_in
        self.slim_out = slim_out
        self.in_layout = in_layout
        self.out_layout = out_layout
        self.divisor = divisor

    @classmethod
    def convert(cls, conv: Conv2d, **slim_kwargs) -> "SlimConv2d":
        """Return a SlimConv2d that shares ``conv``'s parameters, norm and activation."""
        slim = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            bias=conv.bias is not None, padding_mode=conv.padding_mode, norm=conv.norm,
            activation=conv.activation, device="meta", **slim_kwargs,
        )
        slim.weight = conv.weight
        slim.bias = conv.bias
        return slim

    def _keep(self, channels: int, layout: int) -> int:
        """Channels kept per layout group at the current width."""
        per_group = channels // layout
        divisor = self.divisor if layout == 1 else 1
        return slim_channels(per_group, self.width, divisor)

    def active_channels(self):
        """Return ``(in, out)`` channel counts used at the current width."""
        cin = self.in_layout * self._keep(self.in_channels, self.in_layout) if self.slim_in else self.in_channels
        cout = (
            self.out_layout * self._keep(self.out_channels, self.out_layout)
            if self.slim_out else self.out_channels
        )
        return cin, cout

    def forward(self, x):
        if self.width == 1.0:
            return super().forward(x)
        weight = self.weight
        cin = x.shape[1]
        if self.slim_in:
            keep_in = self._keep(self.in_channels, self.in_layout)
            cin = self.in_layout * keep_in
            if x.shape[1] == self.in_channels and cin < self.in_channels:
                x = _select(x, 1, self.in_layout, keep_in)  # full-size (zero-padded) input
            elif x.shape[1] != cin:
                raise RuntimeError(
                    f"SlimConv2d at width {self.width} expects {cin} or {self.in_channels} input "
                    f"channels, got {x.shape[1]}"
                )
        keep_out = self._keep(self.out_channels, self.out_layout) if self.slim_out else self.out_channels
        cout = self.out_layout * keep_out if self.slim_out else self.out_channels
        bias = self.bias
        if self.groups == 1 and (self.out_layout == 1 or not self.slim_out) and (
                self.in_layout == 1 or not self.slim_in):
            # plain layout: one leading block of the weight
            if (cout, cin) != tuple(weight.shape[:2]):
                if torch.jit.is_tracing():  # the tracer (fvcore FLOP counts, export) rejects Functions
                    weight = weight[:cout, :cin]
                else:
                    weight = _LeadingBlock.apply(weight, cout, cin)
            if bias is not None and cout < self.out_channels:
                bias = bias[:cout]
        else:
            if self.slim_in:
                if self.groups == 1:
                    weight = _select(weight, 1, self.in_layout, keep_in)
                else:  # each convolution group reads the leading channels of its own group
                    weight = weight.narrow(1, 0, cin // self.groups)
            if self.slim_out:
                weight = _select(weight, 0, self.out_layout, keep_out)
                bias = None if bias is None else _select(bias, 0, self.out_layout, keep_out)
        x = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        if self.norm is not None:
            if self.slim_out:
                x = slim_norm(self.norm, x, self.out_layout, keep_out)
            else:
                x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def extra_repr(self):
        return super().extra_repr() + f", width={self.width}, slim_in={self.slim_in}, slim_out={self.slim_out}"
