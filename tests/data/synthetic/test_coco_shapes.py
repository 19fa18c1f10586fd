"""Tests for the synthetic COCO shapes dataset and its detectron2 registration."""

import json
import os

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from pycocotools.coco import COCO

from gradaug_det.data.datasets import (
    QUICKSTART_CLS_TRAIN,
    QUICKSTART_CLS_VAL,
    QUICKSTART_TRAIN,
    QUICKSTART_VAL,
    register_quickstart,
)
from gradaug_det.data.synthetic import (
    COCO_SHAPES_CATEGORIES,
    coco_shapes_paths,
    generate_coco_shapes,
)

# Small but big enough (at 256 px) to populate all three COCO area buckets.
SMALL = dict(num_train=24, num_val=6, image_size=256, seed=0, progress=False)


def _read_tree(root):
    """Maps every relative path under ``root`` to the file bytes."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    generate_coco_shapes(root, **SMALL)
    return root


@pytest.fixture
def clean_quickstart():
    """Unregisters the quickstart names before and after a test."""

    def clean():
        for name in (QUICKSTART_TRAIN, QUICKSTART_VAL, QUICKSTART_CLS_TRAIN, QUICKSTART_CLS_VAL):
            if name in DatasetCatalog.list():
                DatasetCatalog.remove(name)
            if name in MetadataCatalog.list():
                MetadataCatalog.remove(name)

    clean()
    yield
    clean()


def test_layout(shapes_root):
    paths = coco_shapes_paths(shapes_root)
    for split, n in (("train", SMALL["num_train"]), ("val", SMALL["num_val"])):
        assert os.path.isfile(paths[split]["json_file"])
        pngs = sorted(f for f in os.listdir(paths[split]["image_root"]) if f.endswith(".png"))
        assert len(pngs) == n
    with open(os.path.join(shapes_root, "DONE")) as f:
        marker = json.load(f)
    assert marker["seed"] == 0 and marker["num_train"] == SMALL["num_train"]


def test_determinism(shapes_root, tmp_path):
    again = str(tmp_path / "again")
    generate_coco_shapes(again, **SMALL)
    first, second = _read_tree(shapes_root), _read_tree(again)
    assert sorted(first) == sorted(second)
    for rel in first:  # JSON byte-identical, PNG byte-identical (hence identical pixels)
        assert first[rel] == second[rel], rel

    other = str(tmp_path / "other_seed")
    generate_coco_shapes(other, **dict(SMALL, seed=1))
    third = _read_tree(other)
    rel = os.path.join("annotations", "instances_train.json")
    assert third[rel] != first[rel]
    assert third[os.path.join("train", "000001.png")] != first[os.path.join("train", "000001.png")]


@pytest.mark.parametrize("split", ["train", "val"])
def test_annotations_are_exact(shapes_root, split):
    json_file = coco_shapes_paths(shapes_root)[split]["json_file"]
    coco = COCO(json_file)
    cat_ids = {c["id"] for c in COCO_SHAPES_CATEGORIES}
    assert sorted(coco.getCatIds()) == [1, 2, 3]
    assert len(coco.dataset["annotations"]) > 0
    ann_ids = [a["id"] for a in coco.dataset["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids)
    image_ids = [i["id"] for i in coco.dataset["images"]]
    assert len(set(image_ids)) == len(image_ids)

    for img in coco.dataset["images"]:
        assert (img["width"], img["height"]) == (256, 256)
        coverage = np.zeros((img["height"], img["width"]), dtype=np.int64)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
            assert ann["category_id"] in cat_ids
            assert ann["iscrowd"] == 0
            assert ann["image_id"] == img["id"]
            assert all(len(poly) >= 6 and len(poly) % 2 == 0 for poly in ann["segmentation"])
            mask = coco.annToMask(ann)
            ys, xs = np.nonzero(mask)
            # The polygons trace pixel boundaries, so rasterising them gives the
            # visible mask exactly: no tolerance on area or bbox.
            assert len(ys) == ann["area"], ann["id"]
            x, y, w, h = ann["bbox"]
            tight = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert tight == [x, y, x + w, y + h], ann["id"]
            coverage += mask
        # Visible masks of one image never overlap (occlusion is resolved).
        assert coverage.max() <= 1


def test_size_buckets_and_categories(shapes_root):
    with open(coco_shapes_paths(shapes_root)["train"]["json_file"]) as f:
        anns = json.load(f)["annotations"]
    areas = np.array([a["area"] for a in anns])
    assert (areas < 32**2).sum() > 0
    assert ((areas >= 32**2) & (areas < 96**2)).sum() > 0
    assert (areas >= 96**2).sum() > 0
    assert {a["category_id"] for a in anns} == {1, 2, 3}


def test_load_coco_json(shapes_root):
    paths = coco_shapes_paths(shapes_root)["val"]
    dicts = load_coco_json(paths["json_file"], paths["image_root"])
    assert len(dicts) == SMALL["num_val"]
    for d in dicts:
        assert os.path.isfile(d["file_name"])
        for obj in d["annotations"]:
            assert obj["category_id"] in (1, 2, 3)  # no dataset_name: ids are not remapped


def test_done_marker_skips_and_regenerates(tmp_path):
    root = str(tmp_path / "marker")
    kwargs = dict(num_train=3, num_val=2, image_size=64, seed=0, progress=False)
    generate_coco_shapes(root, **kwargs)
    json_file = coco_shapes_paths(root)["train"]["json_file"]
    png = os.path.join(root, "train", "000001.png")
    os.utime(json_file, ns=(1, 1))  # any rewrite would change these
    os.utime(png, ns=(1, 1))

    generate_coco_shapes(root, **kwargs)  # marker matches: nothing rewritten
    assert os.stat(json_file).st_mtime_ns == 1 and os.stat(png).st_mtime_ns == 1

    generate_coco_shapes(root, **dict(kwargs, num_train=2))  # parameters differ: regenerate
    assert os.stat(json_file).st_mtime_ns != 1
    assert not os.path.exists(os.path.join(root, "train", "000003.png"))  # stale image removed
    with open(json_file) as f:
        assert len(json.load(f)["images"]) == 2

    # Interrupted run (no marker): regenerated.
    os.remove(os.path.join(root, "DONE"))
    os.utime(json_file, ns=(1, 1))
    generate_coco_shapes(root, **dict(kwargs, num_train=2))
    assert os.stat(json_file).st_mtime_ns != 1
    assert os.path.isfile(os.path.join(root, "DONE"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_train=0), "num_train .* got 0"),
        (dict(image_size=8), "image_size .* got 8"),
        (dict(seed=-1), "seed .* got -1"),
        (dict(num_shapes=(3, 1)), r"min <= max, got \(3, 1\)"),
        (dict(num_shapes=5), "num_shapes .* got 5"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_coco_shapes(str(tmp_path), progress=False, **kwargs)
    assert not os.path.exists(os.path.join(str(tmp_path), "DONE"))


def test_register_quickstart_lazy(tmp_path, clean_quickstart):
    root = str(tmp_path / "qs")
    names = register_quickstart(root, num_train=4, num_val=2, image_size=128, progress=False,
                                cls_root=str(tmp_path / "cls"))
    assert names == {"train": QUICKSTART_TRAIN, "val": QUICKSTART_VAL,
                     "cls_train": QUICKSTART_CLS_TRAIN, "cls_val": QUICKSTART_CLS_VAL}
    assert MetadataCatalog.get(QUICKSTART_CLS_TRAIN).evaluator_type == "classification"
    assert MetadataCatalog.get(QUICKSTART_CLS_VAL).image_root == str(tmp_path / "cls" / "val")
    assert not os.path.exists(root)  # lazy: nothing generated yet
    register_quickstart(root, num_train=4, num_val=2, image_size=128, progress=False)  # no raise

    meta = MetadataCatalog.get(QUICKSTART_VAL)
    assert meta.evaluator_type == "coco"
    assert meta.json_file == coco_shapes_paths(root)["val"]["json_file"]
    assert meta.thing_classes == ["circle", "rectangle", "triangle"]

    dicts = DatasetCatalog.get(QUICKSTART_TRAIN)
    assert len(dicts) == 4
    assert sum(len(d["annotations"]) for d in dicts) > 0
    for d in dicts:
        assert os.path.isfile(d["file_name"])
        assert all(0 <= obj["category_id"] < 3 for obj in d["annotations"])  # contiguous ids
    # Loading train generated both splits, so an evaluator can open the val json.
    assert os.path.isfile(meta.json_file)
    assert len(DatasetCatalog.get(QUICKSTART_VAL)) == 2
    id_map = MetadataCatalog.get(QUICKSTART_TRAIN).thing_dataset_id_to_contiguous_id
    assert id_map == {1: 0, 2: 1, 3: 2}


def test_register_quickstart_default_root_and_eager(tmp_path, monkeypatch, clean_quickstart):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    register_quickstart(num_train=2, num_val=1, image_size=64, eager=True, progress=False)
    root = os.path.join(str(tmp_path), "gradaug_quickstart_shapes")
    assert MetadataCatalog.get(QUICKSTART_TRAIN).image_root == os.path.join(root, "train")
    assert os.path.isfile(os.path.join(root, "DONE"))


def test_distractors_and_size_range(tmp_path):
    """Clutter is drawn but never annotated; sizes follow size_range; the marker records both."""
    kwargs = dict(num_train=12, num_val=1, image_size=128, seed=3, progress=False, size_range=(0.2, 0.4))
    clean, cluttered = str(tmp_path / "clean"), str(tmp_path / "cluttered")
    generate_coco_shapes(clean, **kwargs)
    generate_coco_shapes(cluttered, distractors=(2, 2), **kwargs)
    ann = {}
    for name, root in (("clean", clean), ("cluttered", cluttered)):
        with open(coco_shapes_paths(root)["train"]["json_file"]) as f:
            ann[name] = json.load(f)["annotations"]
    # clutter glyphs are never annotated: only the three categories appear
    assert {a["category_id"] for a in ann["cluttered"]} <= {1, 2, 3}
    for a in ann["clean"]:
        side = max(a["bbox"][2], a["bbox"][3])
        assert side <= 0.4 * 128 * 2 ** 0.5 + 2  # a rotated rectangle: its diagonal, <= sqrt(2) x size
    with open(os.path.join(cluttered, "DONE")) as f:
        marker = json.load(f)
    assert marker["distractors"] == [2, 2] and marker["size_range"] == [0.2, 0.4]
    images = []
    for root in (clean, cluttered):
        import cv2

        images.append(cv2.imread(os.path.join(coco_shapes_paths(root)["train"]["image_root"], "000001.png")))
    assert not np.array_equal(images[0], images[1])


def test_default_marker_unchanged(tmp_path):
    """Default parameters write the marker keys of earlier versions only (their data stays valid)."""
    generate_coco_shapes(str(tmp_path), num_train=1, num_val=1, image_size=64, progress=False)
    with open(os.path.join(str(tmp_path), "DONE")) as f:
        assert set(json.load(f)) == {"generator", "version", "num_train", "num_val", "image_size", "seed",
                                     "num_shapes"}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(size_range=(0.5, 0.2)), r"0 < min <= max <= 1"),
        (dict(size_range=(0.0, 0.2)), r"0 < min <= max <= 1"),
        (dict(size_range=3), "size_range must be a"),
        (dict(distractors=(2, 1)), r"distractors must satisfy min <= max"),
        (dict(distractors=(-1, 1)), r"distractors\[0\] must be an integer >= 0"),
    ],
)
def test_bad_new_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_coco_shapes(str(tmp_path), progress=False, **kwargs)
    assert not os.listdir(str(tmp_path))


def _mean_hue_offsets(root):
    """Circular distance (fraction of the hue circle) between each annotated shape's mean
    colour and its category's hue centre, from the written PNG and the annotation polygons."""
    import cv2

    from gradaug_det.data.synthetic.drawing import GOLDEN_RATIO_CONJUGATE as _GOLDEN_RATIO_CONJUGATE

    paths = coco_shapes_paths(root)["train"]
    with open(paths["json_file"]) as f:
        data = json.load(f)
    offsets = []
    for image in data["images"]:
        bgr = cv2.imread(os.path.join(paths["image_root"], image["file_name"]))
        for a in (a for a in data["annotations"] if a["image_id"] == image["id"]):
            mask = np.zeros(bgr.shape[:2], np.uint8)
            for poly in a["segmentation"]:
                cv2.fillPoly(mask, [np.round(np.asarray(poly).reshape(-1, 2)).astype(np.int32)], 1)
            mask = cv2.erode(mask, np.ones((3, 3), np.uint8))  # the outline's pixels mix with the background
            if mask.sum() < 20:
                continue
            mean = bgr[mask.astype(bool)].mean(0)
            hue = cv2.cvtColor(np.uint8([[np.round(mean)]]), cv2.COLOR_BGR2HSV_FULL)[0, 0, 0] / 256.0
            centre = (a["category_id"] * _GOLDEN_RATIO_CONJUGATE) % 1.0
            d = abs(hue - centre) % 1.0
            offsets.append(min(d, 1 - d))
    return np.array(offsets)


