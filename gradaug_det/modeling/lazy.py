"""LazyConfig support: make a detectron2 LazyConfig R-CNN model slimmable in place."""
from .fpn import SlimmableFPN
from .resnet import SlimBasicBlock, SlimBasicStem, SlimBottleneckBlock, SlimmableResNet

__all__ = ["make_lazy_model_slimmable"]


def make_lazy_model_slimmable(model, *, divisor: int = 1, slim_fpn: bool = True):
    """Switch a LazyConfig model's ResNet(-FPN) backbone to the slimmable classes.

    Works on detectron2's ``common/models/{mask,fast}_rcnn_fpn.py`` style nodes:
    ``model.backbone`` an ``L(FPN)`` over ``L(ResNet)`` with ``L(BasicStem)`` and
    ``L(ResNet.make_default_stages)``. Names, shapes and arguments stay those of
    detectron2, so checkpoints remain interchangeable.

    Args:
        model: the ``model`` node of a LazyConfig (edited in place and returned).
        divisor: channel alignment (``MODEL.SLIMMABLE.CHANNEL_DIVISOR``).
        slim_fpn: slim the FPN too (``MODEL.SLIMMABLE.SLIM_FPN``).
    """
    backbone = model.backbone
    bottom_up = backbone.bottom_up if "bottom_up" in backbone else backbone
    if "stem" not in bottom_up or "stages" not in bottom_up:
        raise ValueError("make_lazy_model_slimmable expects model.backbone(.bottom_up) = L(ResNet)(stem=..., stages=...)")
    if bottom_up is not backbone:
        backbone._target_ = SlimmableFPN
        backbone.slim = slim_fpn
        backbone.divisor = divisor
    bottom_up._target_ = SlimmableResNet
    bottom_up.stem._target_ = SlimBasicStem
    bottom_up.stem.divisor = divisor
    stages = bottom_up.stages
    stages.block_class = SlimBasicBlock if stages.depth < 50 else SlimBottleneckBlock
    stages.divisor = divisor
    return model
