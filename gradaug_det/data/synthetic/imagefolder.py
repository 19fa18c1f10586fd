"""Deterministic tiny ImageFolder classification dataset (an ImageNet stand-in).

:func:`generate_imagefolder` writes::

    root/
      train/<wnid>/<wnid>_00000.JPEG ...
      val/<wnid>/<wnid>_00000.JPEG ...
      DONE            # JSON with the generation parameters, written last

in the layout expected by :func:`gradaug_det.data.datasets.register_imagenet`,
so the classification-pretraining code path can be tested without ImageNet.

Class ``k`` has the fake WordNet id ``"n{k:08d}"`` (so sorted wnids give class
ids in order) and is learnable: it is a fixed shape (circle, square, triangle,
cross, ring, diamond, bar, star, cycling) drawn in a fixed hue, with random
position, size, rotation, hue/brightness jitter and a noisy textured
background. Classes sharing a shape (``num_classes > 8``) differ by hue.
With ``style="shapes"`` the images look like the detection data of
:mod:`~gradaug_det.data.synthetic.coco_shapes` and only the shape tells the class
(the quickstart's classification pretraining).
"""

import logging
import os
import re
from typing import Any, Dict, List

import cv2
import numpy as np
from tqdm import tqdm

from .checks import check_int
from .drawing import APPEARANCES, GOLDEN_RATIO_CONJUGATE, category_color, contrasting_color, draw_glyph, textured_background
from .files import atomic_write_image, read_marker, remove_marker, remove_stale_files, write_marker

__all__ = ["QUICKSTART_CLASSES", "generate_imagefolder", "imagefolder_wnids"]

logger = logging.getLogger(__name__)

_FORMAT_VERSION = 1
_SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "bar", "star")
_SPLIT_CODES = {"train": 0, "val": 1}
_FILE_RE = re.compile(r"^n\d{8}_\d{5}\.JPEG$")
_WNID_RE = re.compile(r"^n\d{8}$")
#: The quickstart's classification pretraining data (``gradaug_quickstart_cls_*``): the
#: 8 glyphs in the detection data's look, 64 px, 300 training / 25 validation images each.
QUICKSTART_CLASSES: Dict[str, Any] = {
    "num_classes": 8,
    "train_per_class": 300,
    "val_per_class": 25,
    "image_size": 64,
    "seed": 0,
    "style": "shapes",
    "appearance": "category",
}


def imagefolder_wnids(num_classes: int) -> List[str]:
    """Returns the fake WordNet ids used for ``num_classes`` synthetic classes.

    Args:
        num_classes: number of classes (>= 1).

    Returns:
        ``["n00000000", "n00000001", ...]``; sorted order equals class order.
    """
    num_classes = check_int("num_classes", num_classes, 1)
    return ["n{:08d}".format(k) for k in range(num_classes)]


def _class_color(class_id: int, rng: np.random.Generator) -> tuple:
    """Returns a jittered BGR colour for a class (fixed hue, random brightness)."""
    hue = ((class_id * GOLDEN_RATIO_CONJUGATE) % 1.0 + rng.uniform(-0.025, 0.025)) % 1.0
    hsv = np.array(
        [[[hue * 180.0, rng.uniform(170, 255), rng.uniform(160, 255)]]], dtype=np.float32
    )
    hsv = np.clip(np.round(hsv), 0, [179, 255, 255]).astype(np.uint8)
    bgr = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return tuple(float(v) for v in bgr)


def _render(rng: np.random.Generator, class_id: int, size: int, style: str = "hue",
            appearance: str = "random") -> np.ndarray:
    """Renders one uint8 BGR image of the given class.

    Args:
        rng: random generator for this image.
        class_id: class index.
        size: image side in pixels.
        style: ``"hue"`` (a dim gradient background; the class has a fixed hue) or
            ``"shapes"`` (the detection data's textured background).
        appearance: with ``style="shapes"``, the glyph's colour: ``"random"`` (only its
            shape tells the class) or ``"category"`` (the hue band of detection category
            ``class_id + 1``, as the detection data's ``appearance="category"``).

    Returns:
        uint8 array of shape (size, size, 3).
    """
    shape = _SHAPES[class_id % len(_SHAPES)]
    if style == "shapes":
        image = textured_background(rng, size)
        r = size * rng.uniform(0.15, 0.4)
        cx, cy = size / 2 + rng.uniform(-0.2, 0.2, size=2) * size
        rot = rng.uniform(0, 2 * np.pi)
        ref = image[int(np.clip(cy, 0, size - 1)), int(np.clip(cx, 0, size - 1))]
        if appearance == "category":
            color = category_color(rng, class_id + 1, ref)
        else:
            color = contrasting_color(rng, ref)
        draw_glyph(image, shape, (cx, cy), r, rot, color, cv2.LINE_8)
        amp = int(rng.integers(4, 17))
    else:
        # Background: dim random gradient + uniform noise, independent of the class.
        coords = np.arange(size, dtype=np.float32) / size
        angle = rng.uniform(0, 2 * np.pi)
        t = np.float32(np.cos(angle)) * coords[None, :] + np.float32(np.sin(angle)) * coords[:, None]
        c0, c1 = rng.uniform(30, 140, size=3), rng.uniform(30, 140, size=3)
        image = cv2.merge([np.float32(c0[i]) + np.float32((c1[i] - c0[i]) / 1.5) * t for i in range(3)])
        color = _class_color(class_id, rng)
        r = size * rng.uniform(0.2, 0.33)
        cx, cy = size / 2 + rng.uniform(-0.15, 0.15, size=2) * size
        rot = rng.uniform(0, 2 * np.pi)
        draw_glyph(image, shape, (cx, cy), r, rot, color, cv2.LINE_AA)
        amp = int(rng.integers(6, 21))
    noise = rng.integers(-amp, amp + 1, size=image.shape, dtype=np.int16)
    return cv2.add(image, noise, dtype=cv2.CV_8U)


