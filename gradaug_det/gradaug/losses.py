"""GradAug's soft labels: the full network's detached predictions teach the sub-networks.

Classification (reference): ``KL(softmax(full) || softmax(sub))`` with log-softmax input,
``reduction="batchmean"``. Detection carries this to the box classifier (the detectron2
side in :mod:`.roi_soft_labels`, the MMDetection side in :mod:`gradaug_det.mmdet`), with
the same KL loss; a dense sigmoid classifier (RetinaNet) gets its per-class Bernoulli form,
:func:`sigmoid_soft_target_kl`. This module depends on torch only.
"""
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["soft_target_kl", "soft_label_kl", "sigmoid_soft_target_kl", "OutputRecorder"]


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


def sigmoid_soft_target_kl(student_logits: torch.Tensor, target: torch.Tensor,
                           weights: Optional[torch.Tensor] = None,
                           normalizer: Optional[float] = None) -> torch.Tensor:
    """GradAug's soft-label KL for a per-class sigmoid classifier (RetinaNet's focal-loss head):
    one Bernoulli KL per class, summed over the classes.

    A sigmoid classifier predicts, per anchor (row) and class ``c``, an independent
    probability ``q_c = sigmoid(student_c)``, not one distribution over the classes, so the
    reference's ``KL(softmax(full) || softmax(sub))`` (gradaug-reference.md, "The training
    step", item 4: the full network's detached prediction is the target, weight 1) becomes,
    per row ``r``, with the teacher's probabilities ``p_c``::

        KL_r = sum_c  p_c log(p_c / q_c) + (1 - p_c) log((1 - p_c) / (1 - q_c))

    computed as ``binary_cross_entropy_with_logits(student, p) - H(p)`` (``H`` the Bernoulli
    entropy, ``0 log 0 = 0``): 0 where the student equals the teacher, gradient
    ``(q_c - p_c) * w_r / normalizer`` with respect to ``student_c``. In float64 (returned as
    float32): a dense head sums ~10^5 (128 px) to ~10^7 (COCO) such terms per batch, most of
    them near 0 where student and teacher agree, and float32's rounding of each (~1e-9, the
    difference of two ~0.05 numbers) would add up to more than the loss itself.

    Args:
        student_logits: (N, C, ...) logits, class dim 1 (as :func:`soft_target_kl`); every
            other position is a row (e.g. (N, C, A, H, W): image, class, anchor, cell).
        target: the teacher's probabilities in [0, 1], same shape (not detached here).
        weights: None (every row weight 1), or (N, ...) row weights (the shape without dim 1),
            e.g. 0 for anchors whose source lies outside the teacher's image.
        normalizer: what the weighted sum is divided by. None: ``max(sum_r w_r, 1)``, the
            weighted mean over rows (the reference's ``batchmean`` with a row per anchor).
            A dense detector passes its own classification loss's normaliser instead (RetinaNet:
            the number of positive anchors, mmdet's ``avg_factor`` of the focal loss), so the
            soft term has the scale of the loss it stands in for.

    Returns:
        The scalar loss (float32, summed in float64); 0 for an empty input, still in the graph.

    Raises:
        ValueError: if ``target`` and ``student_logits`` differ in shape, or ``normalizer``
            is not > 0.
    """
    if target.shape != student_logits.shape:
        raise ValueError(f"sigmoid_soft_target_kl: target shape {tuple(target.shape)} != student logits shape "
                         f"{tuple(student_logits.shape)}")
    if normalizer is not None and not normalizer > 0:
        raise ValueError(f"sigmoid_soft_target_kl: normalizer must be > 0, got {normalizer}")
    if student_logits.numel() == 0:
        return student_logits.float().sum() * 0.0
    x, p = student_logits.double(), target.double()
    entropy = -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p))
    per_row = (F.binary_cross_entropy_with_logits(x, p, reduction="none") - entropy).sum(1)
    if weights is not None:
        per_row = per_row * weights.double()
        mass = weights.double().sum()
    else:
        mass = per_row.new_tensor(float(per_row.numel()))
    if normalizer is None:
        return (per_row.sum() / mass.clamp(min=1.0)).float()
    return (per_row.sum() / float(normalizer)).float()


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
