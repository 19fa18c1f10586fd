"""detectron2 registrations built from :mod:`gradaug_det.slim`."""
from .classifier import SlimmableClassifier, classification_loss
from .fpn import SlimmableFPN, build_slimmable_resnet_fpn_backbone
from .resnet import (
    SlimBasicBlock,
    SlimBasicStem,
    SlimBottleneckBlock,
    SlimmableResNet,
    build_slimmable_resnet_backbone,
)

__all__ = [k for k in globals() if not k.startswith("_")]
