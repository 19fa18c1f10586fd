"""The helpers tools/quickstart.py and tools/compare.py read results with
(gradaug_det.launch.pipeline), against what detectron2 itself writes."""
import json
import logging
import os
import runpy

import pytest
import torch
import yaml

from gradaug_det.launch import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_parse_copypaste_reads_detectron2_print_csv_format(caplog):
    from detectron2.evaluation.testing import print_csv_format

    results = {"bbox": {"AP": 41.25, "AP50": 70.5, "AP75": 40.0, "APs": 1.0, "APm": 2.0, "APl": float("nan")},
               "segm@w0.75": {"AP": 35.125, "AP50": 60.0, "AP75": 30.0, "APs": 3.0, "APm": 4.0, "APl": 5.0}}
    with caplog.at_level(logging.INFO, logger="detectron2.evaluation.testing"):
        print_csv_format({"bbox": {"AP": 1.0, "AP50": 2.0}})  # an earlier evaluation: overridden
        print_csv_format(results)
    text = "\n".join(f"[11/29 10:00:00 d2.evaluation.testing]: {r.getMessage()}" for r in caplog.records)
    parsed = pipeline.parse_copypaste(text)
    assert list(parsed) == ["bbox", "segm@w0.75"]
    # print_csv_format rounds to 4 decimals
    assert parsed["bbox"]["AP"] == 41.25 and parsed["bbox"]["AP50"] == 70.5
    assert parsed["segm@w0.75"]["AP"] == 35.125 and parsed["segm@w0.75"]["APl"] == 5.0


def test_final_results_and_curve_from_metrics_json(tmp_path):
    rows = [{"iteration": 0, "total_loss": 3.0, "gradaug/sub0/loss_soft_cls": 0.1},
            {"iteration": 4, "bbox/AP": 10.0, "segm/AP": 8.0},  # periodic: after the 5th iteration
            {"iteration": 9, "total_loss": 1.0},
            {"iteration": 10, "bbox/AP": 20.0, "segm/AP": 15.0, "bbox@w0.75/AP": 12.0,
             "bbox+bncal@w0.75/AP": 13.0}]  # final, with a BN-calibrated sub-width
    with open(tmp_path / "metrics.json", "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    assert pipeline.read_eval_curve(str(tmp_path), "bbox/AP") == [(5, 10.0), (10, 20.0)]
    final = pipeline.read_final_results(str(tmp_path))
    assert final == {"bbox": {"AP": 20.0}, "segm": {"AP": 15.0}, "bbox@w0.75": {"AP": 12.0},
                     "bbox+bncal@w0.75": {"AP": 13.0}}
    with pytest.raises(SystemExit, match="no evaluation results"):
        pipeline.read_final_results(str(tmp_path / "missing"))


def test_training_speed_line(tmp_path):
    (tmp_path / "log.txt").write_text(
        "[11/29 21:25:42 d2.engine.hooks]: Overall training speed: 98 iterations in 0:01:02 (0.6327 s / it)\n")
    iters, seconds = pipeline.read_training_speed(str(tmp_path))
    assert iters == 98 and seconds == pytest.approx(98 * 0.6327)
    (tmp_path / "log.txt").write_text("nothing\n")
    with pytest.raises(SystemExit, match="did the run finish"):
        pipeline.read_training_speed(str(tmp_path))


def test_flatten_config_opts_inverts_convert_pretrained_emit(tmp_path):
    convert = runpy.run_path(os.path.join(REPO, "tools", "convert_pretrained.py"))
    opts = ["MODEL.WEIGHTS", "/x/backbone_d2.pkl", "MODEL.PIXEL_MEAN", "[123.675, 116.28, 103.53]",
            "INPUT.FORMAT", "RGB", "MODEL.RESNETS.STRIDE_IN_1X1", "False", "MODEL.RESNETS.DEPTH", "18"]
    path = tmp_path / "emitted.yaml"
    path.write_text(yaml.safe_dump(convert["_nested"](opts), sort_keys=False))
    flat = pipeline.flatten_config_opts(str(path))
    from gradaug_det.engine.setup import get_gradaug_cfg

    a, b = get_gradaug_cfg(), get_gradaug_cfg()
    a.merge_from_list(opts)
    b.merge_from_list(flat)
    assert a == b
    assert b.MODEL.PIXEL_MEAN == [123.675, 116.28, 103.53] and b.MODEL.RESNETS.STRIDE_IN_1X1 is False


def test_schedule_opts_scale_steps_and_eval_period():
    from gradaug_det.engine.setup import get_gradaug_cfg

    cfg = get_gradaug_cfg()
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS, cfg.SOLVER.WARMUP_ITERS = 1000, (800, 900), 50
    assert pipeline.schedule_opts(cfg, 300, eval_points=4) == [
        "SOLVER.MAX_ITER", "300", "SOLVER.STEPS", "(240, 270)", "SOLVER.WARMUP_ITERS", "50",
        "TEST.EVAL_PERIOD", "75"]
    assert pipeline.schedule_opts(cfg, 2)[:6] == ["SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)",
                                                  "SOLVER.WARMUP_ITERS", "1"]
    assert pipeline.schedule_opts(cfg, None) == []


def test_auto_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pipeline.auto_device("auto") == expected
    assert pipeline.auto_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="sees no CUDA device"):
            pipeline.auto_device("cuda")


