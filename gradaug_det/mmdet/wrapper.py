"""DDP wrapper that runs a GradAug detector's own ``train_step``.

mmengine's ``MMDistributedDataParallel.train_step`` runs the data preprocessor and one
forward/backward itself, never calling the model's ``train_step``; under it a GradAug
detector would train as a plain one. This wrapper runs the GradAug iteration instead,
with every forward through DDP (so gradients are all-reduced, once per iteration, after
the last pass). Select it in the config::

    model_wrapper_cfg = dict(type='GradAugDistributedDataParallel')
"""
from mmengine.model import MMDistributedDataParallel
from mmengine.registry import MODEL_WRAPPERS

from .detector import GradAugDetectorMixin, gradaug_train_step

__all__ = ["GradAugDistributedDataParallel"]


@MODEL_WRAPPERS.register_module()
class GradAugDistributedDataParallel(MMDistributedDataParallel):
    """``MMDistributedDataParallel`` whose ``train_step`` is the GradAug iteration.

    Defaults that differ from DDP's: ``broadcast_buffers=False`` (as mmengine's default
    wrapper), ``find_unused_parameters`` True when a pass leaves parameters unused
    (soft-label-only or depth sub-networks), and ``device_ids=None`` for a CPU model
    (gloo), where DDP rejects device ids.

    Args:
        module: the detector (a GradAug detector, or any model: then it behaves as
            ``MMDistributedDataParallel``).
        **kwargs: ``DistributedDataParallel`` arguments.
    """

    def __init__(self, module, **kwargs):
        kwargs.setdefault("broadcast_buffers", False)
        if isinstance(module, GradAugDetectorMixin):
            kwargs.setdefault("find_unused_parameters", module.needs_unused_parameters)
        if next(module.parameters()).device.type == "cpu":
            kwargs["device_ids"] = None
        super().__init__(module=module, **kwargs)

    def train_step(self, data, optim_wrapper):
        """The GradAug iteration for a GradAug detector, else the stock step."""
        if isinstance(self.module, GradAugDetectorMixin):
            return gradaug_train_step(self, data, optim_wrapper)
        return super().train_step(data, optim_wrapper)
