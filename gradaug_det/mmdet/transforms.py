"""The sub-networks' input transforms for MMDetection batches: rescale and rotation.

mmdet models see a preprocessed batch: one normalised, padded tensor (N, C, H, W) and a
list of ``DetDataSample`` (boxes, masks, image metadata). A sub-network of relative scale
``s`` gets the whole tensor resized bilinearly to ``round(H * s) x round(W * s)`` with the
geometry of mmdet's own ``Resize`` (``mmcv.imresize``: ``cv2.resize``, pixel centres at
``i + 0.5``, i.e. ``align_corners=False``, so a point ``x`` goes to ``x * new_w / W`` exactly
as the boxes do), padded again to the data preprocessor's size divisor, with boxes, masks,
image shapes and the full network's RoIs mapped by the same factors. A rotation by ``angle`` degrees (mmdet's convention:
positive is clockwise) turns each image about the centre of its valid region
(``img_shape``), keeping its size; boxes become the boxes enclosing their rotated corners
(clipped to the image; instances left without area are dropped), masks rotate with mmdet's
own ``rotate``, and the full network's RoIs map like boxes (RoIs left without area keep
their row with weight 0, as on the detectron2 side). Rescale comes first, as on the
detectron2 side. The coordinate map is the shared
:class:`~gradaug_det.gradaug.geometry.AffineGeometry` (``center="pixels"``: mmdet's rotation
centre ``((w - 1) / 2, (h - 1) / 2)``; ``region``: the image's ``img_shape``), the RoIs
go through the shared :func:`~gradaug_det.gradaug.geometry.map_teacher_rois`, and a dense
head's per-anchor maps through :func:`~gradaug_det.gradaug.geometry.map_teacher_anchors`
(:meth:`BatchGeometry.map_anchors`). The input batch is never modified.

Everything runs where the batch lives (the model's device after mmdet's data preprocessor):
images are resampled in one ``interpolate`` call per pass and one ``grid_sample`` call per
pass and image size; boxes and RoIs move by the affine map with its coefficients passed as
Python numbers (no host-to-device copy of a matrix). mmdet's instance masks
(``BitmapMasks`` / ``PolygonMasks``) are numpy data on the host by nature and move with mmdet's
own ``resize`` / ``rotate``. Host synchronisation left (rotation only; mmdet's preprocessor
puts the annotations on the device): deciding whether an image's ground-truth instances lost
one to the rotation (once per image, as detectron2 drops empty instances); the teacher's RoIs
need none.
"""
import contextlib
import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..gradaug.geometry import AffineGeometry, AnchorLayout, map_teacher_anchors, map_teacher_rois

__all__ = ["rescale_batch", "rotate_batch", "transform_batch", "BatchGeometry"]


def _check_fields(data_samples: List) -> None:
    for sample in data_samples:
        if "gt_sem_seg" in sample or "gt_panoptic_seg" in sample:
            raise NotImplementedError(
                "GradAug's sub-network transforms for mmdet batches cover gt_instances (boxes, masks) "
                "and ignored_instances; this batch also has semantic/panoptic segmentation maps"
            )


def _move_boxes(boxes, geometry: AffineGeometry):
    """(R, 4) boxes (a tensor or mmdet's HorizontalBoxes) through ``geometry.boxes``."""
    moved = geometry.boxes(getattr(boxes, "tensor", boxes))
    return type(boxes)(moved) if hasattr(boxes, "tensor") else moved


def _scale_instances(instances, geometry: AffineGeometry, pad_size: Tuple[int, int]):
    out = instances.clone()
    mask_size = geometry.size
    if "bboxes" in out:
        out.bboxes = _move_boxes(out.bboxes, geometry)
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
    geometry = AffineGeometry(h, w, scale)
    (nh, nw), (sx, sy) = geometry.size, geometry.factors
    out = F.interpolate(inputs, size=(nh, nw), mode="bilinear", align_corners=False)  # cv2.resize's geometry
    ph = int(math.ceil(nh / size_divisor)) * size_divisor
    pw = int(math.ceil(nw / size_divisor)) * size_divisor
    if (ph, pw) != (nh, nw):
        out = F.pad(out, (0, pw - nw, 0, ph - nh), value=pad_value)
    _check_fields(data_samples)
    samples = []
    for sample in data_samples:
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
                setattr(new, key, _scale_instances(getattr(sample, key), geometry, (ph, pw)))
        samples.append(new)
    return out, samples, (sx, sy)


def _no_autocast(t: torch.Tensor):
    """Autocast off on the tensor's device (a no-op context where autocast does not exist)."""
    if not torch.amp.is_autocast_available(t.device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=t.device.type, enabled=False)


def _center(img_shape) -> Tuple[float, float]:
    """The centre mmdet rotates an image of ``img_shape`` (h, w) about, in pixels."""
    h, w = img_shape[:2]
    return (w - 1) * 0.5, (h - 1) * 0.5


