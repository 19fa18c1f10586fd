"""The GradAug algorithm, independent of detectron2's trainers."""
from .losses import OutputRecorder, RoIClassifierSoftLabels, soft_label_kl, unwrap_model
from .sampler import SubnetSampler, SubnetSpec, validate_sampler_args
from .step import GradAugOutput, gradaug_step
from .tasks import ClassificationTask, DetectionTask, build_task
from .transforms import detection_transform, transform_classification_batch, transform_detection_batch

__all__ = [k for k in globals() if not k.startswith("_")]
