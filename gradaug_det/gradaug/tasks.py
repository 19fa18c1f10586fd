"""What differs between detection and classification in a GradAug iteration.

A task runs the full network's pass (returning its losses and the teacher, i.e. what the
sub-networks learn from) and a sub-network's pass on the transformed batch. Both always
call the top-level model, so DistributedDataParallel sees every forward.
"""
import contextlib
import functools
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..utils.parallel import any_rank, unwrap_model
from .losses import OutputRecorder
from .roi_soft_labels import RoIClassifierSoftLabels
from .semseg_soft_labels import SemSegSoftLabels
from .options import GradAugOptions
from .sampler import SubnetSpec
from .transforms import (
    SubnetGeometry, batch_to_device, check_batch_fields, check_transformable_fields, transform_classification_batch,
    transform_detection_batch,
)

__all__ = ["DetectionTask", "ClassificationTask", "build_task", "check_subnet_loss_support",
           "foreground_heads_with_sync_norm"]

LossDict = Dict[str, torch.Tensor]


def _no_losses(*args, **kwargs):
    return None, {}


#: Meta-architectures whose sub-network passes can learn soft labels: the full network's RoI
#: box-classifier distributions (R-CNNs, PanopticFPN), or its per-pixel class distributions
#: (SemanticSegmentor with a SemSegFPNHead); the RoI heads that provide the former.
SOFT_LABEL_META_ARCHITECTURES = ("GeneralizedRCNN", "PanopticFPN", "SemanticSegmentor")
SOFT_LABEL_ROI_HEADS = ("StandardROIHeads", "Res5ROIHeads", "CascadeROIHeads")


def check_subnet_loss_support(cfg) -> None:
    """Refuse, before the model is built, a ``GRADAUG.SUBNET_LOSS`` the model cannot learn,
    and a training-dict field the sub-network transforms cannot move
    (:func:`.transforms.check_transformable_fields`).

    "soft" / "gt+soft" need something to take soft labels from: an R-CNN box classifier
    (``MODEL.META_ARCHITECTURE`` "GeneralizedRCNN" / "PanopticFPN" with ``MODEL.ROI_HEADS.NAME``
    a (subclass of) ``StandardROIHeads`` / ``Res5ROIHeads`` / ``CascadeROIHeads``: every
    stage's classifier, :mod:`.roi_soft_labels`), or a "SemanticSegmentor" whose ``MODEL.SEM_SEG_HEAD.NAME`` is a
    ``SemSegFPNHead``. "gt" works with every detectron2 model.

    Raises:
        ValueError: naming the key, its value and what to set.
    """
    if not cfg.GRADAUG.ENABLED or cfg.MODEL.META_ARCHITECTURE == "SlimmableClassifier":
        return
    check_transformable_fields(cfg)
    if "soft" not in cfg.GRADAUG.SUBNET_LOSS:
        return
    arch = cfg.MODEL.META_ARCHITECTURE
    fix = "set GRADAUG.SUBNET_LOSS='gt' (the standard losses on the transformed annotations)"
    if arch not in SOFT_LABEL_META_ARCHITECTURES:
        raise ValueError(
            f"GRADAUG.SUBNET_LOSS={cfg.GRADAUG.SUBNET_LOSS!r} needs an R-CNN box classifier for its soft labels, "
            f"but MODEL.META_ARCHITECTURE={arch!r} has none (soft labels support "
            f"{', '.join(SOFT_LABEL_META_ARCHITECTURES)}); {fix}"
        )
    if arch == "SemanticSegmentor":
        from detectron2.modeling.meta_arch.semantic_seg import SEM_SEG_HEADS_REGISTRY, SemSegFPNHead

        name = cfg.MODEL.SEM_SEG_HEAD.NAME
        if not issubclass(SEM_SEG_HEADS_REGISTRY.get(name), SemSegFPNHead):
            raise ValueError(
                f"GRADAUG.SUBNET_LOSS={cfg.GRADAUG.SUBNET_LOSS!r} on a SemanticSegmentor takes per-pixel soft labels "
                f"from a SemSegFPNHead, but MODEL.SEM_SEG_HEAD.NAME={name!r} is not one; {fix}"
            )
        return
    from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads, StandardROIHeads

    name = cfg.MODEL.ROI_HEADS.NAME
    heads = ROI_HEADS_REGISTRY.get(name)
    if not issubclass(heads, (StandardROIHeads, Res5ROIHeads)):  # CascadeROIHeads is a StandardROIHeads
        raise ValueError(
            f"GRADAUG.SUBNET_LOSS={cfg.GRADAUG.SUBNET_LOSS!r} takes soft labels from RoI box classifiers "
            f"({', '.join(SOFT_LABEL_ROI_HEADS)}), but MODEL.ROI_HEADS.NAME={name!r} is not one; {fix}"
        )


@contextlib.contextmanager
def _features_only(model):
    """The R-CNN's forward computes its features and nothing else: the proposal generator,
    the RoI heads (and PanopticFPN's semantic head) return no proposals and no losses (the
    soft-label hook on the RoI heads then adds the only loss). Restored on exit, also when
    the body raises."""
    modules = [m for m in (getattr(model, "proposal_generator", None), model.roi_heads,
                           getattr(model, "sem_seg_head", None)) if m is not None]
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


