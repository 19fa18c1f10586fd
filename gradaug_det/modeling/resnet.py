"""Slimmable ResNet backbone, a drop-in replacement of detectron2's ``build_resnet_backbone``.

Same config keys, same module names, parameter names and shapes as detectron2's ResNet,
so any detectron2 ResNet checkpoint loads into it and anything trained with it loads
back into stock detectron2. Every convolution is a :class:`SlimConv2d`; every residual
block can be dropped (depth sub-networks). At width ``w < 1`` the returned feature maps
hold the sub-network's channels first and zeros after, at the full channel count, so
``output_shape()`` never changes and every consumer (FPN, C4 res5 head) works as is.
"""
from typing import List, Sequence, Type

import torch.nn.functional as F
from torch import nn

from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock, ResNet

from ..config import slimmable_config
from ..slim import DroppableBlock, SlimConv2d, check_channel_rule, pad_channels, resnet_channel_ratios
from ..slim.channels import GroupNormSlice, check_group_norm_slicing

__all__ = [
    "SlimBasicStem",
    "SlimBasicBlock",
    "SlimBottleneckBlock",
    "SlimmableResNet",
    "build_slimmable_resnet_backbone",
    "check_slimmable_norms",
    "channel_rule_config",
    "set_resnet_channel_ratios",
    "make_slimmable_resnet",
    "make_resnet_stages",
    "check_resnet_depth",
    "BLOCKS_PER_STAGE",
]


#: Residual blocks per stage (res2..res5) of the standard ResNet depths.
BLOCKS_PER_STAGE = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}


def check_resnet_depth(depth: int) -> None:
    """Raise ``ValueError`` naming ``MODEL.RESNETS.DEPTH`` unless it is in :data:`BLOCKS_PER_STAGE`."""
    if depth not in BLOCKS_PER_STAGE:
        raise ValueError(f"MODEL.RESNETS.DEPTH={depth} is not supported; use one of {sorted(BLOCKS_PER_STAGE)}")


class SlimBasicStem(BasicStem):
    """detectron2's ``BasicStem``; its conv slims its output but never the image input."""

    def __init__(self, in_channels=3, out_channels=64, norm="BN", divisor=1, rule="round"):
        super().__init__(in_channels, out_channels, norm)
        self.conv1 = SlimConv2d.convert(self.conv1, slim_in=False, divisor=divisor, rule=rule)


class _ResidualForward(DroppableBlock):
    """Forward shared by slimmable residual blocks: drop or scale the residual branch."""

    def residual(self, x):
        raise NotImplementedError

    def forward(self, x):
        shortcut = x if self.shortcut is None else self.shortcut(x)
        if self.drop:
            return F.relu(shortcut)
        out = self.residual(x)
        if not self.training and self.eval_scale != 1.0:
            out = out * self.eval_scale
        out += shortcut
        return F.relu_(out)


class SlimBasicBlock(_ResidualForward, BasicBlock):
    """detectron2's ``BasicBlock`` (R18/R34) with slimmable convolutions."""

    def __init__(self, in_channels, out_channels, *, stride=1, norm="BN", divisor=1, rule="round"):
        super().__init__(in_channels, out_channels, stride=stride, norm=norm)
        for name in ("shortcut", "conv1", "conv2"):
            conv = getattr(self, name)
            if conv is not None:
                setattr(self, name, SlimConv2d.convert(conv, divisor=divisor, rule=rule))

    def residual(self, x):
        return self.conv2(F.relu_(self.conv1(x)))


class SlimBottleneckBlock(_ResidualForward, BottleneckBlock):
    """detectron2's ``BottleneckBlock`` with slimmable convolutions.

    With ``num_groups > 1`` (ResNeXt) the bottleneck keeps the leading channels of
    every group, so that the grouped 3x3 convolution stays a true sub-network.
    """

    def __init__(self, in_channels, out_channels, *, bottleneck_channels, stride=1, num_groups=1,
                 norm="BN", stride_in_1x1=False, dilation=1, divisor=1, rule="round"):
        super().__init__(
            in_channels, out_channels, bottleneck_channels=bottleneck_channels, stride=stride,
            num_groups=num_groups, norm=norm, stride_in_1x1=stride_in_1x1, dilation=dilation,
        )
        g = num_groups
        layouts = {"shortcut": (1, 1), "conv1": (1, g), "conv2": (g, g), "conv3": (g, 1)}
        for name, (in_layout, out_layout) in layouts.items():
            conv = getattr(self, name)
            if conv is not None:
                setattr(self, name, SlimConv2d.convert(
                    conv, in_layout=in_layout, out_layout=out_layout, divisor=divisor, rule=rule))

    def residual(self, x):
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        return self.conv3(out)


