"""tools/export_model.py: the exported width runs without gradaug_det / detectron2 and computes
what the slimmable model computes at that width."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from detectron2.modeling import build_model

import gradaug_det
from gradaug_det.deploy.export import RELATIVE_TOLERANCE, flattened_inference
from gradaug_det.engine.setup import get_gradaug_cfg

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "quickstart", "mask_rcnn_gradaug.yaml")

# Runs in `python -I` (no PYTHONPATH, no script directory, no user site): torch + torchvision for
# TorchScript, onnxruntime + numpy for ONNX; writes the outputs as .npz.
_RUNNER = r"""
import sys
path, image_path, out_path = sys.argv[1:4]
import numpy as np
image = np.load(image_path)
if path.endswith(".ts"):
    import torch, torchvision  # torchvision registers the nms / roi_align ops the file calls
    module = torch.jit.load(path)
    with torch.no_grad():
        outputs = [t.numpy() for t in module(torch.from_numpy(image))]
else:
    import onnxruntime
    outputs = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"image": image})
assert "gradaug_det" not in sys.modules and "detectron2" not in sys.modules, sorted(sys.modules)
np.savez(out_path, *outputs)
"""


def _opts(tiny_rcnn_opts, weights):
    opts = list(tiny_rcnn_opts)
    opts[opts.index("MODEL.WEIGHTS") + 1] = weights
    return opts


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tiny_coco):
    """The quickstart Mask R-CNN with the tiny overrides, randomly initialised once (seed 0) and
    saved; a 64 x 80 sample image saved as a tensor (.pt) and as a numpy array (.npy)."""
    from tests.conftest import TINY_RCNN_OPTS  # the fixture is function-scoped

    root = tmp_path_factory.mktemp("export")
    cfg = get_gradaug_cfg()
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(list(TINY_RCNN_OPTS))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    weights = str(root / "model.pth")
    torch.save({"model": model.state_dict()}, weights)
    g = torch.Generator().manual_seed(1)
    image = torch.rand(3, 64, 80, generator=g) * 255
    torch.save(image, str(root / "image.pt"))
    np.save(str(root / "image.npy"), image.numpy())
    return {"root": root, "cfg": cfg, "model": model, "weights": weights, "image": image}


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("w", [1.0, 0.75])
def test_exported_width_runs_alone_and_matches(tiny_model, tiny_rcnn_opts, load_tool, fmt, w, capsys):
    tool = load_tool("export_model")
    out_dir = str(tiny_model["root"] / f"{fmt}_{w:g}")
    args = tool.get_parser().parse_args(
        ["--config-file", CONFIG, "--output", out_dir, "--format", fmt, "--width", str(w), "--runs", "1",
         "--sample-image", str(tiny_model["root"] / "image.pt")] + _opts(tiny_rcnn_opts, tiny_model["weights"]))
    stats = tool.main(args)
    printed = capsys.readouterr().out
    assert "largest difference" in printed and "latency" in printed
    path = stats["path"]
    assert os.path.isfile(path) and path.endswith(".ts" if fmt == "torchscript" else ".onnx")
    with open(os.path.splitext(path)[0] + ".json") as f:
        assert json.load(f)["outputs"] == ["pred_boxes", "pred_classes", "pred_masks", "scores", "image_size"]
    # the pruned network is exported: smaller at 0.75, about the full weights' size at 1.0
    ratio = stats["file_bytes"] / stats["full_bytes"]
    assert (0.4 < ratio < 0.7) if w < 1 else (0.98 < ratio < 1.05), ratio

    runner = tiny_model["root"] / "runner.py"
    runner.write_text(_RUNNER)
    result = str(tiny_model["root"] / f"out_{fmt}_{w:g}.npz")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-I", str(runner), path, str(tiny_model["root"] / "image.npy"), result],
                   check=True, cwd=str(tiny_model["root"]), env=env, timeout=300)
    with np.load(result) as z:
        boxes, classes, masks, scores, size = (torch.from_numpy(z[f"arr_{i}"]) for i in range(5))

    model, image = tiny_model["model"], tiny_model["image"]
    with gradaug_det.width(model, w):
        ref_boxes, ref_classes, ref_masks, ref_scores, ref_size = flattened_inference(model, image)
    assert len(ref_scores) > 10  # the comparison compares something
    assert size.tolist() == ref_size.tolist() == [64, 80]
    assert torch.equal(classes, ref_classes)
    assert (boxes - ref_boxes).abs().max() <= RELATIVE_TOLERANCE * 80
    assert (scores - ref_scores).abs().max() <= RELATIVE_TOLERANCE
    assert (masks - ref_masks).abs().max() <= RELATIVE_TOLERANCE


@pytest.mark.parametrize("flags, opts, message", [
    (["--width", "1.5"], [], "--width must be in (0, 1]"),
    (["--width", "0"], [], "--width must be in (0, 1]"),
    ([], ["MODEL.META_ARCHITECTURE", "SlimmableClassifier"], "MODEL.META_ARCHITECTURE 'SlimmableClassifier' cannot be"),
    ([], ["MODEL.KEYPOINT_ON", "True"], "MODEL.KEYPOINT_ON True"),
    (["--sample-image", "no_such_image.jpg"], [], "--sample-image no_such_image.jpg: no such file"),
])
def test_refuses_before_any_work(tmp_path, load_tool, flags, opts, message):
    tool = load_tool("export_model")
    out_dir = tmp_path / "out"
    args = tool.get_parser().parse_args(["--config-file", CONFIG, "--output", str(out_dir)] + flags + opts)
    with pytest.raises(SystemExit) as info:
        tool.main(args)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert not out_dir.exists()
