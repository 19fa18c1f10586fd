"""Deterministic synthetic COCO-format instance-segmentation dataset ("shapes").

The quickstart configs of this project train and evaluate on a small dataset of
coloured geometric shapes (circles, rectangles, triangles) drawn on textured
backgrounds. It is generated locally by :func:`generate_coco_shapes`, so the
project can be exercised end to end without downloading COCO.

Layout written under ``root``::

    root/
      train/000001.png ...
      val/000001.png ...
      annotations/instances_train.json
      annotations/instances_val.json
      DONE            # JSON with the generation parameters, written last

Guarantees:

* **Deterministic**: the same parameters give byte-identical JSON files and
  identical images (each image is drawn from its own random generator seeded
  with ``(seed, split, index)``).
* **Exact annotations**: instance masks are computed *after* occlusion by later
  shapes. The polygon ``segmentation`` traces the pixel boundary of the visible
  mask, so rasterising it with pycocotools (``annToMask``) reproduces the
  visible mask exactly; ``area`` is its pixel count and ``bbox`` encloses it
  tightly. Shapes are placed so that every annotated instance keeps at least
  half of its pixels visible, its visible mask has no holes and no fragment
  smaller than ``_MIN_FRAGMENT_AREA`` pixels.
* **Restartable**: every file is written through a temporary file and
  ``os.replace``; the ``DONE`` marker is written last. A later call with the
  same parameters and an intact marker returns immediately; an interrupted run
  or one with different parameters is regenerated.
"""
import json
import logging
import os
import re
from typing import Any, Dict, List, Tuple

import cv2
import numpy as np
from tqdm import tqdm

from .checks import check_int, check_int_range
from .drawing import (
    APPEARANCES, DISTRACTOR_GLYPHS, SIZE_RANGE, category_color, contrasting_color, draw_glyph, draw_shape_mask, paint,
    textured_background,
)
from .files import atomic_write_bytes, atomic_write_image, read_marker, remove_marker, remove_stale_files, write_marker

__all__ = [
    "COCO_SHAPES_CATEGORIES",
    "QUICKSTART_SHAPES",
    "generate_coco_shapes",
    "coco_shapes_paths",
]

logger = logging.getLogger(__name__)

#: Categories of the synthetic dataset, in COCO ``categories`` format.
COCO_SHAPES_CATEGORIES: List[Dict[str, Any]] = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "rectangle", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]

_FORMAT_VERSION = 1
_SPLIT_CODES = {"train": 0, "val": 1}
_IMAGE_NAME_RE = re.compile(r"^\d{6}\.png$")

# A placed shape must keep at least this fraction of its own (in-image) pixels
# visible after all later shapes are drawn, otherwise the placement is rejected.
_MIN_VISIBLE_FRACTION = 0.5
# Minimum pixel count of every connected fragment of a visible mask.
_MIN_FRAGMENT_AREA = 16
# Minimum in-image pixel count of a freshly drawn shape.
_MIN_SHAPE_AREA = 40
# Placement attempts per shape before giving up on it.
_MAX_PLACEMENT_TRIES = 12

#: The generation parameters of the quickstart / ``make demo`` data (one home for them:
#: ``register_quickstart`` and ``tools/quickstart.py`` read this). 128 px images, objects
#: 15-77 px (COCO "small" and "medium"), 1-5 shapes that occlude each other (each keeps at
#: least half of its pixels visible), 0-3 unannotated clutter glyphs per image.
QUICKSTART_SHAPES: Dict[str, Any] = {
    "num_train": 800,
    "num_val": 100,
    "image_size": 128,
    "seed": 0,
    "num_shapes": (1, 5),
    "size_range": (0.12, 0.6),
    "distractors": (0, 3),
    "appearance": "category",
}

# Upsampling factor used to trace pixel-boundary polygons with cv2.findContours.
_TRACE_UPSAMPLE = 3


def _fill_external(mask: np.ndarray) -> np.ndarray:
    """Returns ``mask`` with every hole (background enclosed by an outer contour) filled."""
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(mask)
    cv2.drawContours(filled, contours, -1, 1, thickness=-1)
    return filled


def _visible_mask_ok(mask: np.ndarray, full_area: int) -> bool:
    """Checks that a visible mask can be annotated exactly and is mostly visible.

    Args:
        mask: uint8 visible mask (cropped is fine).
        full_area: pixel count of the shape before occlusion.

    Returns:
        True if at least ``_MIN_VISIBLE_FRACTION`` of the shape is visible, the
        mask has no holes, and each 8-connected fragment has at least
        ``_MIN_FRAGMENT_AREA`` pixels.
    """
    area = int(mask.sum())
    if area < _MIN_VISIBLE_FRACTION * full_area:
        return False
    if int(_fill_external(mask).sum()) != area:
        return False
    num, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    return bool(num <= 2 or stats[1:, cv2.CC_STAT_AREA].min() >= _MIN_FRAGMENT_AREA)


