"""tools/tradeoff.py on the tiny generated data, as a user runs it."""
import json
import math
import os

import pytest
import torch

from detectron2.modeling import build_model

from gradaug_det.engine.setup import get_gradaug_cfg

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "quickstart", "mask_rcnn_gradaug.yaml")


def test_tradeoff_rows_front_budget_and_export(tmp_path, tiny_coco, tiny_rcnn_opts, load_tool, capsys):
    cfg = get_gradaug_cfg()
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(tiny_rcnn_opts)
    torch.manual_seed(0)
    weights = str(tmp_path / "model.pth")
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    opts = list(tiny_rcnn_opts)
    opts[opts.index("MODEL.WEIGHTS") + 1] = weights
    tool = load_tool("tradeoff")
    out = tmp_path / "tradeoff"
    args = tool.get_parser().parse_args(
        ["--config-file", CONFIG, "--widths", "1.0", "0.5", "--sizes", "64", "32", "--output", str(out),
         "--bn-calibration-batches", "1", "--budget-gflops", "1000", "--runs", "1", "--no-progress"] + opts)
    doc = tool.main(args)
    rows = json.loads((out / "tradeoff.json").read_text())["rows"]
    # width 1.0; width 0.5 with and without calibration; each at two sizes
    assert [(r["width"], r["bn_calibration_batches"], r["size"]) for r in rows] == [
        (1.0, 0, 64), (1.0, 0, 32), (0.5, 0, 64), (0.5, 0, 32), (0.5, 1, 64), (0.5, 1, 32)]
    for r in rows:
        assert {"bbox_AP", "segm_AP", "gflops", "params", "latency_ms"} <= set(r)
        assert r["latency_ms"] > 0 and not math.isnan(r["gflops"])
    by = {(r["width"], r["bn_calibration_batches"], r["size"]): r for r in rows}
    # the pruned model is smaller and cheaper; FLOPs grow with the size
    assert by[(0.5, 0, 64)]["params"] < 0.5 * by[(1.0, 0, 64)]["params"]
    assert by[(0.5, 0, 64)]["gflops"] < 0.5 * by[(1.0, 0, 64)]["gflops"]
    assert by[(1.0, 0, 32)]["gflops"] < by[(1.0, 0, 64)]["gflops"]
    # the cheapest row is always on the GFLOPs front
    cheapest = min(rows, key=lambda r: r["gflops"])
    assert cheapest["pareto_gflops"]
    # a budget that everything fits: the best AP; it was exported
    best = doc["budget"]["best"]
    assert best["bbox_AP"] == max(r["bbox_AP"] for r in rows)
    assert os.path.isfile(doc["export"]["path"])
    assert (out / "tradeoff.md").read_text().startswith("# Width / test size trade-off")
    assert (out / "tradeoff.png").stat().st_size > 0
    assert "Best under 1000 GFLOPs" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--widths", "1.2"], "--widths holds width 1.2"),
    (["--sizes", "0"], "--sizes must be positive"),
    (["--budget-ms", "-1"], "--budget-ms must be positive"),
])
def test_tradeoff_refuses_before_any_work(tmp_path, tiny_rcnn_opts, load_tool, flags, message):
    tool = load_tool("tradeoff")
    out = tmp_path / "out"
    args = tool.get_parser().parse_args(["--config-file", CONFIG] + flags + ["--output", str(out)] + tiny_rcnn_opts)
    with pytest.raises(SystemExit) as info:
        tool.main(args)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert not out.exists()
