"""tools/train_net.py as users run it (its parser and main): train the shipped Mask R-CNN
GradAug config (small overrides, tiny generated data), --resume, --eval-only at TEST.SLIM_WIDTHS."""
import json
import math
import os
import runpy

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "mask_rcnn_gradaug.yaml")


@pytest.fixture(scope="module")
def tool():
    return runpy.run_path(os.path.join(REPO, "tools", "train_net.py"))


def _rows(out_dir):
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f]


def test_train_resume_eval_only_at_widths(tmp_path, tiny_coco, tiny_rcnn_opts, tool):
    out = str(tmp_path / "out")

    def run(*argv):
        args = tool["get_parser"]().parse_args(["--config-file", CONFIG, *argv])
        return tool["main"](args)

    # the config's TEST.SLIM_WIDTHS [0.9]: the final evaluation reports widths 1.0 and 0.9
    run(*tiny_rcnn_opts, "OUTPUT_DIR", out, "SOLVER.MAX_ITER", "2")
    rows = _rows(out)
    losses = [r for r in rows if "total_loss" in r]
    assert [r["iteration"] for r in losses] == [1]  # detectron2 writes every 20 iterations and the last
    assert all(math.isfinite(r["total_loss"]) and "gradaug/sub2/loss_soft_cls" in r for r in losses)
    assert {"bbox/AP", "segm/AP", "bbox@w0.9/AP", "segm@w0.9/AP"} <= rows[-1].keys()

    saved = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=True)
    assert saved["iteration"] == 1 and "gradaug_sampler" in saved["trainer"]["_trainer"]
    run("--resume", *tiny_rcnn_opts, "OUTPUT_DIR", out, "SOLVER.MAX_ITER", "3")
    rows = _rows(out)
    assert [r["iteration"] for r in rows if "total_loss" in r] == [1, 2]
    with open(os.path.join(out, "log.txt")) as f:
        assert "Starting training from iteration 2" in f.read()  # continued after model_final
    final = rows[-1]

    # --eval-only on model_final at TEST.SLIM_WIDTHS reproduces the run's last evaluation
    res = run("--eval-only", *tiny_rcnn_opts, "OUTPUT_DIR", str(tmp_path / "eval"),
              "MODEL.WEIGHTS", os.path.join(out, "model_final.pth"), "TEST.SLIM_WIDTHS", "[0.9, 0.5]")
    assert list(res) == ["bbox", "segm", "bbox@w0.9", "segm@w0.9", "bbox@w0.5", "segm@w0.5"]
    for task in ("bbox", "segm", "bbox@w0.9", "segm@w0.9"):
        assert res[task]["AP"] == pytest.approx(final[f"{task}/AP"], abs=1e-9), task
    assert math.isfinite(res["bbox@w0.5"]["AP"])


def test_bad_slim_width_refused_before_work(tmp_path, tiny_rcnn_opts, tool):
    args = tool["get_parser"]().parse_args(["--config-file", CONFIG, "--eval-only", *tiny_rcnn_opts,
                                            "OUTPUT_DIR", str(tmp_path / "o"), "TEST.SLIM_WIDTHS", "[1.5]"])
    with pytest.raises(ValueError, match="TEST.SLIM_WIDTHS"):
        tool["main"](args)
    assert not (tmp_path / "o").exists()


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_prune_and_plot_a_train_net_run(tmp_path, tiny_coco, tiny_rcnn_opts, tool, umask_022):
    """tools/prune.py and tools/plot_metrics.py through their parsers on what train_net wrote;
    under umask 022 every file written (model_final.pth, last_checkpoint, the pruned checkpoint
    and config, the plots ...) is 0644, as teammates on a cluster need, and no temporary is left."""
    out = tmp_path / "out"
    tool["main"](tool["get_parser"]().parse_args(["--config-file", CONFIG, *tiny_rcnn_opts, "OUTPUT_DIR", str(out),
                                                  "SOLVER.MAX_ITER", "1", "TEST.SLIM_WIDTHS", "[]"]))
    prune = runpy.run_path(os.path.join(REPO, "tools", "prune.py"))
    stats = prune["main"](prune["get_parser"]().parse_args([
        "--config-file", str(out / "config.yaml"), "--weights", str(out / "model_final.pth"), "--width", "0.5",
        "--output", str(tmp_path / "pruned"), "--no-flops"]))
    assert stats["params_pruned"] < stats["params"]
    assert os.path.getsize(stats["checkpoint"]) < os.path.getsize(out / "model_final.pth")

    plot = runpy.run_path(os.path.join(REPO, "tools", "plot_metrics.py"))
    written = plot["main"](plot["get_parser"]().parse_args([str(out)]))
    assert [os.path.basename(p) for p in written] == ["losses.png", "gradaug.png", "ap.png"]
    assert all(os.path.getsize(p) > 1000 for p in written)

    files = {os.path.relpath(os.path.join(d, f), tmp_path): os.stat(os.path.join(d, f)).st_mode & 0o777
             for d, _, names in os.walk(tmp_path) for f in names}
    assert {"out/model_final.pth", "out/last_checkpoint", "pruned/model_pruned_w0.5.pth"} <= files.keys(), files
    assert {f: oct(m) for f, m in files.items() if m != 0o644} == {}
    assert [f for f in files if ".tmp" in f] == []
