"""Slimmable FPN for MMDetection 3.x: mmdet's own ``FPN``, runnable at any width.

The twin of the detectron2 side's ``SlimmableFPN`` (``MODEL.SLIMMABLE.SLIM_FPN``): at width
``w < 1`` every lateral, output and extra convolution keeps its leading
``slim_channels(out_channels, w, channel_divisor)`` output channels and the input channels
its producer kept; norm layers (if ``norm_cfg`` is set) the matching slice. Each returned
level holds the sub-network's channels first and zeros after, at ``out_channels``, so RPN
and RoI heads run unchanged. Parameters, names and initialisation are mmdet's ``FPN``'s:
its checkpoints load unchanged, and at width 1.0 the outputs are mmdet's.
"""
from mmcv.cnn import ConvModule
from mmdet.models.necks import FPN
from mmdet.registry import MODELS

from .checks import check_group_norms, check_slimmable_args
from ..slim import SlimmableModule, norm_to_input, pad_channels, slim_conv2d

__all__ = ["SlimmableFPN", "SlimConvModule"]


class SlimConvModule(ConvModule, SlimmableModule):
    """mmcv's ``ConvModule`` (conv / norm / activation in ``order``) with a width."""

    divisor: int = 1
    rule: str = "round"

    def forward(self, x, activate: bool = True, norm: bool = True):
        if self.width == 1.0:
            return super().forward(x, activate=activate, norm=norm)
        for layer in self.order:
            if layer == "conv":
                if self.with_explicit_padding:
                    x = self.padding_layer(x)
                x = slim_conv2d(self.conv, x, self.width, self.divisor, rule=self.rule)
            elif layer == "norm" and norm and self.with_norm:
                x = norm_to_input(self.norm, x)
            elif layer == "act" and activate and self.with_activation:
                x = self.activate(x)
        return x


@MODELS.register_module()
class SlimmableFPN(FPN):
    """mmdet ``FPN`` whose convolutions follow the network width (GradAug sub-networks).

    Args:
        channel_divisor (int): align every sliced channel count to a multiple of it; use the
            backbone's ``channel_divisor``.
        channel_rule (str): the backbone's ``channel_rule`` (the FPN's ratio is 1).
        **kwargs: every argument of mmdet's ``FPN``. ``conv_cfg`` must be None (plain
            convolutions); ``norm_cfg`` may be BN, SyncBN or GN.

    Raises:
        ValueError: naming the argument of ``model.neck`` to change.
    """

    def __init__(self, *args, channel_divisor: int = 1, channel_rule: str = "round", **kwargs):
        check_slimmable_args("SlimmableFPN", "model.neck", kwargs, channel_divisor, channel_rule=channel_rule)
        super().__init__(*args, **kwargs)
        self.divisor = channel_divisor
        self.rule = channel_rule
        # mmdet's constructor built (and will initialise) the ConvModules; they become
        # slimmable in place, keeping their parameters and names.
        for m in self.modules():
            if type(m) is ConvModule:
                m.__class__ = SlimConvModule
                m.width, m.divisor, m.rule = 1.0, channel_divisor, channel_rule
        check_group_norms(self, channel_divisor, "SlimmableFPN", "model.neck", channel_rule)

    def forward(self, inputs):
        """mmdet's FPN levels, each at ``out_channels`` (sub-network channels first)."""
        return tuple(pad_channels(x, self.out_channels) for x in super().forward(inputs))
