"""Tiny generated data for the tools' command-line tests (tests/tools/test_*_cli.py)."""
import json
import os
import shutil

import pytest

#: Names under which :func:`tiny_coco` registers its splits in the test process.
TINY_TRAIN, TINY_VAL = "gradaug_test_tiny_train", "gradaug_test_tiny_val"


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory):
    """A ``DETECTRON2_DATASETS`` root whose ``coco/`` holds 4 training and 3 validation
    images (64 px generated shapes) with COCO 2017's layout and its 80 categories (the shapes
    are labelled person/bicycle/car), so detectron2's ``coco_2017_train`` / ``coco_2017_val``
    read them in a process started with ``DETECTRON2_DATASETS`` set to it. The splits are
    also registered in this process as ``gradaug_test_tiny_{train,val}``.

    Returns:
        (root, train name, val name)
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    from gradaug_det.data import generate_coco_shapes

    root = tmp_path_factory.mktemp("datasets")
    paths = generate_coco_shapes(str(root / "shapes"), num_train=4, num_val=3, image_size=64, progress=False)
    coco = root / "coco"
    os.makedirs(coco / "annotations")
    categories = [{"id": c["id"], "name": c["name"], "supercategory": "thing"} for c in COCO_CATEGORIES if c["isthing"]]
    for name, split in ((TINY_TRAIN, "train"), (TINY_VAL, "val")):
        shutil.copytree(paths[split]["image_root"], coco / f"{split}2017")
        with open(paths[split]["json_file"]) as f:
            data = json.load(f)
        data["categories"] = categories  # shape ids 1..3 are COCO's first three
        json_file = str(coco / "annotations" / f"instances_{split}2017.json")
        with open(json_file, "w") as f:
            json.dump(data, f)
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(name, {}, json_file, str(coco / f"{split}2017"))
    return str(root), TINY_TRAIN, TINY_VAL