def _rotation(size: Tuple[int, int], img_shape, angle: float) -> AffineGeometry:
    """mmdet's rotation (clockwise ``angle`` degrees) of an image whose valid region
    ``img_shape`` lies in a padded ``size``: about ``((w - 1) / 2, (h - 1) / 2)`` of that region
    (``cv2.getRotationMatrix2D(center, -angle, 1)``, boxes and images alike), boxes clipped to it."""
    return AffineGeometry(size[0], size[1], 1.0, -angle, center="pixels", region=img_shape[:2])


def _has_area(boxes: torch.Tensor) -> torch.Tensor:
    return ((boxes[:, 2] - boxes[:, 0]) > 1e-5) & ((boxes[:, 3] - boxes[:, 1]) > 1e-5)


def _rotate_images(imgs: torch.Tensor, geometry: AffineGeometry, pad_value: float) -> torch.Tensor:
    """Rotate (N, C, H, W) images that share their valid region (``geometry.region``) by
    ``geometry`` (bilinear, one ``grid_sample`` call); pixels from outside the valid region,
    and the padding, become ``pad_value``. The source grid is computed on the images' device
    in float64."""
    n, c, hp, wp = imgs.shape
    h, w = geometry.region
    src_x, src_y = geometry.source_pixels(hp, wp, imgs.device)  # (H, W) source x, y in pixels
    ys = torch.arange(hp, dtype=torch.float64, device=imgs.device)[:, None]
    xs = torch.arange(wp, dtype=torch.float64, device=imgs.device)[None, :]
    inside = (src_x >= -0.5) & (src_x <= w - 0.5) & (src_y >= -0.5) & (src_y <= h - 0.5) & (xs < w) & (ys < h)
    grid = torch.stack([src_x * 2 / max(wp - 1, 1) - 1, src_y * 2 / max(hp - 1, 1) - 1], -1).to(imgs.dtype)
    out = F.grid_sample(imgs, grid.expand(n, hp, wp, 2), mode="bilinear", padding_mode="border", align_corners=True)
    return torch.where(inside, out, torch.full((), pad_value, dtype=out.dtype, device=out.device))


def _rotate_instances(instances, img_shape, angle: float, pad_shape):
    h, w = img_shape[:2]
    out = instances.clone()
    if "masks" in out:
        # rotate within the valid region, then pad as the batch is padded
        valid = out.masks.crop(np.array([0, 0, w, h]))
        out.masks = valid.rotate((h, w), angle, center=_center(img_shape)).pad(tuple(pad_shape))
    if "bboxes" in out:
        boxes = out.bboxes  # mmdet HorizontalBoxes, or a plain (R, 4) tensor
        out.bboxes = _move_boxes(boxes, _rotation(pad_shape, img_shape, angle))
        keep = _has_area(getattr(out.bboxes, "tensor", out.bboxes))
        if not bool(keep.all()):
            out = out[keep]
    return out


def rotate_batch(inputs: torch.Tensor, data_samples: List, angle: float, pad_value: float = 0.0):
    """Rotate every image of a preprocessed mmdet batch about its valid region's centre.

    Args:
        inputs: (N, C, H, W) batch tensor.
        data_samples: the batch's ``DetDataSample`` list.
        angle: degrees, positive clockwise (mmdet's convention); a multiple of 360 returns the inputs.
        pad_value: value of the padding and of pixels rotated in from outside the image.

    Returns:
        ``(inputs, data_samples)``: new tensor and samples.
    """
    if angle % 360 == 0:
        return inputs, data_samples
    _check_fields(data_samples)
    samples, rotated = [], [None] * len(data_samples)
    pad_shape = tuple(inputs.shape[-2:])
    groups = {}
    for i, sample in enumerate(data_samples):
        groups.setdefault(tuple(sample.metainfo["img_shape"][:2]), []).append(i)
    for img_shape, idx in groups.items():  # one grid_sample per image size
        x = inputs[idx[0]][None] if len(idx) == 1 else torch.stack([inputs[i] for i in idx])
        y = _rotate_images(x, _rotation(pad_shape, img_shape, angle), pad_value)
        for k, i in enumerate(idx):
            rotated[i] = y[k]
    out = torch.stack(rotated)
    for i, sample in enumerate(data_samples):
        img_shape = sample.metainfo["img_shape"][:2]
        new = sample.clone()
        for key in ("gt_instances", "ignored_instances"):
            if key in sample:
                setattr(new, key, _rotate_instances(getattr(sample, key), img_shape, angle, pad_shape))
        samples.append(new)
    return out, samples


