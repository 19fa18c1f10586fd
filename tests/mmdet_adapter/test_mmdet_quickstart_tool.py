"""tools/mmdet_quickstart.py (`make demo-mmdet`) run as a user runs it, at smoke size (the tiny
data, 2 pretraining and 2 fine-tuning iterations): every stage goes through its documented tool
and feeds the next; the printed coco/bbox_mAP / coco/segm_mAP lines parse and agree with what
tools/mmdet_test.py wrote; the picture grid and the listed outputs are there."""
import json
import os
import re
import subprocess
import sys

import cv2

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# (the fine-tuning runs without validation, tools/mmdet_test.py evaluates on test_dataloader)
NO_WORKERS = ["train_dataloader.num_workers=0", "train_dataloader.persistent_workers=False",
              "test_dataloader.num_workers=0", "test_dataloader.persistent_workers=False"]


def test_mmdet_quickstart_pipeline_end_to_end(tmp_path):
    out = tmp_path / "qs"
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(REPO, "tools", "mmdet_quickstart.py"), "--output-dir", str(out),
           "--device", "cpu", "--seed", "3", "--tiny-data", "--pretrain-iters", "2", "--iters", "2",
           "--widths", "1.0", "0.75", "--num-pictures", "2", "--confidence-threshold", "0",
           "--pretrain-opts", "INPUT.CLASSIFICATION.CROP_SIZE", "32", "INPUT.CLASSIFICATION.RESIZE_SIZE", "32",
           "SOLVER.IMS_PER_BATCH", "4", "DATALOADER.NUM_WORKERS", "0",
           "--cfg-options", *NO_WORKERS]
    res = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    stdout = res.stdout

    # every stage through its tool, in order, each fed by the previous one
    with open(out / "commands.txt") as f:
        commands = f.read().splitlines()
    assert [re.search(r"tools/(\w+)\.py", c).group(1) for c in commands] == [
        "train_net", "convert_pretrained", "mmdet_train", "mmdet_test"]
    assert "pretrain_r18_gradaug.yaml" in commands[0] and "SEED 3" in commands[0]
    assert "gradaug_quickstart_tiny_cls_train" in commands[0]
    backbone = out / "pretrain" / "backbone_tv.pth"
    assert "--target torchvision" in commands[1] and str(backbone) in commands[1]
    config = out / "mask-rcnn_r18_fpn_gradaug_quickstart.py"
    assert str(config) in commands[2] and "randomness.seed=3" in commands[2] and "model.gradaug.seed=3" in commands[2]
    assert "train_cfg.max_iters=2" in commands[2] and "val_cfg=None" in commands[2]
    assert str(out / "mask_rcnn" / "iter_2.pth") in commands[3] and "--widths 1.0 0.75" in commands[3]
    with open(config) as f:
        text = f.read()
    assert str(backbone) in text and os.path.join(str(tmp_path / "datasets"), "gradaug_quickstart_shapes_tiny") in text
    # the detector started from the converted backbone (mmengine's Pretrained init logs its file)
    train_logs = [os.path.join(d, f) for d, _, fs in os.walk(out / "mask_rcnn") for f in fs if f.endswith(".log")]
    assert any(str(backbone) in open(p).read() for p in train_logs), train_logs

    # the printed mmdet lines parse, one per width, and are tools/mmdet_test.py's numbers
    with open(out / "coco_ap.json") as f:
        written = json.load(f)
    assert list(written) == ["1.0", "0.75"]
    printed = dict(re.findall(r"^  width (\S+): (coco/bbox_mAP: .*)$", stdout, re.M))
    assert list(printed) == ["1.0", "0.75"]
    for w, line in printed.items():
        values = {k: float(v) for k, v in re.findall(r"(coco/\w+): (-?[0-9.]+)", line)}
        assert {"coco/bbox_mAP", "coco/segm_mAP"} <= set(values)
        for k, v in values.items():
            assert v == round(written[w][k], 4)

    # picture grid: header + 2 rows; 3 columns (ground truth, width 1.0, width 0.75) of 260 px
    grid = cv2.imread(str(out / "predictions.png"))
    assert grid.shape == (28 + 2 * 260, 3 * 260, 3)

    # the last lines list every output, and each exists
    tail = stdout[stdout.index("Outputs:"):].splitlines()[1:]
    paths = [line.rsplit(" ", 1)[1] for line in tail]
    assert len(paths) == 9 and all(os.path.exists(p) for p in paths), paths