def _mask_to_polygons(mask: np.ndarray, offset: Tuple[int, int] = (0, 0)) -> List[List[float]]:
    """Traces the pixel-boundary polygons of a binary mask with ``cv2.findContours``.

    ``cv2.findContours`` returns the centres of boundary pixels, which describes a
    region about half a pixel smaller than the mask all around. Instead, the
    mask is upsampled by 3 (nearest neighbour) before tracing; each traced
    vertex then lies in the first or last sub-pixel of an original pixel, and
    ``floor(v / 3 + 0.5)`` maps it to that pixel's left/top or right/bottom
    edge. The result is the exact outline of the pixel squares in COCO's
    continuous coordinates (pixel ``i`` spans ``[i, i + 1]``), so pycocotools
    rasterises it back to exactly ``mask``, provided the mask has no holes.

    Args:
        mask: uint8 HxW mask.
        offset: (x, y) added to every vertex (position of a crop in the image).

    Returns:
        One flat ``[x0, y0, x1, y1, ...]`` list per 8-connected component, each
        with at least 4 vertices.
    """
    k = _TRACE_UPSAMPLE
    up = np.repeat(np.repeat(mask, k, axis=0), k, axis=1)
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        pts = np.floor(contour.reshape(-1, 2) / k + 0.5).astype(np.int64)
        keep = np.ones(len(pts), dtype=bool)
        keep[1:] = np.any(pts[1:] != pts[:-1], axis=1)
        if len(pts) > 1 and np.array_equal(pts[-1], pts[0]):
            keep[-1] = False
        pts = pts[keep] + np.asarray(offset, dtype=np.int64)
        if len(pts) >= 3:
            polygons.append([float(v) for v in pts.reshape(-1)])
    return polygons


def _render_image(
    rng: np.random.Generator,
    size: int,
    num_shapes: Tuple[int, int],
    size_range: Tuple[float, float] = SIZE_RANGE,
    distractors: Tuple[int, int] = (0, 0),
    appearance: str = "random",
) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
    """Renders one image and the annotations of its visible shapes.

    Args:
        rng: random generator for this image.
        size: image side in pixels.
        num_shapes: inclusive (min, max) number of shapes to try to place.
        size_range: (min, max) shape size as a fraction of ``size``.
        distractors: inclusive (min, max) number of unannotated clutter glyphs
            (``DISTRACTOR_GLYPHS``) painted on the background, under the shapes.
        appearance: ``"random"`` (any colour) or ``"category"`` (each category's own hue
            band, :func:`category_color`).

    Returns:
        (image, instances): uint8 BGR image and a list of dicts with keys
        ``category_id``, ``segmentation``, ``bbox``, ``area``.
    """
    image = textured_background(rng, size)
    if distractors[1] > 0:
        lo, hi = size_range
        for _ in range(int(rng.integers(distractors[0], distractors[1] + 1))):
            glyph = DISTRACTOR_GLYPHS[int(rng.integers(len(DISTRACTOR_GLYPHS)))]
            radius = float(np.exp(rng.uniform(np.log(lo * size), np.log(hi * size)))) / 2
            center = rng.uniform(0, size, size=2)
            ref = image[int(center[1]), int(center[0])]
            draw_glyph(image, glyph, (center[0], center[1]), radius, rng.uniform(0, 2 * np.pi),
                       contrasting_color(rng, ref), cv2.LINE_8)
    owner = np.full((size, size), -1, dtype=np.int16)  # index of the top shape per pixel
    shapes: List[Dict[str, Any]] = []
    target = int(rng.integers(num_shapes[0], num_shapes[1] + 1))
    for _ in range(target):
        for _attempt in range(_MAX_PLACEMENT_TRIES):
            category_id = int(rng.integers(1, len(COCO_SHAPES_CATEGORIES) + 1))
            mask, params = draw_shape_mask(rng, category_id, size, size_range)
            full_area = cv2.countNonZero(mask)
            if full_area < _MIN_SHAPE_AREA:
                continue
            new_owner = owner.copy()
            np.copyto(new_owner, np.int16(len(shapes)), where=mask.view(bool))
            ok = True
            for j, prev in enumerate(shapes):
                y0, y1, x0, x1 = prev["crop"]
                vis = (new_owner[y0:y1, x0:x1] == j).astype(np.uint8)
                if not _visible_mask_ok(vis, prev["full_area"]):
                    ok = False
                    break
            if not ok:
                continue
            owner = new_owner
            x, y, w, h = cv2.boundingRect(mask)
            shapes.append(
                {
                    "category_id": category_id,
                    "params": params,
                    "full_area": full_area,
                    "crop": (y, y + h, x, x + w),
                }
            )
            break

    for shape in shapes:
        y0, y1, x0, x1 = shape["crop"]
        reference = image[y0:y1, x0:x1].reshape(-1, 3).mean(0)
        if appearance == "category":
            color = category_color(rng, shape["category_id"], reference)
        else:
            color = contrasting_color(rng, reference)
        paint(image, shape["params"], color)

    # Sensor-like (uniform, per channel) noise over everything so that shapes
    # are not flat; cv2.add rounds and saturates to uint8.
    amp = int(rng.integers(4, 17))
    noise = rng.integers(-amp, amp + 1, size=image.shape, dtype=np.int16)
    image_u8 = cv2.add(image, noise, dtype=cv2.CV_8U)

    instances = []
    for j, shape in enumerate(shapes):
        y0, y1, x0, x1 = shape["crop"]
        vis = (owner[y0:y1, x0:x1] == j).astype(np.uint8)
        area = cv2.countNonZero(vis)
        polygons = _mask_to_polygons(vis, offset=(x0, y0))
        # By construction (see _visible_mask_ok) this never triggers; it guards
        # the invariant that the polygons describe the whole visible mask.
        if area == 0 or not polygons:
            continue
        bx, by, bw, bh = cv2.boundingRect(vis)
        instances.append(
            {
                "category_id": shape["category_id"],
                "segmentation": polygons,
                "bbox": [float(bx + x0), float(by + y0), float(bw), float(bh)],
                "area": float(area),
            }
        )
    return image_u8, instances


