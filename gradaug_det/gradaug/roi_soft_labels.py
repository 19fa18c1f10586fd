"""Soft labels for the RoI box classifier of a detectron2 R-CNN.

The full network's class distributions on its own sampled RoIs are recorded during its
pass; the RoIs are mapped through the sub-network's input transform (on the device, see
:mod:`.transforms`), and the sub-network's box classifier on those RoIs learns them with
:func:`.losses.soft_label_kl`. RoIs a rotation leaves without area keep a weight of 0
rather than being dropped (dropping needs boolean indexing: a host sync on CUDA).
"""
import contextlib
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.structures import Boxes

from .losses import soft_label_kl, unwrap_model

__all__ = ["RoIClassifierSoftLabels", "weighted_soft_label_kl"]


def weighted_soft_label_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                           weights: torch.Tensor) -> torch.Tensor:
    """:func:`.losses.soft_label_kl` over the RoIs of weight 1 only, without indexing.

    Args:
        student_logits, teacher_logits: (R, K) logits.
        weights: (R,) 1 for RoIs that take part, 0 for RoIs to leave out.

    Returns:
        ``sum_r w_r KL_r / max(sum_r w_r, 1)``: with all weights 1 the reference's
        ``reduction="batchmean"``; with 0/1 weights, exactly that loss on the kept rows.
    """
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    w = weights.float()
    target = F.softmax(teacher_logits.detach().float(), dim=1)
    per_roi = F.kl_div(F.log_softmax(student_logits.float(), dim=1), target, reduction="none").sum(1)
    return (per_roi * w).sum() / w.sum().clamp(min=1.0)


class RoIClassifierSoftLabels:
    """Soft labels for the RoI box classifier of a detectron2 R-CNN.

    Supports ``StandardROIHeads`` (FPN models) and ``Res5ROIHeads`` (C4 models).

    Args:
        model: the (possibly DDP-wrapped) GeneralizedRCNN.

    Raises:
        ValueError: if the model has no supported RoI heads.
    """

    def __init__(self, model: nn.Module):
        roi = getattr(unwrap_model(model), "roi_heads", None)
        pooler = getattr(roi, "box_pooler", None) or getattr(roi, "pooler", None)
        if roi is None or pooler is None or not hasattr(roi, "box_predictor") or isinstance(
                getattr(roi, "box_predictor"), nn.ModuleList):
            raise ValueError(
                f"GRADAUG.SUBNET_LOSS with 'soft' needs StandardROIHeads or Res5ROIHeads, got "
                f"{type(roi).__name__}; set GRADAUG.SUBNET_LOSS='gt' for other models"
            )
        self.roi_heads = roi
        self.pooler = pooler

    @contextlib.contextmanager
    def record(self):
        """Record the full network's RoIs and box-classifier logits during its pass.

        Yields:
            a list that, after the block, holds per image ``{"boxes": (R, 4), "logits": (R, K+1)}``.
        """
        boxes, logits, teacher = [], [], []

        def on_pool(module, args, output):
            boxes.append([b.tensor.detach() for b in args[1]])

        def on_predict(module, args, output):
            logits.append(output[0].detach())

        handles = [self.pooler.register_forward_hook(on_pool),
                   self.roi_heads.box_predictor.register_forward_hook(on_predict)]
        try:
            yield teacher
        finally:
            for h in handles:
                h.remove()
        if len(boxes) != 1 or len(logits) != 1:
            raise RuntimeError(
                f"expected one RoI pooling and one box prediction in the full network's pass, "
                f"saw {len(boxes)} and {len(logits)}; soft labels support StandardROIHeads / Res5ROIHeads"
            )
        for b, l in zip(boxes[0], logits[0].split([len(b) for b in boxes[0]])):
            teacher.append({"boxes": b, "logits": l})

    def student_logits(self, features: Dict[str, torch.Tensor], boxes: List[torch.Tensor]) -> torch.Tensor:
        """Box-classifier logits of the current (sub-)network on the given boxes."""
        roi = self.roi_heads
        box_lists = [Boxes(b) for b in boxes]
        if hasattr(roi, "box_pooler"):
            x = roi.box_pooler([features[f] for f in roi.box_in_features], box_lists)
            x = roi.box_head(x)
        else:  # Res5ROIHeads
            x = roi._shared_roi_transform([features[f] for f in roi.in_features], box_lists)
            x = x.mean(dim=[2, 3])
        scores, _ = roi.box_predictor(x)
        return scores

    @contextlib.contextmanager
    def teach(self, teacher: List[Dict[str, torch.Tensor]], name: str = "loss_soft_cls"):
        """While the block runs, the RoI heads' loss dict gains ``name``: the soft-label KL.

        The loss is computed inside the model's forward (as a forward hook of the RoI
        heads), so it flows through DistributedDataParallel like any other loss.
        """

        def on_roi_heads(module, args, kwargs, output):
            features = args[1] if len(args) > 1 else kwargs["features"]
            device = next(iter(features.values())).device
            student = self.student_logits(features, [t["boxes"].to(device) for t in teacher])
            target = torch.cat([t["logits"] for t in teacher]).to(device)
            weights = [t.get("weights") for t in teacher]
            if any(w is not None for w in weights):
                weights = torch.cat([torch.ones(len(t["logits"]), device=device) if w is None else w.to(device)
                                     for t, w in zip(teacher, weights)])
                output[1][name] = weighted_soft_label_kl(student, target, weights)
            else:
                output[1][name] = soft_label_kl(student, target)
            return output

        handle = self.roi_heads.register_forward_hook(on_roi_heads, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
