"""Self-generated datasets and dataset registration for gradaug_det.

Importing this package only defines functions; nothing is registered or
generated until one of the ``register_*`` / ``generate_*`` functions is called.
"""

from .datasets import (
    IMAGENET_FRACTIONS,
    IMAGENET_TRAIN,
    IMAGENET_VAL,
    QUICKSTART_TRAIN,
    QUICKSTART_VAL,
    imagenet_frac_name,
    list_imagefolder_classes,
    load_imagefolder,
    register_imagenet,
    register_quickstart,
    subsample_per_class,
)
from .synthetic_coco import COCO_SHAPES_CATEGORIES, coco_shapes_paths, generate_coco_shapes
from .synthetic_imagefolder import generate_imagefolder, imagefolder_wnids

__all__ = [
    "COCO_SHAPES_CATEGORIES",
    "IMAGENET_FRACTIONS",
    "IMAGENET_TRAIN",
    "IMAGENET_VAL",
    "QUICKSTART_TRAIN",
    "QUICKSTART_VAL",
    "coco_shapes_paths",
    "generate_coco_shapes",
    "generate_imagefolder",
    "imagefolder_wnids",
    "imagenet_frac_name",
    "list_imagefolder_classes",
    "load_imagefolder",
    "register_imagenet",
    "register_quickstart",
    "subsample_per_class",
]
