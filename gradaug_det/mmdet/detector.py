"""GradAug for MMDetection detectors: the iteration runs in ``train_step``.

``GradAugMaskRCNN`` / ``GradAugFasterRCNN`` / ``GradAugCascadeRCNN`` / ``GradAugRetinaNet`` are
mmdet's ``MaskRCNN`` / ``FasterRCNN`` / ``CascadeRCNN`` / ``RetinaNet`` (same modules, same
state dict, same inference) whose ``train_step`` runs one GradAug iteration through the shared
:func:`gradaug_det.gradaug.gradaug_step`:

1. the data preprocessor runs once; the full network takes its standard losses on the
   batch and back-propagates;
2. each sampled sub-network (width / depth set on the backbone and neck) sees the batch
   rescaled and/or rotated (:func:`.transforms.transform_batch`) and learns from the full
   network's detached predictions ("soft"), the rescaled annotations ("gt") or both. The soft
   label of an R-CNN is its RoI class distributions (Cascade R-CNN's per stage; the teacher's
   RoIs moved with the batch by :meth:`.transforms.BatchGeometry.map_rois`, every row kept,
   weight 0 where a rotation left no area); RetinaNet's is dense, its per-anchor class
   probabilities (:class:`_DenseSoftLabels`: moved onto the sub-network's anchors by
   :meth:`.transforms.BatchGeometry.map_anchors`);
3. one optimizer step.

Every backward goes through the optimizer wrapper (``scale_loss`` + ``backward``: AMP loss
scaling, gradient-accumulation scaling) as one iteration's backward, and every forward
runs inside ``optim_wrapper.optim_context`` (autocast, no_sync while accumulating), so
``AmpOptimWrapper`` and ``accumulative_counts`` behave as for a stock detector. Other
detectors get the same with ``class MyGradAugDetector(GradAugDetectorMixin, MyDetector)``.

Under DDP, mmengine's default ``MMDistributedDataParallel`` calls the model's forward
directly and would skip ``train_step``; use ``model_wrapper_cfg =
dict(type='GradAugDistributedDataParallel')`` (:mod:`.wrapper`). A GradAug detector
raises if it is trained distributed without it.
"""
import contextlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from mmdet.models.detectors import CascadeRCNN, FasterRCNN, MaskRCNN, RetinaNet
from mmdet.registry import MODELS

from ..gradaug import GradAugOptions, SubnetSampler, gradaug_step, soft_label_kl, subnet_metrics, unwrap_model
from ..gradaug.geometry import AnchorLayout
from ..gradaug.losses import sigmoid_soft_target_kl
from ..gradaug.options import MMDET_KEYS
from ..slim import SlimmableModule, residual_blocks
from .transforms import transform_batch

__all__ = ["GradAugDetectorMixin", "GradAugMaskRCNN", "GradAugFasterRCNN",
           "GradAugCascadeRCNN", "GradAugRetinaNet",
           "MMDetTask", "gradaug_train_step"]

@dataclass
class _Pass:
    """What the detector's ``loss`` does in the current GradAug pass. RoIs, logits and
    weights are per box-classifier stage (one, or Cascade R-CNN's stages); a dense head's
    teacher and the batch geometry are in ``dense`` / ``geometry``."""

    mode: str  # "record" (full network) or "teach" (sub-network)
    use_gt: bool = True
    rois: Optional[List[torch.Tensor]] = None
    logits: Optional[List[torch.Tensor]] = None
    weights: Optional[List[torch.Tensor]] = None  # per stage (R,): 0 for RoIs the transform left without area
    recorded: Dict[str, Dict[int, torch.Tensor]] = field(default_factory=lambda: {"rois": {}, "logits": {}})
    features: Optional[tuple] = None
    dense: Optional[dict] = None  # a dense head's teacher (_DenseSoftLabels.teacher)
    geometry: Optional[object] = None  # the sub-network's BatchGeometry (dense heads)
    student: Optional[List[torch.Tensor]] = None  # the sub-network's class maps, when its own loss ran

    @property
    def soft(self) -> bool:
        """Whether this sub-network pass has a soft label to learn."""
        return self.rois is not None or self.dense is not None


