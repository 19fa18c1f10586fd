"""Batch transforms that give each sub-network its differently transformed input.

Detection batches (detectron2's list of dicts with "image" and "instances") go through
detectron2's own transform machinery (``ResizeTransform``, ``RotationTransform``), so
images, boxes and masks (polygons or bitmasks) stay consistent; the full network's
proposals (its soft labels' boxes) are mapped through the same transform.

Classification batches follow the reference code: the full network's crop, bilinearly
resized with ``align_corners=True`` to one resolution per sub-network.
"""
import copy
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from detectron2.data import transforms as T
from detectron2.data.detection_utils import filter_empty_instances
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks

from .sampler import SubnetSpec

__all__ = ["detection_transform", "transform_detection_batch", "transform_classification_batch"]


def detection_transform(height: int, width: int, spec: SubnetSpec) -> T.TransformList:
    """The detectron2 transform of one image of size (height, width) for ``spec``."""
    tfms = []
    h, w = height, width
    if spec.scale != 1.0:
        nh, nw = max(1, int(round(h * spec.scale))), max(1, int(round(w * spec.scale)))
        tfms.append(T.ResizeTransform(h, w, nh, nw))
        h, w = nh, nw
    if spec.angle != 0.0:
        tfms.append(T.RotationTransform(h, w, spec.angle, expand=False))
    return T.TransformList(tfms)


def _transform_instances(inst: Instances, tfm: T.TransformList, size: Tuple[int, int]) -> Instances:
    out = Instances(size)
    # detectron2 transforms may edit coordinates in place: always hand them copies
    boxes = tfm.apply_box(inst.gt_boxes.tensor.cpu().numpy().copy())
    out.gt_boxes = Boxes(torch.as_tensor(boxes, dtype=torch.float32))
    out.gt_boxes.clip(size)
    for field, value in inst.get_fields().items():
        if field == "gt_boxes":
            continue
        if isinstance(value, PolygonMasks):
            value = PolygonMasks([
                [p.reshape(-1) for p in tfm.apply_polygons([q.reshape(-1, 2).copy() for q in polys])]
                for polys in value.polygons
            ])
        elif isinstance(value, BitMasks):
            masks = [tfm.apply_segmentation(m.numpy().astype(np.uint8)) for m in value.tensor.cpu()]
            value = BitMasks(torch.as_tensor(np.stack(masks) if masks else np.zeros((0,) + size), dtype=torch.bool))
        elif not isinstance(value, torch.Tensor):
            raise NotImplementedError(
                f"GradAug cannot transform the instance field '{field}' ({type(value).__name__}); "
                "supported: gt_boxes, gt_classes, gt_masks (polygons or bitmasks)"
            )
        out.set(field, value)
    return filter_empty_instances(out, by_box=True, by_mask=False)


def transform_detection_batch(batch: List[Dict], spec: SubnetSpec,
                              teacher: Optional[List[Dict]] = None):
    """Transform a detectron2 training batch (and the teacher's boxes) for one sub-network.

    Args:
        batch: list of dicts with "image" (C, H, W) tensor and optionally "instances".
        spec: the sub-network's draw (scale, angle).
        teacher: optional per-image {"boxes": (R, 4) tensor, "logits": (R, K) tensor} in
            the coordinates of ``batch``'s images.

    Returns:
        ``(new_batch, new_teacher)``; the input batch is not modified. Teacher boxes that
        leave the image entirely are dropped together with their logits.
    """
    if spec.scale == 1.0 and spec.angle == 0.0:
        return batch, teacher
    new_batch, new_teacher = [], [] if teacher is not None else None
    for i, d in enumerate(batch):
        image = d["image"]
        h, w = image.shape[-2:]
        tfm = detection_transform(h, w, spec)
        np_image = tfm.apply_image(image.permute(1, 2, 0).cpu().numpy())
        out = {k: v for k, v in d.items() if k not in ("image", "instances")}
        out["image"] = torch.as_tensor(np.ascontiguousarray(np_image.transpose(2, 0, 1)))
        size = tuple(out["image"].shape[-2:])
        if "instances" in d:
            out["instances"] = _transform_instances(d["instances"], tfm, size)
        new_batch.append(out)
        if teacher is not None:
            t = teacher[i]
            boxes = Boxes(torch.as_tensor(tfm.apply_box(t["boxes"].detach().cpu().numpy().copy()), dtype=torch.float32))
            boxes.clip(size)
            keep = boxes.nonempty().to(t["logits"].device)
            new_teacher.append({"boxes": boxes.tensor.to(t["boxes"].device)[keep], "logits": t["logits"][keep]})
    return new_batch, new_teacher


def transform_classification_batch(batch: List[Dict], spec: SubnetSpec) -> List[Dict]:
    """Resize (bilinear, align_corners=True) and/or rotate every image of the batch.

    The output resolution is ``round(size * spec.scale)`` for the whole batch, as in the
    reference code (224 -> 192/160/128 for scales 0.857/0.714/0.571).
    """
    if spec.scale == 1.0 and spec.angle == 0.0:
        return batch
    images = torch.stack([d["image"] for d in batch]).float()
    if spec.angle != 0.0:
        from torchvision.transforms.functional import InterpolationMode, rotate

        images = rotate(images, spec.angle, interpolation=InterpolationMode.BILINEAR)
    if spec.scale != 1.0:
        h, w = images.shape[-2:]
        size = (max(1, int(round(h * spec.scale))), max(1, int(round(w * spec.scale))))
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=True)
    out = []
    for d, img in zip(batch, images):
        d = copy.copy(d)
        d["image"] = img
        out.append(d)
    return out
