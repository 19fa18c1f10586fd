"""ImageNet pretraining with GradAug through tools/train_net.py, evaluation at two widths,
conversion to detectron2 and loading into Mask R-CNN with every backbone weight matched."""
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = os.path.join(ROOT, "tools")


def _run(args, env):
    return subprocess.run([sys.executable, *args], check=True, env=env, cwd=ROOT, timeout=900,
                          capture_output=True, text=True)


def test_pretrain_eval_convert_transfer(tmp_path):
    from gradaug_det.data import generate_imagefolder

    data = tmp_path / "datasets"
    generate_imagefolder(str(data / "imagenet"), num_classes=4, train_per_class=8, val_per_class=4, image_size=64)
    env = dict(os.environ, DETECTRON2_DATASETS=str(data))
    out = tmp_path / "pretrain"
    cfg = os.path.join(ROOT, "configs", "imagenet", "quickstart.yaml")
    _run([os.path.join(TOOLS, "train_net.py"), "--config-file", cfg, "OUTPUT_DIR", str(out),
          "SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "6", "INPUT.CLASSIFICATION.CROP_SIZE", "48",
          "INPUT.CLASSIFICATION.RESIZE_SIZE", "56"], env)
    rows = [json.loads(line) for line in open(out / "metrics.json")]
    assert any("gradaug/sub0/loss_soft_cls" in r for r in rows)
    assert (out / "model_final.pth").is_file()

    res = _run([os.path.join(TOOLS, "train_net.py"), "--config-file", cfg, "--eval-only",
                "OUTPUT_DIR", str(tmp_path / "eval"), "MODEL.WEIGHTS", str(out / "model_final.pth"),
                "INPUT.CLASSIFICATION.CROP_SIZE", "48", "INPUT.CLASSIFICATION.RESIZE_SIZE", "56",
                "TEST.SLIM_WIDTHS", "[0.5]"], env)
    log = res.stdout + res.stderr
    assert "classification@w0.5" in log or "0.5" in log
    assert "top1" in log

    pkl = tmp_path / "r18_gradaug.pkl"
    _run([os.path.join(TOOLS, "convert_pretrained.py"), str(out / "model_final.pth"), str(pkl),
          "--source", "classifier", "--config-file", cfg], env)
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from gradaug_det.engine.setup import get_gradaug_cfg

    det = get_gradaug_cfg()
    det.merge_from_file(os.path.join(ROOT, "configs", "quickstart", "mask_rcnn_gradaug.yaml"))
    det.MODEL.PIXEL_MEAN, det.MODEL.PIXEL_STD, det.INPUT.FORMAT = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375], "RGB"
    model = build_model(det)
    DetectionCheckpointer(model).load(str(pkl))
    ckpt = torch.load(out / "model_final.pth", map_location="cpu")["model"]
    bottom_up = model.backbone.bottom_up.state_dict()
    matched = 0
    for name, value in ckpt.items():
        if name.startswith("backbone.") and "num_batches_tracked" not in name:
            key = name[len("backbone."):]
            assert torch.equal(bottom_up[key], value), key
            matched += 1
    assert matched == len([k for k in bottom_up if "num_batches_tracked" not in k])
