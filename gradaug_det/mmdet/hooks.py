"""Keep the GradAug sub-network sampler's state in mmengine checkpoints.

The sampler draws each iteration's widths and scales from its own RNG (identical on every
worker). With this hook a resumed run continues the same sequence of draws, as
``--resume`` does on the detectron2 side; without it a resumed run draws afresh. The
model's state dict is left untouched (it stays loadable into stock mmdet detectors)::

    custom_hooks = [dict(type='GradAugSamplerStateHook')]

The hook also records the model's slimmable settings (channel rule, divisor, whether the
neck is slimmed; :mod:`gradaug_det.slim.settings`) in every checkpoint and checks them when
one is loaded: a warning on a mismatch, an error inside ``strict_slimmable_settings``
(``tools/mmdet_test.py`` at sub-widths).
"""
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ..slim.settings import RECORD_KEY, check_record, model_slimmable_settings

__all__ = ["GradAugSamplerStateHook"]

KEY = "gradaug_sampler"


def _model(runner):
    return runner.model.module if is_model_wrapper(runner.model) else runner.model


def _sampler(runner):
    return getattr(_model(runner), "gradaug_sampler", None)


@HOOKS.register_module()
class GradAugSamplerStateHook(Hook):
    """Save the sampler's RNG state and the slimmable settings with every checkpoint;
    restore the one and check the other when a checkpoint is loaded."""

    priority = "NORMAL"

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        sampler = _sampler(runner)
        if sampler is not None:
            checkpoint[KEY] = sampler.state_dict()
        checkpoint[RECORD_KEY] = model_slimmable_settings(_model(runner))

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        sampler = _sampler(runner)
        if sampler is not None and KEY in checkpoint:
            sampler.load_state_dict(checkpoint[KEY])
        if checkpoint.get(RECORD_KEY) is not None:
            source = str(getattr(runner, "_load_from", "") or "the checkpoint")
            check_record(_model(runner), checkpoint[RECORD_KEY], source)
