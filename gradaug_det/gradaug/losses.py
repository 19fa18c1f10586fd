"""GradAug's soft labels: the full network's detached predictions teach the sub-networks.

Classification (reference): ``KL(softmax(full) || softmax(sub))`` with log-softmax input,
``reduction="batchmean"``. Detection carries this to the box classifier (the detectron2
side in :mod:`.roi_soft_labels`, the MMDetection side in :mod:`gradaug_det.mmdet`), with
the same KL loss. This module depends on torch only.
"""
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["soft_target_kl", "soft_label_kl", "OutputRecorder"]


def soft_target_kl(student_logits: torch.Tensor, target: torch.Tensor,
                   weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """GradAug's soft-label loss against given class probabilities: the one definition of
    the KL every soft label (teacher, CutMix, RoI, semantic segmentation) uses.

    ``KL(target || softmax(student))`` over the class dim 1, computed in float32 (AMP
    logits are upcast), as the reference code's
    ``F.kl_div(log_softmax(student), target, reduction="batchmean")``.

    Args:
        student_logits: (N, K, ...) logits (class dim 1).
        target: probabilities of the same shape (not detached here).
        weights: None (the reference's ``batchmean``: the KL summed over everything,
            divided by N), or (N, ...) per-row weights: ``sum_r w_r KL_r / max(sum_r w_r, 1)``,
            i.e. with 0/1 weights the mean over the kept rows, without boolean indexing
            (a host sync on CUDA).

    Returns:
        The scalar loss (float32); 0 for an empty batch, still in the graph.
    """
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    log_p = F.log_softmax(student_logits.float(), dim=1)
    target = target.float()
    if weights is None:
        return F.kl_div(log_p, target, reduction="batchmean")
    w = weights.float()
    per_row = F.kl_div(log_p, target, reduction="none").sum(1)
    return (per_row * w).sum() / w.sum().clamp(min=1.0)


def soft_label_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """GradAug's soft-label loss, the reference code's exact form: :func:`soft_target_kl`
    against ``softmax(teacher_logits)``.

    Args:
        student_logits: (N, K) logits of the sub-network.
        teacher_logits: (N, K) logits of the full network (detached here).
        weights: optional (N,) row weights (see :func:`soft_target_kl`); e.g. 0 for RoIs a
            rotation leaves without area.

    Returns:
        ``F.kl_div(log_softmax(student), softmax(teacher), reduction="batchmean")`` (or
        its weighted mean), in float32.
    """
    target = F.softmax(teacher_logits.detach().float(), dim=1)
    return soft_target_kl(student_logits, target, weights)


class OutputRecorder:
    """Record the (detached) outputs of a module while a ``with`` block runs.

    Example::

        with OutputRecorder(model.head) as rec:
            losses = model(batch)
        teacher_logits = rec.outputs[0]
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.outputs: List[torch.Tensor] = []
        self._handle = None

    def __enter__(self):
        self.outputs = []
        self._handle = self.module.register_forward_hook(lambda m, i, o: self.outputs.append(o.detach()))
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False