class SlimmableResNet(ResNet):
    """detectron2's ``ResNet`` whose outputs keep their full channel count at any width.

    Its constructor also gives every convolution its channel ratio for the ``"reference"``
    channel rule (:func:`gradaug_det.slim.resnet_channel_ratios`): the stem's output and
    the bottleneck's inner layers 0.25, everything else 1. The ratios are structural, so
    a ResNet built by a LazyConfig gets them too; the ``"round"`` rule ignores them.
    """

    def __init__(self, stem, stages, *args, **kwargs):
        super().__init__(stem, stages, *args, **kwargs)
        set_resnet_channel_ratios(self)

    def forward(self, x):
        outputs = super().forward(x)
        shapes = self._out_feature_channels
        return {k: pad_channels(v, shapes[k]) if k in shapes else v for k, v in outputs.items()}


def set_resnet_channel_ratios(resnet: ResNet) -> None:
    """Set the ``in_ratio`` / ``out_ratio`` of every :class:`SlimConv2d` of ``resnet``.

    Bottleneck nets: stem output 0.25 (1 if res2's first block adds the stem's output
    through an identity shortcut), conv1 / conv2 outputs 0.25, block outputs and shortcuts
    1; every input ratio is its producer's output ratio. Basic-block nets: 1 everywhere.
    See :func:`gradaug_det.slim.resnet_channel_ratios` for why.
    """
    blocks = [block for stage in resnet.stages for block in stage]
    if not blocks or not isinstance(getattr(resnet.stem, "conv1", None), SlimConv2d):
        return
    first = blocks[0]
    bottleneck = isinstance(first, BottleneckBlock)
    ratios = resnet_channel_ratios(bottleneck, bottleneck and first.shortcut is None)
    def put(conv, in_ratio, out_ratio):
        if isinstance(conv, SlimConv2d):
            conv.in_ratio, conv.out_ratio = in_ratio, out_ratio

    put(resnet.stem.conv1, 1.0, ratios["stem"])
    previous = ratios["stem"]
    inner = ("conv1", "conv2") if bottleneck else ("conv1",)
    for block in blocks:
        put(block.shortcut, previous, ratios["out"])
        for name in inner + (("conv3",) if bottleneck else ("conv2",)):
            out_ratio = ratios["inner"] if name in inner else ratios["out"]
            put(getattr(block, name), previous, out_ratio)
            previous = out_ratio


def check_slimmable_norms(model: nn.Module, prefix: str = "") -> None:
    """Fail early for normalisations that cannot be sliced at every width.

    FrozenBN, BN and SyncBN slice per channel. GroupNorm slices cleanly only when
    every sliced channel count is a whole number of groups, i.e. when
    ``MODEL.SLIMMABLE.CHANNEL_DIVISOR`` is a multiple of every GN layer's channels per
    group (and never inside grouped, ResNeXt, convolutions): the rule of
    :func:`gradaug_det.slim.channels.check_group_norm_slicing`. Other norms cannot be
    sliced.

    Raises:
        ValueError: naming the first layer that cannot be sliced and what to change;
            for GN, the smallest divisor that suits every GN layer of ``model``.
    """
    group_norms = []
    for name, m in model.named_modules(prefix=prefix):
        if not isinstance(m, SlimConv2d) or not m.slim_out or m.norm is None:
            continue
        if isinstance(m.norm, (FrozenBatchNorm2d, nn.modules.batchnorm._BatchNorm)):
            continue
        if isinstance(m.norm, nn.GroupNorm):
            group_norms.append((name, m))
            continue
        raise ValueError(
            f"{name}.norm is {type(m.norm).__name__}, which cannot be sliced to a sub-network "
            "width. Use FrozenBN, BN, SyncBN or GN (MODEL.RESNETS.NORM, MODEL.FPN.NORM)."
        )
    check_group_norm_slicing(
        [GroupNormSlice(f"{name}.norm", m.norm.num_groups, m.norm.num_channels, m.divisor,
                        getattr(m, "rule", "round"), grouped=m.out_layout != 1) for name, m in group_norms],
        divisor_key="MODEL.SLIMMABLE.CHANNEL_DIVISOR", rule_key="MODEL.SLIMMABLE.CHANNEL_RULE",
        bn_fix="a BN-type norm (MODEL.RESNETS.NORM / MODEL.FPN.NORM: FrozenBN, BN, SyncBN)",
        groups_fix="MODEL.RESNETS.NUM_GROUPS=1")


@BACKBONE_REGISTRY.register()
def build_slimmable_resnet_backbone(cfg, input_shape: ShapeSpec) -> SlimmableResNet:
    """Build a slimmable ResNet from the same config keys as ``build_resnet_backbone``.

    Reads ``MODEL.RESNETS.*``, ``MODEL.BACKBONE.FREEZE_AT`` and
    ``MODEL.SLIMMABLE.CHANNEL_DIVISOR``.

    Returns:
        SlimmableResNet: state-dict compatible with detectron2's ``ResNet``.
    """
    model = make_slimmable_resnet(cfg, input_shape)
    check_slimmable_norms(model, prefix="backbone")
    return model


