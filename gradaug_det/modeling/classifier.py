"""Image classifier meta-architecture on the slimmable ResNet (ImageNet pretraining).

``MODEL.META_ARCHITECTURE = "SlimmableClassifier"`` builds the backbone with
``build_backbone(cfg)`` (``MODEL.BACKBONE.NAME = "build_slimmable_resnet_backbone"``,
``MODEL.RESNETS.OUT_FEATURES = ["res5"]``), global-average-pools its one output and
classifies it with a :class:`~gradaug_det.slim.SlimLinear`. Its state dict holds
``backbone.*`` (named exactly as detectron2's ResNet) and ``head.*``, so
:mod:`gradaug_det.checkpoint.convert` can hand the backbone to a detection model.
"""
import logging
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import move_device_like
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone

from ..config import slimmable_config
from ..gradaug.losses import soft_target_kl
from ..slim import SlimLinear, SlimmableModule

__all__ = ["SlimmableClassifier", "classification_loss"]

logger = logging.getLogger(__name__)


def classification_loss(logits: torch.Tensor, batched_inputs: List[Dict],
                        label_smoothing: float = 0.0) -> torch.Tensor:
    """The classifier's training loss for one batch.

    If every input dict carries ``"soft_label"`` (a probability vector over the
    classes, e.g. from CutMix), the loss is GradAug's soft-label loss
    (:func:`gradaug_det.gradaug.losses.soft_target_kl`:
    ``F.kl_div(F.log_softmax(logits, 1), soft, reduction="batchmean")`` in float32); otherwise it is
    the cross-entropy with the integer ``"class_id"`` of every dict.

    Args:
        logits: (N, K) class scores.
        batched_inputs: the N input dicts.
        label_smoothing: label smoothing of the hard-label cross-entropy.

    Returns:
        The scalar loss.

    Raises:
        ValueError: if only part of the batch has soft labels, or a label is missing
            or has the wrong size.
    """
    has_soft = ["soft_label" in x for x in batched_inputs]
    if all(has_soft):
        soft = torch.stack([torch.as_tensor(x["soft_label"], dtype=torch.float32)
                            for x in batched_inputs])
        if soft.shape != logits.shape:
            raise ValueError(
                f"soft labels have shape {tuple(soft.shape)} but the logits {tuple(logits.shape)}; "
                "a soft label needs one probability per class (MODEL.CLASSIFIER.NUM_CLASSES)"
            )
        return soft_target_kl(logits, move_device_like(soft, logits))
    if any(has_soft):
        raise ValueError(
            f"{sum(has_soft)} of {len(has_soft)} images carry a 'soft_label'; a batch must be "
            "all soft-labelled (e.g. all passed through cutmix()) or all hard-labelled"
        )
    if not all("class_id" in x for x in batched_inputs):
        raise ValueError("training inputs need a 'class_id' (or a 'soft_label') per image")
    targets = torch.as_tensor([int(x["class_id"]) for x in batched_inputs], dtype=torch.long)
    targets = move_device_like(targets, logits)
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


