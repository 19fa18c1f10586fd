"""Batch transforms that give each sub-network its differently transformed input.

Detection batches (detectron2's list of dataset dicts) are rescaled and/or rotated with
exactly the geometry of detectron2's ``ResizeTransform`` and ``RotationTransform``
(``expand=False``: the image keeps its size and turns counter-clockwise about its centre
``(w / 2, h / 2)``), resize first. The coordinate map is the plain-torch
:class:`.geometry.AffineGeometry` shared with the MMDetection side. Where each field is
transformed:

* ``image`` (any channel count, uint8 or float), ``sem_seg`` and ``BitMasks``: on the
  model's device, batched over the images that share a size (one call per pass and size).
  uint8 images are resized with PIL's own fixed-point bilinear filter (the antialiased one
  detectron2's ``ResizeTransform`` runs through PIL), reproduced in integer arithmetic, so
  they are bit-identical to detectron2's CPU result; float images use ``F.interpolate``
  as detectron2 does. Rotation is bilinear ``grid_sample`` with zeros outside, as
  ``cv2.warpAffine`` (which quantises positions to 1/32 px, so the two differ by a rounding).
  Label maps and bitmasks use nearest neighbour (PIL's rule when resizing, OpenCV's when
  rotating); ``sem_seg`` pixels rotated in from outside the image get the ignore value.
* ``gt_boxes``, ``gt_keypoints`` and precomputed ``proposals``: where they live (detectron2's
  loaders leave them on the host, and the model moves them, as for every pass), by the same
  affine map: boxes become the boxes enclosing their 4 moved corners, clipped (instances
  and proposals left without area are dropped, as ``filter_empty_instances`` /
  ``transform_proposals`` do); keypoints that leave the image get visibility 0 and
  coordinates 0 (``transform_keypoint_annotations``).
* ``PolygonMasks``: host numpy data by nature (detectron2 keeps them so); moved with
  detectron2's own ``apply_polygons`` of the same transform (no device involved).
* the full network's RoIs (soft labels): on the device, through
  :func:`.geometry.map_teacher_rois`; RoIs with no area left keep a weight of 0 instead of
  being dropped, so no boolean indexing (a host sync on CUDA) runs.

Host synchronisation: none of these transforms reads a device value on the host. Deciding
whether an instance or proposal is dropped reads its (host) box; if a user's loader puts
instances on the device, that one decision per image syncs. Coefficient tables of the
resize (which depend on sizes only) are cached per device.

Classification batches follow the reference code: the full network's crop, bilinearly
resized with ``align_corners=True`` to one resolution per sub-network.
"""
import contextlib
import copy
import functools
import math
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Boxes, Instances, Keypoints, PolygonMasks

from .geometry import AffineGeometry, map_teacher_rois, scaled_size
from .sampler import SubnetSpec

__all__ = [
    "SUPPORTED_DICT_FIELDS", "SUPPORTED_INSTANCE_FIELDS", "check_transformable_fields", "check_batch_fields",
    "keep_instance_field",
    "detection_transform", "SubnetGeometry", "transform_detection_batch", "transform_classification_batch",
    "batch_to_device",
]

