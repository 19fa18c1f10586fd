"""Slimmable fully-connected layer: the classifier of a slimmable network.

GradAug slims a classifier's *input* features with the network width and never its
output (the classes). A :class:`SlimLinear` has exactly the parameters and names of
``nn.Linear`` (``weight``, ``bias``), and at width 1.0 it runs ``nn.Linear``'s own
forward. At width ``w < 1`` it reads the leading
``slim_channels(in_features, w, divisor)`` input features and the matching columns of
its weight.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .channels import slim_channels
from .control import SlimmableModule

__all__ = ["SlimLinear"]


class SlimLinear(nn.Linear, SlimmableModule):
    """``nn.Linear`` whose input features follow the network width.

    The input may be the sub-network's narrow features (``keep`` of them) or a
    full-size, zero-padded feature vector (``in_features``, as the slimmable ResNet
    returns); in the latter case the leading ``keep`` features are used.

    Args:
        in_features: full number of input features.
        out_features: number of outputs (classes); never slimmed.
        bias: whether the layer has a bias.
        divisor: channel alignment, ``MODEL.SLIMMABLE.CHANNEL_DIVISOR``; must be the
            one of the layer producing the input so both keep the same features.
        rule: ``MODEL.SLIMMABLE.CHANNEL_RULE``, likewise the producer's; the input
            features have channel ratio 1 (block outputs) under ``"reference"``.
        **kwargs: ``device`` / ``dtype``, as for ``nn.Linear``.

    Attributes:
        width (float): active width, set by :func:`gradaug_det.set_width`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, divisor: int = 1,
                 rule: str = "round", **kwargs):
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self.width = 1.0
        self.divisor = divisor
        self.rule = rule

    def active_in_features(self) -> int:
        """Number of input features used at the current width."""
        return slim_channels(self.in_features, self.width, self.divisor, self.rule)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.width == 1.0:
            return super().forward(x)
        keep = self.active_in_features()
        if x.shape[-1] == self.in_features and keep < self.in_features:
            x = x.narrow(-1, 0, keep)  # full-size (zero-padded) input
        elif x.shape[-1] != keep:
            raise RuntimeError(
                f"SlimLinear at width {self.width} expects {keep} or {self.in_features} input "
                f"features, got {x.shape[-1]}"
            )
        return F.linear(x, self.weight.narrow(1, 0, keep), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", width={self.width}, divisor={self.divisor}, rule={self.rule}"