@META_ARCH_REGISTRY.register()
class SlimmableClassifier(nn.Module):
    """Backbone -> global average pool -> :class:`SlimLinear` head.

    Inputs follow detectron2's conventions: a list of dicts whose ``"image"`` is a
    (C, H, W) tensor with 0-255 values in ``INPUT.FORMAT`` channel order, all of the same
    size (fixed crops). Training dicts carry ``"class_id"`` (int) or ``"soft_label"``.

    The head's output *is* the logits, so a forward hook on ``model.head`` records
    them (GradAug's engine does so to get the full network's predictions).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        in_feature: str,
        num_classes: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        input_format: Optional[str] = None,
        label_smoothing: float = 0.0,
        divisor: int = 1,
        rule: str = "round",
    ):
        """
        Args:
            backbone: a detectron2 backbone, normally the slimmable ResNet.
            in_feature: the backbone output that is pooled and classified.
            num_classes: number of classes of the head.
            pixel_mean, pixel_std: per-channel normalisation of the 0-255 input image.
            input_format: channel order of the input images ("RGB" or "BGR"); recorded
                for the checkpoint converter and for visualisation.
            label_smoothing: label smoothing of the hard-label cross-entropy.
            divisor: ``MODEL.SLIMMABLE.CHANNEL_DIVISOR``; the head keeps the same leading
                features as the backbone's last layer.
            rule: ``MODEL.SLIMMABLE.CHANNEL_RULE``, likewise.
        """
        super().__init__()
        self.backbone = backbone
        shapes = backbone.output_shape()
        if in_feature not in shapes:
            raise ValueError(f"backbone has no output '{in_feature}'; it returns {sorted(shapes)}")
        self.in_feature = in_feature
        self.num_classes = num_classes
        self.input_format = input_format
        self.label_smoothing = label_smoothing
        self.head = SlimLinear(shapes[in_feature].channels, num_classes, divisor=divisor, rule=rule)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1),
                             False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1),
                             False)
        if self.pixel_mean.shape != self.pixel_std.shape:
            raise ValueError(
                f"MODEL.PIXEL_MEAN {list(pixel_mean)} and MODEL.PIXEL_STD {list(pixel_std)} have "
                "different lengths"
            )

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        if len(shapes) != 1:
            raise ValueError(
                f"SlimmableClassifier pools one feature map but the backbone returns {sorted(shapes)}; "
                "set MODEL.RESNETS.OUT_FEATURES to ['res5']"
            )
        if not any(isinstance(m, SlimmableModule) for m in backbone.modules()):
            logger.warning(
                "MODEL.BACKBONE.NAME=%s has no slimmable layers: widths < 1.0 will run the full "
                "backbone. Use build_slimmable_resnet_backbone for GradAug.", cfg.MODEL.BACKBONE.NAME,
            )
        num_classes = cfg.MODEL.CLASSIFIER.NUM_CLASSES
        if num_classes < 1:
            raise ValueError(f"MODEL.CLASSIFIER.NUM_CLASSES must be >= 1, got {num_classes}")
        smoothing = cfg.MODEL.CLASSIFIER.LABEL_SMOOTHING
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"MODEL.CLASSIFIER.LABEL_SMOOTHING must be in [0, 1), got {smoothing}")
        return {
            "backbone": backbone,
            "in_feature": next(iter(shapes)),
            "num_classes": num_classes,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
            "label_smoothing": smoothing,
            "divisor": slimmable_config(cfg).CHANNEL_DIVISOR,
            "rule": slimmable_config(cfg).get("CHANNEL_RULE", "round"),
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[Dict]) -> torch.Tensor:
        """Stack the inputs' images into one normalised (N, C, H, W) float tensor.

        Raises:
            ValueError: if the images do not all have the same size.
        """
        images = [move_device_like(x["image"], self.pixel_mean) for x in batched_inputs]
        sizes = {tuple(im.shape) for im in images}
        if len(sizes) != 1:
            raise ValueError(
                f"SlimmableClassifier stacks its images, which must share one size; got {sorted(sizes)}. "
                "Use fixed-size crops (INPUT.CLASSIFICATION.CROP_SIZE)."
            )
        images = torch.stack(images).to(self.pixel_mean.dtype)
        return (images - self.pixel_mean) / self.pixel_std

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class scores of already-normalised images, (N, num_classes)."""
        features = self.backbone(images)[self.in_feature]
        pooled = F.adaptive_avg_pool2d(features, 1).flatten(1)
        return self.head(pooled)

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: list of dicts with ``"image"`` and, in training,
                ``"class_id"`` or ``"soft_label"`` (see :func:`classification_loss`).

        Returns:
            In training, ``{"loss_cls": loss}``; in evaluation, one ``{"logits": (K,)}``
            dict per image.
        """
        logits = self.logits(self.preprocess_image(batched_inputs))
        if self.training:
            return {"loss_cls": classification_loss(logits, batched_inputs, self.label_smoothing)}
        return [{"logits": row} for row in logits]
