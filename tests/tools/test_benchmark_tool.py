"""tools/benchmark.py: baseline vs GradAug priced by the cost model, run as a user runs it (tiny)."""
import json
from pathlib import Path

import pytest

from gradaug_det.slim import preferred_channel_divisor

TOOL = Path(__file__).resolve().parents[2] / "tools" / "benchmark.py"


@pytest.fixture(scope="module")
def tool(load_tool):
    return load_tool("benchmark")


def test_benchmark_tool_tiny_run(tool, tmp_path, capsys):
    out_json, out_md = tmp_path / "b.json", tmp_path / "b.md"
    doc = tool.main(["--config-file", str(TOOL.parents[1] / "configs/quickstart/benchmark_gradaug.yaml"),
                     "--synthetic", "64", "64", "--iters", "1", "--warmup", "0", "--threads", "1",
                     "--device", "cpu", "--no-cpu-caches", "--rounds", "2", "--json", str(out_json),
                     "--markdown", str(out_md)])
    text = capsys.readouterr().out
    assert json.loads(out_json.read_text())["comparisons"].keys() == {"gradaug", "gradaug_aligned"}
    assert out_md.read_text().strip() == text.strip()
    plan = doc["plan"][0]
    base = doc["modes"]["baseline"]
    # two rounds, pooled: each mode's timed iterations of both rounds, its median over them
    for mode in ("baseline", "gradaug", "gradaug_aligned"):
        m = doc["modes"][mode]
        assert len(m["times"]) == len(m["probed"]) == len(m["flops"]) == 2 and len(m["round_median_s"]) == 2
        assert m["median_s"] == pytest.approx(sorted(m["times"])[0] / 2 + sorted(m["times"])[1] / 2)
    assert "2 rounds pooled" in text.splitlines()[0]
    for mode in ("gradaug", "gradaug_aligned"):
        c = doc["comparisons"][mode]
        passes = c["passes"]
        assert [p["pass"] for p in passes] == ["full"] + [f"sub{i + 1}" for i in range(len(plan))]
        # the full pass runs the baseline's backbone on the same batch: the same FLOPs; its
        # heads' FLOPs depend on how many sampled RoIs are foreground (the mask head runs on
        # those), which drifts as the weights train, so the pass is priced at its own FLOPs
        full, ref = passes[0], c["baseline"]["pass"]
        assert full["backbone_fwd_gflops"] == ref["backbone_fwd_gflops"] > 0
        assert full["model_s"] == pytest.approx(
            ref["measured_s"] * (full["fwd_gflops"] + full["bwd_gflops"]) / (ref["fwd_gflops"] + ref["bwd_gflops"]))
        for p, spec in zip(passes[1:], plan):
            # each sub-network pass ran at its planned scale and width, and soft-label
            # passes (no RPN, no mask head) cost less than the full pass even at width 1
            assert p["input_hw_mean"] == [round(64 * spec["scale"])] * 2
            assert p["width_mean"] == pytest.approx(spec["width"])
            assert 0 < p["fwd_gflops"] < passes[0]["fwd_gflops"] and p["bwd_gflops"] > p["fwd_gflops"]
            assert p["model_s"] == pytest.approx((p["fwd_gflops"] + p["bwd_gflops"]) * c["rate_s_per_gflop"])
        it = c["iteration"]
        assert it["model_s"] == pytest.approx(base["median_s"] + sum(p["model_s"] for p in passes[1:]))
        assert it["time_over_model"] == pytest.approx(it["median_s"] / it["model_s"])
        assert set(c["overhead_s"]) == {"transform", "preprocess", "teacher", "slicing", "optimizer",
                                        "outside passes"}
        # slimmed vs pruned backbones: the full backbone on the full pass's input, each
        # sub-network's at its width on its input padded to FPN's 32 px; the pruned one
        # runs exactly the sub-network's training FLOPs (fewer than the full backbone's)
        slicing = doc["modes"][mode]["slicing"]  # measured in the first round only
        assert len(slicing["passes"]) == 1
        full_bb = slicing["full"]
        assert (full_bb["width"], full_bb["input_hw"], full_bb["slicing_s"]) == (1.0, [64, 64], 0.0)
        # forward + backward of the backbone the full pass ran forward on the same input
        # (the stem computes no input gradient: just under 3x)
        fwd = passes[0]["backbone_fwd_gflops"] * 1e9
        assert 2 * fwd < full_bb["dense_flops"] < 3 * fwd
        for p, spec, sl in zip(passes[1:], plan, slicing["passes"][0]):
            assert sl["width"] == spec["width"] < 1.0
            assert sl["input_hw"] == [-(-round(64 * spec["scale"]) // 32) * 32] * 2
            assert 0 < sl["dense_flops"] < full_bb["dense_flops"]
            assert p["slicing_s"] == pytest.approx(sl["slim_s"] - sl["dense_s"])
            assert p["narrow_s"] == pytest.approx(
                sl["dense_s"] - full_bb["dense_s"] * sl["dense_flops"] / full_bb["dense_flops"])
        assert c["overhead_s"]["slicing"] == pytest.approx(sum(p["slicing_s"] for p in passes))
        assert passes[0]["slicing_s"] == 0.0 and all(p["peak_mb"] > 0 for p in passes)
    # every mode ran with the CPU caches off, as asked
    for mode in ("baseline", "gradaug", "gradaug_aligned"):
        assert doc["modes"][mode]["environment"] == tool.NO_CPU_CACHES
    assert doc["no_cpu_caches"] and "ONEDNN_PRIMITIVE_CACHE_CAPACITY=0" in text.splitlines()[0]
    aligned = preferred_channel_divisor("cpu")  # 16 on AVX-512 CPUs, else 8
    assert f"| gradaug_aligned | {aligned} |" in text and text.count(f"| sub{len(plan)} |") == 2 * 2
    assert "time / cost model" in text and "peak RSS / baseline" in text and "| sub1 | " in text
    # the memory goal's line says what a default CPU run's resident set includes, only there
    caches_note = "--no-cpu-caches measures the tensors alone"
    assert caches_note not in text
    argv = ["--config-file", str(TOOL.parents[1] / "configs/quickstart/benchmark_gradaug.yaml"), "--synthetic", "64",
            "64", "--iters", "1", "--warmup", "0", "--device", "cpu", "--rounds", "2"]
    args = tool.parse_args(argv)
    _, default_text = tool.report(args, doc["modes"], tool.make_plan(tool.make_cfg(args), 1))
    assert default_text.rstrip().splitlines()[-1].endswith(caches_note + ")")


@pytest.mark.parametrize("bad", [["--iters", "0"], ["--synthetic", "8", "8"], ["--amp", "fp16", "--device", "cpu"],
                                 ["--config-file", "nope.yaml"], ["--divisor", "0"], ["--rounds", "0"]])
def test_benchmark_tool_rejects_bad_arguments(tool, bad):
    with pytest.raises(SystemExit):
        tool.parse_args(bad)


def test_benchmark_tool_default_divisor_is_the_devices(tool):
    assert tool.parse_args([]).divisor == preferred_channel_divisor("cpu")
    assert tool.parse_args(["--divisor", "4"]).divisor == 4


def test_pool_rounds_refuses_mismatched_rounds():
    from gradaug_det.benchmark.iteration import pool_rounds

    one = {"times": [1.0], "probed": [{}], "flops": [[]], "median_s": 1.0, "peak_mb": 1.0}
    two = {"times": [1.0, 2.0], "probed": [{}, {}], "flops": [[], []], "median_s": 1.5, "peak_mb": 2.0}
    with pytest.raises(ValueError, match="different lengths"):
        pool_rounds([one, two])
    with pytest.raises(ValueError, match="at least one"):
        pool_rounds([])
    late = dict(one, slicing={"full": {}, "passes": [[]]})
    with pytest.raises(ValueError, match="first rounds"):
        pool_rounds([one, late])
