"""GradAug for MMDetection two-stage detectors: the iteration runs in ``train_step``.

``GradAugMaskRCNN`` / ``GradAugFasterRCNN`` are mmdet's ``MaskRCNN`` / ``FasterRCNN``
(same modules, same state dict, same inference) whose ``train_step`` runs one GradAug
iteration through the shared :func:`gradaug_det.gradaug.gradaug_step`:

1. the data preprocessor runs once; the full network takes its standard losses on the
   batch and back-propagates;
2. each sampled sub-network (width / depth set on the backbone and neck) sees the batch
   rescaled and/or rotated (:func:`.transforms.transform_batch`) and learns from the full network's detached RoI
   class distributions ("soft"), the rescaled annotations ("gt") or both;
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

from ..gradaug import SubnetSampler, gradaug_step, soft_label_kl, subnet_metrics, unwrap_model
from ..gradaug.sampler import validate_loss_args, validate_sampler_args
from ..slim import SlimmableModule, residual_blocks
from .transforms import transform_batch

__all__ = ["GRADAUG_DEFAULTS", "GradAugDetectorMixin", "GradAugMaskRCNN", "GradAugFasterRCNN",
           "GradAugCascadeRCNN", "GradAugRetinaNet",
           "MMDetTask", "gradaug_train_step"]

#: ``model.gradaug`` keys and their defaults (the paper's ImageNet setting; the meaning of
#: each is that of the detectron2 key ``GRADAUG.<KEY>``, see gradaug_det/config.py).
GRADAUG_DEFAULTS = dict(
    num_subnets=3,  # sub-networks per iteration
    min_width=0.9,  # smallest width; always one sub-network at it when smallest_subnet
    max_width=1.0,  # the other widths are uniform in [min_width, max_width]
    smallest_subnet=True,
    sampling="width",  # "width" or "depth" (drop residual blocks instead)
    depth_min_keep=0.8,  # depth sampling: keep probability of the last block
    transform="scale",  # the sub-networks' input transform: "scale", "rotate" or "scale_rotate"
    scales=(1.0, 0.857, 0.714, 0.571),  # relative input scales, one drawn per sub-network
    rotation=(-20.0, 20.0),  # (min, max) degrees of the rotation, one angle drawn per sub-network
    subnet_loss="soft",  # "soft" (RoI class KL), "gt" or "gt+soft"
    soft_weight=1.0,
    gt_weight=1.0,
    seed=0,  # the sub-network sampler's own RNG; identical on every worker
)


@dataclass
class _Pass:
    """What the detector's ``loss`` does in the current GradAug pass."""

    mode: str  # "record" (full network) or "teach" (sub-network)
    use_gt: bool = True
    rois: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    recorded: Dict[str, List[torch.Tensor]] = field(default_factory=lambda: {"rois": [], "logits": []})
    features: Optional[tuple] = None