class _RoISoftLabels:
    """The box classifier(s) of a ``StandardRoIHead`` or a ``CascadeRoIHead``: record the full
    network's RoIs and class logits of every stage; compute a sub-network's logits of a stage
    on given RoIs.

    Cascade R-CNN: every stage's classifier learns the full network's same stage on that
    stage's RoIs (the RoIs the full network's stage ``k`` pooled, mapped through the
    transform); the stage losses are summed with the head's ``stage_loss_weights``, as mmdet
    weights the stages' own losses (the detectron2 side scales the stages' gradients by
    ``1 / num_stages`` instead, as detectron2 does).
    """

    def __init__(self, detector: nn.Module):
        roi = getattr(detector, "roi_head", None)
        extractor = getattr(roi, "bbox_roi_extractor", None)
        head = getattr(roi, "bbox_head", None)
        cascade = isinstance(head, nn.ModuleList)
        if roi is None or extractor is None or head is None or cascade != isinstance(extractor, nn.ModuleList):
            raise ValueError(
                f"model.gradaug.subnet_loss with 'soft' needs a StandardRoIHead (Faster / Mask R-CNN) or a "
                f"CascadeRoIHead, got {type(roi).__name__}; set model.gradaug.subnet_loss='gt' for this detector"
            )
        self.roi_head = roi
        self.extractors = list(extractor) if cascade else [extractor]
        self.heads = list(head) if cascade else [head]
        self.stage_weights = [float(w) for w in roi.stage_loss_weights] if cascade else [1.0]
        if len(self.stage_weights) != len(self.heads):
            raise ValueError(f"model.roi_head.stage_loss_weights has {len(self.stage_weights)} entries for "
                             f"{len(self.heads)} stages")

    @property
    def num_stages(self) -> int:
        return len(self.heads)

    @contextlib.contextmanager
    def record(self, store: _Pass):
        def recorder(key, stage, pick):
            def hook(module, args, output):
                if stage in store.recorded[key]:
                    raise RuntimeError(f"stage {stage}'s box classifier ran twice in the full network's pass")
                store.recorded[key][stage] = pick(args, output).detach()
            return hook

        handles = []
        for stage, (extractor, head) in enumerate(zip(self.extractors, self.heads)):
            handles.append(extractor.register_forward_hook(recorder("rois", stage, lambda a, o: a[1])))
            handles.append(head.register_forward_hook(recorder("logits", stage, lambda a, o: o[0])))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def prepare(self, state: _Pass, teacher: dict, geometry) -> None:
        """Set a sub-network pass's soft label: the teacher's RoIs moved with its batch."""
        mapped = [geometry.map_rois(rois) for rois in teacher["rois"]]
        state.rois, state.weights = [r for r, _ in mapped], [w for _, w in mapped]
        state.logits = teacher["logits"]

    def capture(self, state: _Pass):
        """Nothing of the sub-network's own loss is reused (its classifier runs on the teacher's RoIs)."""
        return contextlib.nullcontext()

    def teacher(self, store: _Pass) -> dict:
        """The recorded ``{"rois": [per stage (R_k, 5)], "logits": [per stage (R_k, K+1)]}``."""
        stages = range(self.num_stages)
        if any(k not in store.recorded["rois"] or k not in store.recorded["logits"] for k in stages):
            raise RuntimeError(
                f"expected {self.num_stages} box prediction(s) in the full network's pass, saw stages "
                f"{sorted(store.recorded['logits'])}"
            )
        return {"rois": [store.recorded["rois"][k] for k in stages],
                "logits": [store.recorded["logits"][k] for k in stages]}

    def student_logits(self, x, rois: torch.Tensor, stage: int = 0) -> torch.Tensor:
        """Class logits (R, K+1) of stage ``stage``'s box classifier on ``rois`` ((R, 5):
        image index, x0, y0, x1, y1 in input pixels), from the feature maps ``x``."""
        roi, extractor = self.roi_head, self.extractors[stage]
        feats = extractor(x[: extractor.num_inputs], rois)
        if roi.with_shared_head:
            feats = roi.shared_head(feats)
        return self.heads[stage](feats)[0]

    def loss(self, x, state: _Pass) -> torch.Tensor:
        """``sum_k stage_weight_k * soft_label_kl(student_k, teacher_k, weights_k)`` (one term
        unless Cascade R-CNN)."""
        terms = [w * soft_label_kl(self.student_logits(x, rois, k), logits, weights)
                 for k, (w, rois, logits, weights) in enumerate(
                     zip(self.stage_weights, state.rois, state.logits, state.weights))]
        return sum(terms[1:], terms[0])


