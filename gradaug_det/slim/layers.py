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
from detectron2.layers import Conv2d

from .channels import slim_channels
from .control import SlimmableModule
from .functional import ConvSlice, conv2d_slice, conv_slice, select_channels, slim_norm

__all__ = ["SlimConv2d"]


class SlimConv2d(Conv2d, SlimmableModule):
    """``detectron2.layers.Conv2d`` with a settable width (see module docstring).

    Attributes:
        width (float): active width, set by :func:`gradaug_det.set_width`.
        slim_in (bool): whether the input channels follow the width (False for the
            stem, whose input is the image).
        slim_out (bool): whether the output channels follow the width.
        in_layout, out_layout (int): channel groups of the input / output layout.
        divisor (int): channel alignment, ``MODEL.SLIMMABLE.CHANNEL_DIVISOR``.
        rule (str): ``MODEL.SLIMMABLE.CHANNEL_RULE`` (see :mod:`gradaug_det.slim.channels`).
        in_ratio, out_ratio (float): channel ratios of the input (its producer's) and of
            the output, read by the ``"reference"`` rule (0.25 for the stem and the
            bottleneck's inner layers, else 1).
    """

    def __init__(self, *args, slim_in=True, slim_out=True, in_layout=1, out_layout=1, divisor=1,
                 rule="round", in_ratio=1.0, out_ratio=1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.width = 1.0
        self.slim_in = slim_in
        self.slim_out = slim_out
        self.in_layout = in_layout
        self.out_layout = out_layout
        self.divisor = divisor
        self.rule = rule
        self.in_ratio = in_ratio
        self.out_ratio = out_ratio

    @classmethod
    def convert(cls, conv: Conv2d, **slim_kwargs) -> "SlimConv2d":
        """Return a SlimConv2d that shares ``conv``'s parameters, norm and activation.

        ``conv`` is a detectron2 ``Conv2d`` or a plain ``torch.nn.Conv2d`` (no norm or
        activation; e.g. RetinaNet's P6/P7), same state-dict names either way."""
        slim = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            bias=conv.bias is not None, padding_mode=conv.padding_mode, norm=getattr(conv, "norm", None),
            activation=getattr(conv, "activation", None), device="meta", **slim_kwargs,
        )
        slim.weight = conv.weight
        slim.bias = conv.bias
        return slim

    def _keep(self, channels: int, layout: int, ratio: float) -> int:
        """Channels kept per layout group at the current width."""
        per_group = channels // layout
        divisor = self.divisor if layout == 1 else 1
        return slim_channels(per_group, self.width, divisor, self.rule, ratio)

    def active_channels(self):
        """Return ``(in, out)`` channel counts used at the current width."""
        cin = (self.in_layout * self._keep(self.in_channels, self.in_layout, self.in_ratio)
               if self.slim_in else self.in_channels)
        cout = (
            self.out_layout * self._keep(self.out_channels, self.out_layout, self.out_ratio)
            if self.slim_out else self.out_channels
        )
        return cin, cout

    def channel_slice(self) -> ConvSlice:
        """The :class:`~gradaug_det.slim.functional.ConvSlice` used at the current width
        (what the forward convolves with and what pruning keeps)."""
        cin, cout = self.active_channels()
        return conv_slice(self, cin, cout, self.in_layout if self.slim_in else 1,
                          self.out_layout if self.slim_out else 1)

    def forward(self, x):
        if self.width == 1.0:
            return super().forward(x)
        cin = self.active_channels()[0]
        if x.shape[1] == self.in_channels and cin < self.in_channels:
            x = select_channels(x, 1, self.in_layout, cin // self.in_layout)  # full-size (zero-padded) input
        elif x.shape[1] != cin:
            raise RuntimeError(
                f"SlimConv2d at width {self.width} expects {cin} or {self.in_channels} input "
                f"channels, got {x.shape[1]}"
            )
        s = self.channel_slice()
        x = conv2d_slice(self, x, s)
        if self.norm is not None:
            x = slim_norm(self.norm, x, s.out_layout, s.keep_out) if self.slim_out else self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def extra_repr(self):
        rule = "" if self.rule == "round" else f", rule={self.rule}, ratios=({self.in_ratio:g}, {self.out_ratio:g})"
        return super().extra_repr() + f", width={self.width}, slim_in={self.slim_in}, slim_out={self.slim_out}{rule}"