def channel_rule_config(cfg):
    """``(CHANNEL_DIVISOR, CHANNEL_RULE)`` of ``MODEL.SLIMMABLE`` (or its defaults), validated.

    Raises:
        ValueError: naming the key and what is allowed (:func:`gradaug_det.slim.check_channel_rule`).
    """
    s = slimmable_config(cfg)
    divisor, rule = s.CHANNEL_DIVISOR, s.get("CHANNEL_RULE", "round")
    check_channel_rule(rule, divisor)
    return divisor, rule


def make_slimmable_resnet(cfg, input_shape: ShapeSpec) -> SlimmableResNet:
    """The body of :func:`build_slimmable_resnet_backbone`, without the norm check.

    Callers that wrap the ResNet (FPN, classifier) check the whole model themselves
    so that error messages carry the full module names.
    """
    r = cfg.MODEL.RESNETS
    depth = r.DEPTH
    divisor, rule = channel_rule_config(cfg)
    check_resnet_depth(depth)
    if any(r.DEFORM_ON_PER_STAGE):
        raise ValueError(
            f"MODEL.RESNETS.DEFORM_ON_PER_STAGE={list(r.DEFORM_ON_PER_STAGE)}: deformable "
            "convolutions are not slimmable; set it to [False, False, False, False]."
        )
    if r.RES5_DILATION not in (1, 2):
        raise ValueError(f"MODEL.RESNETS.RES5_DILATION must be 1 or 2, got {r.RES5_DILATION}")
    if depth in (18, 34):
        for key, value, allowed in (("RES2_OUT_CHANNELS", r.RES2_OUT_CHANNELS, 64),
                                    ("RES5_DILATION", r.RES5_DILATION, 1), ("NUM_GROUPS", r.NUM_GROUPS, 1)):
            if value != allowed:
                raise ValueError(f"MODEL.RESNETS.{key}={value} is not supported for R{depth}; set it to {allowed}")

    stem = SlimBasicStem(input_shape.channels, r.STEM_OUT_CHANNELS, r.NORM, divisor, rule)
    stages = make_resnet_stages(
        r, r.STEM_OUT_CHANNELS, [r.RES2_OUT_CHANNELS * 2 ** i for i in range(4)],
        [r.NUM_GROUPS * r.WIDTH_PER_GROUP * 2 ** i for i in range(4)],
        basic_block=SlimBasicBlock, bottleneck_block=SlimBottleneckBlock, divisor=divisor, rule=rule,
    )
    return SlimmableResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


def make_resnet_stages(r, in_channels: int, out_channels: Sequence[int], bottleneck_channels: Sequence[int], *,
                       basic_block: Type[nn.Module] = BasicBlock, bottleneck_block: Type[nn.Module] = BottleneckBlock,
                       **block_kwargs) -> List[List[nn.Module]]:
    """The res2..res5 stages of a ResNet, as detectron2's ``build_resnet_backbone`` lays them out.

    The one stage loop of gradaug-det: the slimmable ResNet (channels doubled per stage)
    and the pruned ResNet (:mod:`gradaug_det.modeling.pruned`, explicit channels per
    stage) both build their stages here.

    Args:
        r: ``cfg.MODEL.RESNETS`` (``DEPTH``, ``NORM``, ``RES5_DILATION``, ``NUM_GROUPS``,
            ``STRIDE_IN_1X1``).
        in_channels: the stem's output channels.
        out_channels: output channels of every block of res2, res3, res4, res5.
        bottleneck_channels: conv1 / conv2 channels of the blocks of res2..res5 (unused by
            R18/R34's basic blocks).
        basic_block, bottleneck_block: the block classes (R18/R34, deeper nets).
        **block_kwargs: passed to every block (e.g. the slimmable blocks' ``divisor``, ``rule``).

    Returns:
        Four lists of blocks, for ``ResNet(stem, stages, ...)``.

    Raises:
        ValueError: for a ``MODEL.RESNETS.DEPTH`` not in :data:`BLOCKS_PER_STAGE`.
    """
    check_resnet_depth(r.DEPTH)
    stages = []
    for idx, num_blocks in enumerate(BLOCKS_PER_STAGE[r.DEPTH]):
        dilation = r.RES5_DILATION if idx == 3 else 1
        first_stride = 1 if idx == 0 or dilation == 2 else 2
        kwargs = dict(num_blocks=num_blocks, stride_per_block=[first_stride] + [1] * (num_blocks - 1),
                      in_channels=in_channels, out_channels=out_channels[idx], norm=r.NORM, **block_kwargs)
        if r.DEPTH in (18, 34):
            kwargs["block_class"] = basic_block
        else:
            kwargs.update(block_class=bottleneck_block, bottleneck_channels=bottleneck_channels[idx],
                          stride_in_1x1=r.STRIDE_IN_1X1, dilation=dilation, num_groups=r.NUM_GROUPS)
        stages.append(ResNet.make_stage(**kwargs))
        in_channels = out_channels[idx]
    return stages
