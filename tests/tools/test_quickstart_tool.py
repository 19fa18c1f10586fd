"""tools/quickstart.py (`make demo`) run as a user runs it, at smoke size: every stage goes
through its documented tool and feeds the next; the pruned model's AP equals the slimmed
evaluation; the picture grid, plots and the printed output list are there."""
import os
import re
import subprocess
import sys

import cv2
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ("MODEL.RPN.POST_NMS_TOPK_TRAIN", "100", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
        "MODEL.ROI_MASK_HEAD.NUM_CONV", "1", "MODEL.ROI_MASK_HEAD.CONV_DIM", "16", "MODEL.FPN.OUT_CHANNELS", "32",
        "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "DATALOADER.NUM_WORKERS", "0")


def test_quickstart_pipeline_end_to_end(tmp_path):
    out = tmp_path / "qs"
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(REPO, "tools", "quickstart.py"), "--output-dir", str(out),
           "--device", "auto", "--seed", "3", "--pretrain-iters", "2", "--iters", "2", "--num-pictures", "2",
           "--confidence-threshold", "0",
           "--pretrain-opts", "DATASETS.TRAIN", '("gradaug_quickstart_tiny_cls_train",)',
           "DATASETS.TEST", '("gradaug_quickstart_tiny_cls_val",)', "INPUT.CLASSIFICATION.CROP_SIZE", "32",
           "INPUT.CLASSIFICATION.RESIZE_SIZE", "32", "SOLVER.IMS_PER_BATCH", "4", "DATALOADER.NUM_WORKERS", "0",
           "--opts", "DATASETS.TRAIN", '("gradaug_quickstart_tiny_train",)',
           "DATASETS.TEST", '("gradaug_quickstart_tiny_val",)', "TEST.SLIM_WIDTHS", "[0.75]", *TINY]
    res = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    stdout = res.stdout

    # every stage through its tool, in order, each fed by the previous one
    with open(out / "commands.txt") as f:
        commands = f.read().splitlines()
    tools = [re.search(r"tools/(\w+)\.py", c).group(1) for c in commands]
    assert tools == ["train_net", "convert_pretrained", "train_net", "prune", "train_net", "demo", "demo",
                     "plot_metrics", "plot_metrics"]
    pkl = str(out / "pretrain" / "backbone_d2.pkl")
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"  # --device auto
    assert "pretrain_r18_gradaug.yaml" in commands[0] and f"MODEL.DEVICE {device}" in commands[0]
    assert all(f"MODEL.DEVICE {device}" in commands[i] for i in (0, 2, 3, 4, 5, 6))  # not the converter
    assert f"MODEL.WEIGHTS {pkl}" in commands[2] and "mask_rcnn_gradaug.yaml" in commands[2]
    assert "INPUT.FORMAT RGB" in commands[2]  # the converter's emitted conventions
    assert "--width 0.75" in commands[3] and "--eval-only" in commands[4]
    with open(out / "mask_rcnn" / "log.txt") as f:
        assert "backbone_d2.pkl" in f.read()  # the detector started from the converted backbone

    from gradaug_det.engine.pipeline import read_final_results

    det = read_final_results(str(out / "mask_rcnn"))
    assert set(det) == {"bbox", "segm", "bbox@w0.75", "segm@w0.75"}
    pruned = read_final_results(str(out / "pruned_w0.75" / "eval"))
    # the pruned stock model reproduces the width-0.75 evaluation (features equal to ~1e-6;
    # COCO AP is a step function of the scores, so allow a flip at a threshold)
    for task in ("bbox", "segm"):
        assert pruned[task]["AP"] == pytest.approx(det[f"{task}@w0.75"]["AP"], abs=0.5)

    # picture grid: header + 2 rows; 3 columns (ground truth, width 1.0, width 0.75) of 260 px
    grid = cv2.imread(str(out / "predictions.png"))
    assert grid.shape == (28 + 2 * 260, 3 * 260, 3)
    assert (out / "plots" / "losses.png").is_file() and (out / "plots" / "ap.png").is_file()

    # the last lines list every output, and each exists
    tail = stdout[stdout.index("Outputs:"):].splitlines()[1:]
    paths = [line.rsplit(" ", 1)[1] for line in tail]
    assert len(paths) >= 12
    assert all(os.path.exists(p) for p in paths), paths
    assert str(out / "predictions.png") in paths and str(out / "pruned_w0.75" / "model_pruned_w0.75.pth") in paths
    # the R18 at 0.75 keeps 48/96/192/384 channels: detectron2's ResNet needs 64 in res2 for R18
    assert re.search(r"pruned to width 0.75 \(backbone build_pruned_resnet_fpn_backbone: import gradaug_det "
                     r"to load it\): bbox AP", stdout)
    assert "classification@w0.75" in stdout


def test_quickstart_refuses_bad_arguments_before_work(tmp_path):
    for args, message in ((["--iters", "0"], "--iters must be >= 1"),
                          (["--prune-width", "1.0"], "--prune-width must be in (0, 1)"),
                          (["--config-file", str(tmp_path / "nope.yaml")], "no such file"),
                          (["--opts", "SOLVER.MAX_ITER"], "KEY VALUE pairs")):
        res = subprocess.run([sys.executable, os.path.join(REPO, "tools", "quickstart.py"),
                              "--output-dir", str(tmp_path / "out"), *args],
                             capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
        assert res.returncode != 0 and message in res.stderr, res.stderr[-2000:]
        assert not (tmp_path / "out").exists()
