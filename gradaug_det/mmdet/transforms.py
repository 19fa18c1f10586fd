"""The sub-networks' input transform for MMDetection batches: random rescale.

mmdet models see a preprocessed batch: one normalised, padded tensor (N, C, H, W) and a
list of ``DetDataSample`` (boxes, masks, image metadata). A sub-network of relative scale
``s`` gets the whole tensor resized bilinearly (``align_corners=True``, as the GradAug
reference resizes its crops) to ``round(H * s) x round(W * s)``, padded again to the data
preprocessor's size divisor, with boxes, masks, image shapes and the full network's
RoIs mapped by the same factors. The input batch is never modified.
"""
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["rescale_batch", "rescale_rois"]


def _scaled_size(h: int, w: int, scale: float) -> Tuple[int, int]:
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def _scale_boxes(boxes, sx: float, sy: float):
    if hasattr(boxes, "rescale_"):  # mmdet BaseBoxes (HorizontalBoxes)
        boxes = boxes.clone()
        boxes.rescale_((sx, sy))
        return boxes
    return boxes * boxes.new_tensor([sx, sy, sx, sy])


def _scale_instances(instances, sx: float, sy: float, mask_size: Tuple[int, int], pad_size: Tuple[int, int]):
    out = instances.clone()
    if "bboxes" in out:
        out.bboxes = _scale_boxes(out.bboxes, sx, sy)
    if "masks" in out:
        masks = out.masks.resize(mask_size)
        out.masks = masks.pad(pad_size) if hasattr(masks, "pad") else masks
    return out


def rescale_batch(inputs: torch.Tensor, data_samples: List, scale: float,
                  size_divisor: int = 1, pad_value: float = 0.0):
    """Rescale a preprocessed mmdet batch for one sub-network.

    Args:
        inputs: (N, C, H, W) batch tensor from the data preprocessor.
        data_samples: the batch's ``DetDataSample`` list (``gt_instances`` with
            ``bboxes``, ``labels`` and optionally ``masks``; ``ignored_instances``).
        scale: relative scale (1.0 returns the inputs unchanged).
        size_divisor: pad the resized tensor to a multiple of this
            (the data preprocessor's ``pad_size_divisor``).
        pad_value: value of the padding (the preprocessor's ``pad_value``).

    Returns:
        ``(inputs, data_samples, (sx, sy))``: new tensor, new samples, and the factors
        applied to x and y coordinates.
    """
    if scale == 1.0:
        return inputs, data_samples, (1.0, 1.0)
    h, w = inputs.shape[-2:]
    nh, nw = _scaled_size(h, w, scale)
    sx, sy = nw / w, nh / h
    out = F.interpolate(inputs, size=(nh, nw), mode="bilinear", align_corners=True)
    ph = int(math.ceil(nh / size_divisor)) * size_divisor
    pw = int(math.ceil(nw / size_divisor)) * size_divisor
    if (ph, pw) != (nh, nw):
        out = F.pad(out, (0, pw - nw, 0, ph - nh), value=pad_value)
    samples = []
    for sample in data_samples:
        if "gt_sem_seg" in sample or "gt_panoptic_seg" in sample:
            raise NotImplementedError(
                "GradAug's rescale for mmdet batches covers gt_instances (boxes, masks) and "
                "ignored_instances; this batch also has semantic/panoptic segmentation maps"
            )
        new = sample.clone()
        ih, iw = sample.metainfo["img_shape"][:2]
        meta = {"img_shape": (min(nh, int(round(ih * sy))), min(nw, int(round(iw * sx)))),
                "pad_shape": (ph, pw), "batch_input_shape": (ph, pw)}
        if "scale_factor" in sample.metainfo:
            fx, fy = sample.metainfo["scale_factor"][:2]
            meta["scale_factor"] = (fx * sx, fy * sy)
        new.set_metainfo(meta)
        for key in ("gt_instances", "ignored_instances"):
            if key in sample:
                setattr(new, key, _scale_instances(getattr(sample, key), sx, sy, (nh, nw), (ph, pw)))
        samples.append(new)
    return out, samples, (sx, sy)


def rescale_rois(rois: torch.Tensor, factors: Optional[Tuple[float, float]]) -> torch.Tensor:
    """Map (R, 5) RoIs ``[batch_index, x1, y1, x2, y2]`` by the factors of :func:`rescale_batch`."""
    if factors is None or factors == (1.0, 1.0):
        return rois
    sx, sy = factors
    return rois * rois.new_tensor([1.0, sx, sy, sx, sy])
