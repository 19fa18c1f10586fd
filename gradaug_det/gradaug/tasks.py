"""What differs between detection and classification in a GradAug iteration.

A task runs the full network's pass (returning its losses and the teacher, i.e. what the
sub-networks learn from) and a sub-network's pass on the transformed batch. Both always
call the top-level model, so DistributedDataParallel sees every forward.
"""
import contextlib
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .losses import OutputRecorder, unwrap_model
from .roi_soft_labels import RoIClassifierSoftLabels
from .sampler import SUBNET_LOSSES, SubnetSpec
from .transforms import transform_classification_batch, transform_detection_batch

__all__ = ["DetectionTask", "ClassificationTask", "build_task"]

LossDict = Dict[str, torch.Tensor]


def _check_loss_mode(subnet_loss: str) -> None:
    if subnet_loss not in SUBNET_LOSSES:
        raise ValueError(f"GRADAUG.SUBNET_LOSS={subnet_loss!r} is invalid: allowed {', '.join(SUBNET_LOSSES)}")


def _no_losses(*args, **kwargs):
    return None, {}


@contextlib.contextmanager
def _features_only(model):
    """The R-CNN's forward computes its features and nothing else: the proposal generator and
    the RoI heads return no proposals and no losses (the soft-label hook on the RoI heads then
    adds the only loss). Restored on exit, also when the body raises."""
    modules = [m for m in (getattr(model, "proposal_generator", None), model.roi_heads) if m is not None]
    vis_period = getattr(model, "vis_period", 0)
    try:
        model.vis_period = 0  # training visualisation would need proposals
        for m in modules:
            m.forward = _no_losses  # an instance attribute shadows the class's forward
        yield
    finally:
        model.vis_period = vis_period
        for m in modules:
            del m.forward


class DetectionTask:
    """GradAug for detectron2 R-CNN models (Faster / Mask R-CNN, FPN or C4).

    Sub-network loss: "gt" = the standard losses on the transformed annotations;
    "soft" = KL to the full network's box-classifier distributions on its RoIs;
    "gt+soft" = both.

    Args:
        model: the (possibly DDP-wrapped) detector.
        subnet_loss: "soft", "gt" or "gt+soft".
        soft_weight, gt_weight: weights of the two kinds of sub-network loss.
    """

    def __init__(self, model, subnet_loss: str = "soft", soft_weight: float = 1.0, gt_weight: float = 1.0):
        _check_loss_mode(subnet_loss)
        self.use_gt = "gt" in subnet_loss
        self.use_soft = "soft" in subnet_loss
        self.soft_weight, self.gt_weight = soft_weight, gt_weight
        self.soft = RoIClassifierSoftLabels(model) if self.use_soft else None

    def full_pass(self, model, batch: List[Dict]) -> Tuple[LossDict, object]:
        """Full network on the original batch: its standard losses and its RoI soft labels."""
        if not self.use_soft:
            return model(batch), None
        with self.soft.record() as teacher:
            losses = model(batch)
        return losses, teacher

    def subnet_pass(self, model, batch: List[Dict], teacher, spec: SubnetSpec) -> LossDict:
        """One sub-network (already set on the model) on its transformed batch."""
        if not self.use_gt:  # soft labels only: the annotations are not used
            batch = [{k: v for k, v in d.items() if k != "instances"} for d in batch]
        batch_t, teacher_t = transform_detection_batch(batch, spec, teacher)
        if not self.use_soft:
            losses = model(batch_t)
        elif self.use_gt:
            with self.soft.teach(teacher_t):
                losses = model(batch_t)
        else:  # soft labels only: RPN, box, mask and keypoint losses would all be discarded
            with self.soft.teach(teacher_t), _features_only(unwrap_model(model)):
                losses = model(batch_t)
        out = {}
        for k, v in losses.items():
            if k == "loss_soft_cls":
                out[k] = v * self.soft_weight
            elif self.use_gt:
                out[k] = v * self.gt_weight
        return out


class ClassificationTask:
    """GradAug for the ImageNet classifier (reference code semantics).

    The full network takes cross-entropy on the (optionally CutMix-ed) batch; each
    sub-network sees the same images resized/rotated and learns the full network's
    detached softmax ("soft"), the labels ("gt") or both.

    Args:
        model: the (possibly DDP-wrapped) classifier; its ``head`` outputs the logits.
        subnet_loss: "soft", "gt" or "gt+soft".
        soft_weight, gt_weight: loss weights.
        batch_fn: optional transform of the full network's batch (e.g. CutMix); the
            sub-networks see its output.
    """

    def __init__(self, model, subnet_loss: str = "soft", soft_weight: float = 1.0, gt_weight: float = 1.0,
                 batch_fn: Optional[Callable[[List[Dict]], List[Dict]]] = None):
        _check_loss_mode(subnet_loss)
        self.head = unwrap_model(model).head
        self.use_gt = "gt" in subnet_loss
        self.use_soft = "soft" in subnet_loss
        self.soft_weight, self.gt_weight = soft_weight, gt_weight
        self.batch_fn = batch_fn

    def full_pass(self, model, batch):
        if self.batch_fn is not None:
            batch = self.batch_fn(batch)
        with OutputRecorder(self.head) as rec:
            losses = model(batch)
        return losses, {"batch": batch, "logits": rec.outputs[-1]}

    def subnet_pass(self, model, batch, teacher, spec: SubnetSpec) -> LossDict:
        batch_t = transform_classification_batch(teacher["batch"], spec)
        out = {}
        if self.use_soft:
            probs = F.softmax(teacher["logits"].float(), dim=1)
            soft_batch = [dict(d, soft_label=p) for d, p in zip(batch_t, probs)]
            out["loss_soft_cls"] = model(soft_batch)["loss_cls"] * self.soft_weight
        if self.use_gt:
            out["loss_cls"] = model(batch_t)["loss_cls"] * self.gt_weight
        return out


def build_task(cfg, model):
    """The task for ``cfg.MODEL.META_ARCHITECTURE`` (classifier or R-CNN detector)."""
    g = cfg.GRADAUG
    if cfg.MODEL.META_ARCHITECTURE == "SlimmableClassifier":
        batch_fn = None
        if cfg.INPUT.CUTMIX.ENABLED:
            from ..data.classification import CutMix

            batch_fn = CutMix(cfg)
        return ClassificationTask(model, g.SUBNET_LOSS, g.SOFT_WEIGHT, g.GT_WEIGHT, batch_fn)
    return DetectionTask(model, g.SUBNET_LOSS, g.SOFT_WEIGHT, g.GT_WEIGHT)