#: Dataset-dict fields moved with the image; other keys must hold no tensor data (e.g.
#: "file_name", "height", "width", "image_id") and pass through unchanged.
SUPPORTED_DICT_FIELDS = ("image", "instances", "sem_seg", "proposals")
#: Instance fields with geometry and how they move.
SUPPORTED_INSTANCE_FIELDS = {
    "gt_boxes": "Boxes: enclosing box of the 4 moved corners, clipped; empty ones dropped",
    "proposal_boxes": "Boxes (precomputed proposals): as gt_boxes",
    "gt_masks": "PolygonMasks (same affine map, host numpy) or BitMasks (nearest, on the device)",
    "gt_keypoints": "Keypoints: same affine map; points leaving the image get visibility 0",
    "gt_point_coords": "(N, P, 2) tensor of (x, y) pixels (PointSup): same affine map as keypoints",
    "gt_point_labels": "(N, P) tensor (PointSup): kept; points leaving the image get label -1 (ignored by "
                       "PointRend's roi_mask_point_loss)",
}
#: Plain per-instance tensors without geometry, kept as they are (more can be declared with
#: :func:`keep_instance_field`). Any other plain tensor field is refused: GradAug cannot know
#: whether it holds coordinates that must move with the image.
_INSTANCE_ATTRIBUTES = {"gt_classes", "objectness_logits"}
#: detectron2 meta-architectures whose dataset mapper emits dense targets these transforms do
#: not move, refused before any data is read.
_UNMOVABLE_TARGETS = {
    "PanopticDeepLab": "center heat maps and offset maps (center, center_weights, offset, offset_weights)",
}
#: detectron2 parts whose training dicts carry rotated boxes, which these transforms do not move.
_ROTATED_BOX_MODULES = {("MODEL.PROPOSAL_GENERATOR.NAME", "RRPN"), ("MODEL.ROI_HEADS.NAME", "RROIHeads")}
_PRECISION_BITS = 22  # PIL's fixed-point precision for 8-bit resampling (Resample.c: 32 - 8 - 2)


def check_transformable_fields(cfg) -> None:
    """Refuse, before any data is read, a config whose training dicts carry a field the
    sub-network transforms cannot move with the image.

    Every field detectron2's mappers put into a training dict for the models configured by
    ``MODEL.MASK_ON``, ``MODEL.KEYPOINT_ON``, ``MODEL.LOAD_PROPOSALS``, semantic / panoptic
    (FPN) segmentation, PointSup's point labels, and any ``INPUT.FORMAT`` (channel count) is
    supported; rotated boxes (``RRPN`` / ``RROIHeads``, ``gt_boxes`` as ``RotatedBoxes``) and
    Panoptic-DeepLab's center / offset targets are not.

    Args:
        cfg: a detectron2 config (yacs ``CfgNode``) with GradAug's keys.

    Raises:
        ValueError: naming the key, its value, and what to change.
    """
    if not cfg.GRADAUG.ENABLED:
        return
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch in _UNMOVABLE_TARGETS:
        raise ValueError(
            f"MODEL.META_ARCHITECTURE={arch!r} trains on {_UNMOVABLE_TARGETS[arch]}, which GradAug's sub-network "
            "transforms do not move with the image; set GRADAUG.ENABLED=False for this model"
        )
    for key, value in sorted(_ROTATED_BOX_MODULES):
        node = cfg
        for part in key.split(".")[:-1]:
            node = node[part]
        if node[key.split(".")[-1]] == value:
            raise ValueError(
                f"{key}={value!r} trains on rotated boxes (RotatedBoxes), which GradAug's sub-network "
                "transforms do not move; set GRADAUG.ENABLED=False for this model or use axis-aligned boxes"
            )


def check_batch_fields(batch: List[Dict]) -> None:
    """Refuse a batch with a field the sub-network transforms cannot move, before any pass.

    Raises:
        NotImplementedError: naming the field and its type, and what is supported.
    """
    for d in batch:
        for key, value in d.items():
            if key in SUPPORTED_DICT_FIELDS:
                if key in ("instances", "proposals"):
                    _check_instance_fields(value, key)
            elif isinstance(value, (torch.Tensor, np.ndarray, Instances)):
                raise NotImplementedError(
                    f"GradAug cannot transform the dataset-dict field {key!r} ({type(value).__name__}) "
                    f"with the sub-networks' images; supported: {', '.join(SUPPORTED_DICT_FIELDS)} (and keys "
                    "without tensor data); remove the field in the dataset mapper or set GRADAUG.ENABLED=False"
                )


