"""Every shipped yaml config parses with gradaug-det's keys and trains one iteration through
tools/train_net.py (small overrides, tiny generated data)."""
import glob
import json
import math
import os
import runpy

import pytest

from detectron2.config import get_cfg

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


@pytest.fixture(scope="module")
def train_net():
    return runpy.run_path(os.path.join(REPO, "tools", "train_net.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, REPO))
def test_config_trains_one_iteration(path, tmp_path, train_net, tiny_coco, tiny_imagefolder, tiny_rcnn_opts,
                                     tiny_cls_opts):
    """Each shipped config, through tools/train_net.py's parser and main, trains one iteration
    (small model, tiny generated data): finite losses, GradAug's sub-network passes where enabled."""
    cfg = _load(path)
    validate_config(cfg)
    normalize_widths(cfg.TEST.SLIM_WIDTHS)
    opts = tiny_cls_opts if cfg.MODEL.META_ARCHITECTURE == "SlimmableClassifier" else tiny_rcnn_opts
    out = tmp_path / "out"
    args = train_net["get_parser"]().parse_args([
        "--config-file", path, *opts, "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "1", "OUTPUT_DIR", str(out)])
    train_net["main"](args)
    with open(out / "metrics.json") as f:
        row = [json.loads(line) for line in f][-1]
    assert row["iteration"] == 0 and math.isfinite(row["total_loss"])
    n_sub = cfg.GRADAUG.NUM_SUBNETS
    assert (f"gradaug/sub{n_sub - 1}/total_loss" in row) == cfg.GRADAUG.ENABLED
    assert f"gradaug/sub{n_sub}/total_loss" not in row
    assert (out / "model_final.pth").is_file()


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


def test_benchmark_config_is_the_quickstart_with_two_soft_subnetworks():
    """tools/benchmark.py's config: the quickstart Mask R-CNN with 2 soft-label sub-networks
    (what the README's benchmark numbers were measured with, as command-line overrides)."""
    bench = _load(os.path.join(REPO, "configs", "quickstart", "benchmark_gradaug.yaml"))
    quickstart = _load(os.path.join(REPO, "configs", "quickstart", "mask_rcnn_gradaug.yaml"))
    assert (quickstart.GRADAUG.NUM_SUBNETS, quickstart.GRADAUG.SUBNET_LOSS) != (2, "soft")
    quickstart.merge_from_list(["GRADAUG.SUBNET_LOSS", "soft", "GRADAUG.NUM_SUBNETS", "2"])
    quickstart.OUTPUT_DIR = bench.OUTPUT_DIR
    assert bench == quickstart