class _RoISoftLabels:
    """The box classifier of a ``StandardRoIHead``: record the full network's RoIs and
    class logits; compute a sub-network's logits on given RoIs."""

    def __init__(self, detector: nn.Module):
        roi = getattr(detector, "roi_head", None)
        if roi is None or not hasattr(roi, "bbox_roi_extractor") or isinstance(
                getattr(roi, "bbox_head", None), nn.ModuleList):
            raise ValueError(
                f"model.gradaug.subnet_loss with 'soft' needs a StandardRoIHead (Faster / Mask R-CNN), got "
                f"{type(roi).__name__}; set model.gradaug.subnet_loss='gt' for this detector"
            )
        self.roi_head = roi

    @contextlib.contextmanager
    def record(self, store: _Pass):
        def on_extract(module, args, output):
            store.recorded["rois"].append(args[1].detach())

        def on_predict(module, args, output):
            store.recorded["logits"].append(output[0].detach())

        handles = [self.roi_head.bbox_roi_extractor.register_forward_hook(on_extract),
                   self.roi_head.bbox_head.register_forward_hook(on_predict)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def student_logits(self, x, rois: torch.Tensor) -> torch.Tensor:
        roi = self.roi_head
        feats = roi.bbox_roi_extractor(x[: roi.bbox_roi_extractor.num_inputs], rois)
        if roi.with_shared_head:
            feats = roi.shared_head(feats)
        return roi.bbox_head(feats)[0]


def _loss_terms(log_vars) -> Dict[str, torch.Tensor]:
    """The loss terms of mmengine's parsed losses (``parse_losses``: lists summed, means
    taken), without their total ``"loss"`` and without metrics such as ``acc``."""
    return {k: v for k, v in log_vars.items() if k != "loss" and "loss" in k}


class MMDetTask:
    """The two GradAug passes of an mmdet detector (the mmdet counterpart of
    :class:`gradaug_det.gradaug.DetectionTask`).

    Args:
        detector: the GradAug detector (unwrapped).
        subnet_loss: "soft", "gt" or "gt+soft".
        soft_weight, gt_weight: weights of the two kinds of sub-network loss.
    """

    def __init__(self, detector, subnet_loss: str = "soft", soft_weight: float = 1.0, gt_weight: float = 1.0):
        self.use_gt = "gt" in subnet_loss
        self.use_soft = "soft" in subnet_loss
        self.soft_weight, self.gt_weight = soft_weight, gt_weight
        self.soft = _RoISoftLabels(detector) if self.use_soft else None
        self.full_log_vars: Dict[str, torch.Tensor] = {}

    def full_pass(self, model, batch):
        net = unwrap_model(model)
        state = _Pass("record")
        with net.gradaug_pass(state):
            losses = model(**batch, mode="loss")
        _, log_vars = net.parse_losses(losses)
        self.full_log_vars = {k: v.detach() for k, v in log_vars.items()}
        teacher = None
        if self.use_soft:
            if len(state.recorded["logits"]) != 1 or not state.recorded["rois"]:
                raise RuntimeError(
                    f"expected one box prediction in the full network's pass, saw {len(state.recorded['logits'])}"
                )
            teacher = {"rois": state.recorded["rois"][0], "logits": state.recorded["logits"][0]}
        return _loss_terms(log_vars), teacher

    def subnet_pass(self, model, batch, teacher, spec):
        net = unwrap_model(model)
        prep = net.data_preprocessor
        inputs, samples, geometry = transform_batch(
            batch["inputs"], batch["data_samples"], spec.scale, spec.angle,
            getattr(prep, "pad_size_divisor", 1), getattr(prep, "pad_value", 0.0))
        state = _Pass("teach", use_gt=self.use_gt)
        if self.use_soft:
            state.rois, state.logits = geometry.map_rois(teacher["rois"], teacher["logits"])
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
    """Make an mmdet two-stage detector train with GradAug (see the module docstring).

    Args:
        gradaug (dict): overrides of :data:`GRADAUG_DEFAULTS` (``model.gradaug`` in configs).
        *args, **kwargs: the detector's own arguments.

    Raises:
        ValueError: naming the ``model.gradaug`` key (or backbone) to change.
    """

    def __init__(self, *args, gradaug: Optional[dict] = None, **kwargs):
        opts = _check_options(gradaug)
        super().__init__(*args, **kwargs)
        if not any(isinstance(m, SlimmableModule) for m in self.backbone.modules()):
            raise ValueError(
                f"GradAug needs a slimmable backbone, got {type(self.backbone).__name__}; set "
                "model.backbone.type='SlimmableResNet' (same arguments and weights as 'ResNet')"
            )
        if opts["sampling"] == "depth" and not residual_blocks(self.backbone):
            raise ValueError("model.gradaug.sampling='depth' needs a backbone with droppable residual blocks")
        self.gradaug_options = opts
        self.gradaug_sampler = SubnetSampler(
            num_subnets=opts["num_subnets"], min_width=opts["min_width"], max_width=opts["max_width"],
            smallest=opts["smallest_subnet"], sampling=opts["sampling"], min_keep=opts["depth_min_keep"],
            transform=opts["transform"], scales=opts["scales"], rotation=opts["rotation"], seed=opts["seed"])
        self.gradaug_task = MMDetTask(self, opts["subnet_loss"], opts["soft_weight"], opts["gt_weight"])
        self._gradaug_pass: Optional[_Pass] = None

    @property
    def needs_unused_parameters(self) -> bool:
        """Whether DDP must look for parameters a pass leaves unused (soft-only or depth sub-networks)."""
        o = self.gradaug_options
        return o["subnet_loss"] == "soft" or o["sampling"] == "depth"

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
        if state.rois is None:  # sub-network, ground truth only
            return super().loss(batch_inputs, batch_data_samples)
        if state.use_gt:
            losses = super().loss(batch_inputs, batch_data_samples)
            x = state.features
        else:  # soft labels only: RPN and mask head losses would be discarded
            losses = {}
            x = self.extract_feat(batch_inputs)
        student = self.gradaug_task.soft.student_logits(x, state.rois)
        losses["loss_soft_cls"] = soft_label_kl(student, state.logits)
        return losses


def _check_options(gradaug: Optional[dict]) -> dict:
    gradaug = dict(gradaug or {})
    unknown = sorted(set(gradaug) - set(GRADAUG_DEFAULTS))
    if unknown:
        raise ValueError(f"model.gradaug has unknown keys {unknown}; allowed: {sorted(GRADAUG_DEFAULTS)}")
    opts = dict(GRADAUG_DEFAULTS, **gradaug)
    validate_sampler_args(num_subnets=opts["num_subnets"], min_width=opts["min_width"],
                          max_width=opts["max_width"], sampling=opts["sampling"],
                          min_keep=opts["depth_min_keep"], transform=opts["transform"],
                          scales=opts["scales"], rotation=opts["rotation"], prefix="model.gradaug.", lowercase=True)
    validate_loss_args(subnet_loss=opts["subnet_loss"], soft_weight=opts["soft_weight"],
                       gt_weight=opts["gt_weight"], prefix="model.gradaug.", lowercase=True)
    return opts


@MODELS.register_module()
class GradAugMaskRCNN(GradAugDetectorMixin, MaskRCNN):
    """mmdet ``MaskRCNN`` trained with GradAug (``model.gradaug``: :data:`GRADAUG_DEFAULTS`)."""


@MODELS.register_module()
class GradAugFasterRCNN(GradAugDetectorMixin, FasterRCNN):
    """mmdet ``FasterRCNN`` trained with GradAug (``model.gradaug``: :data:`GRADAUG_DEFAULTS`)."""


@MODELS.register_module()
class GradAugCascadeRCNN(GradAugDetectorMixin, CascadeRCNN):
    """mmdet ``CascadeRCNN`` (also Cascade Mask R-CNN) trained with GradAug. Sub-networks
    learn from the rescaled annotations: ``model.gradaug.subnet_loss='gt'`` ("soft" needs one
    RoI box classifier and is refused when the model is built)."""


@MODELS.register_module()
class GradAugRetinaNet(GradAugDetectorMixin, RetinaNet):
    """mmdet ``RetinaNet`` trained with GradAug. Sub-networks learn from the rescaled
    annotations: ``model.gradaug.subnet_loss='gt'`` (no RoIs, so "soft" is refused when the
    model is built)."""