def keep_instance_field(name: str) -> None:
    """Declare a plain per-instance tensor field of a project's training dicts that has no
    geometry (an attribute such as ``gt_classes``): the sub-networks get it unchanged.

    Call it once, before training, in the project that adds the field (e.g. next to the
    dataset mapper that writes it). Fields that hold coordinates must not be declared: the
    sub-networks would learn from points that did not move with the image.

    Args:
        name: the ``Instances`` field name, e.g. ``"gt_difficulty"``.

    Raises:
        ValueError: for a field whose geometry these transforms already move.
    """
    if name in SUPPORTED_INSTANCE_FIELDS:
        raise ValueError(f"{name!r} has geometry that GradAug moves with the image; it cannot be kept unchanged")
    _INSTANCE_ATTRIBUTES.add(name)


def _check_instance_fields(inst: Instances, where: str) -> None:
    for name, value in inst.get_fields().items():
        if type(value) in (Boxes, PolygonMasks, BitMasks, Keypoints) or (
                type(value) is torch.Tensor and (name in SUPPORTED_INSTANCE_FIELDS or name in _INSTANCE_ATTRIBUTES)):
            continue
        if type(value) is torch.Tensor:
            raise NotImplementedError(
                f"GradAug cannot tell whether the per-instance field {name!r} of {where!r} (a tensor of shape "
                f"{tuple(value.shape)}) holds coordinates that must move with the sub-networks' images; if it is "
                f"an attribute without geometry, declare it with gradaug_det.gradaug.keep_instance_field({name!r}) "
                "before training; if it holds coordinates, remove it in the dataset mapper or set "
                "GRADAUG.ENABLED=False (supported with geometry: " + ", ".join(SUPPORTED_INSTANCE_FIELDS) + ")"
            )
        raise NotImplementedError(
            f"GradAug cannot transform the field {name!r} ({type(value).__name__}) of {where!r}; supported: "
            + "; ".join(f"{k}: {v}" for k, v in SUPPORTED_INSTANCE_FIELDS.items())
            + "; attributes without geometry: " + ", ".join(sorted(_INSTANCE_ATTRIBUTES))
        )


def detection_transform(height: int, width: int, spec: SubnetSpec) -> T.TransformList:
    """detectron2's transform of one image of size (height, width) for ``spec``: the
    reference of :class:`SubnetGeometry` (and what moves polygons)."""
    tfms = []
    h, w = height, width
    if spec.scale != 1.0:
        nh, nw = scaled_size(h, w, spec.scale)
        tfms.append(T.ResizeTransform(h, w, nh, nw))
        h, w = nh, nw
    if spec.angle != 0.0:
        tfms.append(T.RotationTransform(h, w, spec.angle, expand=False))
    return T.TransformList(tfms)


