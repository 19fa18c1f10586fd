"""detectron2 glue: GradAug trainers and launch helpers."""
from .runner import GradAugAMPTrainer, GradAugSimpleTrainer, subnet_metrics
from .setup import setup
from .trainer import GradAugTrainer, apply_depth_eval_scale, create_ddp_model, validate_config

__all__ = [k for k in globals() if not k.startswith("_")]
