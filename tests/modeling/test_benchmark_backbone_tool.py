"""tools/benchmark_backbone.py runs end to end and reports consistent numbers (tiny setting)."""
import math

import pytest


@pytest.fixture(scope="module")
def tool(load_tool):
    return load_tool("benchmark_backbone")


def test_benchmark_tool_tiny_run(tool, tmp_path, capsys):
    png = tmp_path / "bench.png"
    rows = tool.main(["--depth", "18", "--size", "32", "--batch", "2", "--iters", "1", "--warmup", "0",
                      "--divisor", "8", "--widths", "0.9", "0.5", "--threads", "1", "--plot", str(png)])
    out = capsys.readouterr().out
    assert [(r["model"], r["width"], r["divisor"]) for r in rows] == [
        ("stock detectron2", 1.0, "-"), ("slimmable", 1.0, "-"),
        ("slimmable", 0.9, 1), ("slimmable", 0.5, 1), ("slimmable", 0.9, 8), ("slimmable", 0.5, 8)]
    assert rows[0]["gflops"] == rows[1]["gflops"]  # same network at width 1.0
    assert rows[2]["channels"] == "58/58/115/230/461" and rows[4]["channels"] == "56/56/112/232/464"
    assert 0.25 <= rows[3]["flop_ratio"] <= 0.3 and 0.75 <= rows[2]["flop_ratio"] <= 0.85
    assert rows[5]["note"] == "same channels as divisor 1" and rows[5]["ms"] == rows[3]["ms"]
    assert all(r["ms"] > 0 and math.isfinite(r["time_ratio"]) for r in rows)
    assert out.count("| slimmable |") == 5 and "width 1.0 vs stock detectron2" in out
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_benchmark_tool_rejects_bad_width(tool):
    with pytest.raises(SystemExit):
        tool.parse_args(["--widths", "1.5"])
