"""Dataset registration: the synthetic quickstart COCO set and ImageNet (ImageFolder).

Nothing here runs at import time; call the ``register_*`` functions (they are
idempotent) before building data loaders.

Registered names
----------------
``register_quickstart``:
    ``gradaug_quickstart_train``, ``gradaug_quickstart_val`` -- COCO-format
    instance segmentation (3 classes: circle, rectangle, triangle), see
    :mod:`gradaug_det.data.synthetic.coco_shapes` (parameters: ``QUICKSTART_SHAPES``);
    ``gradaug_quickstart_cls_train``, ``gradaug_quickstart_cls_val`` -- the
    ImageFolder classification data of the same look for pretraining the
    backbone (8 glyph classes, ``QUICKSTART_CLASSES``), see
    :mod:`gradaug_det.data.synthetic.imagefolder`.
``register_subset``:
    ``<source>_frac<F>_seed<S>`` -- a seeded fraction of the images of any registered
    dataset (:func:`subsample_images`), e.g. the scarce-data split of ``tools/compare.py
    --train-fraction``.
``register_imagenet``:
    ``imagenet_train``, ``imagenet_val`` -- every image of
    ``root/{train,val}/<wnid>/*``;
    ``imagenet_train_frac10``, ``imagenet_train_frac20``,
    ``imagenet_train_frac50`` -- low-data subsets of ``imagenet_train`` keeping
    10 %, 20 % and 50 % of the images of every class
    (:func:`subsample_per_class`). For a fixed seed the subsets are nested.

Dataset roots default to ``$DETECTRON2_DATASETS/<name>``, where
``DETECTRON2_DATASETS`` defaults to ``datasets`` as in detectron2.
"""

import logging
import math
import os
from fractions import Fraction
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .synthetic import (
    COCO_SHAPES_CATEGORIES, QUICKSTART_CLASSES, QUICKSTART_SHAPES, coco_shapes_paths, generate_coco_shapes,
    generate_imagefolder,
)

__all__ = [
    "QUICKSTART_TRAIN",
    "QUICKSTART_VAL",
    "QUICKSTART_CLS_TRAIN",
    "QUICKSTART_CLS_VAL",
    "QUICKSTART_TINY",
    "IMAGENET_TRAIN",
    "IMAGENET_VAL",
    "IMAGENET_FRACTIONS",
    "IMAGE_EXTENSIONS",
    "default_datasets_root",
    "register_quickstart",
    "register_imagenet",
    "imagenet_frac_name",
    "list_imagefolder_classes",
    "load_imagefolder",
    "subsample_per_class",
    "subsample_images",
    "subset_name",
    "register_subset",
    "check_datasets_registered",
    "DATASETS_DOC",
]

logger = logging.getLogger(__name__)

#: Where the docs say how to register a dataset (named by :func:`check_datasets_registered`).
DATASETS_DOC = "docs/getting_started.md#datasets"

QUICKSTART_TRAIN = "gradaug_quickstart_train"
QUICKSTART_VAL = "gradaug_quickstart_val"
QUICKSTART_CLS_TRAIN = "gradaug_quickstart_cls_train"
QUICKSTART_CLS_VAL = "gradaug_quickstart_cls_val"
#: Smoke-size twins of the four quickstart sets (same look; 8 / 4 detection images, 8 / 2
#: classification images per class), for checking the pipeline in seconds (the tools' tests):
#: ``gradaug_quickstart_tiny_{train,val}``, ``gradaug_quickstart_tiny_cls_{train,val}``.
QUICKSTART_TINY = {
    "train": "gradaug_quickstart_tiny_train",
    "val": "gradaug_quickstart_tiny_val",
    "cls_train": "gradaug_quickstart_tiny_cls_train",
    "cls_val": "gradaug_quickstart_tiny_cls_val",
}
_TINY_SHAPES = {"num_train": 8, "num_val": 4}
_TINY_CLASSES = {"train_per_class": 8, "val_per_class": 2}
IMAGENET_TRAIN = "imagenet_train"
IMAGENET_VAL = "imagenet_val"
#: Percentages for which ``imagenet_train_frac{P}`` is registered.
IMAGENET_FRACTIONS = (10, 20, 50)
#: File extensions (lower case) recognised as images in an ImageFolder tree.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
)


