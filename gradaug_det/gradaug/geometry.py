"""The affine geometry of a sub-network's input transform, and the teacher's RoIs and dense
per-anchor maps through it.

One definition shared by the detectron2 transforms (:mod:`.transforms`) and the MMDetection
ones (:mod:`gradaug_det.mmdet.transforms`); it depends on torch only (no detectron2, no
OpenCV), so ``gradaug_det.mmdet`` works without detectron2.

A sub-network's image of size (h, w) is rescaled to :func:`scaled_size` (x scaled by
``new_w / w``, y by ``new_h / h``: detectron2's ``ResizeTransform`` and mmdet's ``Resize``
map coordinates alike), then rotated counter-clockwise by ``angle`` degrees about the centre
of a region (the whole image, or in an mmdet batch an image's valid ``img_shape``), keeping
its size (detectron2's ``RotationTransform(expand=False)``). The two frameworks place that
centre differently for coordinates, hence :class:`AffineGeometry`'s ``center``:

* ``"edges"`` (detectron2's ``RotationTransform.rm_coords``): ``(w / 2, h / 2)``, continuous
  coordinates, pixel ``i`` covering [i, i + 1);
* ``"pixels"`` (mmdet's ``Rotate``, which moves boxes with the image's matrix):
  ``((w - 1) / 2, (h - 1) / 2)``.

Images are resampled in the pixel-index convention in both (detectron2's ``rm_image``, mmdet's
matrix): the centre ``((w - 1) / 2, (h - 1) / 2)``. The matrices are OpenCV's
(``cv2.getRotationMatrix2D``, ``cv2.invertAffineTransform``) computed here in Python floats,
to the bit; coefficients reach the device as Python numbers (no host-to-device copy).

Host synchronisation: none. The teacher's RoIs a rotation leaves without area keep their row
with weight 0 (:func:`map_teacher_rois`) instead of being dropped (boolean indexing would read
the device on the host); likewise the sub-network's anchors whose source lies outside the
teacher's input, or whose size the teacher has no anchor for, keep weight 0
(:func:`map_teacher_anchors`).
"""
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Affine", "scaled_size", "rotation_matrix", "invert_affine", "AffineGeometry", "map_teacher_rois",
           "AnchorLayout", "anchor_scale_pairs", "map_teacher_anchors"]

#: A 2x3 affine map ``((a, b, c), (d, e, f))``: ``x' = a x + b y + c``, ``y' = d x + e y + f``.
Affine = Tuple[Tuple[float, float, float], Tuple[float, float, float]]


def scaled_size(height: int, width: int, scale: float) -> Tuple[int, int]:
    """(height, width) of an image rescaled by ``scale``: ``max(1, round(size * scale))`` each."""
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def rotation_matrix(center: Tuple[float, float], angle: float) -> Affine:
    """The rotation counter-clockwise (on screen, y down) by ``angle`` degrees about
    ``center`` = (x, y): exactly ``cv2.getRotationMatrix2D(center, angle, 1.0)`` (OpenCV's
    ``imgwarp.cpp``: the same double-precision expressions; the centre as float32, as its
    ``Point2f``)."""
    cx, cy = (float(np.float32(c)) for c in center)
    t = float(angle) * (math.pi / 180)
    alpha, beta = math.cos(t), math.sin(t)
    return ((alpha, beta, (1 - alpha) * cx - beta * cy), (-beta, alpha, beta * cx + (1 - alpha) * cy))


def invert_affine(m: Affine) -> Affine:
    """The inverse map: exactly ``cv2.invertAffineTransform`` (OpenCV's double-precision
    expressions; a singular map gives zeros, as there)."""
    (m0, m1, m2), (m3, m4, m5) = m
    det = m0 * m4 - m1 * m3
    det = 1.0 / det if det != 0 else 0.0
    a11, a22, a12, a21 = m4 * det, m0 * det, -m1 * det, -m3 * det
    return ((a11, a12, -a11 * m2 - a12 * m5), (a21, a22, -a21 * m2 - a22 * m5))