@dataclass(frozen=True)
class BatchGeometry:
    """How :func:`transform_batch` moved a batch: maps the full network's RoIs likewise.

    Attributes:
        in_size: (H, W) of the batch tensor before the transform.
        scale: the relative scale of the rescale.
        angle: rotation in degrees (mmdet's convention: clockwise).
        img_shapes: every image's (h, w) after the rescale (the rotation keeps them).
    """

    in_size: Tuple[int, int]
    scale: float
    angle: float
    img_shapes: Sequence[Tuple[int, int]]

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.angle % 360 == 0

    def image_geometry(self, img_shape) -> AffineGeometry:
        """The shared geometry of an image whose valid region after the rescale is ``img_shape``."""
        rotates = self.angle % 360 != 0
        return AffineGeometry(self.in_size[0], self.in_size[1], self.scale, -self.angle, center="pixels",
                              region=img_shape[:2] if rotates else None)

    def _boxes(self, boxes: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        groups = {}
        for i, img_shape in enumerate(self.img_shapes):
            groups.setdefault(tuple(img_shape[:2]), []).append(i)
        out = None
        for img_shape, idx in groups.items():  # every RoI moved by each image size's map, kept where it belongs
            moved = self.image_geometry(img_shape).boxes(boxes)
            if out is None:
                out = moved
            else:
                sel = sum((image_index == i) for i in idx)[:, None].bool()
                out = torch.where(sel, moved, out)
        return out

    def map_rois(self, rois: torch.Tensor):
        """Move (R, 5) RoIs ``[batch_index, x1, y1, x2, y2]`` with their images
        (:func:`~gradaug_det.gradaug.geometry.map_teacher_rois`: every row kept).

        Returns:
            ``(rois (R, 5), weights)``: ``weights`` (R,) float32, 0 for RoIs left without
            area, or None when the transform is the identity (rois returned as they are).
        """
        if self.identity:
            return rois, None
        with _no_autocast(rois):
            boxes, weights = map_teacher_rois(rois[:, 1:], lambda b: self._boxes(b, rois[:, 0]))
        return torch.cat([rois[:, :1], boxes], 1), weights

    @property
    def size_factor(self) -> float:
        """How much the rescale changed lengths: ``sqrt(sx * sy)`` of the exact factors
        (``round(H * scale) / H``...; a rotation keeps lengths)."""
        sx, sy = AffineGeometry(self.in_size[0], self.in_size[1], self.scale).factors
        return (sx * sy) ** 0.5

    def source_points(self, x: torch.Tensor, y: torch.Tensor):
        """Where points of the transformed batch came from, per image: the inverse of each
        image's geometry (:meth:`~gradaug_det.gradaug.geometry.AffineGeometry.inverse_points`).

        Args:
            x, y: (H', W') float64 pixel coordinates in the transformed batch.

        Returns:
            ``(x, y)``: (N, H', W') float64 pixel coordinates in the input batch.
        """
        xs, ys = [], []
        geometries = {}
        for img_shape in self.img_shapes:
            key = tuple(img_shape[:2])
            if key not in geometries:
                geometries[key] = self.image_geometry(key).inverse_points(x, y)
            xs.append(geometries[key][0])
            ys.append(geometries[key][1])
        return torch.stack(xs), torch.stack(ys)

    def map_anchors(self, maps: Sequence[torch.Tensor], layout: AnchorLayout, student_sizes):
        """Move the full network's dense per-anchor maps onto the transformed batch's anchors
        (:func:`~gradaug_det.gradaug.geometry.map_teacher_anchors`: positions through each
        image's inverse map, anchor sizes by :attr:`size_factor`).

        Args:
            maps: per level (N, A * C, H, W) (the teacher's class probabilities).
            layout: the head's anchors.
            student_sizes: per level (H', W') of the sub-network's maps.

        Returns:
            ``(targets, weights)``: per level (N, A * C, H', W') and (N, A, H', W'), or
            ``(maps, None)`` when the transform is the identity.
        """
        if self.identity:
            return list(maps), None
        with _no_autocast(maps[0]):
            return map_teacher_anchors(maps, layout, student_sizes, self.source_points, self.in_size,
                                       self.size_factor)


def transform_batch(inputs: torch.Tensor, data_samples: List, scale: float = 1.0, angle: float = 0.0,
                    size_divisor: int = 1, pad_value: float = 0.0):
    """A sub-network's input: the batch rescaled by ``scale``, then rotated by ``angle``.

    Returns:
        ``(inputs, data_samples, geometry)``; ``geometry.map_rois`` maps the full
        network's RoIs the same way.
    """
    in_size = tuple(inputs.shape[-2:])
    with _no_autocast(inputs):  # sub-network passes run under AMP: coordinates stay float32
        inputs, data_samples, _ = rescale_batch(inputs, data_samples, scale, size_divisor, pad_value)
        inputs, data_samples = rotate_batch(inputs, data_samples, angle, pad_value)
    shapes = [tuple(s.metainfo["img_shape"][:2]) for s in data_samples]
    return inputs, data_samples, BatchGeometry(in_size, scale, angle, shapes)
