"""The GradAug algorithm, independent of any trainer.

The options (:class:`GradAugOptions`), the sampler, the iteration (:func:`gradaug_step`) and
the soft-label loss depend on torch only and are shared by the detectron2 and MMDetection
adapters; the detectron2 tasks, batch transforms and RoI soft labels are imported on first use.
"""
import importlib

from ..utils.parallel import unwrap_model
from .losses import OutputRecorder, soft_label_kl
from .options import GradAugOptions
from .sampler import SubnetSampler, SubnetSpec
from .step import GradAugOutput, gradaug_step, subnet_metrics

# detectron2 parts, imported when first accessed
_DETECTRON2_PARTS = {
    "RoIClassifierSoftLabels": ".roi_soft_labels",
    "ClassificationTask": ".tasks",
    "DetectionTask": ".tasks",
    "build_task": ".tasks",
    "SemSegSoftLabels": ".semseg_soft_labels",
    "SubnetGeometry": ".transforms",
    "check_subnet_loss_support": ".tasks",
    "check_transformable_fields": ".transforms",
    "detection_transform": ".transforms",
    "keep_instance_field": ".transforms",
    "transform_classification_batch": ".transforms",
    "transform_detection_batch": ".transforms",
}


def __getattr__(name):
    if name in _DETECTRON2_PARTS:
        return getattr(importlib.import_module(_DETECTRON2_PARTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [k for k in globals() if not k.startswith("_") and k != "importlib"] + list(_DETECTRON2_PARTS)