def default_datasets_root() -> str:
    """Returns ``$DETECTRON2_DATASETS`` (default ``"datasets"``), read at call time."""
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def _skip_if_registered(name: str, **expected: Any) -> bool:
    """Returns True (and warns on mismatching metadata) if ``name`` is already registered."""
    if name not in DatasetCatalog.list():
        return False
    meta = MetadataCatalog.get(name)
    for key, value in expected.items():
        old = getattr(meta, key, None)
        if old is not None and old != value:
            logger.warning(
                "Dataset %r is already registered with %s=%r; keeping it (requested %r).",
                name,
                key,
                old,
                value,
            )
    return True


# ----------------------------------------------------------------------------
# Synthetic COCO quickstart.
# ----------------------------------------------------------------------------
def register_quickstart(
    root: Optional[str] = None,
    num_train: Optional[int] = None,
    num_val: Optional[int] = None,
    image_size: Optional[int] = None,
    seed: Optional[int] = None,
    eager: bool = False,
    progress: bool = True,
    cls_root: Optional[str] = None,
    tiny: bool = False,
) -> Dict[str, str]:
    """Registers ``gradaug_quickstart_{train,val}`` and ``gradaug_quickstart_cls_{train,val}``.

    The datasets behave exactly like those of
    ``detectron2.data.datasets.register_coco_instances``: the loader is
    ``load_coco_json(json_file, image_root, name)`` and the metadata holds
    ``json_file``, ``image_root``, ``evaluator_type="coco"``, plus
    ``thing_classes`` and ``thing_dataset_id_to_contiguous_id`` (set up front
    with the values ``load_coco_json`` derives from the fixed categories).

    Generation is lazy by default: the loader first calls
    :func:`~gradaug_det.data.synthetic.coco_shapes.generate_coco_shapes` (a no-op when
    the ``DONE`` marker matches, about 2 s for the default sizes otherwise),
    which writes *both* splits. ``COCOEvaluator`` opens ``metadata.json_file``
    when it is constructed; detectron2's ``DefaultTrainer.test`` and
    ``build_detection_{train,test}_loader`` load the dataset first, so that is
    safe. Pass ``eager=True`` (or call ``DatasetCatalog.get`` once) when
    constructing an evaluator before any data loader.

    The classification twin (``gradaug_quickstart_cls_*``, for pretraining the
    backbone, ``configs/quickstart/pretrain_r18_gradaug.yaml``) is an ImageFolder
    of the detection data's look (``generate_imagefolder(style="shapes", appearance="category")``),
    registered like ``register_imagenet``'s names and generated lazily too.

    Calling this again is harmless: names that are already registered are kept
    (a warning is logged if they point at another root).

    Args:
        root: dataset directory; default ``$DETECTRON2_DATASETS/gradaug_quickstart_shapes``.
        num_train: number of training images (default: ``QUICKSTART_SHAPES``, as the
            other generation parameters).
        num_val: number of validation images.
        image_size: image side in pixels.
        seed: generation seed.
        eager: generate the data now instead of on first ``DatasetCatalog.get``.
        progress: show a progress bar while generating.
        cls_root: classification data directory; default
            ``$DETECTRON2_DATASETS/gradaug_quickstart_classes``.
        tiny: register the smoke-size twins instead (``QUICKSTART_TINY`` names, roots
            with a ``_tiny`` suffix). A call with neither ``root`` nor ``cls_root``
            registers them too.

    Returns:
        ``{"train": "gradaug_quickstart_train", "val": "gradaug_quickstart_val",
        "cls_train": ..., "cls_val": ...}``.
    """
    suffix = "_tiny" if tiny else ""
    defaults = root is None and cls_root is None
    if root is None:
        root = os.path.join(default_datasets_root(), "gradaug_quickstart_shapes" + suffix)
    if cls_root is None:
        cls_root = os.path.join(default_datasets_root(), "gradaug_quickstart_classes" + suffix)
    root, cls_root = os.fspath(root), os.fspath(cls_root)
    paths = coco_shapes_paths(root)
    given = {"num_train": num_train, "num_val": num_val, "image_size": image_size, "seed": seed}
    shapes_params = dict(QUICKSTART_SHAPES, **(_TINY_SHAPES if tiny else {}))
    shapes_params.update({k: v for k, v in given.items() if v is not None})
    classes_params = dict(QUICKSTART_CLASSES, **(_TINY_CLASSES if tiny else {}))

    def generate() -> None:
        generate_coco_shapes(root, progress=progress, **shapes_params)

    def generate_classes() -> None:
        generate_imagefolder(cls_root, progress=progress, **classes_params)

    cats = sorted(COCO_SHAPES_CATEGORIES, key=lambda c: c["id"])
    thing_classes = [c["name"] for c in cats]
    id_map = {c["id"]: i for i, c in enumerate(cats)}

    def make_loader(json_file: str, image_root: str, name: str) -> Callable[[], List[dict]]:
        def load() -> List[dict]:
            generate()
            return load_coco_json(json_file, image_root, name)

        return load

    names = {"train": QUICKSTART_TRAIN, "val": QUICKSTART_VAL}
    cls_names = {"cls_train": QUICKSTART_CLS_TRAIN, "cls_val": QUICKSTART_CLS_VAL}
    if tiny:
        names = {k: QUICKSTART_TINY[k] for k in names}
        cls_names = {k: QUICKSTART_TINY[k] for k in cls_names}
    for split, name in names.items():
        json_file, image_root = paths[split]["json_file"], paths[split]["image_root"]
        if _skip_if_registered(name, json_file=json_file):
            continue
        DatasetCatalog.register(name, make_loader(json_file, image_root, name))
        MetadataCatalog.get(name).set(
            json_file=json_file,
            image_root=image_root,
            evaluator_type="coco",
            thing_classes=thing_classes,
            thing_dataset_id_to_contiguous_id=id_map,
        )
    cls_dirs = {"train": os.path.join(cls_root, "train"), "val": os.path.join(cls_root, "val")}

    def make_cls_loader(split: str, name: str) -> Callable[[], List[dict]]:
        def load() -> List[dict]:
            generate_classes()
            classes = list_imagefolder_classes(cls_dirs["train"])
            MetadataCatalog.get(name).set(thing_classes=classes, classes=classes)
            return load_imagefolder(cls_dirs[split], classes)

        return load

    for key, name in cls_names.items():
        split = key[len("cls_"):]
        if _skip_if_registered(name, image_root=cls_dirs[split]):
            continue
        DatasetCatalog.register(name, make_cls_loader(split, name))
        MetadataCatalog.get(name).set(image_root=cls_dirs[split], evaluator_type="classification")
    if eager:
        generate()
        generate_classes()
    if defaults and not tiny:
        register_quickstart(progress=progress, tiny=True)
    return dict(names, **cls_names)


