"""detectron2 registrations built from :mod:`gradaug_det.slim`."""
from .classifier import SlimmableClassifier, classification_loss
from .fpn import (
    SlimLastLevelP6P7,
    SlimmableFPN,
    build_slimmable_resnet_fpn_backbone,
    build_slimmable_retinanet_resnet_fpn_backbone,
)
from .pruned import build_pruned_resnet_fpn_backbone
from .resnet import (
    SlimBasicBlock,
    SlimBasicStem,
    SlimBottleneckBlock,
    SlimmableResNet,
    build_slimmable_resnet_backbone,
)

#: The slimmable twin of every ResNet backbone builder detectron2 registers: the same
#: config keys, the same state dict, the same outputs at width 1.0.
SLIMMABLE_TWINS = {
    "build_resnet_backbone": "build_slimmable_resnet_backbone",
    "build_resnet_fpn_backbone": "build_slimmable_resnet_fpn_backbone",
    "build_retinanet_resnet_fpn_backbone": "build_slimmable_retinanet_resnet_fpn_backbone",
}

__all__ = [k for k in globals() if not k.startswith("_")]