class _DenseSoftLabels:
    """The dense soft label of an anchor-based head with a per-class sigmoid classifier
    (RetinaNet's ``RetinaHead``, an ``AnchorHead`` with focal loss).

    The full network's class maps (per level (N, A * C, H, W)) are recorded, detached, with
    the normaliser of its focal loss (``avg_factor``: the number of positive anchors of the
    batch, at least 1 per image, as mmdet's ``AnchorHead`` computes it). A sub-network's
    anchors learn the teacher's per-anchor, per-class probabilities ``sigmoid(logit_T)``
    moved onto them (:meth:`.transforms.BatchGeometry.map_anchors`: each anchor's centre back
    through the inverse of the sub-network's transform, bilinear between the teacher's
    anchor centres; anchor sizes shifted by the rescale, so an anchor of size ``a`` of the
    sub-network learns the teacher's anchors of size ``a / s``, the same anchor one level up
    at ``s = 0.5``; weight 0 where the source lies outside the full network's input or no
    teacher anchor has that size) with
    :func:`~gradaug_det.gradaug.losses.sigmoid_soft_target_kl`: the Bernoulli KL per class,
    summed over classes and weighted anchors, divided by the teacher's ``avg_factor``.

    Why that normaliser, not the mean over anchors: the soft term stands in for (``'soft'``)
    or adds to (``'gt+soft'``) the focal loss, which mmdet divides by the number of positive
    anchors; the reference weighs its KL 1:1 against a cross-entropy of the same per-sample
    normalisation. A mean over all anchors (3069 per 128 x 128 input, about 200 000 per
    800 x 1333 COCO input, for tens of positives) would scale the soft term, and its gradient
    per anchor, down by that ratio, far below the focal loss it replaces.
    """

    def __init__(self, detector: nn.Module):
        head = getattr(detector, "bbox_head", None)
        generator = getattr(head, "prior_generator", None)
        name = type(head).__name__
        if head is None or generator is None or not hasattr(generator, "base_anchors"):
            raise ValueError(
                f"model.gradaug.subnet_loss with 'soft' needs RoI heads (Faster / Mask / Cascade R-CNN) or a dense "
                f"anchor head (RetinaNet's AnchorHead), and {type(detector).__name__}'s {name} has "
                f"{'no prior generator' if generator is None else type(generator).__name__ + ', not anchors'}; "
                "set model.gradaug.subnet_loss='gt' for this detector"
            )
        if not getattr(head, "use_sigmoid_cls", False) or not isinstance(getattr(head, "loss_cls", None), nn.Module):
            raise ValueError(
                f"model.gradaug.subnet_loss with 'soft' on a dense head needs a per-class sigmoid classifier "
                f"(loss_cls with use_sigmoid=True, e.g. FocalLoss), and {name} has a softmax one; set "
                "model.gradaug.subnet_loss='gt' for this detector"
            )
        self.head = head
        self.layout = AnchorLayout.from_base_anchors(generator.strides, generator.base_anchors)

    @contextlib.contextmanager
    def record(self, store: _Pass):
        def on_head(module, args, output):
            if "scores" in store.recorded:
                raise RuntimeError(f"{name} ran twice in the full network's pass")
            store.recorded["scores"] = [s.detach() for s in output[0]]

        def on_loss_cls(module, args, kwargs):
            store.recorded["avg_factor"] = kwargs.get("avg_factor")

        name = type(self.head).__name__
        handles = [self.head.register_forward_hook(on_head),
                   self.head.loss_cls.register_forward_pre_hook(on_loss_cls, with_kwargs=True)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def teacher(self, store: _Pass) -> dict:
        """``{"scores": [per level (N, A * C, H, W)] (detached logits), "avg_factor": float}``."""
        scores, avg = store.recorded.get("scores"), store.recorded.get("avg_factor")
        if scores is None or avg is None:
            raise RuntimeError(f"expected the full network's pass to run {type(self.head).__name__} and its "
                               "classification loss with an avg_factor")
        return {"scores": scores, "avg_factor": max(float(avg), 1.0)}

    def prepare(self, state: _Pass, teacher: dict, geometry) -> None:
        """Set a sub-network pass's soft label (moved in :meth:`loss`, once the sub-network's
        grids are known)."""
        state.dense, state.geometry = teacher, geometry

    @contextlib.contextmanager
    def capture(self, state: _Pass):
        """While the sub-network's own ("gt") loss runs, keep its class maps for the soft term."""
        def on_head(module, args, output):
            state.student = list(output[0])

        handle = self.head.register_forward_hook(on_head)
        try:
            yield
        finally:
            handle.remove()

    def loss(self, x, state: _Pass) -> torch.Tensor:
        """``sum_levels sum_anchors w * sum_c KL_Bernoulli(p_T || sigmoid(student)) / avg_factor_T``
        (see the class docstring)."""
        student = state.student if state.student is not None else self.head(x)[0]
        probs = [torch.sigmoid(s.float()) for s in state.dense["scores"]]
        targets, weights = state.geometry.map_anchors(probs, self.layout, [s.shape[-2:] for s in student])
        terms = []
        for k, (s, t) in enumerate(zip(student, targets)):
            a = len(self.layout.sizes[k])
            # (N, A * C, H, W) -> (N, C, A, H, W): class dim 1, a row per anchor and cell
            s, t = (v.unflatten(1, (a, -1)).transpose(1, 2) for v in (s, t))
            terms.append(sigmoid_soft_target_kl(s, t, None if weights is None else weights[k],
                                                normalizer=state.dense["avg_factor"]))
        return sum(terms[1:], terms[0])


def _soft_labels(detector: nn.Module):
    """The soft label a detector supports: RoI heads, or a dense anchor head."""
    if getattr(detector, "roi_head", None) is None and getattr(detector, "bbox_head", None) is not None:
        return _DenseSoftLabels(detector)
    return _RoISoftLabels(detector)


def _loss_terms(log_vars) -> Dict[str, torch.Tensor]:
    """The loss terms of mmengine's parsed losses (``parse_losses``: lists summed, means
    taken), without their total ``"loss"`` and without metrics such as ``acc``."""
    return {k: v for k, v in log_vars.items() if k != "loss" and "loss" in k}


class MMDetTask:
    """The two GradAug passes of an mmdet detector (the mmdet counterpart of
    :class:`gradaug_det.gradaug.DetectionTask`).

    Args:
        detector: the GradAug detector (unwrapped).
        options: GradAug's options (validated); reads ``subnet_loss`` ("soft", "gt" or
            "gt+soft"), ``soft_weight`` and ``gt_weight``.
    """

    def __init__(self, detector, options: GradAugOptions):
        self.use_gt = "gt" in options.subnet_loss
        self.use_soft = "soft" in options.subnet_loss
        self.soft_weight, self.gt_weight = options.soft_weight, options.gt_weight
        self.soft = _soft_labels(detector) if self.use_soft else None
        self.full_log_vars: Dict[str, torch.Tensor] = {}

    def full_pass(self, model, batch):
        net = unwrap_model(model)
        state = _Pass("record")
        with net.gradaug_pass(state):
            losses = model(**batch, mode="loss")
        _, log_vars = net.parse_losses(losses)
        self.full_log_vars = {k: v.detach() for k, v in log_vars.items()}
        teacher = self.soft.teacher(state) if self.use_soft else None
        return _loss_terms(log_vars), teacher

    def subnet_pass(self, model, batch, teacher, spec):
        net = unwrap_model(model)
        prep = net.data_preprocessor
        inputs, samples, geometry = transform_batch(
            batch["inputs"], batch["data_samples"], spec.scale, spec.angle,
            getattr(prep, "pad_size_divisor", 1), getattr(prep, "pad_value", 0.0))
        state = _Pass("teach", use_gt=self.use_gt)
        if self.use_soft:
            self.soft.prepare(state, teacher, geometry)
        with net.gradaug_pass(state):
            losses = model(inputs=inputs, data_samples=samples, mode="loss")
        out = {}
        _, log_vars = net.parse_losses(losses)
        for k, v in _loss_terms(log_vars).items():
            if k == "loss_soft_cls":
                out[k] = v * self.soft_weight
            elif self.use_gt:
                out[k] = v * self.gt_weight
        return out


def gradaug_train_step(model, data, optim_wrapper) -> Dict[str, torch.Tensor]:
    """One GradAug iteration of an mmdet GradAug detector, bare or DDP-wrapped.

    Args:
        model: the detector, or the DDP wrapper around it (every forward goes through it).
        data: the data loader's batch (before the data preprocessor).
        optim_wrapper: mmengine ``OptimWrapper`` / ``AmpOptimWrapper``.

    Returns:
        The log variables: the full network's (as a stock ``train_step`` returns them) and
        ``gradaug/sub{i}/...`` for every sub-network pass.
    """
    net = unwrap_model(model)
    with optim_wrapper.optim_context(model):
        data = net.data_preprocessor(data, True)
    count = optim_wrapper.inner_count

    def backward(loss):
        # Every pass back-propagates as part of ONE iteration: same accumulation scaling,
        # and the wrapper's count advances by one per iteration, as with update_params.
        optim_wrapper._inner_count = count
        optim_wrapper.backward(optim_wrapper.scale_loss(loss))

    from mmengine.logging import MessageHub

    out = gradaug_step(model, data, net.gradaug_sampler, net.gradaug_task, backward=backward,
                       autocast=lambda: optim_wrapper.optim_context(model),
                       iteration=MessageHub.get_current_instance().get_info("iter"))
    if optim_wrapper.should_update():
        optim_wrapper.step()
        optim_wrapper.zero_grad()
    log_vars = dict(net.gradaug_task.full_log_vars)
    log_vars.update({k: torch.tensor(v) for k, v in subnet_metrics(out).items()})
    return log_vars


class GradAugDetectorMixin:
    """Make an mmdet detector train with GradAug (see the module docstring).

    Args:
        gradaug (dict): ``model.gradaug`` in configs: GradAug's options over their defaults
            (:class:`~gradaug_det.gradaug.options.GradAugOptions`, the keys of
            :data:`~gradaug_det.gradaug.options.MMDET_KEYS`: the yacs ``GRADAUG`` keys in lower
            case but ``enabled`` and ``depth_eval_scale``; ``seed`` -1 is 0).
        *args, **kwargs: the detector's own arguments.

    Raises:
        ValueError: naming the ``model.gradaug`` key (or backbone) to change.
    """

    def __init__(self, *args, gradaug: Optional[dict] = None, **kwargs):
        opts = GradAugOptions.from_dict(gradaug, "model.gradaug.", MMDET_KEYS)
        super().__init__(*args, **kwargs)
        if not any(isinstance(m, SlimmableModule) for m in self.backbone.modules()):
            raise ValueError(
                f"GradAug needs a slimmable backbone, got {type(self.backbone).__name__}; set "
                "model.backbone.type='SlimmableResNet' (same arguments and weights as 'ResNet')"
            )
        if opts.sampling == "depth" and not residual_blocks(self.backbone):
            raise ValueError("model.gradaug.sampling='depth' needs a backbone with droppable residual blocks")
        self.gradaug_options = opts
        self.gradaug_sampler = SubnetSampler(opts)
        self.gradaug_task = MMDetTask(self, opts)
        self._gradaug_pass: Optional[_Pass] = None

    @property
    def needs_unused_parameters(self) -> bool:
        """Whether DDP must look for parameters a pass leaves unused (soft-only or depth sub-networks:
        :meth:`GradAugOptions.unused_parameters_reason
        <gradaug_det.gradaug.options.GradAugOptions.unused_parameters_reason>`)."""
        return self.gradaug_options.unused_parameters_reason() is not None

    @contextlib.contextmanager
    def gradaug_pass(self, state: _Pass):
        """While the block runs, ``loss`` serves this GradAug pass."""
        self._gradaug_pass = state
        try:
            yield state
        finally:
            self._gradaug_pass = None

    def train_step(self, data, optim_wrapper):
        """One GradAug iteration (see :func:`gradaug_train_step`)."""
        return gradaug_train_step(self, data, optim_wrapper)

    def extract_feat(self, batch_inputs):
        x = super().extract_feat(batch_inputs)
        if self._gradaug_pass is not None:
            self._gradaug_pass.features = x
        return x

    def loss(self, batch_inputs, batch_data_samples):
        state = self._gradaug_pass
        if state is None:
            if self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                raise RuntimeError(
                    f"{type(self).__name__} is being trained under a DDP wrapper that bypasses its "
                    "train_step, so no GradAug step would run; set "
                    "model_wrapper_cfg=dict(type='GradAugDistributedDataParallel') in the config"
                )
            return super().loss(batch_inputs, batch_data_samples)
        if state.mode == "record":
            soft = self.gradaug_task.soft
            with soft.record(state) if soft is not None else contextlib.nullcontext():
                return super().loss(batch_inputs, batch_data_samples)
        if not state.soft:  # sub-network, ground truth only
            return super().loss(batch_inputs, batch_data_samples)
        if state.use_gt:
            with self.gradaug_task.soft.capture(state):
                losses = super().loss(batch_inputs, batch_data_samples)
            x = state.features
        else:  # soft labels only: RPN, mask and box regression losses would be discarded
            losses = {}
            x = self.extract_feat(batch_inputs)
        losses["loss_soft_cls"] = self.gradaug_task.soft.loss(x, state)
        return losses


@MODELS.register_module()
class GradAugMaskRCNN(GradAugDetectorMixin, MaskRCNN):
    """mmdet ``MaskRCNN`` trained with GradAug (``model.gradaug``: GradAug's options,
    :class:`~gradaug_det.gradaug.options.GradAugOptions`)."""


@MODELS.register_module()
class GradAugFasterRCNN(GradAugDetectorMixin, FasterRCNN):
    """mmdet ``FasterRCNN`` trained with GradAug (``model.gradaug``: GradAug's options,
    :class:`~gradaug_det.gradaug.options.GradAugOptions`)."""


@MODELS.register_module()
class GradAugCascadeRCNN(GradAugDetectorMixin, CascadeRCNN):
    """mmdet ``CascadeRCNN`` (also Cascade Mask R-CNN) trained with GradAug. With "soft"
    labels every stage's box classifier learns the full network's same stage (on that stage's
    RoIs, mapped through the transform), the stages weighted by ``stage_loss_weights``."""


@MODELS.register_module()
class GradAugRetinaNet(GradAugDetectorMixin, RetinaNet):
    """mmdet ``RetinaNet`` trained with GradAug. With "soft" labels every sub-network anchor
    learns the full network's per-class probabilities of the anchor it corresponds to (same
    source point, size divided by the rescale; :class:`_DenseSoftLabels`), normalised as the
    focal loss is."""
