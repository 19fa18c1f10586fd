"""Checkpoint tools: ImageNet classifiers and torchvision ResNets -> detectron2 detection models
(and classifiers -> torchvision names, for MMDetection)."""
from .convert import (
    NAME_TABLE,
    TARGETS,
    TORCHVISION_FORMAT,
    TORCHVISION_PIXEL_MEAN,
    TORCHVISION_PIXEL_STD,
    check_pretrained_config,
    classifier_to_d2,
    convert_classifier,
    convert_classifier_to_torchvision,
    d2_to_torchvision,
    convert_torchvision,
    make_d2_checkpoint,
    pretrained_config_opts,
    read_pretrained_meta,
    rename,
    resnet_arch,
    save_d2_checkpoint,
    torchvision_to_d2,
)

__all__ = [k for k in globals() if not k.startswith("_")]
