"""Channel slicing in plain torch: weights, activations and normalisation layers.

Everything a slimmable layer does at width ``w < 1`` besides choosing how many channels
to keep (:mod:`.channels`): the part of a convolution a sub-network keeps
(:class:`ConvSlice`: the one definition of weight slicing, used by the forward of the
detectron2 layers (:mod:`.layers`), of the MMDetection adapter
(:mod:`gradaug_det.mmdet`) and by pruning (:mod:`gradaug_det.checkpoint.prune`)), the
leading channels of an activation (per channel group for ResNeXt layouts), and the
matching slice of a BN / SyncBN / FrozenBN / GN layer. Nothing here imports detectron2.
"""
import contextlib
import sys
from typing import Dict, NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .channels import slim_channels

__all__ = [
    "select_channels", "ConvSlice", "conv_slice", "sliced_conv_state", "sliced_input_weight", "conv2d_slice",
    "slim_norm",
    "norm_to_input", "slim_conv2d", "pad_channels",
]

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


def _kept_view(t: torch.Tensor, dim: int, layout: int, keep: int) -> torch.Tensor:
    """View of ``t`` with ``dim`` split into ``(layout, dim_size // layout)`` and the second
    part narrowed to its leading ``keep`` entries (no copy)."""
    return t.unflatten(dim, (layout, t.shape[dim] // layout)).narrow(dim + 1, 0, keep)


def select_channels(t: torch.Tensor, dim: int, layout: int, keep: int) -> torch.Tensor:
    """Keep the leading ``keep`` channels of each of ``layout`` groups along ``dim``.

    A view for ``layout == 1``; a copy otherwise.
    """
    if layout == 1:
        return t.narrow(dim, 0, keep)
    return _kept_view(t, dim, layout, keep).flatten(dim, dim + 1)


class ConvSlice(NamedTuple):
    """The part of a convolution a sub-network keeps: the one definition of conv slicing.

    Output channels (weight dim 0, bias, the norm's per-channel tensors): the leading
    ``keep_out`` of each of ``out_layout`` channel groups. Weight dim 1 (the inputs one
    convolution group reads): the leading ``keep_in`` of each of ``in_layout`` groups. The
    runtime layers (:class:`~gradaug_det.slim.SlimConv2d`, :func:`slim_conv2d`) convolve
    with exactly :meth:`weight` / :meth:`out`, and pruning
    (:mod:`gradaug_det.checkpoint.prune`) stores exactly them (:func:`sliced_conv_state`).
    Build one with :func:`conv_slice`.
    """

    out_layout: int
    keep_out: int
    in_layout: int
    keep_in: int

    @property
    def plain(self) -> bool:
        """Whether the kept weight is one leading block ``[:out_channels, :in_channels]``."""
        return self.out_layout == 1 and self.in_layout == 1

    @property
    def out_channels(self) -> int:
        """Output channels kept."""
        return self.out_layout * self.keep_out

    @property
    def weight_in_channels(self) -> int:
        """Size of the kept weight's dim 1."""
        return self.in_layout * self.keep_in

    def keeps_all(self, weight: torch.Tensor) -> bool:
        """Whether this slice is all of ``weight`` (width 1.0)."""
        return (self.out_channels, self.weight_in_channels) == tuple(weight.shape[:2])

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """The kept weight, ``(out_channels, weight_in_channels, *kernel)``; a view when
        :attr:`plain`, else a copy."""
        t = select_channels(t, 0, self.out_layout, self.keep_out)
        return select_channels(t, 1, self.in_layout, self.keep_in)

    def out(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The kept entries of a per-output-channel tensor (bias, norm parameters and
        statistics; dim 0); None stays None."""
        return None if t is None else select_channels(t, 0, self.out_layout, self.keep_out)

    def full_weight_grad(self, grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """A zero gradient of the full weight's ``shape`` holding ``grad`` (the kept weight's
        gradient) in the kept entries: the inverse of :meth:`weight`."""
        full = grad.new_zeros(shape)
        view = _kept_view(_kept_view(full, 0, self.out_layout, self.keep_out), 2, self.in_layout, self.keep_in)
        view.copy_(grad.reshape(view.shape))
        return full

    def full_out_grad(self, grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """A zero gradient of a full per-output-channel tensor's ``shape`` holding ``grad``
        in the kept entries: the inverse of :meth:`out`."""
        full = grad.new_zeros(shape)
        view = _kept_view(full, 0, self.out_layout, self.keep_out)
        view.copy_(grad.reshape(view.shape))
        return full


def conv_slice(conv: nn.Conv2d, cin: int, cout: int, in_layout: int = 1, out_layout: int = 1) -> ConvSlice:
    """The :class:`ConvSlice` of ``conv`` keeping ``cin`` input and ``cout`` output channels.

    Args:
        conv: the full-width convolution; weight ``(C_out, C_in / groups, kH, kW)``.
        cin, cout: channels kept, ``cin <= C_in``, ``cout <= C_out``.
        in_layout, out_layout: channel groups of the input / output layout (1 = plain
            leading channels; ResNeXt bottlenecks keep the leading channels of every group).
            A grouped convolution (``conv.groups > 1``) that is sliced needs the layout of
            the sliced side equal to ``groups``: each convolution group then reads (and
            writes) the leading channels of its own group.

    Raises:
        ValueError: if the counts do not divide into the layouts or groups.
    """
    groups = conv.groups
    full_in, full_out = conv.weight.shape[1] * groups, conv.weight.shape[0]
    for side, kept, full, layout in (("input", cin, full_in, in_layout), ("output", cout, full_out, out_layout)):
        if kept == full:
            continue
        if kept > full or kept % layout or full % layout or (groups > 1 and layout != groups):
            raise ValueError(
                f"cannot keep {kept} of the {full} {side} channels of {conv} with a layout of {layout} "
                f"group(s) (the layout must divide both, and equal the convolution's groups={groups})"
            )
    if cout == full_out:
        out_layout = 1
    if groups > 1:  # weight dim 1 holds one convolution group's inputs
        return ConvSlice(out_layout, cout // out_layout, 1, cin // groups)
    if cin == full_in:
        in_layout = 1
    return ConvSlice(out_layout, cout // out_layout, in_layout, cin // in_layout)


def sliced_conv_state(conv: nn.Module, s: ConvSlice) -> Dict[str, torch.Tensor]:
    """The state of ``conv`` (and of its ``norm``, if any) that the slice ``s`` keeps.

    Args:
        conv: a convolution with ``weight``, ``bias`` and optionally a ``norm`` submodule
            (a detectron2 ``Conv2d`` / :class:`~gradaug_det.slim.SlimConv2d`).
        s: the slice, from :func:`conv_slice`.

    Returns:
        ``conv.state_dict()`` with the weight cut by :meth:`ConvSlice.weight` and the bias
        and every per-channel tensor of ``norm`` by :meth:`ConvSlice.out` (views when
        the slice is plain).
    """
    out = {}
    full_out = conv.weight.shape[0]
    for key, t in conv.state_dict().items():
        if key == "weight":
            t = s.weight(t)
        elif (key == "bias" or key.startswith("norm.")) and t.dim() >= 1 and t.shape[0] == full_out:
            t = s.out(t)
        out[key] = t
    return out


def sliced_input_weight(layer: nn.Module, channels: int, keep: int) -> torch.Tensor:
    """The weight of ``layer`` reading only the leading ``keep`` of its ``channels`` input channels.

    Pruning cuts the dead inputs of the layers that read a slimmed, zero-padded feature map
    (the heads behind a slimmable FPN, an FPN behind a slimmable ResNet): the padded channels
    are zero, so dropping their weights leaves the output unchanged.

    Args:
        layer: ``nn.Conv2d`` (weight ``(C_out, C_in, kH, kW)``, groups 1),
            ``nn.ConvTranspose2d`` (weight ``(C_in, C_out, kH, kW)``, groups 1) or
            ``nn.Linear`` reading a flattened ``(channels, *spatial)`` map (weight
            ``(out, channels * area)``, channel-major as ``torch.flatten`` orders it).
        channels: the input's full channel count.
        keep: the leading channels kept.

    Returns:
        The cut weight (a view or a copy): dim 1 (conv), dim 0 (transposed conv) or the
        ``keep * area`` leading inputs (linear) kept.

    Raises:
        ValueError: a grouped convolution, or a linear layer whose inputs are not a flattened
            ``channels``-channel map.
        TypeError: another layer type.
    """
    t = layer.weight
    if isinstance(layer, nn.ConvTranspose2d):  # weight (C_in, C_out / groups, kH, kW)
        if layer.groups != 1:
            raise ValueError(f"cannot prune the input of a grouped convolution {layer}")
        return select_channels(t, 0, 1, keep)
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise ValueError(f"cannot prune the input of a grouped convolution {layer}")
        return conv_slice(layer, keep, layer.out_channels).weight(t)
    if isinstance(layer, nn.Linear):
        if layer.in_features % channels:
            raise ValueError(f"{layer} does not read a flattened {channels}-channel feature map")
        return select_channels(t.reshape(t.shape[0], channels, -1), 1, 1, keep).reshape(t.shape[0], -1)
    raise TypeError(f"cannot prune the input of {type(layer).__name__}")


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast would run a convolution on ``x`` in, or None (autocast off, or
    ``x`` not eligible: float64 or not floating)."""
    device = x.device.type
    if not x.is_floating_point() or x.dtype == torch.float64 or not torch.amp.is_autocast_available(device):
        return None
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


class _SlicedConv2d(torch.autograd.Function):
    """A convolution with the part ``s`` of a weight, saving the *full* weight for backward.

    Autograd through ``F.conv2d(x, s.weight(weight))`` keeps the sliced (contiguous) copy of
    every convolution's weight alive from its forward to its backward. This saves the full
    weight (a parameter, alive anyway), slices it again in backward, and writes the weight
    and bias gradients into the kept entries of zero full-size gradients. The kernels see
    exactly the tensors (values, dtype, layout) of the autograd path, so the gradients are
    the same to the bit. Under autocast, the inputs are cast as autocast casts
    ``F.conv2d``'s. First-order gradients only.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, s, stride, padding, dilation, groups):
        dtype = _autocast_dtype(x)
        ctx.x_dtype, ctx.bias_dtype = x.dtype, None if bias is None else bias.dtype
        w, b = s.weight(weight).contiguous(), s.out(bias)
        if dtype is not None:
            x, w = x.to(dtype), w.to(dtype)
            b = None if b is None else b.to(dtype)
        with torch.autocast(x.device.type, enabled=False) if dtype is not None else contextlib.nullcontext():
            out = F.conv2d(x, w, b, stride, padding, dilation, groups)
        ctx.save_for_backward(x, weight)
        ctx.conf = (s, stride, padding, dilation, groups, dtype, None if bias is None else bias.shape)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        s, stride, padding, dilation, groups, dtype, bias_shape = ctx.conf
        w = s.weight(weight).contiguous()
        if dtype is not None:
            w = w.to(dtype)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out, x, w, None if bias_shape is None else [s.out_channels], _pair(stride), _pair(padding),
            _pair(dilation), False, [0, 0], groups, [need_x, need_w, need_b and bias_shape is not None],
        )
        if grad_x is not None and ctx.x_dtype != grad_x.dtype:
            grad_x = grad_x.to(ctx.x_dtype)
        if grad_w is not None:
            grad_w = s.full_weight_grad(grad_w.to(weight.dtype), weight.shape)
        if grad_b is not None:
            grad_b = s.full_out_grad(grad_b.to(ctx.bias_dtype), bias_shape)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def _pair(v):
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


def conv2d_slice(conv: nn.Conv2d, x: torch.Tensor, s: ConvSlice) -> torch.Tensor:
    """Convolve ``x`` with the part ``s`` of ``conv``'s weight and bias (no norm, no activation).

    With all of the weight (width 1.0) this is ``conv``'s own convolution. Otherwise, when
    a gradient is needed, :class:`_SlicedConv2d` runs it without keeping a sliced copy of
    the weight for backward (its gradients are exactly those of autograd through the
    slice); without gradients (eval, ``torch.no_grad``) and under ``torch.jit`` tracing
    (fvcore FLOP counts) it is ``conv._conv_forward`` on the sliced weight.

    Args:
        conv: the full-width convolution (its stride, padding, dilation, groups and
            padding mode are used).
        x: ``(N, s.weight_in_channels * conv.groups, H, W)`` input.
        s: the slice, from :func:`conv_slice`.

    Returns:
        ``(N, s.out_channels, H', W')`` output.
    """
    weight, bias = conv.weight, conv.bias
    if s.keeps_all(weight):
        return conv._conv_forward(x, weight, bias)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    if not needs_grad or torch.jit.is_tracing() or isinstance(conv.padding, str):
        return conv._conv_forward(x, s.weight(weight).contiguous(), s.out(bias))
    padding = conv.padding
    if conv.padding_mode != "zeros":  # as nn.Conv2d._conv_forward
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    return _SlicedConv2d.apply(x, weight, bias, s, conv.stride, padding, conv.dilation, conv.groups)


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
    return conv2d_slice(conv, x, conv_slice(conv, cin, cout))


def pad_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Zero-pad a slimmed feature map ``x`` (N, c, H, W) to ``channels`` channels."""
    missing = channels - x.shape[1]
    return x if missing == 0 else F.pad(x, (0, 0, 0, 0, 0, missing))
