"""The drawing kit of the synthetic datasets: backgrounds, glyphs, shapes and their colours.

Plain numpy / OpenCV. The COCO-layout shapes (:mod:`.coco_shapes`) and the ImageNet-layout
folders (:mod:`.imagefolder`) draw with it, so the classification data can take the
detection data's look.
"""
from typing import Any, Dict, Tuple

import cv2
import numpy as np

__all__ = ["APPEARANCES", "DISTRACTOR_GLYPHS", "GOLDEN_RATIO_CONJUGATE", "SIZE_RANGE", "textured_background",
           "draw_glyph", "shape_polygon", "draw_shape_mask", "paint", "contrasting_color", "category_color"]

# Hue spacing of the categories' / classes' colours: consecutive ids get hues far apart on
# the hue circle.
GOLDEN_RATIO_CONJUGATE = 0.6180339887498949
#: How a shape's colour is drawn (``appearance``): any colour contrasting with what lies
#: under it, or the hue band of its category (:func:`category_color`).
APPEARANCES = ("random", "category")
# Characteristic shape size is log-uniform in this range, expressed as a
# fraction of the image side (at 256 px: ~12 px .. ~170 px), which populates
# the COCO small (< 32^2), medium and large (>= 96^2) area buckets.
SIZE_RANGE = (0.047, 0.66)
#: Unannotated clutter drawn under the annotated shapes (``distractors``): glyphs that
#: are not one of the categories (see :func:`draw_glyph`).
DISTRACTOR_GLYPHS = ("cross", "ring", "star")


def textured_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Draws a background: linear colour gradient + sinusoidal stripes + blotches.

    Channels are computed separately and merged with OpenCV, which is several
    times faster than numpy broadcasting over a trailing axis of length 3.

    Args:
        rng: random generator.
        size: image side in pixels.

    Returns:
        float32 array of shape (size, size, 3) with values roughly in [0, 255].
    """
    coords = np.arange(size, dtype=np.float32) / size
    yy, xx = coords[:, None], coords[None, :]
    angle = rng.uniform(0, 2 * np.pi)
    t = np.float32(np.cos(angle)) * xx + np.float32(np.sin(angle)) * yy
    t = (t - t.min()) / np.float32(max(float(t.max() - t.min()), 1e-6))
    c0 = rng.uniform(20, 235, size=3)
    c1 = rng.uniform(20, 235, size=3)

    # Stripes with random orientation, frequency, phase and per-channel amplitude.
    s_angle = rng.uniform(0, np.pi)
    freq = rng.uniform(3, 18)
    phase = rng.uniform(0, 2 * np.pi)
    stripes = np.sin(
        np.float32(2 * np.pi * freq * np.cos(s_angle)) * xx
        + np.float32(2 * np.pi * freq * np.sin(s_angle)) * yy
        + np.float32(phase)
    )
    stripe_amp = rng.uniform(5, 30, size=3)

    # Low-frequency blotches: bicubically upsampled coarse noise.
    coarse = rng.normal(0, 1, size=(6, 6, 3)).astype(np.float32)
    blotches = cv2.split(cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC))
    blotch_amp = rng.uniform(4, 16)

    channels = [
        np.float32(c0[i])
        + np.float32(c1[i] - c0[i]) * t
        + np.float32(stripe_amp[i]) * stripes
        + np.float32(blotch_amp) * blotches[i]
        for i in range(3)
    ]
    return cv2.merge(channels)


def draw_glyph(
    canvas: np.ndarray,
    glyph: str,
    center: Tuple[float, float],
    radius: float,
    angle: float,
    color: Any,
    line_type: int = cv2.LINE_AA,
) -> None:
    """Draws one filled glyph in place (the classification classes and the clutter).

    Args:
        canvas: HxW or HxWx3 image (any dtype OpenCV draws on), modified in place.
        glyph: one of ``circle, square, triangle, cross, ring, diamond, bar, star``.
        center: (x, y) centre in pixels.
        radius: half the glyph's extent in pixels.
        angle: rotation in radians (ignored by the circle and ring).
        color: colour (a scalar for a single-channel canvas).
        line_type: OpenCV line type (``cv2.LINE_AA`` or ``cv2.LINE_8``).

    Raises:
        ValueError: for an unknown glyph.
    """
    cx, cy, r = float(center[0]), float(center[1]), float(radius)
    thick = max(int(round(r * 0.35)), 2)
    c, s = np.cos(angle), np.sin(angle)

    def rotated(offsets: np.ndarray) -> np.ndarray:
        return np.stack([cx + c * offsets[:, 0] - s * offsets[:, 1],
                         cy + s * offsets[:, 0] + c * offsets[:, 1]], 1)

    def poly(points: np.ndarray) -> None:
        cv2.fillPoly(canvas, [np.round(points).astype(np.int32)], color, lineType=line_type)

    ctr = (int(round(cx)), int(round(cy)))
    if glyph == "circle":
        cv2.circle(canvas, ctr, int(round(r)), color, -1, line_type)
    elif glyph == "ring":
        cv2.circle(canvas, ctr, int(round(r)), color, thick, line_type)
    elif glyph == "square":
        poly(rotated(np.array([[-r, -r], [r, -r], [r, r], [-r, r]]) * 0.8))
    elif glyph == "diamond":
        poly(rotated(np.array([[0, -r], [0.6 * r, 0], [0, r], [-0.6 * r, 0]])))
    elif glyph == "triangle":
        a = angle + np.arange(3) * 2 * np.pi / 3
        poly(np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], 1))
    elif glyph == "cross":
        w = thick / 2
        poly(rotated(np.array([[-r, -w], [r, -w], [r, w], [-r, w]])))
        poly(rotated(np.array([[-w, -r], [w, -r], [w, r], [-w, r]])))
    elif glyph == "bar":
        poly(rotated(np.array([[-r, -r * 0.22], [r, -r * 0.22], [r, r * 0.22], [-r, r * 0.22]])))
    elif glyph == "star":
        a = angle + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        poly(np.stack([cx + radii * np.cos(a), cy + radii * np.sin(a)], 1))
    else:
        raise ValueError("unknown glyph {!r}".format(glyph))


def shape_polygon(
    rng: np.random.Generator, category_id: int, center: np.ndarray, scale: float
) -> np.ndarray:
    """Returns the integer vertex polygon of a rectangle or triangle.

    Args:
        rng: random generator.
        category_id: 2 (rectangle) or 3 (triangle).
        center: (x, y) centre.
        scale: characteristic size in pixels.

    Returns:
        int32 array of shape (N, 2) with (x, y) vertices.
    """
    if category_id == 2:
        aspect = rng.uniform(0.45, 1.0)
        w, h = scale, scale * aspect
        if rng.random() < 0.5:
            w, h = h, w
        box = ((float(center[0]), float(center[1])), (w, h), float(rng.uniform(0, 180)))
        pts = cv2.boxPoints(box)
    else:
        # Three vertices on a circle, with angular gaps >= 70 degrees so that
        # the triangle is never degenerate.
        gaps = rng.uniform(70, 150, size=2)
        angles = np.radians(rng.uniform(0, 360) + np.array([0.0, gaps[0], gaps[0] + gaps[1]]))
        radius = scale / 2 * rng.uniform(0.85, 1.15, size=3)
        pts = np.stack(
            [center[0] + radius * np.cos(angles), center[1] + radius * np.sin(angles)], 1
        )
    return np.round(pts).astype(np.int32)


def draw_shape_mask(
    rng: np.random.Generator,
    category_id: int,
    size: int,
    size_range: Tuple[float, float] = SIZE_RANGE,
) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Samples a shape of the given category and rasterises its full mask.

    Args:
        rng: random generator.
        category_id: 1 circle, 2 rectangle, 3 triangle.
        size: image side in pixels.
        size_range: (min, max) characteristic size as a fraction of ``size``
            (log-uniform).

    Returns:
        (mask, params): uint8 mask of shape (size, size) with 1 inside the shape
        (no anti-aliasing, so the mask matches the painted pixels exactly), and
        the drawing parameters needed to paint it.
    """
    lo, hi = size_range
    scale = float(np.exp(rng.uniform(np.log(lo * size), np.log(hi * size))))
    # Centres stay scale/4 away from the border: large shapes may be truncated
    # by the image border, but most of each shape lies inside the image.
    margin = scale / 4
    center = rng.uniform(margin, size - margin, size=2)
    mask = np.zeros((size, size), np.uint8)
    if category_id == 1:
        x, y, r = int(round(center[0])), int(round(center[1])), max(int(round(scale / 2)), 2)
        params = {"circle": (x, y, r)}
        cv2.circle(mask, (x, y), r, 1, thickness=-1, lineType=cv2.LINE_8)
    else:
        poly = shape_polygon(rng, category_id, center, scale)
        params = {"poly": poly}
        cv2.fillPoly(mask, [poly], 1, lineType=cv2.LINE_8)
    return mask, params