#: RoI heads that see foreground RoIs only (an image whose objects all left the sub-network's
#: image gives them none), their ``on`` switch on the RoI heads, and their loss's name.
_FOREGROUND_HEADS = (("mask_head", "mask_on", "loss_mask"), ("keypoint_head", "keypoint_on", "loss_keypoint"))


def _sync_norm_types():
    from detectron2.layers import NaiveSyncBatchNorm

    return (torch.nn.SyncBatchNorm, NaiveSyncBatchNorm)


def foreground_heads_with_sync_norm(model) -> List[Tuple[str, str, str]]:
    """The foreground-only RoI heads (mask, keypoint) of ``model`` that hold a synchronised BN
    (``SyncBN`` / ``naiveSyncBN``, e.g. ``MODEL.ROI_MASK_HEAD.NORM "SyncBN"`` as in the model
    zoo's ``Misc/mask_rcnn_R_50_FPN_3x_syncbn.yaml``).

    Such a head cannot take an empty input: detectron2's ``Conv2d`` refuses it for
    ``nn.SyncBatchNorm`` and ``NaiveSyncBatchNorm(stats_mode="")`` asserts a non-zero batch,
    and a worker that skipped the head alone would leave the others waiting in its
    all-reduce. See :meth:`DetectionTask.subnet_pass`.

    Returns:
        ``(head attribute, switch attribute, loss name)`` for each such head.
    """
    heads = getattr(unwrap_model(model), "roi_heads", None)
    out = []
    for name, switch, loss in _FOREGROUND_HEADS:
        head = getattr(heads, name, None) if getattr(heads, switch, False) else None
        if head is not None and any(isinstance(m, _sync_norm_types()) for m in head.modules()):
            out.append((name, switch, loss))
    return out


@contextlib.contextmanager
def _heads_skipped(net, heads: List[Tuple[str, str, str]]):
    """For one forward, the given RoI heads return their loss as 0 without running their
    layers. The 0 is computed from the head's parameters inside the model's forward, so
    DistributedDataParallel sees them used (with or without ``find_unused_parameters``) and
    every worker logs the same keys. Restored on exit, also when the body raises."""
    modules = [(getattr(net.roi_heads, name), loss) for name, _, loss in heads]
    try:
        for head, loss in modules:
            head.forward = functools.partial(_zero_loss, head, loss)  # shadows the class's forward
        yield
    finally:
        for head, _ in modules:
            del head.forward


def _zero_loss(head, loss, *args, **kwargs) -> LossDict:
    return {loss: sum(p.sum() for p in head.parameters()) * 0.0}


def _model_device(model) -> torch.device:
    net = unwrap_model(model)
    device = getattr(net, "device", None)
    return torch.device(device) if device is not None else next(net.parameters()).device


