"""tools/quickstart.py (`make demo`) run as a user runs it, at smoke size: every stage goes
through its documented tool and feeds the next; the pruned model's AP equals the slimmed
evaluation; the picture grid, plots and the printed output list are there."""
import os
import re
import subprocess
import sys

import cv2
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ("MODEL.RPN.POST_NMS_TOPK_TRAIN", "100", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
        "MODEL.ROI_MASK_HEAD.NUM_CONV", "1", "MODEL.ROI_MASK_HEAD.CONV_DIM", "16", "MODEL.FPN.OUT_CHANNELS", "32",
        "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "DATALOADER.NUM_WORKERS", "0")


def test_quickstart_pipeline_end_to_end(tmp_path, assert_same_detections):
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
    device = "cuda" if torch.cuda.is_available() else "cpu"  # --device auto
    assert "pretrain_r18_gradaug.yaml" in commands[0] and f"MODEL.DEVICE {device}" in commands[0]
    assert all(f"MODEL.DEVICE {device}" in commands[i] for i in (0, 2, 3, 4, 5, 6))  # not the converter
    assert f"MODEL.WEIGHTS {pkl}" in commands[2] and "mask_rcnn_gradaug.yaml" in commands[2]
    assert "INPUT.FORMAT RGB" in commands[2]  # the converter's emitted conventions
    assert "--width 0.75" in commands[3] and "--eval-only" in commands[4]
    with open(out / "mask_rcnn" / "log.txt") as f:
        assert "backbone_d2.pkl" in f.read()  # the detector started from the converted backbone

    from gradaug_det.launch.pipeline import read_final_results

    det = read_final_results(str(out / "mask_rcnn"))
    assert set(det) == {"bbox", "segm", "bbox@w0.75", "segm@w0.75"}
    pruned = read_final_results(str(out / "pruned_w0.75" / "eval"))
    assert set(pruned) == {"bbox", "segm"}
    # the pruned stock model (its evaluation's predictions file) detects what the fine-tuned
    # model detects at width 0.75, image by image; after 2 iterations AP is about 0 at any
    # width, so the detections are compared, not the AP
    _assert_pruned_predictions_equal_slimmed(out, tmp_path / "datasets", 0.75, device, assert_same_detections)

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


def _slimmed_predictions(cfg_file, weights, datasets_root, w):
    """The fine-tuned model evaluated at width ``w`` in this process: per image id, the list of
    (contiguous class, score, XYXY box)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import build_detection_test_loader
    from detectron2.modeling import build_model

    import gradaug_det
    from gradaug_det.engine.setup import get_gradaug_cfg

    cfg = get_gradaug_cfg()
    cfg.merge_from_file(str(cfg_file))
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(str(weights))
    old = os.environ.get("DETECTRON2_DATASETS")
    os.environ["DETECTRON2_DATASETS"] = str(datasets_root)  # the quickstart's generated data (read at call time)
    try:
        loader = build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])
        out = {}
        with torch.no_grad(), gradaug_det.width(model, w):
            for batch in loader:
                for inp, o in zip(batch, model(batch)):
                    inst = o["instances"].to("cpu")
                    out[inp["image_id"]] = list(zip(inst.pred_classes.tolist(), inst.scores.tolist(),
                                                    inst.pred_boxes.tensor.tolist()))
    finally:
        if old is None:
            del os.environ["DETECTRON2_DATASETS"]
        else:
            os.environ["DETECTRON2_DATASETS"] = old
    return out, cfg


def _assert_pruned_predictions_equal_slimmed(out, datasets_root, w, device, assert_same_detections):
    """The detections of the pruned model's evaluation (``instances_predictions.pth``, written by
    detectron2's COCOEvaluator in ``tools/train_net.py --eval-only``) equal the slimmed model's
    within float32 rounding (tests/conftest.py's ``FLOAT32_SCORE_TOL``)."""
    from gradaug_det.checkpoint.io import load_weights_file

    slim, cfg = _slimmed_predictions(out / "mask_rcnn" / "config.yaml", out / "mask_rcnn" / "model_final.pth",
                                     datasets_root, w)
    assert cfg.MODEL.DEVICE == device
    records = load_weights_file(str(out / f"pruned_w{w:g}" / "eval" / "inference" / "instances_predictions.pth"))
    assert sorted(r["image_id"] for r in records) == sorted(slim)
    # COCOEvaluator's .pth keeps instances_to_coco_json's records: contiguous classes, XYWH boxes
    pruned = [[(d["category_id"], d["score"],
                [d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2], d["bbox"][1] + d["bbox"][3]])
               for d in r["instances"]] for r in records]
    assert sum(map(len, pruned)) > 0
    assert_same_detections(pruned, [slim[r["image_id"]] for r in records], cfg.INPUT.MAX_SIZE_TEST)


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
