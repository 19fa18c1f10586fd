"""What ``GradAugTrainer``'s constructor refuses, after building the model and before any
data is read: a model x GradAug setting that cannot train.

Each rule lives where it belongs and is only called from here:

* the backbone must form the configured sub-networks (:func:`check_subnet_backbone`: a
  slimmable twin for width sampling, droppable blocks for depth sampling);
* the sub-network loss must suit the model and every training-dict field must be
  transformable (:func:`gradaug_det.gradaug.tasks.check_subnet_loss_support`, which calls
  :func:`gradaug_det.gradaug.transforms.check_transformable_fields`);
* norms and deformable stages are refused by the slimmable builders themselves
  (:func:`gradaug_det.modeling.resnet.check_slimmable_norms`,
  :func:`gradaug_det.modeling.resnet.make_slimmable_resnet`), i.e. while the model is built.
"""
from ..gradaug.tasks import check_subnet_loss_support
from ..modeling import SLIMMABLE_TWINS
from ..slim import SlimmableModule, residual_blocks

__all__ = ["check_gradaug_trainable", "check_subnet_backbone"]


def check_subnet_backbone(cfg, model) -> None:
    """Refuse a backbone that cannot form the sub-networks ``GRADAUG.SAMPLING`` asks for.

    Args:
        cfg: the trainer's config.
        model: the built (unwrapped) model.

    Raises:
        ValueError: naming ``MODEL.BACKBONE.NAME`` and, for a stock ResNet builder, its
            slimmable twin to set instead.
    """
    if not cfg.GRADAUG.ENABLED:
        return
    name = cfg.MODEL.BACKBONE.NAME
    twin = SLIMMABLE_TWINS.get(name)
    twins = ", ".join(f"{k} -> {v}" for k, v in SLIMMABLE_TWINS.items())
    fix = (f"set MODEL.BACKBONE.NAME={twin!r} (its slimmable twin: same keys, same weights)" if twin else
           f"{name!r} has no slimmable twin in gradaug-det (only {twins} have one; another builder's own keys, "
           "such as DeepLab's stem and multi-grid keys, have no slimmable equivalent): build the model with one of "
           "those backbones, or train this one with GRADAUG.ENABLED=False")
    if cfg.GRADAUG.SAMPLING == "width" and not any(isinstance(m, SlimmableModule) for m in model.modules()):
        raise ValueError(f"GRADAUG.SAMPLING='width' needs a slimmable backbone, but MODEL.BACKBONE.NAME="
                         f"{name!r} has no slimmable layer; {fix}")
    if cfg.GRADAUG.SAMPLING == "depth" and not residual_blocks(model):
        raise ValueError(f"GRADAUG.SAMPLING='depth' needs droppable residual blocks, but MODEL.BACKBONE.NAME="
                         f"{name!r} has none; {fix}")


def check_gradaug_trainable(cfg, model) -> None:
    """Every check GradAug needs between building the model and reading data.

    Call it right after ``build_model`` (as :class:`~gradaug_det.engine.GradAugTrainer` does),
    so a config that cannot train fails in seconds, before a dataset is loaded.

    Args:
        cfg: the trainer's config (with :func:`gradaug_det.add_gradaug_config`'s keys).
        model: the built (unwrapped) model.

    Raises:
        ValueError: naming the config key, its value and what to set.
    """
    if not cfg.GRADAUG.ENABLED:
        return
    check_subnet_backbone(cfg, model)
    check_subnet_loss_support(cfg)
