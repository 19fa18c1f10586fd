"""Self-generated datasets and dataset registration for gradaug_det.

Importing this package only defines functions; nothing is registered or
generated until one of the ``register_*`` / ``generate_*`` functions is called.
The generators are plain numpy / OpenCV (usable without detectron2, e.g. for the
MMDetection quickstart); the detectron2 registration helpers are imported on first use.
"""
import importlib

from .synthetic import (
    COCO_SHAPES_CATEGORIES, QUICKSTART_CLASSES, QUICKSTART_SHAPES, coco_shapes_paths, generate_coco_shapes,
    generate_imagefolder, imagefolder_wnids,
)

# detectron2 dataset registration (gradaug_det.data.datasets), imported when first accessed
_DETECTRON2_NAMES = (
    "DATASETS_DOC",
    "check_datasets_registered",
    "IMAGENET_FRACTIONS",
    "IMAGENET_TRAIN",
    "IMAGENET_VAL",
    "QUICKSTART_TRAIN",
    "QUICKSTART_VAL",
    "QUICKSTART_CLS_TRAIN",
    "QUICKSTART_CLS_VAL",
    "QUICKSTART_TINY",
    "imagenet_frac_name",
    "list_imagefolder_classes",
    "load_imagefolder",
    "register_imagenet",
    "register_quickstart",
    "subsample_per_class",
    "subsample_images",
    "subset_name",
    "register_subset",
)


def __getattr__(name):
    if name in _DETECTRON2_NAMES:
        return getattr(importlib.import_module(".datasets", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(["COCO_SHAPES_CATEGORIES", "QUICKSTART_CLASSES", "QUICKSTART_SHAPES", "coco_shapes_paths", "generate_coco_shapes", "generate_imagefolder",
                  "imagefolder_wnids", *_DETECTRON2_NAMES])
