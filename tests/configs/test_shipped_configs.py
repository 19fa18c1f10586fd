"""Every shipped yaml config parses with gradaug-det's keys and builds its model on CPU."""
import glob
import os

import pytest

from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer
from detectron2.modeling import build_model

import gradaug_det
from gradaug_det.engine.trainer import validate_config
from gradaug_det.evaluation.widths import normalize_widths

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))


def _load(path):
    cfg = get_cfg()
    gradaug_det.add_gradaug_config(cfg)
    cfg.merge_from_file(path)
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def test_configs_found():
    names = {os.path.relpath(p, os.path.join(REPO, "configs")) for p in CONFIGS}
    for expected in ("Base-GradAug-RCNN-FPN.yaml", "mask_rcnn_gradaug.yaml", "mask_rcnn_baseline.yaml",
                     "faster_rcnn_gradaug.yaml", "mask_rcnn_gradaug_3x.yaml", "mask_rcnn_baseline_3x.yaml",
                     "faster_rcnn_gradaug_3x.yaml", os.path.join("quickstart", "mask_rcnn_gradaug.yaml"),
                     os.path.join("quickstart", "mask_rcnn_baseline.yaml")):
        assert expected in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, REPO))
def test_config_parses_and_builds(path):
    cfg = _load(path)
    validate_config(cfg)
    normalize_widths(cfg.TEST.SLIM_WIDTHS)
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) > 0
    DefaultTrainer.build_optimizer(cfg, model)  # SOLVER.* keys (e.g. CLIP_GRADIENTS) are valid


@pytest.mark.parametrize("name", ["", "_3x"])
def test_baselines_differ_from_gradaug_only_in_gradaug_enabled(name):
    gradaug = _load(os.path.join(REPO, "configs", f"mask_rcnn_gradaug{name}.yaml"))
    baseline = _load(os.path.join(REPO, "configs", f"mask_rcnn_baseline{name}.yaml"))
    assert gradaug.GRADAUG.ENABLED and not baseline.GRADAUG.ENABLED
    baseline.GRADAUG.ENABLED = True
    baseline.OUTPUT_DIR = gradaug.OUTPUT_DIR
    assert baseline == gradaug


def test_quickstart_pair_differs_only_in_gradaug_enabled():
    gradaug = _load(os.path.join(REPO, "configs", "quickstart", "mask_rcnn_gradaug.yaml"))
    baseline = _load(os.path.join(REPO, "configs", "quickstart", "mask_rcnn_baseline.yaml"))
    assert gradaug.MODEL.WEIGHTS == "" and gradaug.MODEL.RESNETS.DEPTH == 18
    assert gradaug.DATASETS.TRAIN == ("gradaug_quickstart_train",)
    baseline.GRADAUG.ENABLED = True
    baseline.OUTPUT_DIR = gradaug.OUTPUT_DIR
    assert baseline == gradaug
