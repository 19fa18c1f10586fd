"""Slimmable ResNet-FPN backbones, drop-in replacements of detectron2's
``build_resnet_fpn_backbone`` and ``build_retinanet_resnet_fpn_backbone``."""
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7

from ..config import slimmable_config
from ..slim import SlimConv2d, pad_channels
from .resnet import channel_rule_config, check_slimmable_norms, make_slimmable_resnet

__all__ = [
    "SlimmableFPN",
    "SlimLastLevelP6P7",
    "build_slimmable_resnet_fpn_backbone",
    "build_slimmable_retinanet_resnet_fpn_backbone",
    "fpn_config_kwargs",
]


class SlimmableFPN(FPN):
    """detectron2's ``FPN`` whose lateral and output convolutions follow the width.

    At width ``w < 1`` every pyramid level holds the sub-network's leading channels
    and zeros after, at ``out_channels``, so RPN and RoI heads run unchanged.

    Args:
        slim (bool): if False the FPN stays at full width (only the bottom-up
            network is slimmed); ``MODEL.SLIMMABLE.SLIM_FPN``.
        divisor (int): ``MODEL.SLIMMABLE.CHANNEL_DIVISOR``.
        rule (str): ``MODEL.SLIMMABLE.CHANNEL_RULE`` (channel ratio 1 in the FPN); also
            given to the slimmable convolutions of ``top_block`` (P6/P7).
        **kwargs: arguments of detectron2's ``FPN``.
    """

    def __init__(self, *, slim: bool = True, divisor: int = 1, rule: str = "round", **kwargs):
        super().__init__(**kwargs)
        if self.top_block is not None:
            for m in self.top_block.modules():
                if isinstance(m, SlimConv2d):
                    m.rule = rule
        if not slim:
            return
        for convs, kind in ((self.lateral_convs, "lateral"), (self.output_convs, "output")):
            for i, conv in enumerate(convs):
                name = next(n for n, m in self.named_children() if m is conv)
                convs[i] = SlimConv2d.convert(conv, divisor=divisor, rule=rule)
                setattr(self, name, convs[i])

    def forward(self, x):
        outputs = super().forward(x)
        return {k: pad_channels(v, self._out_feature_channels[k]) for k, v in outputs.items()}


class SlimLastLevelP6P7(LastLevelP6P7):
    """detectron2's ``LastLevelP6P7`` (RetinaNet's P6 and P7) with slimmable convolutions.

    P6 = conv3x3/2(``in_feature``), P7 = conv3x3/2(ReLU(P6)), as in detectron2, from C5
    (``in_feature="res5"``, what ``build_retinanet_resnet_fpn_backbone`` builds) or from
    P5 (``in_feature="p5"``, ``in_channels`` = the FPN's ``out_channels``). Same parameter
    names, shapes and initialisation as detectron2's module. At width ``w < 1`` both convs
    read the input's kept channels (a zero-padded C5 or P5 is sliced first) and keep
    ``slim_channels(out_channels, w, divisor)`` outputs; :class:`SlimmableFPN` pads them.

    Args:
        in_channels (int): channels of ``in_feature`` (C5: 2048 for R50; P5: FPN width).
        out_channels (int): ``MODEL.FPN.OUT_CHANNELS``.
        in_feature (str): ``"res5"`` or ``"p5"``.
        slim (bool): slim P6/P7 with the FPN (``MODEL.SLIMMABLE.SLIM_FPN``); if False they
            stay at full width and read the zero-padded input.
        divisor (int): ``MODEL.SLIMMABLE.CHANNEL_DIVISOR``.
    """

    def __init__(self, in_channels, out_channels, in_feature="res5", *, slim: bool = True, divisor: int = 1):
        super().__init__(in_channels, out_channels, in_feature)
        if slim:
            self.p6 = SlimConv2d.convert(self.p6, divisor=divisor)
            self.p7 = SlimConv2d.convert(self.p7, divisor=divisor)


def fpn_config_kwargs(cfg, top_block=None) -> dict:
    """The ``FPN`` arguments that detectron2's ``build_resnet_fpn_backbone`` reads from
    ``MODEL.FPN.*``; ``bottom_up`` is the caller's.

    Args:
        cfg: a detectron2 ``CfgNode``.
        top_block: the FPN's top block; default ``LastLevelMaxPool()`` (P6 by max-pooling P5).
    """
    f = cfg.MODEL.FPN
    return dict(in_features=f.IN_FEATURES, out_channels=f.OUT_CHANNELS, norm=f.NORM,
                top_block=LastLevelMaxPool() if top_block is None else top_block, fuse_type=f.FUSE_TYPE)


def _build_slimmable_fpn(cfg, input_shape: ShapeSpec, make_top_block) -> SlimmableFPN:
    """A SlimmableFPN over a slimmable ResNet; ``make_top_block(bottom_up, slim, divisor)``."""
    s = slimmable_config(cfg)
    bottom_up = make_slimmable_resnet(cfg, input_shape)
    backbone = SlimmableFPN(
        bottom_up=bottom_up, slim=s.SLIM_FPN, divisor=s.CHANNEL_DIVISOR, rule=channel_rule_config(cfg)[1],
        **fpn_config_kwargs(cfg, make_top_block(bottom_up, s.SLIM_FPN, s.CHANNEL_DIVISOR)),
    )
    check_slimmable_norms(backbone, prefix="backbone")
    return backbone


@BACKBONE_REGISTRY.register()
def build_slimmable_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> SlimmableFPN:
    """Build a slimmable ResNet-FPN from the same keys as ``build_resnet_fpn_backbone``.

    Reads ``MODEL.RESNETS.*``, ``MODEL.FPN.*``, ``MODEL.BACKBONE.FREEZE_AT`` and
    ``MODEL.SLIMMABLE.*`` (defaults if the config has none, :func:`slimmable_config`).
    P6 is max-pooled from P5 (``LastLevelMaxPool``), as in detectron2.

    Returns:
        SlimmableFPN: state-dict compatible with the stock builder's ``FPN``.
    """
    return _build_slimmable_fpn(cfg, input_shape, lambda bottom_up, slim, divisor: LastLevelMaxPool())


@BACKBONE_REGISTRY.register()
def build_slimmable_retinanet_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> SlimmableFPN:
    """Slimmable twin of detectron2's ``build_retinanet_resnet_fpn_backbone``.

    The same keys as :func:`build_slimmable_resnet_fpn_backbone`; P6 and P7 come from C5
    (``res5``, which ``MODEL.RESNETS.OUT_FEATURES`` must hold) through
    :class:`SlimLastLevelP6P7`, exactly as detectron2's builder does (its yacs builder
    has no P5 option; build ``SlimLastLevelP6P7(..., in_feature="p5")`` yourself for that).

    Returns:
        SlimmableFPN: state-dict compatible with the stock builder's ``FPN`` (``top_block.p6``,
        ``top_block.p7``).

    Raises:
        ValueError: if ``res5`` is not among ``MODEL.RESNETS.OUT_FEATURES``.
    """
    def top_block(bottom_up, slim, divisor):
        shapes = bottom_up.output_shape()
        if "res5" not in shapes:
            raise ValueError(
                f"build_slimmable_retinanet_resnet_fpn_backbone computes P6/P7 from res5, but "
                f"MODEL.RESNETS.OUT_FEATURES={list(cfg.MODEL.RESNETS.OUT_FEATURES)} has no res5; add it.")
        return SlimLastLevelP6P7(shapes["res5"].channels, cfg.MODEL.FPN.OUT_CHANNELS, slim=slim, divisor=divisor)

    return _build_slimmable_fpn(cfg, input_shape, top_block)
