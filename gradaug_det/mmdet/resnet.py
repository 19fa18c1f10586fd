"""Slimmable ResNet for MMDetection 3.x: mmdet's own ``ResNet``, runnable at any width.

``SlimmableResNet`` *is* mmdet's ``ResNet`` (same constructor, modules, parameter names,
initialisation), so mmdet / torchvision ResNet checkpoints load into it unchanged and
what it learns loads back into a stock ``ResNet``. Only the forward differs: at width
``w < 1`` every convolution uses the leading
``slim_channels(c, w, channel_divisor, channel_rule, ratio)`` output channels of its weight
(and the input channels its producer kept), every norm layer the matching slice
(BN/SyncBN in training: batch statistics, running statistics
untouched; in eval: the sliced running statistics) — the same rules, from the same
functions (:mod:`gradaug_det.slim`), as the detectron2 backbone. The returned feature
maps hold the sub-network's channels first and zeros after, at the full channel count,
so necks and heads run unchanged. Residual blocks can be dropped (depth sub-networks).
"""
import torch.utils.checkpoint as cp
from torch import nn

from mmdet.models.backbones.resnet import BasicBlock, Bottleneck, ResNet
from mmdet.registry import MODELS

from .checks import check_group_norms, check_slimmable_args
from ..slim import (
    DroppableBlock,
    SlimmableModule,
    norm_to_input,
    pad_channels,
    resnet_channel_ratios,
    slim_conv2d,
)

__all__ = ["SlimmableResNet", "SlimBasicBlock", "SlimBottleneck"]

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


def _slim_sequential(seq: nn.Sequential, x, width: float, divisor: int, rule: str = "round",
                     ratio: float = 1.0):
    """Run an ``nn.Sequential`` of convolutions, norms and parameter-free layers at ``width``
    (mmdet's deep stem and downsample shortcuts); every convolution has channel ``ratio``."""
    for m in seq:
        if isinstance(m, nn.Conv2d):
            x = slim_conv2d(m, x, width, divisor, rule=rule, ratio=ratio)
        elif isinstance(m, _NORMS):
            x = norm_to_input(m, x)
        else:
            x = m(x)
    return x


class _SlimBlock(DroppableBlock, SlimmableModule):
    """Forward shared by the slimmable blocks: width-aware convs and norms, block drop."""

    divisor: int = 1
    rule: str = "round"
    inner_ratio: float = 1.0  # channel ratio of the inner convs (reference rule), set by SlimmableResNet

    def _conv(self, conv, x, inner=True):
        ratio = self.inner_ratio if inner else 1.0
        return slim_conv2d(conv, x, self.width, self.divisor, rule=self.rule, ratio=ratio)

    def residual(self, x):
        raise NotImplementedError

    def forward(self, x):
        def inner(x):
            identity = x if self.downsample is None else _slim_sequential(
                self.downsample, x, self.width, self.divisor, self.rule)
            if self.drop:
                return identity
            out = self.residual(x)
            if not self.training and self.eval_scale != 1.0:
                out = out * self.eval_scale
            return out + identity

        out = cp.checkpoint(inner, x, use_reentrant=False) if self.with_cp and x.requires_grad else inner(x)
        return self.relu(out)


class SlimBasicBlock(_SlimBlock, BasicBlock):
    """mmdet's ``BasicBlock`` (R18/R34) with a width and a drop flag."""

    def residual(self, x):
        out = self.relu(norm_to_input(self.norm1, self._conv(self.conv1, x)))
        return norm_to_input(self.norm2, self._conv(self.conv2, out, inner=False))


class SlimBottleneck(_SlimBlock, Bottleneck):
    """mmdet's ``Bottleneck`` (R50/R101/R152) with a width and a drop flag."""

    def residual(self, x):
        out = self.relu(norm_to_input(self.norm1, self._conv(self.conv1, x)))
        out = self.relu(norm_to_input(self.norm2, self._conv(self.conv2, out)))
        return norm_to_input(self.norm3, self._conv(self.conv3, out, inner=False))


_SLIM_BLOCKS = {BasicBlock: SlimBasicBlock, Bottleneck: SlimBottleneck}


@MODELS.register_module()
class SlimmableResNet(ResNet, SlimmableModule):
    """mmdet ``ResNet`` whose width and depth can be switched (GradAug sub-networks).

    Args:
        channel_divisor (int): align every sliced channel count to a multiple of it
            (1 = no alignment; 8 gives hardware-friendly widths).
        channel_rule (str): ``"round"`` or ``"reference"`` (the GradAug code's rule: ratio
            0.25 for the stem and the bottleneck's inner convolutions), as
            ``MODEL.SLIMMABLE.CHANNEL_RULE`` (:mod:`gradaug_det.slim.channels`).
        **kwargs: every argument of mmdet's ``ResNet``. ``conv_cfg`` must be None (plain
            convolutions), ``dcn`` and ``plugins`` None: those layers are not slimmable.

    Raises:
        ValueError: naming the argument of ``model.backbone`` to change.
    """

    def __init__(self, *args, channel_divisor: int = 1, channel_rule: str = "round", **kwargs):
        check_slimmable_args("SlimmableResNet", "model.backbone", kwargs, channel_divisor,
                             unsupported=("conv_cfg", "dcn", "plugins"), channel_rule=channel_rule)
        super().__init__(*args, **kwargs)
        self.width = 1.0
        self.divisor = channel_divisor
        self.rule = channel_rule
        bottleneck = issubclass(self.block, Bottleneck)
        identity = bottleneck and self.stem_channels == self.base_channels * self.block.expansion
        self.ratios = resnet_channel_ratios(bottleneck, identity)  # res2 adds the stem's output
        # The blocks become their slimmable subclasses in place (same parameters, names
        # and initialisation: mmdet's own constructor built them).
        for m in self.modules():
            if type(m) in _SLIM_BLOCKS:
                m.__class__ = _SLIM_BLOCKS[type(m)]
                m.width, m.divisor, m.rule, m.inner_ratio = 1.0, channel_divisor, channel_rule, self.ratios["inner"]
        check_group_norms(self, channel_divisor, "SlimmableResNet", "model.backbone", channel_rule)
        self._full_channels = [self.base_channels * 2**i * self.block.expansion for i in range(self.num_stages)]

    def _stem(self, x):
        ratio = self.ratios["stem"]
        if self.deep_stem:
            return _slim_sequential(self.stem, x, self.width, self.divisor, self.rule, ratio)
        x = slim_conv2d(self.conv1, x, self.width, self.divisor, rule=self.rule, ratio=ratio)
        return self.relu(norm_to_input(self.norm1, x))

    def train(self, mode: bool = True):
        """mmdet's ``ResNet.train`` (frozen stages, ``norm_eval``), returning ``self`` as
        ``nn.Module.train`` does (mmdet's returns None, so ``.eval()`` would too)."""
        super().train(mode)
        return self

    def forward(self, x):
        """Feature maps of ``out_indices``, each at its full channel count."""
        x = self.maxpool(self._stem(x))
        outs = []
        for i, layer_name in enumerate(self.res_layers):
            x = getattr(self, layer_name)(x)
            if i in self.out_indices:
                outs.append(pad_channels(x, self._full_channels[i]))
        return tuple(outs)