# ----------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------
def coco_shapes_paths(root: str) -> Dict[str, Dict[str, str]]:
    """Returns the annotation file and image directory of each split.

    Args:
        root: dataset root passed to :func:`generate_coco_shapes`.

    Returns:
        ``{"train": {"json_file": ..., "image_root": ...}, "val": {...}}``.
    """
    root = os.fspath(root)
    return {
        split: {
            "json_file": os.path.join(root, "annotations", "instances_{}.json".format(split)),
            "image_root": os.path.join(root, split),
        }
        for split in _SPLIT_CODES
    }


def _generate_split(
    root: str,
    split: str,
    num_images: int,
    image_size: int,
    seed: int,
    num_shapes: Tuple[int, int],
    progress: bool,
    size_range: Tuple[float, float] = SIZE_RANGE,
    distractors: Tuple[int, int] = (0, 0),
    appearance: str = "random",
) -> None:
    """Writes the images and the annotation JSON of one split."""
    paths = coco_shapes_paths(root)[split]
    image_dir = paths["image_root"]
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    names = set()
    iterator = range(1, num_images + 1)
    if progress:
        iterator = tqdm(iterator, desc="gradaug shapes {}".format(split), unit="img", leave=False)
    for image_id in iterator:
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], image_id])
        image, instances = _render_image(rng, image_size, num_shapes, size_range, distractors,
                                          appearance)
        file_name = "{:06d}.png".format(image_id)
        names.add(file_name)
        atomic_write_image(os.path.join(image_dir, file_name), image)
        images.append(
            {"id": image_id, "file_name": file_name, "width": image_size, "height": image_size}
        )
        for inst in instances:
            inst = {"id": len(annotations) + 1, "image_id": image_id, **inst, "iscrowd": 0}
            annotations.append(inst)
    remove_stale_files(image_dir, _IMAGE_NAME_RE, names)

    dataset = {
        "info": {
            "description": "gradaug_det synthetic shapes ({} split)".format(split),
            "version": str(_FORMAT_VERSION),
            "year": 2024,
            "contributor": "gradaug_det.data.synthetic_coco",  # as generated before: the same bytes
            "date_created": "n/a",
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [dict(c) for c in COCO_SHAPES_CATEGORIES],
    }
    os.makedirs(os.path.dirname(paths["json_file"]), exist_ok=True)
    data = json.dumps(dataset, separators=(",", ":")).encode("utf-8")
    atomic_write_bytes(paths["json_file"], data)


def generate_coco_shapes(
    root: str,
    num_train: int = 300,
    num_val: int = 50,
    image_size: int = 256,
    seed: int = 0,
    num_shapes: Tuple[int, int] = (1, 4),
    progress: bool = True,
    size_range: Tuple[float, float] = SIZE_RANGE,
    distractors: Tuple[int, int] = (0, 0),
    appearance: str = "random",
) -> Dict[str, Dict[str, str]]:
    """Generates (or reuses) the synthetic COCO-format shapes dataset under ``root``.

    If ``root/DONE`` exists, records exactly these parameters and both
    annotation files exist, nothing is written. Otherwise the marker is removed
    first, all images and annotation files are (re)written atomically, stale
    images from an earlier, larger generation (named ``NNNNNN.png``) are
    deleted, and the marker is written last; an interrupted run is therefore
    redone by the next call. Concurrent calls with identical parameters (e.g.
    several distributed ranks) write identical bytes and are harmless.

    With the defaults (300 train / 50 val images of 256 px) this takes about
    2 seconds on one CPU core (measured: 2.1 s, including PNG encoding).

    Args:
        root: output directory.
        num_train: number of training images (>= 1).
        num_val: number of validation images (>= 1).
        image_size: side of the square images in pixels (>= 32).
        seed: non-negative random seed; the data is a pure function of the
            parameters.
        num_shapes: inclusive ``(min, max)`` number of shapes attempted per image.
            A shape that cannot be placed without hiding more than half of an
            earlier one (after 12 attempts) is skipped, so an image can contain
            fewer shapes, rarely none.
        progress: show a tqdm progress bar.
        size_range: ``(min, max)`` characteristic shape size (diameter / side) as a
            fraction of ``image_size``, drawn log-uniformly; ``0 < min <= max <= 1``.
            The default (0.047, 0.66) spans COCO's small, medium and large buckets at
            256 px.
        distractors: inclusive ``(min, max)`` number of unannotated clutter glyphs
            (``DISTRACTOR_GLYPHS``: cross, ring, star; sizes from ``size_range``)
            painted on the background before the shapes, so a detector must learn
            to ignore shape-like objects of other kinds. Default none.
        appearance: how a shape's colour is drawn: ``"random"`` (default: any colour
            contrasting with what lies under it; only the outline tells the category) or
            ``"category"`` (each category has its own hue band with random saturation
            and brightness, as real categories have typical colours; distractors stay
            random, so colour alone does not tell an object from clutter).

    Returns:
        ``{"train": {"json_file": ..., "image_root": ...}, "val": {...}}``, as
        :func:`coco_shapes_paths`.

    Raises:
        ValueError: if an argument is out of range.
    """
    root = os.fspath(root)
    num_train = check_int("num_train", num_train, 1)
    num_val = check_int("num_val", num_val, 1)
    image_size = check_int("image_size", image_size, 32)
    seed = check_int("seed", seed, 0)
    lo, hi = check_int_range("num_shapes", num_shapes, 1)
    try:
        size_lo, size_hi = (float(v) for v in size_range)
    except (TypeError, ValueError):
        raise ValueError(
            "size_range must be a (min, max) pair of numbers, got {!r}".format(size_range)
        ) from None
    if not 0 < size_lo <= size_hi <= 1:
        raise ValueError(
            "size_range must satisfy 0 < min <= max <= 1 (fractions of image_size), "
            "got {!r}".format(size_range)
        )
    d_lo, d_hi = check_int_range("distractors", distractors, 0)
    if appearance not in APPEARANCES:
        raise ValueError("appearance must be one of {}, got {!r}".format(
            ", ".join(map(repr, APPEARANCES)), appearance))

    params = {
        # the generator's name when the format was fixed: kept, so earlier markers stay valid
        "generator": "gradaug_det.data.synthetic_coco",
        "version": _FORMAT_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": image_size,
        "seed": seed,
        "num_shapes": [lo, hi],
    }
    # Recorded only when not the defaults, so markers of earlier versions stay valid.
    if (size_lo, size_hi) != tuple(SIZE_RANGE):
        params["size_range"] = [size_lo, size_hi]
    if (d_lo, d_hi) != (0, 0):
        params["distractors"] = [d_lo, d_hi]
    if appearance != "random":
        params["appearance"] = appearance
    paths = coco_shapes_paths(root)
    if read_marker(root) == params and all(
        os.path.isfile(p["json_file"]) for p in paths.values()
    ):
        logger.debug("Synthetic shapes dataset at %s is up to date.", root)
        return paths

    logger.info("Generating synthetic shapes dataset at %s ...", root)
    os.makedirs(root, exist_ok=True)
    remove_marker(root)
    for split, count in (("train", num_train), ("val", num_val)):
        _generate_split(root, split, count, image_size, seed, (lo, hi), progress,
                        (size_lo, size_hi), (d_lo, d_hi), appearance)
    write_marker(root, params)
    return paths