def _apply(m: Affine, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    (a, b, c), (d, e, f) = m
    return x * a + y * b + c, x * d + y * e + f


class AffineGeometry:
    """One image's sub-network map: rescale, then rotate (see the module docstring).

    Args:
        height, width: the input image's size in pixels.
        scale: relative scale (1.0: no rescale); the output size is :func:`scaled_size`.
        angle: degrees, counter-clockwise (detectron2's convention; mmdet's clockwise angles
            enter negated); a multiple of 360 is no rotation.
        center: where coordinates turn about: ``"edges"`` (detectron2) or ``"pixels"``
            (mmdet), see the module docstring.
        region: (h, w) of the region the rotation turns about and boxes are clipped to, in
            output pixels from the top-left corner (mmdet: an image's ``img_shape`` inside a
            padded batch); default the output size.

    Raises:
        ValueError: for an unknown ``center``.
    """

    def __init__(self, height: int, width: int, scale: float = 1.0, angle: float = 0.0, *,
                 center: str = "edges", region: Optional[Sequence[int]] = None):
        if center not in ("edges", "pixels"):
            raise ValueError(f"center must be 'edges' (detectron2) or 'pixels' (mmdet), got {center!r}")
        self.in_size = (int(height), int(width))
        self.size = scaled_size(height, width, scale) if scale != 1.0 else self.in_size
        self.resize = self.size != self.in_size
        self.factors = (self.size[1] / width, self.size[0] / height)  # (sx, sy)
        self.region = tuple(int(v) for v in region[:2]) if region is not None else self.size
        self.rotation: Optional[Affine] = None  # coordinates
        self.image_rotation: Optional[Affine] = None  # pixel indices (what the images' resampling uses)
        if angle % 360 != 0:
            h, w = self.region
            c = (w / 2, h / 2) if center == "edges" else ((w - 1) / 2, (h - 1) / 2)
            self.rotation = rotation_matrix(c, angle)
            self.image_rotation = rotation_matrix(((w - 1) / 2, (h - 1) / 2), angle)
            self.image_inverse = invert_affine(self.image_rotation)

    @property
    def identity(self) -> bool:
        return not self.resize and self.rotation is None

    def points(self, xy: torch.Tensor) -> torch.Tensor:
        """(..., 2) (x, y) coordinates in pixels, moved, computed in float64 (as
        detectron2's ``apply_coords`` on float64 input, e.g. keypoints); returns float64."""
        x, y = xy[..., 0].double(), xy[..., 1].double()
        if self.resize:
            x, y = x * self.factors[0], y * self.factors[1]
        if self.rotation is not None:
            x, y = _apply(self.rotation, x, y)
        return torch.stack([x, y], -1)

    def inverse_points(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Where output coordinates (x, y) (pixels, float64) came from in the input image:
        the inverse of :meth:`points`."""
        if self.rotation is not None:
            x, y = _apply(invert_affine(self.rotation), x, y)
        if self.resize:
            x, y = x / self.factors[0], y / self.factors[1]
        return x, y

    def boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """(..., 4) XYXY boxes in pixels -> the boxes enclosing their 4 moved corners, clipped
        to ``region`` (detectron2's ``apply_box`` then ``Boxes.clip``; mmdet's ``rescale_`` /
        ``rotate_`` then ``clip_``). The rescale runs in the boxes' dtype (float32 products,
        as ``ResizeTransform.apply_coords`` and ``HorizontalBoxes.rescale_``), the rotation in
        float64 (as ``cv2.transform``). Same dtype and device as the input."""
        x1, y1, x2, y2 = boxes.unbind(-1)
        if self.resize:
            sx, sy = self.factors
            x1, y1, x2, y2 = x1 * sx, y1 * sy, x2 * sx, y2 * sy
        if self.rotation is not None:
            xs = torch.stack([x1, x2, x1, x2], -1).double()
            ys = torch.stack([y1, y1, y2, y2], -1).double()
            xs, ys = _apply(self.rotation, xs, ys)
            x1, x2 = xs.min(-1).values.to(boxes.dtype), xs.max(-1).values.to(boxes.dtype)
            y1, y2 = ys.min(-1).values.to(boxes.dtype), ys.max(-1).values.to(boxes.dtype)
        h, w = self.region
        return torch.stack([x1.clamp(0, w), y1.clamp(0, h), x2.clamp(0, w), y2.clamp(0, h)], -1)

    def source_pixels(self, height: int, width: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Source pixel positions (pixel-index convention, float64, each (height, width)) of
        every output pixel of the rotation's image warp (``cv2.warpAffine`` with the image
        matrix), over an output grid of ``height x width`` (an mmdet batch: the padded size).

        Raises:
            ValueError: if this geometry does not rotate.
        """
        if self.rotation is None:
            raise ValueError("source_pixels: this geometry does not rotate")
        ys = torch.arange(height, dtype=torch.float64, device=device)[:, None]
        xs = torch.arange(width, dtype=torch.float64, device=device)[None, :]
        return _apply(self.image_inverse, xs, ys)


def map_teacher_rois(boxes: torch.Tensor, move: Callable[[torch.Tensor], torch.Tensor],
                     weights: Optional[torch.Tensor] = None,
                     dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """The full network's RoIs moved with a sub-network's input, and their loss weights: the
    one RoI-teacher core of the detectron2 and mmdet soft labels.

    Every row is kept; a RoI left without area (width or height <= 0 after the move,
    detectron2's ``Boxes.nonempty()``) gets weight 0 (so no boolean indexing, no host
    synchronisation; :func:`~gradaug_det.gradaug.losses.soft_target_kl` averages over the
    weighted rows).

    Args:
        boxes: (R, 4) XYXY RoIs in the full network's input pixels, any device.
        move: the sub-network's box map, (R, 4) -> (R, 4) (e.g. :meth:`AffineGeometry.boxes`).
        weights: optional (R,) prior weights, multiplied in.
        dtype: the weights' dtype (the teacher logits' floating dtype).

    Returns:
        ``(moved (R, 4), weights (R,))`` on the boxes' device.
    """
    moved = move(boxes)
    keep = (moved[..., 2] > moved[..., 0]) & (moved[..., 3] > moved[..., 1])
    w = keep.to(dtype)
    return moved, (w * weights if weights is not None else w)


@dataclass(frozen=True)
class AnchorLayout:
    """Where a dense head's anchors sit: per feature level, a grid whose cell ``(i, j)``
    holds anchors centred at ``origin + (j * stride_x, i * stride_y)`` (input pixels, the
    boxes' continuous coordinates), and per anchor type its size and aspect ratio. Anchor
    type ``a`` of a level is channel block ``a`` of the head's ``(N, A * C, H, W)`` map
    (mmdet's layout: channel ``a * C + c``).

    Attributes:
        strides: per level ``(stride_x, stride_y)`` in pixels.
        origins: per level ``(x, y)``: the centre of cell ``(0, 0)``'s anchors.
        sizes: per level, per anchor type: ``sqrt(w * h)`` in pixels.
        ratios: per level, per anchor type: ``h / w``.
    """

    strides: Tuple[Tuple[float, float], ...]
    origins: Tuple[Tuple[float, float], ...]
    sizes: Tuple[Tuple[float, ...], ...]
    ratios: Tuple[Tuple[float, ...], ...]

    @classmethod
    def from_base_anchors(cls, strides: Sequence, base_anchors: Sequence[torch.Tensor]) -> "AnchorLayout":
        """The layout of an anchor generator: per level its stride (a number or ``(x, y)``) and
        its ``(A, 4)`` XYXY base anchors, the anchors of cell ``(0, 0)`` (mmdet's
        ``AnchorGenerator.strides`` / ``.base_anchors``; cell ``(i, j)`` shifts them by
        ``(j * stride_x, i * stride_y)``).

        Raises:
            ValueError: if the counts differ, an anchor has no area, or a level's anchors do
                not share one centre.
        """
        if len(strides) != len(base_anchors):
            raise ValueError(f"AnchorLayout: {len(strides)} strides for {len(base_anchors)} levels of base anchors")
        out_strides, origins, sizes, ratios = [], [], [], []
        for level, (stride, anchors) in enumerate(zip(strides, base_anchors)):
            sx, sy = (stride, stride) if isinstance(stride, (int, float)) else stride
            a = anchors.detach().double().cpu()
            w, h = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
            cx, cy = (a[:, 0] + a[:, 2]) / 2, (a[:, 1] + a[:, 3]) / 2
            if len(a) == 0 or bool((w <= 0).any() or (h <= 0).any()):
                raise ValueError(f"AnchorLayout: level {level} has an anchor without area (or no anchors)")
            if float((cx - cx[0]).abs().max()) > 1e-6 or float((cy - cy[0]).abs().max()) > 1e-6:
                raise ValueError(f"AnchorLayout: the base anchors of level {level} do not share one centre")
            out_strides.append((float(sx), float(sy)))
            origins.append((float(cx[0]), float(cy[0])))
            sizes.append(tuple(float(v) for v in (w * h).sqrt()))
            ratios.append(tuple(float(v) for v in h / w))
        return cls(tuple(out_strides), tuple(origins), tuple(sizes), tuple(ratios))

    @property
    def num_levels(self) -> int:
        return len(self.strides)


#: (teacher level, teacher anchor type, interpolation weight)
AnchorPair = Tuple[int, int, float]


def anchor_scale_pairs(layout: AnchorLayout, factor: float) -> List[List[List[AnchorPair]]]:
    """Which of the full network's anchor types teach each anchor type of a sub-network whose
    input is the full network's resized by ``factor``.

    An object of size ``d`` in the full network's image has size ``factor * d`` in the
    sub-network's, so the sub-network's anchor of size ``a`` (at a point ``p``) plays the role
    of the full network's anchor of size ``a / factor`` (at the point ``p`` comes from). Anchor
    sizes of a feature pyramid are one geometric ladder (RetinaNet: ``4 * stride * 2^(o/3)``,
    strides doubling per level), so the match is on ``log2(size)``: ``u' = log2(a) -
    log2(factor)``, among the teacher's anchor types of the same aspect ratio; the two types
    bracketing ``u'`` are interpolated linearly in ``u'`` (one type when ``u'`` hits it,
    within 1e-6; at ``factor`` 0.5 that is the same type one level up, at 1.0 the same type of
    the same level). A size outside the teacher's ladder, or a ratio the teacher lacks, gets no
    pair (weight 0).

    Args:
        layout: the head's anchors (teacher and student share them).
        factor: the sub-network's linear size relative to the full network's, > 0 (the
            rescale's factor; a rotation keeps sizes: 1).

    Returns:
        ``pairs[level][anchor]``: a list of ``(teacher_level, teacher_anchor, weight)``, the
        weights summing to 1, or an empty list.

    Raises:
        ValueError: if ``factor`` is not > 0.
    """
    if not factor > 0:
        raise ValueError(f"anchor_scale_pairs: factor must be > 0, got {factor}")
    shift, tol = -math.log2(factor), 1e-6
    slots = [(math.log2(size), math.log(ratio), lt, at)
             for lt, (sizes, ratios) in enumerate(zip(layout.sizes, layout.ratios))
             for at, (size, ratio) in enumerate(zip(sizes, ratios))]
    out = []
    for sizes, ratios in zip(layout.sizes, layout.ratios):
        level = []
        for size, ratio in zip(sizes, ratios):
            u, r = math.log2(size) + shift, math.log(ratio)
            same = sorted((su, lt, at) for su, sr, lt, at in slots if abs(sr - r) < tol)
            exact = [(lt, at, 1.0) for su, lt, at in same if abs(su - u) < tol]
            below = [s for s in same if s[0] < u]
            above = [s for s in same if s[0] > u]
            if exact:
                level.append(exact[:1])
            elif below and above:
                (ul, ll, al), (uh, lh, ah) = below[-1], above[0]
                t = (u - ul) / (uh - ul)
                level.append([(ll, al, 1.0 - t), (lh, ah, t)])
            else:
                level.append([])
        out.append(level)
    return out


def _sample_level(probs: torch.Tensor, x: torch.Tensor, y: torch.Tensor, layout: AnchorLayout,
                  level: int) -> torch.Tensor:
    """Bilinear samples of a teacher level's (N, K, Ht, Wt) maps at the points (N, Hs, Ws)
    (pixels): cell ``j`` holds the point ``origin + j * stride`` (``align_corners=True``
    between cell centres), clamped to the outermost cells."""
    (sx, sy), (ox, oy) = layout.strides[level], layout.origins[level]
    ht, wt = probs.shape[-2:]
    gx = (x - ox) / sx * (2.0 / max(wt - 1, 1)) - 1.0
    gy = (y - oy) / sy * (2.0 / max(ht - 1, 1)) - 1.0
    grid = torch.stack([gx, gy], -1).to(probs.dtype)
    return F.grid_sample(probs, grid, mode="bilinear", padding_mode="border", align_corners=True)


def map_teacher_anchors(teacher: Sequence[torch.Tensor], layout: AnchorLayout,
                        student_sizes: Sequence[Sequence[int]],
                        source_points: Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]],
                        in_size: Sequence[int], factor: float) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """The full network's dense per-anchor maps moved onto a sub-network's anchors, and their
    weights: the dense counterpart of :func:`map_teacher_rois`.

    For each of the sub-network's anchors (level ``l``, type ``a``, cell ``(i, j)``): its
    centre (:class:`AnchorLayout`) goes back through the inverse of the sub-network's input
    transform (``source_points``: the shared geometry's
    :meth:`AffineGeometry.inverse_points`) to a point of the full network's input; there the
    teacher's maps of the anchor types :func:`anchor_scale_pairs` pairs with ``(l, a)`` are
    sampled bilinearly between their cell centres and mixed with the pairs' weights. Weight 0
    for anchors whose source point lies outside the full network's input (``[0, W] x [0, H]``:
    e.g. the corners a rotation brings in, the padding a rescale adds) or whose size has no
    teacher anchor; 1 otherwise.

    Args:
        teacher: per level (N, A_l * C, Ht_l, Wt_l): what is moved (the teacher's class
            probabilities), channel ``a * C + c``.
        layout: the head's anchors (:class:`AnchorLayout`).
        student_sizes: per level (Hs_l, Ws_l): the sub-network's grids.
        source_points: ``(x, y)`` (Hs, Ws) float64 pixels of the sub-network's input ->
            ``(x, y)`` (N, Hs, Ws) float64 pixels of the full network's input, one map per image.
        in_size: (H, W) of the full network's input (the padded batch).
        factor: the sub-network's linear size relative to the full network's (see
            :func:`anchor_scale_pairs`).

    Returns:
        ``(targets, weights)``: per level (N, A_l * C, Hs_l, Ws_l) in the teacher's dtype,
        and (N, A_l, Hs_l, Ws_l) 0/1 of the same dtype, on the teacher's device.

    Raises:
        ValueError: if the level counts differ or a map's channels are not ``A_l * C``.
    """
    levels = layout.num_levels
    if len(teacher) != levels or len(student_sizes) != levels:
        raise ValueError(f"map_teacher_anchors: {len(teacher)} teacher maps and {len(student_sizes)} student grids "
                         f"for {levels} anchor levels")
    num_classes = teacher[0].shape[1] // len(layout.sizes[0])
    for level, t in enumerate(teacher):
        if t.shape[1] != len(layout.sizes[level]) * num_classes:
            raise ValueError(f"map_teacher_anchors: level {level} has {t.shape[1]} channels, expected "
                             f"{len(layout.sizes[level])} anchors x {num_classes} classes")
    pairs = anchor_scale_pairs(layout, factor)
    n, device, dtype = teacher[0].shape[0], teacher[0].device, teacher[0].dtype
    height, width = in_size[0], in_size[1]
    targets, weights = [], []
    for level, (hs, ws) in enumerate(student_sizes):
        (sx, sy), (ox, oy) = layout.strides[level], layout.origins[level]
        xs = (ox + torch.arange(ws, dtype=torch.float64, device=device) * sx)[None, :].expand(hs, ws)
        ys = (oy + torch.arange(hs, dtype=torch.float64, device=device) * sy)[:, None].expand(hs, ws)
        x, y = source_points(xs, ys)
        inside = ((x >= 0) & (x <= width) & (y >= 0) & (y <= height)).to(dtype)
        sampled = {lt: _sample_level(teacher[lt], x, y, layout, lt).unflatten(1, (-1, num_classes))
                   for lt in sorted({lt for anchor in pairs[level] for lt, _, _ in anchor})}
        zeros = torch.zeros((n, num_classes, hs, ws), dtype=dtype, device=device)
        per_anchor, kept = [], []
        for anchor in pairs[level]:
            mixed = zeros
            for lt, at, w in anchor:
                mixed = mixed + sampled[lt][:, at] * w
            per_anchor.append(mixed)
            kept.append(inside if anchor else torch.zeros_like(inside))
        targets.append(torch.stack(per_anchor, 1).flatten(1, 2))
        weights.append(torch.stack(kept, 1))
    return targets, weights
