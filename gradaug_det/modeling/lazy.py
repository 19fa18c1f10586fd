"""LazyConfig support: make a detectron2 LazyConfig R-CNN model slimmable in place."""
from ..slim import check_channel_rule
from detectron2.modeling.backbone.fpn import LastLevelP6P7

from .fpn import SlimLastLevelP6P7, SlimmableFPN
from .resnet import SlimBasicBlock, SlimBasicStem, SlimBottleneckBlock, SlimmableResNet

__all__ = ["make_lazy_model_slimmable", "make_slimmable_default_stages"]

# Arguments of detectron2's BottleneckBlock that a BasicBlock (ResNet-18/34) does not take.
_BOTTLENECK_ONLY = ("stride_in_1x1", "num_groups", "dilation")


def make_slimmable_default_stages(depth: int, block_class=None, divisor: int = 1, rule: str = "round",
                                  **kwargs):
    """``ResNet.make_default_stages`` with slimmable blocks, chosen by ``depth`` when built.

    Like detectron2's yacs builder (``build_resnet_backbone``), the bottleneck-only
    arguments (``stride_in_1x1``, ``num_groups``, ``dilation``) are not passed to the basic
    blocks of ResNet-18/34, so ``model.backbone.bottom_up.stages.depth=18`` works on a config
    written for R50.

    Args:
        depth: 18, 34, 50, 101 or 152.
        block_class: default :class:`SlimBasicBlock` below depth 50, else :class:`SlimBottleneckBlock`.
        divisor: channel alignment (``MODEL.SLIMMABLE.CHANNEL_DIVISOR``).
        rule: channel rule (``MODEL.SLIMMABLE.CHANNEL_RULE``: "round" or "reference").
        kwargs: other arguments of ``ResNet.make_default_stages`` / the blocks (``norm`` ...).

    Returns:
        list[list[CNNBlockBase]]: the blocks of res2..res5, as ``ResNet.make_default_stages``.
    """
    if block_class is None:
        block_class = SlimBasicBlock if depth < 50 else SlimBottleneckBlock
    if depth < 50:
        kwargs = {k: v for k, v in kwargs.items() if k not in _BOTTLENECK_ONLY}
    return SlimmableResNet.make_default_stages(depth, block_class, divisor=divisor, rule=rule, **kwargs)


def make_lazy_model_slimmable(model, *, divisor: int = 1, slim_fpn: bool = True, rule: str = "round"):
    """Switch a LazyConfig model's ResNet(-FPN) backbone to the slimmable classes.

    Works on detectron2's ``common/models/{mask,fast}_rcnn_fpn.py`` style nodes:
    ``model.backbone`` an ``L(FPN)`` over ``L(ResNet)`` with ``L(BasicStem)`` and
    ``L(ResNet.make_default_stages)``; RetinaNet's ``L(LastLevelP6P7)`` top block
    (``common/models/retinanet.py``) becomes :class:`SlimLastLevelP6P7`. Names, shapes and
    arguments stay those of detectron2, so checkpoints remain interchangeable.

    Args:
        model: the ``model`` node of a LazyConfig (edited in place and returned).
        divisor: channel alignment (``MODEL.SLIMMABLE.CHANNEL_DIVISOR``).
        slim_fpn: slim the FPN too (``MODEL.SLIMMABLE.SLIM_FPN``).
        rule: channel rule (``MODEL.SLIMMABLE.CHANNEL_RULE``: "round" or "reference"; the
            reference's per-layer ratios are set by ``SlimmableResNet`` itself).

    Raises:
        ValueError: for an invalid ``rule`` / ``divisor`` pair (before anything is built).
    """
    check_channel_rule(rule, divisor, rule_key="rule", divisor_key="divisor")
    backbone = model.backbone
    bottom_up = backbone.bottom_up if "bottom_up" in backbone else backbone
    if "stem" not in bottom_up or "stages" not in bottom_up:
        raise ValueError("make_lazy_model_slimmable expects model.backbone(.bottom_up) = L(ResNet)(stem=..., stages=...)")
    if bottom_up is not backbone:
        backbone._target_ = SlimmableFPN
        backbone.slim = slim_fpn
        backbone.divisor = divisor
        backbone.rule = rule
        top_block = backbone.get("top_block")
        if top_block is not None and top_block.get("_target_") is LastLevelP6P7:
            top_block._target_ = SlimLastLevelP6P7
            top_block.slim = slim_fpn
            top_block.divisor = divisor
    bottom_up._target_ = SlimmableResNet
    bottom_up.stem._target_ = SlimBasicStem
    bottom_up.stem.divisor = divisor
    bottom_up.stem.rule = rule
    stages = bottom_up.stages
    stages._target_ = make_slimmable_default_stages  # blocks chosen by depth when instantiated
    stages.divisor = divisor
    stages.rule = rule
    return model