def test_category_appearance(tmp_path):
    """appearance="category": every annotated shape's mean colour lies in its category's hue
    band (centre k x 0.618, +-0.05; +0.02 for the sensor noise and 8-bit HSV); with the
    default "random" colours most do not. Recorded in the marker; bad values refused first."""
    kwargs = dict(num_train=16, num_val=1, image_size=128, seed=5, progress=False, distractors=(0, 3))
    cat, rnd = str(tmp_path / "category"), str(tmp_path / "random")
    generate_coco_shapes(cat, appearance="category", **kwargs)
    generate_coco_shapes(rnd, **kwargs)
    cat_off, rnd_off = _mean_hue_offsets(cat), _mean_hue_offsets(rnd)
    assert len(cat_off) >= 30 and len(rnd_off) >= 30
    assert cat_off.max() <= 0.07, cat_off.max()
    assert (rnd_off > 0.07).mean() > 0.5
    with open(os.path.join(cat, "DONE")) as f:
        assert json.load(f)["appearance"] == "category"
    with open(os.path.join(rnd, "DONE")) as f:
        assert "appearance" not in json.load(f)
    with pytest.raises(ValueError, match="appearance must be one of 'random', 'category', got 'hue'"):
        generate_coco_shapes(str(tmp_path / "bad"), appearance="hue", **kwargs)
    assert not os.path.exists(str(tmp_path / "bad"))


def test_quickstart_data_is_category_coloured():
    """The demo's detection and pretraining data share the category look (one home: the
    generators' parameters in QUICKSTART_SHAPES / QUICKSTART_CLASSES)."""
    from gradaug_det.data import QUICKSTART_CLASSES, QUICKSTART_SHAPES

    assert QUICKSTART_SHAPES["appearance"] == "category"
    assert QUICKSTART_CLASSES["style"] == "shapes" and QUICKSTART_CLASSES["appearance"] == "category"
