"""GradAug for detectron2's LazyConfig training (``tools/lazyconfig_train_net.py``).

A LazyConfig enables GradAug with a ``gradaug`` node::

    gradaug = dict(
        enabled=True,
        sampler=L(SubnetSampler)(num_subnets=3, min_width=0.9, max_width=1.0, seed=0),
        subnet_loss="soft", soft_weight=1.0, gt_weight=1.0,
    )
"""
from detectron2.config import instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer

from ..gradaug import ClassificationTask, DetectionTask, SubnetSampler
from .runner import GradAugAMPTrainer, GradAugSimpleTrainer

__all__ = ["gradaug_enabled", "needs_unused_parameter_search_lazy", "build_lazy_step_trainer"]


def gradaug_enabled(cfg) -> bool:
    """Whether the LazyConfig has ``gradaug.enabled`` set."""
    return bool(cfg.get("gradaug", {}).get("enabled", False))


def needs_unused_parameter_search_lazy(cfg) -> bool:
    """DDP needs ``find_unused_parameters`` for depth sampling or soft-only sub-network losses."""
    if not gradaug_enabled(cfg):
        return False
    g = cfg.gradaug
    sampling = g.sampler.get("sampling", "width") if "sampler" in g else "width"
    return sampling == "depth" or "gt" not in g.get("subnet_loss", "soft")


def build_lazy_step_trainer(cfg, model, data_loader, optimizer):
    """detectron2's SimpleTrainer/AMPTrainer, or their GradAug versions if ``gradaug.enabled``."""
    amp = cfg.train.amp.enabled
    if not gradaug_enabled(cfg):
        return (AMPTrainer if amp else SimpleTrainer)(model, data_loader, optimizer)
    g = cfg.gradaug
    sampler = instantiate(g.sampler) if "sampler" in g else SubnetSampler()
    task_cls = ClassificationTask if hasattr(getattr(model, "module", model), "head") else DetectionTask
    task = task_cls(model, g.get("subnet_loss", "soft"), g.get("soft_weight", 1.0), g.get("gt_weight", 1.0))
    cls = GradAugAMPTrainer if amp else GradAugSimpleTrainer
    return cls(model, data_loader, optimizer, sampler=sampler, task=task)
