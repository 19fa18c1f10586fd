"""Slimmable ResNet-FPN backbone, a drop-in replacement of ``build_resnet_fpn_backbone``."""
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool

from ..config import slimmable_config
from ..slim import SlimConv2d, pad_channels
from .resnet import check_slimmable_norms, make_slimmable_resnet

__all__ = ["SlimmableFPN", "build_slimmable_resnet_fpn_backbone", "fpn_config_kwargs"]


class SlimmableFPN(FPN):
    """detectron2's ``FPN`` whose lateral and output convolutions follow the width.

    At width ``w < 1`` every pyramid level holds the sub-network's leading channels
    and zeros after, at ``out_channels``, so RPN and RoI heads run unchanged.

    Args:
        slim (bool): if False the FPN stays at full width (only the bottom-up
            network is slimmed); ``MODEL.SLIMMABLE.SLIM_FPN``.
        divisor (int): ``MODEL.SLIMMABLE.CHANNEL_DIVISOR``.
        **kwargs: arguments of detectron2's ``FPN``.
    """

    def __init__(self, *, slim: bool = True, divisor: int = 1, **kwargs):
        super().__init__(**kwargs)
        if not slim:
            return
        for convs, kind in ((self.lateral_convs, "lateral"), (self.output_convs, "output")):
            for i, conv in enumerate(convs):
                name = next(n for n, m in self.named_children() if m is conv)
                convs[i] = SlimConv2d.convert(conv, divisor=divisor)
                setattr(self, name, convs[i])

    def forward(self, x):
        outputs = super().forward(x)
        return {k: pad_channels(v, self._out_feature_channels[k]) for k, v in outputs.items()}


def fpn_config_kwargs(cfg) -> dict:
    """The ``FPN`` arguments that detectron2's ``build_resnet_fpn_backbone`` reads from
    ``MODEL.FPN.*`` (with a ``LastLevelMaxPool`` top block); ``bottom_up`` is the caller's."""
    f = cfg.MODEL.FPN
    return dict(in_features=f.IN_FEATURES, out_channels=f.OUT_CHANNELS, norm=f.NORM,
                top_block=LastLevelMaxPool(), fuse_type=f.FUSE_TYPE)


@BACKBONE_REGISTRY.register()
def build_slimmable_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> SlimmableFPN:
    """Build a slimmable ResNet-FPN from the same keys as ``build_resnet_fpn_backbone``.

    Reads ``MODEL.RESNETS.*``, ``MODEL.FPN.*``, ``MODEL.BACKBONE.FREEZE_AT`` and
    ``MODEL.SLIMMABLE.*``.
    """
    backbone = SlimmableFPN(
        bottom_up=make_slimmable_resnet(cfg, input_shape),
        slim=slimmable_config(cfg).SLIM_FPN,
        divisor=slimmable_config(cfg).CHANNEL_DIVISOR,
        **fpn_config_kwargs(cfg),
    )
    check_slimmable_norms(backbone, prefix="backbone")
    return backbone