def generate_imagefolder(
    root: str,
    num_classes: int = 4,
    train_per_class: int = 16,
    val_per_class: int = 8,
    image_size: int = 64,
    seed: int = 0,
    progress: bool = False,
    style: str = "hue",
    appearance: str = "random",
) -> Dict[str, str]:
    """Generates (or reuses) a tiny, learnable ImageFolder dataset under ``root``.

    Same restart rules as :func:`gradaug_det.data.synthetic.coco_shapes.generate_coco_shapes`:
    if ``root/DONE`` records exactly these parameters nothing is written;
    otherwise the marker is removed, all images are rewritten atomically,
    stale files following this generator's naming scheme
    (``n########/n########_#####.JPEG``) are deleted, and the marker is
    written last. Files not following that scheme are never touched.

    JPEG encoding (quality 95) is deterministic for a given OpenCV build, so
    the same parameters give identical files.

    Args:
        root: output directory.
        num_classes: number of classes (>= 1).
        train_per_class: training images per class (>= 1).
        val_per_class: validation images per class (>= 1).
        image_size: side of the square images in pixels (>= 16).
        seed: non-negative random seed.
        progress: show a tqdm progress bar.
        style: ``"hue"`` (default): each class is a glyph in its own hue on a dim
            gradient. ``"shapes"``: the look of the detection data
            (:mod:`~gradaug_det.data.synthetic.coco_shapes`: textured background, random
            contrasting colour, glyph 30-80 % of the side, off-centre), so only the
            glyph tells the class -- pretraining on it gives a backbone that knows the
            detection data's shapes and clutter. At most 8 classes (one per glyph).
        appearance: with ``style="shapes"``: ``"random"`` (default; random contrasting
            colour, only the glyph tells the class) or ``"category"`` (class ``k`` takes
            the colours of detection category ``k + 1``: circle, square/rectangle and
            triangle look as in the detection data with ``appearance="category"``).

    Returns:
        ``{"train": root/train, "val": root/val}``.

    Raises:
        ValueError: if an argument is out of range.
    """
    root = os.fspath(root)
    wnids = imagefolder_wnids(num_classes)
    counts = {
        "train": check_int("train_per_class", train_per_class, 1),
        "val": check_int("val_per_class", val_per_class, 1),
    }
    image_size = check_int("image_size", image_size, 16)
    seed = check_int("seed", seed, 0)
    if style not in ("hue", "shapes"):
        raise ValueError("style must be 'hue' or 'shapes', got {!r}".format(style))
    if appearance not in APPEARANCES or (appearance != "random" and style != "shapes"):
        raise ValueError("appearance must be 'random', or 'category' with style='shapes'; got "
                         "appearance={!r}, style={!r}".format(appearance, style))
    if style == "shapes" and len(wnids) > len(_SHAPES):
        raise ValueError(
            "style='shapes' has one class per glyph, so at most {} classes; got num_classes={}"
            .format(len(_SHAPES), len(wnids))
        )
    params: Dict[str, Any] = {
        # the generator's name when the format was fixed: kept, so earlier markers stay valid
        "generator": "gradaug_det.data.synthetic_imagefolder",
        "version": _FORMAT_VERSION,
        "num_classes": len(wnids),
        "train_per_class": counts["train"],
        "val_per_class": counts["val"],
        "image_size": image_size,
        "seed": seed,
    }
    if style != "hue":  # recorded only when not the default: earlier markers stay valid
        params["style"] = style
    if appearance != "random":
        params["appearance"] = appearance
    paths = {split: os.path.join(root, split) for split in _SPLIT_CODES}
    if read_marker(root) == params:
        return paths

    logger.info("Generating synthetic ImageFolder dataset at %s ...", root)
    os.makedirs(root, exist_ok=True)
    remove_marker(root)
    jobs = [
        (split, class_id, index)
        for split in _SPLIT_CODES
        for class_id in range(len(wnids))
        for index in range(counts[split])
    ]
    iterator = tqdm(jobs, desc="gradaug imagefolder", unit="img", leave=False) if progress else jobs
    for split, class_id, index in iterator:
        class_dir = os.path.join(paths[split], wnids[class_id])
        if index == 0:
            os.makedirs(class_dir, exist_ok=True)
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], class_id, index])
        image = _render(rng, class_id, image_size, style, appearance)
        name = "{}_{:05d}.JPEG".format(wnids[class_id], index)
        atomic_write_image(
            os.path.join(class_dir, name), image, (cv2.IMWRITE_JPEG_QUALITY, 95)
        )

    # Remove what an earlier generation with other parameters left behind.
    for split, split_dir in paths.items():
        for wnid in os.listdir(split_dir):
            class_dir = os.path.join(split_dir, wnid)
            if not (_WNID_RE.match(wnid) and os.path.isdir(class_dir)):
                continue
            keep = set()
            if wnid in wnids:
                keep = {"{}_{:05d}.JPEG".format(wnid, i) for i in range(counts[split])}
            remove_stale_files(class_dir, _FILE_RE, keep)
            if not os.listdir(class_dir):
                os.rmdir(class_dir)
    write_marker(root, params)
    return paths