def paint(image: np.ndarray, params: Dict[str, Any], color: Tuple[float, float, float]) -> None:
    """Paints a shape onto a float32 image in place (same rasterisation as the mask)."""
    if "circle" in params:
        x, y, r = params["circle"]
        cv2.circle(image, (x, y), r, color, thickness=-1, lineType=cv2.LINE_8)
    else:
        cv2.fillPoly(image, [params["poly"]], color, lineType=cv2.LINE_8)


def contrasting_color(
    rng: np.random.Generator, reference: np.ndarray
) -> Tuple[float, float, float]:
    """Samples a colour at least ~70 (L2 in RGB) away from ``reference``."""
    color = rng.uniform(0, 255, size=3)
    for _ in range(20):
        if np.linalg.norm(color - reference) >= 70:
            break
        color = rng.uniform(0, 255, size=3)
    return float(color[0]), float(color[1]), float(color[2])


def category_color(
    rng: np.random.Generator, category_id: int, reference: np.ndarray
) -> Tuple[float, float, float]:
    """Samples a colour typical of ``category_id``, contrasting with ``reference``.

    Real object categories have characteristic colours and shades; here each category
    owns a hue band (centres spaced by the golden ratio, width +-0.05 of the hue circle)
    with random saturation and brightness, so colour is a strong but not a sufficient
    cue (distractors take any colour). Up to 20 draws look for one at least ~70 (L2 in
    RGB) away from ``reference``, as :func:`contrasting_color`.
    """
    centre = (category_id * GOLDEN_RATIO_CONJUGATE) % 1.0
    best, best_dist = None, -1.0
    for _ in range(20):
        hue = (centre + rng.uniform(-0.05, 0.05)) % 1.0
        hsv = np.array([[[hue * 180.0, rng.uniform(0.55, 1.0) * 255, rng.uniform(0.35, 1.0) * 255]]],
                       dtype=np.float32)
        color = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR)[0, 0].astype(np.float64)
        dist = float(np.linalg.norm(color - reference))
        if dist > best_dist:
            best, best_dist = color, dist
        if dist >= 70:
            break
    return float(best[0]), float(best[1]), float(best[2])
