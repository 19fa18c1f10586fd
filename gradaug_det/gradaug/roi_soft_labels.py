"""Soft labels for the RoI box classifier of a detectron2 R-CNN.

The full network's class distributions on its own sampled RoIs are recorded during its
pass; the RoIs are mapped through the sub-network's input transform (on the device, see
:mod:`.transforms`) by :func:`.geometry.map_teacher_rois` (the core shared with the mmdet
side), and the sub-network's box classifier on those RoIs learns them with
:func:`.losses.soft_label_kl`. RoIs a rotation leaves without area keep a weight of 0
rather than being dropped (dropping needs boolean indexing: a host sync on CUDA).

Cascade R-CNN (``CascadeROIHeads``): every stage's box classifier learns the full network's
same stage on that stage's RoIs (the RoIs the full network's stage ``k`` pooled, mapped
through the transform). The stage losses are summed into one ``loss_soft_cls`` and the
gradient into the pooled features is scaled by ``1 / num_stages``, exactly as detectron2
treats Cascade R-CNN's own per-stage classification losses.
"""
import contextlib
from typing import Dict, List

import torch
from torch import nn

from detectron2.structures import Boxes

from ..utils.parallel import unwrap_model
from .losses import soft_label_kl

__all__ = ["RoIClassifierSoftLabels"]


class RoIClassifierSoftLabels:
    """Soft labels for the RoI box classifier(s) of a detectron2 R-CNN.

    Supports ``StandardROIHeads`` (FPN models), ``Res5ROIHeads`` (C4 models) and
    ``CascadeROIHeads`` (one box classifier per stage, see the module docstring).

    Args:
        model: the (possibly DDP-wrapped) GeneralizedRCNN.

    Raises:
        ValueError: if the model has no supported RoI heads.
    """

    def __init__(self, model: nn.Module):
        roi = getattr(unwrap_model(model), "roi_heads", None)
        pooler = getattr(roi, "box_pooler", None) or getattr(roi, "pooler", None)
        if roi is None or pooler is None or not hasattr(roi, "box_predictor"):
            raise ValueError(
                f"GRADAUG.SUBNET_LOSS with 'soft' needs StandardROIHeads, Res5ROIHeads or CascadeROIHeads, got "
                f"{type(roi).__name__}; set GRADAUG.SUBNET_LOSS='gt' for other models"
            )
        self.roi_heads = roi
        self.pooler = pooler
        #: Cascade R-CNN: one box head and predictor per stage.
        self.cascade = isinstance(roi.box_predictor, nn.ModuleList)
        self.predictors = list(roi.box_predictor) if self.cascade else [roi.box_predictor]

    @contextlib.contextmanager
    def record(self):
        """Record the full network's RoIs and box-classifier logits during its pass.

        Yields:
            a list that, after the block, holds per image ``{"boxes": (R, 4), "logits": (R, K+1)}``;
            for Cascade R-CNN the stages' RoIs one after the other and ``"stage_sizes"``
            (a list of ints: RoIs per stage).
        """
        boxes, logits, teacher = [], [], []

        def on_pool(module, args, output):
            boxes.append([b.tensor.detach() for b in args[1]])

        def on_predict(module, args, output):
            logits.append(output[0].detach())

        handles = [self.pooler.register_forward_hook(on_pool)]
        handles += [p.register_forward_hook(on_predict) for p in self.predictors]
        try:
            yield teacher
        finally:
            for h in handles:
                h.remove()
        n = len(self.predictors)
        if len(boxes) != n or len(logits) != n:
            raise RuntimeError(
                f"expected {n} RoI pooling(s) and box prediction(s) in the full network's pass, "
                f"saw {len(boxes)} and {len(logits)}; soft labels support StandardROIHeads / Res5ROIHeads / "
                "CascadeROIHeads"
            )
        per_stage = [l.split([len(b) for b in bs]) for bs, l in zip(boxes, logits)]  # [stage][image]
        for i in range(len(boxes[0])):
            entry = {"boxes": torch.cat([bs[i] for bs in boxes]) if self.cascade else boxes[0][i],
                     "logits": torch.cat([ls[i] for ls in per_stage]) if self.cascade else per_stage[0][i]}
            if self.cascade:
                entry["stage_sizes"] = [len(bs[i]) for bs in boxes]
            teacher.append(entry)

    def student_logits(self, features: Dict[str, torch.Tensor], boxes: List[torch.Tensor],
                       stage: int = 0) -> torch.Tensor:
        """Box-classifier logits (R, K+1) of the current (sub-)network on the given boxes
        (per image (R_i, 4), in pixels); ``stage``: the Cascade R-CNN stage."""
        roi = self.roi_heads
        box_lists = [Boxes(b) for b in boxes]
        if self.cascade:
            from detectron2.modeling.roi_heads.cascade_rcnn import _ScaleGradient

            x = roi.box_pooler([features[f] for f in roi.box_in_features], box_lists)
            x = _ScaleGradient.apply(x, 1.0 / roi.num_cascade_stages)  # as CascadeROIHeads._run_stage
            scores, _ = roi.box_predictor[stage](roi.box_head[stage](x))
            return scores
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
            losses = [self._stage_kl(features, stage_teacher, stage, device)
                      for stage, stage_teacher in enumerate(self._stages(teacher))]
            output[1][name] = sum(losses[1:], losses[0])
            return output

        handle = self.roi_heads.register_forward_hook(on_roi_heads, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def _stages(self, teacher: List[Dict]) -> List[List[Dict]]:
        """The teacher per stage (one stage unless Cascade R-CNN), each a per-image list."""
        if not self.cascade:
            return [teacher]
        split = [{k: t[k].split(t["stage_sizes"]) for k in ("boxes", "logits", "weights") if k in t}
                 for t in teacher]
        return [[{k: v[stage] for k, v in s.items()} for s in split] for stage in range(len(self.predictors))]

    def _stage_kl(self, features, teacher: List[Dict], stage: int, device) -> torch.Tensor:
        student = self.student_logits(features, [t["boxes"].to(device) for t in teacher], stage)
        target = torch.cat([t["logits"] for t in teacher]).to(device)
        weights = [t.get("weights") for t in teacher]
        if any(w is not None for w in weights):
            weights = torch.cat([torch.ones(len(t["logits"]), device=device) if w is None else w.to(device)
                                 for t, w in zip(teacher, weights)])
            return soft_label_kl(student, target, weights)
        return soft_label_kl(student, target)
