"""The shipped mmdet configs: they parse and build; a short run through tools/mmdet_train.py."""
import glob
import json
import math
import os
import subprocess
import sys

from types import SimpleNamespace

import pytest
import torch
from mmengine.config import Config
from mmdet.registry import MODELS

from gradaug_det.gradaug import SubnetSampler
from gradaug_det.mmdet.checkpoint import load_mmengine_checkpoint
from gradaug_det.mmdet import GradAugMaskRCNN, GradAugRetinaNet, GradAugSamplerStateHook, SlimmableResNet

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join(ROOT, "configs/mmdet/quickstart/mask-rcnn_r18_fpn_gradaug_shapes.py")
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "mmdet", "**", "*.py"), recursive=True))


def test_configs_found():
    names = {os.path.relpath(c, ROOT) for c in CONFIGS}
    assert {"configs/mmdet/mask-rcnn_r50_fpn_gradaug_1x_coco.py", "configs/mmdet/mask-rcnn_r50_fpn_1x_coco.py",
            "configs/mmdet/quickstart/mask-rcnn_r18_fpn_gradaug_shapes.py"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_config_parses_and_builds(path):
    cfg = Config.fromfile(path)
    cfg.model.backbone.init_cfg = None  # no download
    model = MODELS.build(cfg.model)
    if "gradaug" in os.path.basename(path):
        detector = GradAugRetinaNet if "retinanet" in os.path.basename(path) else GradAugMaskRCNN
        assert isinstance(model, detector) and isinstance(model.backbone, SlimmableResNet)
        assert cfg.model_wrapper_cfg.type == "GradAugDistributedDataParallel"
        if path == QUICKSTART:  # the detectron2 quickstart's recipe: 1 "gt+soft" sub-network at 0.75
            assert model.gradaug_sampler.num_subnets == 1 and model.gradaug_sampler.min_width == 0.75
            assert model.gradaug_options.subnet_loss == "gt+soft"
        else:  # the reference's
            assert model.gradaug_sampler.num_subnets == 3 and model.gradaug_sampler.min_width == 0.9
    else:
        assert type(model).__name__ == "MaskRCNN"


def test_gradaug_and_baseline_differ_only_in_gradaug():
    a = Config.fromfile(os.path.join(ROOT, "configs/mmdet/mask-rcnn_r50_fpn_gradaug_1x_coco.py"))
    b = Config.fromfile(os.path.join(ROOT, "configs/mmdet/mask-rcnn_r50_fpn_1x_coco.py"))
    for key in ("train_dataloader", "val_evaluator", "optim_wrapper", "param_scheduler", "train_cfg"):
        assert a[key] == b[key], key
    for key in ("rpn_head", "roi_head", "train_cfg", "test_cfg", "data_preprocessor"):
        assert a.model[key] == b.model[key], key
    for key, slimmable in (("backbone", "SlimmableResNet"), ("neck", "SlimmableFPN")):
        module = dict(a.model[key])
        assert module.pop("type") == slimmable and module.pop("channel_divisor") == 1
        assert module == {k: v for k, v in b.model[key].items() if k != "type"}, key


def test_short_training_run_through_the_tool(tmp_path, shapes_data_options, short_train_options):
    work = tmp_path / "work"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "mmdet_train.py"), QUICKSTART,
           "--work-dir", str(work), "--cfg-options", *shapes_data_options, *short_train_options(4)]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    scalars = glob.glob(str(work / "*" / "vis_data" / "scalars.json"))
    assert len(scalars) == 1
    records = [json.loads(line) for line in open(scalars[0])]
    train = [r for r in records if "loss" in r]
    assert [r["iter"] for r in train] == [1, 2, 3, 4]
    for r in train:
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        # the config's one sub-network per iteration, the smallest (0.75)
        assert r["gradaug/sub0/width"] == pytest.approx(0.75) and "gradaug/sub1/width" not in r
        assert math.isfinite(r["gradaug/sub0/loss_soft_cls"])
    evals = [r for r in records if "coco/bbox_mAP" in r]
    assert len(evals) == 1 and 0.0 <= evals[0]["coco/bbox_mAP"] <= 1.0 and "coco/segm_mAP" in evals[0]
    # the checkpoint carries the sampler's state after 4 iterations (GradAugSamplerStateHook) ...
    ckpt = load_mmengine_checkpoint(str(work / "iter_4.pth"))  # no full unpickling, even of our own files
    model = MODELS.build(Config.fromfile(QUICKSTART).model)
    sampler = SubnetSampler(model.gradaug_options)  # the config's settings and seed, fresh
    for _ in range(4):
        sampler.sample()
    assert ckpt["gradaug_sampler"] == sampler.state_dict()
    # ... and loading it restores the draws
    GradAugSamplerStateHook().after_load_checkpoint(SimpleNamespace(model=model), ckpt)
    assert model.gradaug_sampler.sample() == sampler.sample()

    # --resume continues from iter_4.pth (mmengine's full checkpoint, torch >= 2.6) with the
    # sampler's next draws
    resume = cmd[:cmd.index("train_cfg.max_iters=4")] + ["train_cfg.max_iters=6"] + \
        cmd[cmd.index("train_cfg.max_iters=4") + 1:] + ["--resume"]
    proc = subprocess.run(resume, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    latest = max(glob.glob(str(work / "*" / "vis_data" / "scalars.json")), key=os.path.getmtime)
    resumed = [json.loads(line) for line in open(latest)]
    resumed = [r for r in resumed if "loss" in r]
    assert [r["iter"] for r in resumed] == [5, 6]
    expected = SubnetSampler(model.gradaug_options)
    draws = [expected.sample() for _ in range(6)]
    for r, specs in zip(resumed, draws[4:]):
        for i, spec in enumerate(specs):  # (the config's sub-network is always 0.75 wide: its scale is drawn)
            assert r[f"gradaug/sub{i}/width"] == pytest.approx(spec.width, abs=1e-6)
            assert r[f"gradaug/sub{i}/scale"] == pytest.approx(spec.scale, abs=1e-6)

    # tools/mmdet_test.py: the same checkpoint at two widths; width 1.0 reproduces the AP above
    out = tmp_path / "widths.json"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "mmdet_test.py"), QUICKSTART, str(work / "iter_4.pth"),
           "--widths", "1.0", "0.75", "--work-dir", str(tmp_path / "test"), "--out", str(out),
           "--cfg-options", *shapes_data_options]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    widths = json.loads(out.read_text())
    assert set(widths) == {"1.0", "0.75"}
    for key in ("coco/bbox_mAP", "coco/segm_mAP", "coco/bbox_mAP_50"):
        assert widths["1.0"][key] == pytest.approx(evals[0][key], abs=1e-4)
    assert "width" in proc.stdout and "coco/bbox_mAP" in proc.stdout
