"""Keep the GradAug sub-network sampler's state in mmengine checkpoints.

The sampler draws each iteration's widths and scales from its own RNG (identical on every
worker). With this hook a resumed run continues the same sequence of draws, as
``--resume`` does on the detectron2 side; without it a resumed run draws afresh. The
model's state dict is left untouched (it stays loadable into stock mmdet detectors)::

    custom_hooks = [dict(type='GradAugSamplerStateHook')]
"""
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

__all__ = ["GradAugSamplerStateHook"]

KEY = "gradaug_sampler"


def _sampler(runner):
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    return getattr(model, "gradaug_sampler", None)


@HOOKS.register_module()
class GradAugSamplerStateHook(Hook):
    """Save the sampler's RNG state with every checkpoint; restore it when one is loaded."""

    priority = "NORMAL"

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        sampler = _sampler(runner)
        if sampler is not None:
            checkpoint[KEY] = sampler.state_dict()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        sampler = _sampler(runner)
        if sampler is not None and KEY in checkpoint:
            sampler.load_state_dict(checkpoint[KEY])
