"""The affine geometry of a sub-network's input transform, and the teacher's RoIs through it.

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
the device on the host).
"""
import math
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["Affine", "scaled_size", "rotation_matrix", "invert_affine", "AffineGeometry", "map_teacher_rois"]

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