# ----------------------------------------------------------------------------
# ImageNet / ImageFolder.
# ----------------------------------------------------------------------------
def imagenet_frac_name(percent: int) -> str:
    """Returns the registered name of a low-data ImageNet subset, e.g. ``imagenet_train_frac10``."""
    return "{}_frac{}".format(IMAGENET_TRAIN, int(percent))


def list_imagefolder_classes(split_dir: str) -> List[str]:
    """Returns the sorted class folder names (wnids) of an ImageFolder split.

    Args:
        split_dir: directory holding one sub-directory per class.

    Raises:
        FileNotFoundError: if ``split_dir`` is not a directory.
    """
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(
            "ImageFolder split directory {!r} does not exist (expected "
            "<root>/<split>/<wnid>/<image>)".format(split_dir)
        )
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir())


def load_imagefolder(split_dir: str, class_names: Optional[Sequence[str]] = None) -> List[dict]:
    """Lists an ImageFolder split as detectron2-style records.

    Args:
        split_dir: ``<root>/<split>`` containing ``<wnid>/<image>`` files; files
            whose extension (case-insensitive) is not in ``IMAGE_EXTENSIONS`` are
            ignored.
        class_names: class folder names defining the ids (``class_id`` is the
            index in this list); default: the sorted folders of ``split_dir``.

    Returns:
        Records ``{"file_name", "image_id", "class_id"}`` sorted by
        ``(class_id, file name)``; ``image_id`` is the position in that order.

    Raises:
        FileNotFoundError: if ``split_dir`` does not exist.
        ValueError: if ``split_dir`` has a class folder not in ``class_names``.
    """
    folders = list_imagefolder_classes(split_dir)
    if class_names is None:
        class_names = folders
    index = {name: i for i, name in enumerate(class_names)}
    unknown = [f for f in folders if f not in index]
    if unknown:
        raise ValueError(
            "Class folders {} in {!r} are not among the {} training classes".format(
                unknown[:5], split_dir, len(class_names)
            )
        )
    records = []
    for folder in folders:
        class_dir = os.path.join(split_dir, folder)
        files = sorted(
            e.name
            for e in os.scandir(class_dir)
            if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
        )
        for name in files:
            records.append(
                {
                    "file_name": os.path.join(class_dir, name),
                    "image_id": len(records),
                    "class_id": index[folder],
                }
            )
    return records