def test_compare_table_mean_and_sample_std():
    compare = runpy.run_path(os.path.join(REPO, "tools", "compare.py"))
    runs = [{"arm": "gradaug", "seed": s, "iters": 100, "seconds": t, "bbox_AP": b, "segm_AP": m}
            for s, t, b, m in ((0, 10.0, 40.0, 30.0), (1, 12.0, 42.0, 33.0), (2, 14.0, 44.0, 36.0))]
    runs.append({"arm": "baseline", "seed": 0, "iters": 100, "seconds": 6.0, "bbox_AP": 39.0, "segm_AP": 31.0})
    table = compare["results_table"](runs, has_segm=True).splitlines()
    # runs without evaluation curves: no best AP, no time to reach (—)
    assert table[2] == "| baseline, equal iterations | 1 | 100 | 6 ± 0 | 39.0 ± 0.0 | — | — | 31.0 ± 0.0 | — | — |"
    # mean 42, sample std 2 (bbox); mean 33, sample std 3 (segm); time 12 ± 2
    assert table[3] == "| GradAug | 3 | 100 | 12 ± 2 | 42.0 ± 2.0 | — | — | 33.0 ± 3.0 | — | — |"


def test_run_tool_stop_when_terminates_the_tool_without_an_error(tmp_path):
    """stop_when (the --until-converged probe's early stop): polled while the tool runs; True
    ends it (not an error), False lets it finish; a tool that fails without being stopped still
    raises."""
    import time

    tool = tmp_path / "count.py"
    out = tmp_path / "count.txt"
    tool.write_text("import sys, time\n"
                    "for i in range(600):\n"
                    "    open(sys.argv[1], 'a').write(f'{i}\\n'); time.sleep(0.05)\n"
                    "sys.exit(int(sys.argv[2]))\n")
    lines = lambda: len(out.read_text().splitlines()) if out.exists() else 0  # noqa: E731
    log = tmp_path / "runs.log"
    start = time.perf_counter()
    pipeline.run_tool(str(tool), [str(out), "3"], "count", str(log), stop_when=lambda: lines() >= 5, poll_s=0.1)
    assert time.perf_counter() - start < 20 and 5 <= lines() < 600  # stopped long before its 30 s
    assert "[count] stopped after" in log.read_text()
    failing = tmp_path / "fail.py"
    failing.write_text("import time, sys\ntime.sleep(0.3)\nsys.exit(3)\n")
    with pytest.raises(SystemExit, match="failed with exit code 3"):  # never stopped: its exit code counts
        pipeline.run_tool(str(failing), [], "fail", stop_when=lambda: False, poll_s=0.1)