class DetectionTask:
    """GradAug for detectron2 models (Faster / Mask / Keypoint R-CNN, FPN or C4, PanopticFPN;
    with "gt" any detectron2 meta-architecture, e.g. RetinaNet or SemanticSegmentor).

    Sub-network loss: "gt" = the standard losses on the transformed annotations;
    "soft" = KL to the full network's box-classifier distributions on its RoIs (R-CNNs,
    PanopticFPN), or to its per-pixel class distributions (SemanticSegmentor,
    :mod:`.semseg_soft_labels`); "gt+soft" = both.

    The full pass puts the batch's dense fields on the model's device once
    (:func:`.transforms.batch_to_device`); every sub-network's batch is formed there.

    Args:
        model: the (possibly DDP-wrapped) detector.
        options: GradAug's options (validated); reads ``subnet_loss`` ("soft", "gt" or
            "gt+soft"), ``soft_weight`` and ``gt_weight``. Default: their defaults.
        ignore_value: ``sem_seg`` label of pixels rotated in from outside the image
            (``MODEL.SEM_SEG_HEAD.IGNORE_VALUE``).
    """

    def __init__(self, model, options: Optional[GradAugOptions] = None, *, ignore_value: int = 255):
        options = options if options is not None else GradAugOptions()
        self.use_gt = "gt" in options.subnet_loss
        self.use_soft = "soft" in options.subnet_loss
        self.soft_weight, self.gt_weight = options.soft_weight, options.gt_weight
        self.ignore_value = ignore_value
        net = unwrap_model(model)
        dense = hasattr(net, "sem_seg_head") and not hasattr(net, "roi_heads")  # SemanticSegmentor
        self.soft = RoIClassifierSoftLabels(model) if self.use_soft and not dense else None
        self.semseg = SemSegSoftLabels(model) if self.use_soft and dense else None
        # PanopticFPN's forward reads "instances" and "sem_seg" even when its heads are switched off
        self.panoptic = hasattr(net, "sem_seg_head") and hasattr(net, "roi_heads")
        # an R-CNN on precomputed proposals (PROPOSAL_GENERATOR "PrecomputedProposals") reads
        # "proposals" even when its RoI heads are switched off
        self.precomputed_proposals = hasattr(net, "roi_heads") and getattr(net, "proposal_generator", 0) is None
        # mask / keypoint heads with SyncBN: skipped on every worker when one worker's sub-network
        # batch kept no object (see subnet_pass)
        self.sync_norm_heads = foreground_heads_with_sync_norm(net) if self.use_gt else []

    def full_pass(self, model, batch: List[Dict]) -> Tuple[LossDict, object]:
        """Full network on the original batch: its standard losses; the teacher holds the
        batch with its dense fields on the model's device, and the RoI soft labels."""
        check_batch_fields(batch)  # a field the sub-networks cannot get: refused before any pass
        batch = batch_to_device(batch, _model_device(model))
        if self.semseg is not None:
            with self.semseg.record(batch) as dense:
                losses = model(batch)
            return losses, {"batch": batch, "rois": None, "sem_seg": dense}
        if not self.use_soft:
            return model(batch), {"batch": batch, "rois": None}
        with self.soft.record() as rois:
            losses = model(batch)
        return losses, {"batch": batch, "rois": rois}

    def subnet_pass(self, model, batch: List[Dict], teacher, spec: SubnetSpec) -> LossDict:
        """One sub-network (already set on the model) on its transformed batch.

        A rotated batch can lose every object of a worker's images. A mask or keypoint head
        normalised with SyncBN (:func:`foreground_heads_with_sync_norm`) then has no input on
        that worker and cannot run; so when any worker's batch kept no object (one all-reduce
        of a flag, only for such models), every worker skips those heads for this pass and
        their loss is 0 (attached to the head's parameters, so DDP and the logged keys stay the
        same on every worker). Plain BN / GN heads run on the empty input as in detectron2.
        """
        batch = teacher["batch"]
        if not self.use_gt:  # soft labels only: the annotations are not used
            # (precomputed "proposals" stay: a model without a proposal generator reads them)
            unused = ("instances",) if self.panoptic else ("instances", "sem_seg")
            batch = [{k: v for k, v in d.items() if k not in unused} for d in batch]
        batch_t, teacher_t = transform_detection_batch(batch, spec, teacher["rois"], device=_model_device(model),
                                                       ignore_value=self.ignore_value)
        if not self.use_gt and (self.panoptic or self.precomputed_proposals):
            from detectron2.structures import Instances

            empty = ["instances"] * self.panoptic + ["proposals"] * self.precomputed_proposals
            batch_t = [dict(d, **{k: Instances(tuple(d["image"].shape[-2:])) for k in empty}) for d in batch_t]
        if self.semseg is not None:
            geos = [SubnetGeometry(*d["image"].shape[-2:], spec) for d in batch]
            with self.semseg.teach(teacher["sem_seg"], geos, soft_only=not self.use_gt):
                losses = model(batch_t)
        elif self.use_gt:
            skip = []
            if self.sync_norm_heads:
                empty = sum(len(d["instances"]) for d in batch_t if "instances" in d) == 0
                skip = self.sync_norm_heads if any_rank(empty) else []
            soft = self.soft.teach(teacher_t) if self.use_soft else contextlib.nullcontext()
            with _heads_skipped(unwrap_model(model), skip), soft:
                losses = model(batch_t)
        else:  # soft labels only: RPN, box, mask and keypoint losses would all be discarded
            with self.soft.teach(teacher_t), _features_only(unwrap_model(model)):
                losses = model(batch_t)
        out = {}
        for k, v in losses.items():
            if k in ("loss_soft_cls", "loss_soft_sem_seg"):
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
        options: GradAug's options (validated); reads ``subnet_loss`` ("soft", "gt" or
            "gt+soft"), ``soft_weight`` and ``gt_weight``. Default: their defaults.
        batch_fn: optional transform of the full network's batch (e.g. CutMix); the
            sub-networks see its output.
    """

    def __init__(self, model, options: Optional[GradAugOptions] = None, *,
                 batch_fn: Optional[Callable[[List[Dict]], List[Dict]]] = None):
        options = options if options is not None else GradAugOptions()
        self.head = unwrap_model(model).head
        self.use_gt = "gt" in options.subnet_loss
        self.use_soft = "soft" in options.subnet_loss
        self.soft_weight, self.gt_weight = options.soft_weight, options.gt_weight
        self.batch_fn = batch_fn

    def full_pass(self, model, batch):
        if self.batch_fn is not None:
            batch = self.batch_fn(batch)
        batch = batch_to_device(batch, _model_device(model))  # the sub-networks' resizes run there too
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
    options = GradAugOptions.from_yacs(cfg)
    check_subnet_loss_support(cfg)
    if cfg.MODEL.META_ARCHITECTURE == "SlimmableClassifier":
        batch_fn = None
        if cfg.INPUT.CUTMIX.ENABLED:
            from ..data.classification import CutMix

            batch_fn = CutMix(cfg)
        return ClassificationTask(model, options, batch_fn=batch_fn)
    return DetectionTask(model, options, ignore_value=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE)