def _num_to_keep(fraction: Fraction, count: int) -> int:
    """``max(1, round_half_up(fraction * count))``, computed exactly."""
    return max(1, math.floor(fraction * count + Fraction(1, 2)))


def _check_fraction_and_seed(fraction, seed) -> Fraction:
    """The subset helpers' argument check: ``fraction`` in (0, 1] (as an exact fraction,
    denominator at most 10^6) and a non-negative integer ``seed``.

    Raises:
        ValueError: naming the argument and its value.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating, Fraction)):
        raise ValueError("fraction must be a number in (0, 1], got {!r}".format(fraction))
    if not 0 < fraction <= 1:
        raise ValueError("fraction must be in (0, 1], got {!r}".format(fraction))
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError("seed must be a non-negative integer, got {!r}".format(seed))
    return Fraction(float(fraction) if isinstance(fraction, np.floating) else fraction).limit_denominator(1_000_000)


def subsample_per_class(records: Sequence[dict], fraction: float, seed: int = 0) -> List[dict]:
    """Keeps a seeded, fixed fraction of the records of every class.

    For a class with ``n`` records, ``k = max(1, floor(fraction * n + 1/2))``
    records are kept (round half up, computed on the exact rational value of
    ``fraction`` limited to denominators <= 10^6, so 0.1 means exactly 1/10).
    Which ones is decided by a permutation drawn from
    ``numpy.random.default_rng([seed, class_id])`` over the class's records
    sorted by ``(file_name, image_id)``, taking the first ``k``. Hence the
    result does not depend on the input order or on other classes, and for a
    fixed seed a smaller fraction gives a subset of a larger one.

    Args:
        records: dicts with at least ``class_id`` (an int) and ``file_name``.
        fraction: fraction to keep, in (0, 1].
        seed: non-negative integer seed.

    Returns:
        Shallow copies of the kept records, in their input order.

    Raises:
        ValueError: if ``fraction`` or ``seed`` is out of range, or a record has
            no non-negative integer ``class_id``.
    """
    exact = _check_fraction_and_seed(fraction, seed)

    by_class: Dict[int, List[int]] = {}
    for i, rec in enumerate(records):
        class_id = rec.get("class_id")
        valid = isinstance(class_id, (int, np.integer)) and not isinstance(class_id, bool)
        if not valid or class_id < 0:
            raise ValueError(
                "record {} needs a non-negative integer 'class_id', got {!r}".format(i, rec)
            )
        by_class.setdefault(int(class_id), []).append(i)

    keep = set()
    for class_id, indices in by_class.items():
        indices = sorted(
            indices,
            key=lambda i: (str(records[i].get("file_name", "")), str(records[i].get("image_id"))),
        )
        k = _num_to_keep(exact, len(indices))
        rng = np.random.default_rng([int(seed), class_id])
        order = rng.permutation(len(indices))[:k]
        keep.update(indices[j] for j in order)
    return [dict(rec) for i, rec in enumerate(records) if i in keep]


def subsample_images(records: Sequence[dict], fraction: float, seed: int = 0) -> List[dict]:
    """Keeps a seeded, fixed fraction of the images of a (detection) dataset.

    ``k = max(1, floor(fraction * n + 1/2))`` of the ``n`` records are kept (the rounding
    of :func:`subsample_per_class`, on the exact rational ``fraction``). Which ones: the
    first ``k`` of a permutation drawn from ``numpy.random.default_rng(seed)`` over the
    records sorted by ``(file_name, image_id)``, so the result does not depend on the input
    order, and for a fixed seed a smaller fraction gives a subset of a larger one. Unlike
    :func:`subsample_per_class` it needs no ``class_id`` (a detection image has many).

    Args:
        records: detectron2 dataset dicts (``file_name``, ``image_id``, ...).
        fraction: fraction to keep, in (0, 1].
        seed: non-negative integer seed.

    Returns:
        Shallow copies of the kept records, in their input order.

    Raises:
        ValueError: if ``fraction`` or ``seed`` is out of range.
    """
    exact = _check_fraction_and_seed(fraction, seed)
    order = sorted(range(len(records)),
                   key=lambda i: (str(records[i].get("file_name", "")), str(records[i].get("image_id"))))
    k = _num_to_keep(exact, len(order))
    perm = np.random.default_rng(int(seed)).permutation(len(order))[:k]
    keep = {order[j] for j in perm}
    return [dict(rec) for i, rec in enumerate(records) if i in keep]


def subset_name(source: str, fraction: float, seed: int = 0) -> str:
    """The registered name of :func:`register_subset`'s subset, e.g.
    ``gradaug_quickstart_train_frac0.1_seed0``."""
    return "{}_frac{:g}_seed{}".format(source, float(fraction), int(seed))


def register_subset(source: str, fraction: float, seed: int = 0) -> str:
    """Registers a seeded fraction of the images of the registered dataset ``source``.

    The loader calls ``DatasetCatalog.get(source)`` when the subset is loaded and keeps
    :func:`subsample_images` of it. The metadata is ``source``'s (class names, evaluator
    type ...; copied now and again after each load, as a COCO loader sets ``thing_classes``
    when it runs) without ``json_file`` (that file lists every image of ``source``), plus
    ``fraction``, ``subsample_seed`` and ``subset_of``. Idempotent.

    Args:
        source: a registered dataset name (usually a training split).
        fraction: fraction of its images to keep, in (0, 1].
        seed: subsampling seed (non-negative integer).

    Returns:
        The subset's name, :func:`subset_name`.

    Raises:
        KeyError: ``source`` is not registered.
        ValueError: ``fraction`` or ``seed`` out of range.
    """
    if source not in DatasetCatalog.list():
        raise KeyError("dataset {!r} is not registered".format(source))
    subsample_images([], fraction, seed)  # validates fraction and seed now
    name = subset_name(source, fraction, seed)
    if name in DatasetCatalog.list():
        return name

    def copy_metadata():  # again after loading: a COCO loader sets thing_classes when it runs
        have = MetadataCatalog.get(name).as_dict()
        MetadataCatalog.get(name).set(**{k: v for k, v in MetadataCatalog.get(source).as_dict().items()
                                         if k not in ("name", "json_file") and k not in have})

    def load():
        records = subsample_images(DatasetCatalog.get(source), fraction, seed)
        copy_metadata()
        return records

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(fraction=float(fraction), subsample_seed=int(seed), subset_of=source)
    copy_metadata()
    return name


def register_imagenet(
    root: Optional[str] = None,
    fractions: Sequence[int] = IMAGENET_FRACTIONS,
    seed: int = 0,
) -> List[str]:
    """Registers ImageNet (ImageFolder layout) for classification pre-training.

    Layout: ``root/train/<wnid>/*`` and ``root/val/<wnid>/*`` with any image
    extension in ``IMAGE_EXTENSIONS``. Registered names: ``imagenet_train``,
    ``imagenet_val`` and ``imagenet_train_frac{P}`` for each ``P`` in
    ``fractions`` (default 10, 20, 50: ``P`` percent of every class, see
    :func:`subsample_per_class`, seeded with ``seed``).

    Registration does not touch the disk. Each loader lists the files when
    ``DatasetCatalog.get`` is called and then sets ``thing_classes`` and
    ``classes`` (both the sorted wnids of ``root/train``; the class ids of the
    ``class_id`` field index this list, also for ``val``) in the metadata. Set
    up front: ``image_root``, ``evaluator_type="classification"``, and for the
    subsets ``fraction`` and ``subsample_seed``. Use
    :func:`list_imagefolder_classes` to get the classes without loading.

    Names that are already registered are kept, so calling this twice is
    harmless.

    Args:
        root: ImageNet directory; default ``$DETECTRON2_DATASETS/imagenet``.
        fractions: percentages (integers in 1..100) of the low-data subsets.
        seed: subsampling seed.

    Returns:
        The dataset names handled (registered now or before).

    Raises:
        ValueError: if a percentage is not an integer in 1..100.
    """
    if root is None:
        root = os.path.join(default_datasets_root(), "imagenet")
    root = os.fspath(root)
    for p in fractions:
        if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or not 1 <= p <= 100:
            raise ValueError("fractions must be integer percentages in 1..100, got {!r}".format(p))
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")

    def make_loader(name: str, split_dir: str, percent: Optional[int]) -> Callable[[], List[dict]]:
        def load() -> List[dict]:
            # Class ids always come from the training folders, so that train
            # and val agree; fall back to the split itself if train is absent.
            classes = list_imagefolder_classes(train_dir if os.path.isdir(train_dir) else split_dir)
            records = load_imagefolder(split_dir, classes)
            if percent is not None:
                records = subsample_per_class(records, Fraction(int(percent), 100), seed)
            MetadataCatalog.get(name).set(thing_classes=classes, classes=classes)
            logger.info("Loaded %d images from %s (%s).", len(records), split_dir, name)
            return records

        return load

    specs = [(IMAGENET_TRAIN, train_dir, None), (IMAGENET_VAL, val_dir, None)]
    specs += [(imagenet_frac_name(p), train_dir, int(p)) for p in fractions]
    names = []
    for name, split_dir, percent in specs:
        names.append(name)
        if _skip_if_registered(name, image_root=split_dir):
            continue
        DatasetCatalog.register(name, make_loader(name, split_dir, percent))
        meta: Dict[str, Any] = {"image_root": split_dir, "evaluator_type": "classification"}
        if percent is not None:
            meta.update(fraction=percent / 100, subsample_seed=seed)
        MetadataCatalog.get(name).set(**meta)
    return names


def check_datasets_registered(names: Sequence[str], key: str) -> None:
    """Refuse a dataset name that is not in detectron2's ``DatasetCatalog``, before any work.

    Args:
        names: the dataset names a config gives (e.g. ``cfg.DATASETS.TRAIN``).
        key: how the config names them, for the message (``"DATASETS.TRAIN"``,
            ``"dataloader.train.dataset.names"``).

    Raises:
        ConfigError: naming ``key``, the dataset, the closest registered name, how to
            register one and :data:`DATASETS_DOC`.
    """
    from ..utils.cli import ConfigError, did_you_mean

    registered = DatasetCatalog.list()
    for name in [names] if isinstance(names, str) else names:
        if name not in registered:
            raise ConfigError(
                f"{key}: dataset {name!r} is not registered{did_you_mean(name, registered) or '.'} "
                "Register yours before building the trainer, e.g. detectron2's register_coco_instances(name, {}, "
                f"json_file, image_root) (see {DATASETS_DOC})")
