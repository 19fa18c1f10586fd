"""Mapper, detectron2 loaders and classifier evaluation on a tiny generated ImageFolder."""
import itertools
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from PIL import Image

import gradaug_det
from gradaug_det import add_gradaug_config
from gradaug_det.data import generate_imagefolder, load_imagefolder
from gradaug_det.data.classification import (
    ClassificationDatasetMapper,
    Lighting,
    build_classification_test_loader,
    build_classification_train_loader,
)
from gradaug_det.evaluation import evaluate_at_widths, evaluate_classifier, build_classification_evaluator

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "imagenet"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    paths = generate_imagefolder(str(root), num_classes=4, train_per_class=4, val_per_class=3, image_size=48)
    tag = uuid.uuid4().hex[:8]
    names = {}
    for split in ("train", "val"):
        name = f"gradaug_test_cls_{split}_{tag}"
        DatasetCatalog.register(name, lambda d=paths[split]: load_imagefolder(d))
        names[split] = name
    yield names
    for name in names.values():
        DatasetCatalog.remove(name)


def tiny_cfg(folder):
    cfg = add_gradaug_config(get_cfg())
    cfg.merge_from_file(str(CONFIGS / "quickstart.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.DATASETS.TRAIN = (folder["train"],)
    cfg.DATASETS.TEST = (folder["val"],)
    cfg.INPUT.CLASSIFICATION.CROP_SIZE = 32
    cfg.INPUT.CLASSIFICATION.RESIZE_SIZE = 40
    cfg.INPUT.CLASSIFICATION.TEST_IMS_PER_BATCH = 5
    cfg.SOLVER.IMS_PER_BATCH = 6
    return cfg


def test_all_imagenet_configs_load():
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = add_gradaug_config(get_cfg())
        cfg.merge_from_file(str(path))
        assert cfg.MODEL.META_ARCHITECTURE == "SlimmableClassifier", path.name
    cfg = add_gradaug_config(get_cfg())
    cfg.merge_from_file(str(CONFIGS / "resnet50_gradaug.yaml"))
    assert cfg.GRADAUG.ENABLED and cfg.SOLVER.NESTEROV and cfg.SOLVER.BASE_LR == 0.2
    assert cfg.SOLVER.MAX_ITER * cfg.SOLVER.IMS_PER_BATCH / 1281167 == pytest.approx(120, abs=0.1)
    assert cfg.MODEL.RESNETS.DEPTH == 50 and cfg.INPUT.FORMAT == "RGB"


def test_mapper_train_and_test(folder):
    cfg = tiny_cfg(folder)
    record = DatasetCatalog.get(folder["train"])[5]
    torch.manual_seed(0)
    out = ClassificationDatasetMapper(cfg, is_train=True)(record)
    assert out["image"].shape == (3, 32, 32) and out["image"].dtype == torch.uint8
    assert out["class_id"] == record["class_id"] and out["file_name"] == record["file_name"]
    assert out["image_id"] == record["image_id"]

    test_mapper = ClassificationDatasetMapper(cfg, is_train=False)
    a, b = test_mapper(record)["image"], test_mapper(record)["image"]
    assert torch.equal(a, b) and a.shape == (3, 32, 32)
    # resize 48 -> 40, center crop 32: pixels [4, 36) of the resized RGB image
    rgb = Image.open(record["file_name"]).convert("RGB").resize((40, 40), Image.BILINEAR)
    ref = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[:, 4:36, 4:36]
    assert (a.int() - ref.int()).abs().float().mean() < 2.0

    cfg.INPUT.FORMAT = "BGR"
    bgr = ClassificationDatasetMapper(cfg, is_train=False)(record)["image"]
    assert torch.equal(bgr, a.flip(0))

    cfg.INPUT.FORMAT = "YUV-BT.601"
    with pytest.raises(ValueError, match="INPUT.FORMAT"):
        ClassificationDatasetMapper(cfg, is_train=False)


def test_lighting_adds_one_colour_shift():
    img = torch.rand(3, 4, 4)
    out = Lighting(0.1)(img, generator=torch.Generator().manual_seed(0))
    shift = out - img
    assert torch.allclose(shift, shift[:, :1, :1].expand_as(shift))
    assert shift.abs().max() > 0 and torch.equal(Lighting(0.0)(img), img)


def test_train_loader_batches(folder):
    cfg = tiny_cfg(folder)
    loader = build_classification_train_loader(cfg)
    batches = list(itertools.islice(iter(loader), 3))
    assert [len(b) for b in batches] == [6, 6, 6]
    assert all(d["image"].shape == (3, 32, 32) and "class_id" in d for b in batches for d in b)


def test_eval_at_two_widths_and_fgsm(folder):
    cfg = tiny_cfg(folder)
    cfg.TEST.FGSM_EPSILONS = [0.0, 0.05]
    torch.manual_seed(0)
    model = build_model(cfg)
    name = folder["val"]
    loader = build_classification_test_loader(cfg, name)
    assert sum(len(b) for b in loader) == 12 and len(next(iter(loader))) == 5

    res = evaluate_classifier(cfg, model, name)
    assert set(res) == {"classification", "fgsm"}
    assert set(res["classification"]) == {"top1", "top5"}
    assert res["classification"]["top5"] == 100.0  # 4 classes
    assert res["fgsm"]["eps=0"] == pytest.approx(res["classification"]["top1"])
    assert model.training and gradaug_det.get_width(model) == 1.0

    cfg.TEST.FGSM_EPSILONS = []
    by_width = evaluate_at_widths(model, loader, build_classification_evaluator(cfg, name), widths=[0.9])
    assert list(by_width) == [1.0, 0.9]
    assert by_width[1.0]["classification"]["top1"] == pytest.approx(res["classification"]["top1"])
    for w in (1.0, 0.9):
        top1 = by_width[w]["classification"]["top1"]
        assert 0.0 <= top1 <= 100.0 and (top1 * 12 / 100) == pytest.approx(round(top1 * 12 / 100))
    assert gradaug_det.get_width(model) == 1.0
