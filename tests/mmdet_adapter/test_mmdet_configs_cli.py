"""Every shipped mmdet config trains through tools/mmdet_train.py as users run it (the
COCO configs: small R18 overrides on tiny generated data in COCO 2017's layout; the
quickstart config is run through the tool, --resume and tools/mmdet_test.py in
test_mmdet_runner.py, the RetinaNet quickstart in test_mmdet_retinanet_soft.py)."""
import glob
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join(ROOT, "configs/mmdet/quickstart/mask-rcnn_r18_fpn_gradaug_shapes.py")
RETINANET = os.path.join(ROOT, "configs/mmdet/quickstart/retinanet_r18_fpn_gradaug_shapes.py")
COCO_CONFIGS = sorted(set(glob.glob(os.path.join(ROOT, "configs", "mmdet", "**", "*.py"), recursive=True))
                      - {QUICKSTART, RETINANET})


def test_every_config_is_run():
    assert [os.path.relpath(p, ROOT) for p in COCO_CONFIGS] == [
        "configs/mmdet/mask-rcnn_r50_fpn_1x_coco.py", "configs/mmdet/mask-rcnn_r50_fpn_gradaug_1x_coco.py"]


@pytest.mark.parametrize("path", COCO_CONFIGS, ids=lambda p: os.path.basename(p))
def test_coco_config_trains_through_the_tool(path, tmp_path, tiny_coco):
    coco = os.path.join(tiny_coco[0], "coco") + "/"
    data = [f"data_root={coco}", f"train_dataloader.dataset.data_root={coco}",
            f"val_dataloader.dataset.data_root={coco}", f"test_dataloader.dataset.data_root={coco}",
            f"val_evaluator.ann_file={coco}annotations/instances_val2017.json",
            f"test_evaluator.ann_file={coco}annotations/instances_val2017.json",
            "train_dataloader.batch_size=2", "train_dataloader.num_workers=0",
            "train_dataloader.persistent_workers=False", "val_dataloader.num_workers=0",
            "val_dataloader.persistent_workers=False", "test_dataloader.num_workers=0",
            "test_dataloader.persistent_workers=False", "train_dataloader.dataset.pipeline.2.scale=(96,64)"]
    tiny = ["model.backbone.depth=18", "model.backbone.init_cfg=None", "model.neck.in_channels=[64,128,256,512]",
            "model.train_cfg.rpn_proposal.nms_pre=200", "model.train_cfg.rpn_proposal.max_per_img=64",
            "model.train_cfg.rcnn.sampler.num=32", "model.roi_head.bbox_head.fc_out_channels=64"]
    run = ["train_cfg.max_epochs=1", "train_cfg.val_interval=100", "default_hooks.logger.interval=1",
           "default_hooks.checkpoint.interval=100", "default_hooks.checkpoint.save_last=False"]
    work = tmp_path / "work"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "mmdet_train.py"), path, "--work-dir", str(work),
           "--cfg-options", *data, *tiny, *run]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    scalars = glob.glob(str(work / "*" / "vis_data" / "scalars.json"))
    assert len(scalars) == 1
    train = [r for r in map(json.loads, open(scalars[0])) if "loss" in r]
    assert [r["iter"] for r in train] == [1, 2]  # 4 images, batch 2, one epoch
    for r in train:
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        if "gradaug" in os.path.basename(path):
            assert r["gradaug/sub2/width"] == pytest.approx(0.9) and math.isfinite(r["gradaug/sub0/loss_soft_cls"])
        else:
            assert not any(k.startswith("gradaug/") for k in r)