# ---------------------------------------------------------------------------------------
# Resampling kernels (device tensors in, device tensors out)
# ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=512)
def _pil_bilinear_table(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """PIL's bilinear resampling coefficients of one axis, as integers.

    Source: Pillow ``libImaging/Resample.c`` (``precompute_coeffs`` with the triangle
    filter, support 1 widened by the downscale factor, then ``normalize_coeffs_8bpc``).

    Returns:
        ``(index, weight)``, both (out_size, K) int64: output pixel ``i`` is
        ``(2**21 + sum_k in[index[i, k]] * weight[i, k]) >> 22``, clipped to [0, 255].
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    index = np.zeros((out_size, ksize), np.int64)
    weight = np.zeros((out_size, ksize), np.int64)
    ss = 1.0 / filterscale
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        k = []
        for x in range(xmax):
            t = abs((x + xmin - center + 0.5) * ss)
            k.append(1.0 - t if t < 1.0 else 0.0)
        ww = 0.0
        for v in k:  # sequential, as in C
            ww += v
        for x, v in enumerate(k):
            v = v / ww if ww != 0.0 else v
            index[xx, x] = xmin + x
            weight[xx, x] = int(0.5 + v * (1 << _PRECISION_BITS)) if v >= 0 else int(-0.5 + v * (1 << _PRECISION_BITS))
    return index, weight


@functools.lru_cache(maxsize=512)
def _pil_nearest_index(in_size: int, out_size: int) -> np.ndarray:
    """Source pixel of each output pixel in PIL's NEAREST resize (``ImagingScaleAffine``:
    ``floor((i + 0.5) * in / out)``, accumulated as Pillow does), clipped to the image."""
    a = in_size / out_size
    xo = a * 0.5
    out = np.empty(out_size, np.int64)
    for x in range(out_size):
        out[x] = min(max(int(xo), 0), in_size - 1)
        xo += a
    return out


_DEVICE_TABLES: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()


def _on_device(key: tuple, make, device: torch.device) -> torch.Tensor:
    """A small index/weight table (a function of sizes only), copied to ``device`` once."""
    key = key + (str(device),)
    t = _DEVICE_TABLES.get(key)
    if t is None:
        t = torch.from_numpy(make()).to(device, non_blocking=True)  # the cached numpy table outlives the copy
        _DEVICE_TABLES[key] = t
        if len(_DEVICE_TABLES) > 1024:
            _DEVICE_TABLES.popitem(last=False)
    return t


def _pil_axis_pass(x: torch.Tensor, out_size: int) -> torch.Tensor:
    """One axis of PIL's 8-bit bilinear resize, on dim 0 of an int32 tensor (exact integers).

    The resampled axis leads, so each tap gathers whole contiguous rows (``index_select``
    on dim 0 copies rows; on the last dim it gathers single elements, 3x slower on a CPU).

    Args:
        x: (L, ...) int32, values in [0, 255].
        out_size: the new length of dim 0.

    Returns:
        (out_size, ...) int32 in [0, 255].
    """
    in_size = x.shape[0]
    index = _on_device(("pil_index", in_size, out_size), lambda: _pil_bilinear_table(in_size, out_size)[0], x.device)
    weight = _on_device(("pil_weight", in_size, out_size),
                        lambda: _pil_bilinear_table(in_size, out_size)[1].astype(np.int32), x.device)
    per_row = (-1,) + (1,) * (x.dim() - 1)
    acc = x.index_select(0, index[:, 0]) * weight[:, 0].view(per_row)
    for k in range(1, index.shape[1]):
        acc.addcmul_(x.index_select(0, index[:, k]), weight[:, k].view(per_row))
    return acc.add_(1 << (_PRECISION_BITS - 1)).bitwise_right_shift_(_PRECISION_BITS).clamp_(0, 255)


def _resize_bilinear(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, *size) as detectron2's ``ResizeTransform.apply_image``.

    uint8: PIL's bilinear filter (horizontal pass, 8-bit rounding, vertical pass), exactly.
    Floating point: ``F.interpolate(mode="bilinear", align_corners=False)`` as detectron2.
    """
    if x.dtype == torch.uint8:
        y = x.permute(3, 0, 1, 2).to(torch.int32, memory_format=torch.contiguous_format)  # (W, N, C, H)
        if size[1] != x.shape[-1]:
            y = _pil_axis_pass(y, size[1])
        y = y.permute(3, 0, 1, 2).contiguous()  # (H, W', N, C)
        if size[0] != x.shape[-2]:
            y = _pil_axis_pass(y, size[0])
        return y.permute(2, 3, 0, 1).to(torch.uint8, memory_format=torch.contiguous_format)
    if not x.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point for GradAug's resize, got {x.dtype}")
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _resize_nearest(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(..., H, W) of any dtype -> (..., *size), PIL's NEAREST rule (detectron2's
    ``ResizeTransform.apply_segmentation`` on uint8 maps)."""
    h, w = x.shape[-2:]
    iy = _on_device(("nearest", h, size[0]), lambda: _pil_nearest_index(h, size[0]), x.device)
    ix = _on_device(("nearest", w, size[1]), lambda: _pil_nearest_index(w, size[1]), x.device)
    return x.index_select(-2, iy).index_select(-1, ix)


def _rotate_bilinear(x: torch.Tensor, geo: AffineGeometry) -> torch.Tensor:
    """(N, C, H, W) through ``cv2.warpAffine(INTER_LINEAR, BORDER_CONSTANT 0)`` geometry:
    ``grid_sample`` (bilinear, zeros outside). uint8 is rounded back to uint8."""
    n, _, h, w = x.shape
    sx, sy = geo.source_pixels(h, w, x.device)
    dtype = x.dtype if x.is_floating_point() else torch.float32
    grid = torch.stack([(2 * sx + 1) / w - 1, (2 * sy + 1) / h - 1], -1).to(dtype)
    out = F.grid_sample(x.to(dtype), grid.expand(n, h, w, 2), mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    if x.dtype == torch.uint8:
        return torch.floor(out + 0.5).clamp_(0, 255).to(torch.uint8)
    return out


def _rotate_nearest(x: torch.Tensor, geo: AffineGeometry, fill) -> torch.Tensor:
    """(..., H, W) of any dtype through ``cv2.warpAffine(INTER_NEAREST)`` geometry
    (source pixel ``floor(coordinate + 0.5)``); pixels from outside become ``fill``."""
    h, w = x.shape[-2:]
    sx, sy = geo.source_pixels(h, w, x.device)
    ix, iy = torch.floor(sx + 0.5).long(), torch.floor(sy + 0.5).long()
    inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    flat = (iy.clamp(0, h - 1) * w + ix.clamp(0, w - 1)).reshape(-1)
    out = x.reshape(*x.shape[:-2], h * w).index_select(-1, flat).reshape(x.shape)
    return torch.where(inside, out, torch.full((), fill, dtype=x.dtype, device=x.device))


# ---------------------------------------------------------------------------------------
# The geometry of one image's sub-network transform
# ---------------------------------------------------------------------------------------
class SubnetGeometry(AffineGeometry):
    """How one sub-network's transform moves an image of size (height, width), and with it
    every field of the image's training dict.

    The map is detectron2's (:class:`~gradaug_det.gradaug.geometry.AffineGeometry` with
    ``center="edges"``): ``ResizeTransform(h, w, round(h*s), round(w*s))`` (x scaled by
    ``new_w / w``, y by ``new_h / h``), then ``RotationTransform(new_h, new_w, angle,
    expand=False)`` (counter-clockwise by ``angle`` degrees about ``(new_w / 2, new_h / 2)``,
    continuous coordinates: pixel ``i`` covers [i, i + 1)). Coordinates (``points``,
    ``inverse_points``, ``boxes``) are the shared geometry's; this class adds the dense
    fields, keypoints and polygons.

    Args:
        height, width: input image size in pixels.
        spec: the sub-network's draw (``scale``, ``angle`` in degrees).
    """

    def __init__(self, height: int, width: int, spec: SubnetSpec):
        super().__init__(height, width, spec.scale, spec.angle, center="edges")
        self.spec = spec

    @functools.cached_property
    def transform(self) -> T.TransformList:
        """detectron2's equivalent transform (moves polygons, the reference in tests)."""
        return detection_transform(*self.in_size, self.spec)

    # -- dense fields -------------------------------------------------------------------
    def images(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images (uint8 or float, any C) of this size -> (N, C, *self.size)."""
        if self.resize:
            x = _resize_bilinear(x, self.size)
        if self.rotation is not None:
            x = _rotate_bilinear(x, self)
        return x

    def label_map(self, x: torch.Tensor, fill) -> torch.Tensor:
        """(..., H, W) label maps or masks of any dtype, nearest neighbour; pixels rotated in
        from outside the image become ``fill``."""
        if self.resize:
            x = _resize_nearest(x, self.size)
        if self.rotation is not None:
            x = _rotate_nearest(x, self, fill)
        return x

    # -- keypoints and polygons ---------------------------------------------------------
    def keypoints(self, kp: torch.Tensor) -> torch.Tensor:
        """(N, K, 3) keypoints (x, y, visibility) -> moved; points outside the output image
        get visibility 0 and all points with visibility 0 get (0, 0, 0), as detectron2's
        ``transform_keypoint_annotations``."""
        xy = self.points(kp[..., :2])
        h, w = self.size
        inside = (xy[..., 0] >= 0) & (xy[..., 0] <= w) & (xy[..., 1] >= 0) & (xy[..., 1] <= h)
        v = torch.where(inside, kp[..., 2].double(), torch.zeros((), dtype=torch.float64, device=kp.device))
        out = torch.cat([xy, v[..., None]], -1)
        return torch.where((v == 0)[..., None], torch.zeros_like(out), out).to(kp.dtype)

    def point_labels(self, moved: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N, P) point labels of the (N, P, 2) points ``moved`` (already in this output's
        pixels): points outside the output image get -1, the label PointRend's
        ``roi_mask_point_loss`` ignores (PointSup's point supervision)."""
        h, w = self.size
        inside = (moved[..., 0] >= 0) & (moved[..., 0] <= w) & (moved[..., 1] >= 0) & (moved[..., 1] <= h)
        return torch.where(inside, labels, torch.full((), -1, dtype=labels.dtype, device=labels.device))

    def polygons(self, masks: PolygonMasks) -> PolygonMasks:
        """Polygons (host numpy) through detectron2's ``apply_polygons`` of the same transform."""
        tfm = self.transform
        return PolygonMasks([
            [p.reshape(-1) for p in tfm.apply_polygons([q.reshape(-1, 2).copy() for q in polys])]
            for polys in masks.polygons
        ])


def _select(inst: Instances, keep: torch.Tensor) -> Instances:
    """``inst[keep]`` with the decision read where ``keep`` lives (the boxes' device)."""
    if bool(keep.all()):
        return inst
    idx = keep.nonzero().squeeze(1)
    out = Instances(inst.image_size)
    for name, value in inst.get_fields().items():
        if isinstance(value, PolygonMasks):
            out.set(name, value[idx.cpu()])
        else:
            dev = value.device if isinstance(value, torch.Tensor) else getattr(value, "device", idx.device)
            out.set(name, value[idx.to(dev, non_blocking=True)])
    return out


def _transform_instances(inst: Instances, geo: SubnetGeometry, device, box_threshold: float) -> Instances:
    _check_instance_fields(inst, "instances")
    out = Instances(geo.size)
    keep = None
    for name, value in inst.get_fields().items():
        if isinstance(value, Boxes):
            value = Boxes(geo.boxes(value.tensor))
            if keep is None:
                keep = value.nonempty(threshold=box_threshold)
        elif isinstance(value, PolygonMasks):
            value = geo.polygons(value)
        elif isinstance(value, BitMasks):
            t = value.tensor.to(device, non_blocking=True)
            value = BitMasks(geo.label_map(t, False) if len(t) else t.new_zeros((0,) + geo.size))
        elif isinstance(value, Keypoints):
            value = Keypoints(geo.keypoints(value.tensor))
        elif name == "gt_point_coords":
            value = geo.points(value).to(value.dtype)
        out.set(name, value)
    if out.has("gt_point_coords") and out.has("gt_point_labels"):
        out.gt_point_labels = geo.point_labels(out.gt_point_coords, out.gt_point_labels)
    return _select(out, keep) if keep is not None else out


def batch_to_device(batch: List[Dict], device) -> List[Dict]:
    """The batch with its dense fields (``image``, ``sem_seg``, ``BitMasks``) on ``device``
    (non-blocking copies; the model's own ``.to(device)`` is then a no-op). Sparse fields
    (boxes, keypoints, polygons, proposals) stay where the loader put them, as detectron2
    moves them inside the model's forward. The input batch is not modified."""
    out = []
    for d in batch:
        d = dict(d)
        for key in ("image", "sem_seg"):
            if isinstance(d.get(key), torch.Tensor):
                d[key] = d[key].to(device, non_blocking=True)
        inst = d.get("instances")
        if isinstance(inst, Instances) and any(isinstance(v, BitMasks) for v in inst.get_fields().values()):
            new = Instances(inst.image_size)
            for name, value in inst.get_fields().items():
                new.set(name, BitMasks(value.tensor.to(device, non_blocking=True)) if isinstance(value, BitMasks)
                        else value)
            d["instances"] = new
        out.append(d)
    return out


def transform_detection_batch(batch: List[Dict], spec: SubnetSpec, teacher: Optional[List[Dict]] = None, *,
                              device=None, ignore_value: int = 255):
    """Transform a detectron2 training batch (and the teacher's RoIs) for one sub-network.

    Args:
        batch: list of dataset dicts: "image" (C, H, W) uint8 or float tensor, any C; optional
            "instances" (``gt_boxes``, ``gt_classes``, ``gt_masks`` as polygons or bitmasks,
            ``gt_keypoints`` (N, K, 3)), "sem_seg" (H, W) integer map, "proposals"
            (``proposal_boxes``, ``objectness_logits``); other keys pass through.
        spec: the sub-network's draw (scale, angle in degrees, counter-clockwise).
        teacher: optional per-image {"boxes": (R, 4), "logits": (R, K), optional "weights":
            (R,)} in the coordinates of ``batch``'s images, on the model's device.
        device: where the dense fields are resampled (the model's device); default: each
            image's own device.
        ignore_value: label of ``sem_seg`` pixels rotated in from outside the image
            (``MODEL.SEM_SEG_HEAD.IGNORE_VALUE``).

    Returns:
        ``(new_batch, new_teacher)``; the input batch is not modified. Each teacher entry
        gains "weights" (R,) float: 0 for RoIs left without area (they stay, so no
        boolean indexing runs on the device).

    Raises:
        NotImplementedError: for a field the transforms cannot move (see :func:`check_batch_fields`).
    """
    if spec.scale == 1.0 and spec.angle % 360 == 0:
        return batch, teacher
    check_batch_fields(batch)
    device_type = torch.device(device).type if device is not None else batch[0]["image"].device.type
    no_amp = (torch.autocast(device_type=device_type, enabled=False) if torch.amp.is_autocast_available(device_type)
              else contextlib.nullcontext())
    with no_amp:  # passes run under AMP: the geometry stays in full precision
        return _transform_detection_batch(batch, spec, teacher, device, ignore_value)


def _transform_detection_batch(batch, spec, teacher, device, ignore_value):
    geos = [SubnetGeometry(*d["image"].shape[-2:], spec) for d in batch]
    images = _transform_images([d["image"] if device is None else d["image"].to(device, non_blocking=True)
                                for d in batch], geos)
    new_batch = []
    for d, geo, image in zip(batch, geos, images):
        out = {k: v for k, v in d.items() if k not in ("image", "instances", "sem_seg", "proposals")}
        out["image"] = image
        dev = image.device
        if "instances" in d:
            out["instances"] = _transform_instances(d["instances"], geo, dev, box_threshold=1e-5)
        if "proposals" in d:
            out["proposals"] = _transform_instances(d["proposals"], geo, dev, box_threshold=0.0)
        if "sem_seg" in d:
            out["sem_seg"] = geo.label_map(d["sem_seg"].to(dev, non_blocking=True), ignore_value)
        new_batch.append(out)
    new_teacher = None
    if teacher is not None:
        new_teacher = []
        for t, geo in zip(teacher, geos):
            dtype = t["logits"].dtype if t["logits"].is_floating_point() else torch.float32
            boxes, w = map_teacher_rois(t["boxes"], geo.boxes, t.get("weights"), dtype)
            new_teacher.append(dict(t, boxes=boxes, weights=w))  # other keys (e.g. "stage_sizes") pass
    return new_batch, new_teacher


def _transform_images(images: Sequence[torch.Tensor], geos: Sequence[SubnetGeometry]) -> List[torch.Tensor]:
    """One batched resample per group of images sharing size, dtype and device."""
    groups: Dict[tuple, List[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault((tuple(img.shape), img.dtype, img.device), []).append(i)
    out: List[Optional[torch.Tensor]] = [None] * len(images)
    for idx in groups.values():
        x = images[idx[0]][None] if len(idx) == 1 else torch.stack([images[i] for i in idx])
        y = geos[idx[0]].images(x)
        for i, yi in zip(idx, y.unbind(0)):
            out[i] = yi
    return out


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
