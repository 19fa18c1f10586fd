"""Per-parameter gradient clipping for mmengine: detectron2's ``CLIP_TYPE "norm"``.

detectron2's ``SOLVER.CLIP_GRADIENTS`` with ``CLIP_TYPE "norm"`` clips the gradient of every
parameter tensor on its own (``torch.nn.utils.clip_grad_norm_(p, CLIP_VALUE)`` for each ``p``,
detectron2/solver/build.py); mmengine's ``clip_grad=dict(max_norm=...)`` clips the norm of
all gradients together, which for the same value is far stricter (one large gradient scales
every other one down). The detectron2 recipes ported to mmdet (the quickstart's) use this::

    optim_wrapper = dict(type='PerParameterClipOptimWrapper', optimizer=dict(type='SGD', lr=0.01),
                         clip_grad=dict(max_norm=5.0))
"""
import torch
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS

__all__ = ["PerParameterClipOptimWrapper"]


@OPTIM_WRAPPERS.register_module()
class PerParameterClipOptimWrapper(OptimWrapper):
    """mmengine's ``OptimWrapper`` whose ``clip_grad`` clips each parameter's gradient norm.

    ``clip_grad`` takes ``torch.nn.utils.clip_grad_norm_``'s arguments (``max_norm``,
    ``norm_type``), applied to every parameter tensor separately; ``train/grad_norm`` logs
    the largest norm before clipping. Accumulation, ``optim_context`` and the rest are
    mmengine's.

    Raises:
        ValueError: ``clip_grad`` missing, or of ``type='value'`` (already per element:
            use mmengine's ``OptimWrapper``).
    """

    def __init__(self, *args, **kwargs):
        clip = kwargs.get("clip_grad")
        if not clip or clip.get("type", "norm") != "norm" or "max_norm" not in clip:
            raise ValueError(f"PerParameterClipOptimWrapper needs clip_grad=dict(max_norm=...), got {clip!r} "
                             "(type='value' clips each element already: use type='OptimWrapper')")
        super().__init__(*args, **kwargs)

    def _clip_grad(self) -> None:
        params = [p for group in self.optimizer.param_groups for p in group["params"]
                  if p.requires_grad and p.grad is not None]
        if params:
            norms = torch.stack([self.clip_func(p, **self.clip_grad_kwargs) for p in params])
            self.message_hub.update_scalar(f"train/{self.grad_name}", float(norms.max()))
