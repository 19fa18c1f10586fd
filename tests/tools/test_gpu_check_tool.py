"""tools/gpu_check.py runs every section through its real entry point (tiny sizes on the CPU)."""
import json
import os
from pathlib import Path

import pytest
import torch

from gradaug_det.slim import preferred_channel_divisor

TOOL = Path(__file__).resolve().parents[2] / "tools" / "gpu_check.py"


@pytest.fixture(scope="module")
def tool(load_tool):
    return load_tool("gpu_check")


def test_gpu_check_tiny_cpu_run(tool, tmp_path):
    doc = tool.main(["--tiny", "--output-dir", str(tmp_path), "--budget-min", "60"])
    sections = doc["sections"]
    assert list(sections) == ["env", "amp", "hostsync", "syncbn", "cudnn", "iteration", "backbone"]
    failed = {k: v.get("error") for k, v in sections.items() if v["status"] != "ok"}
    assert not failed, failed
    # AMP: detectron2's AMP loop with a real GradScaler (bf16 on the CPU), weights updated
    amp = {r["precision"]: r for r in sections["amp"]["rows"]}
    assert set(amp) == {"bf16"}
    assert all(r["finite_losses"] and r["params_updated"] == r["params"] > 0 for r in amp.values())
    assert amp["bf16"]["grad_scale"] == 65536.0 and amp["bf16"]["subnet_losses_logged"] > 0
    # host syncs: without CUDA nothing to detect, the GradAug step still ran
    host = sections["hostsync"]
    assert host["cuda"] is False and host["syncs"] == 0 and host["first_sync_in_error_mode"] is None
    # SyncBN under DDP in a one-process group equals BN, at every width
    sync = sections["syncbn"]
    assert sync["backend"] == "gloo" and sync["world_size"] == 1
    assert sorted(r["width"] for r in sync["rows"]) == [0.5, 0.75, 0.9, 1.0]
    assert all(r["max_abs_diff_out"] <= 1e-4 * max(1.0, r["out_scale"]) for r in sync["rows"])
    # cudnn.benchmark on/off: same outputs (on the CPU the flag is inert: exactly equal)
    assert max(sections["cudnn"]["max_abs_diff"].values()) == 0.0
    # the iteration table: baseline and GradAug at both divisors in fp32; the model prices
    # the full pass as the baseline's, so a GradAug iteration's model exceeds the baseline
    aligned = preferred_channel_divisor("cpu")  # 16 on AVX-512 CPUs, else 8
    rows = sections["iteration"]["rows"]
    fp32 = {(r["mode"], r["divisor"]): r for r in rows if r["precision"] == "fp32"}
    assert set(fp32) == {("baseline", "-"), ("gradaug", 1), ("gradaug", aligned)}
    for key in (("gradaug", 1), ("gradaug", aligned)):
        r = fp32[key]
        assert r["model_s"] > fp32[("baseline", "-")]["median_s"]
        plan = sections["iteration"]["plan"][0]
        assert [p["pass"] for p in r["passes"]] == ["full"] + [f"sub{i + 1}" for i in range(len(plan))]
    # the aligned fp32 mode splits each sub-network's backbone into slicing and narrow kernels
    sliced = fp32[("gradaug", aligned)]
    assert fp32[("gradaug", 1)]["slicing"] is None and len(sliced["slicing"]["passes"]) == 1
    assert len(sliced["slicing"]["passes"][0]) == len(plan) == len(sliced["passes"]) - 1
    for spec, sl in zip(plan, sliced["slicing"]["passes"][0]):
        assert sl["width"] == spec["width"] and sl["dense_flops"] > 0
    assert {r["precision"] for r in rows} == {"fp32", "bf16"}
    # the backbone benchmark at 1.0 / 0.9 / 0.75 / 0.5
    widths = sorted({r["width"] for r in sections["backbone"]["rows"]})
    assert widths == [0.5, 0.75, 0.9, 1.0]
    # one JSON and one Markdown table, naming the device
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["device"] == doc["device"] and "CPU" in saved["device"] and saved["tiny"] is True
    md = (tmp_path / "gpu_check.md").read_text()
    assert md.startswith("# gpu_check on ") and "| iteration | ok |" in md and f"| gradaug | {aligned} |" in md
    assert f"Per pass, fp32, divisor {aligned}" in md and "| sub1 | " in md
    assert md.count("| slimmable |") == 1 + 3 * 2  # width 1.0, then 0.9 / 0.75 / 0.5 at divisors 1 and the aligned one


def test_gpu_check_records_failures_and_budget(tool, tmp_path, monkeypatch):
    """A failing section is recorded and the next still runs; a spent budget skips (non-tiny)."""
    from gradaug_det.benchmark import gpu_check

    def broken(ctx):
        raise RuntimeError("boom")

    monkeypatch.setitem(gpu_check._FUNCS, "cudnn", broken)
    doc = tool.main(["--tiny", "--output-dir", str(tmp_path), "--sections", "cudnn", "env"])
    assert doc["sections"]["cudnn"]["status"] == "failed" and "boom" in doc["sections"]["cudnn"]["error"]
    assert doc["sections"]["env"]["status"] == "ok"
    ctx = gpu_check.CheckContext(device="cpu", tiny=False, repo=str(TOOL.parents[1]), budget_s=0.0,
                                 progress=lambda m: None)
    out = gpu_check.run_sections(ctx, ["iteration"])
    assert out["iteration"]["status"] == "skipped" and "budget" in out["iteration"]["reason"]


def test_gpu_check_rejects_unknown_section(tool):
    with pytest.raises(SystemExit):
        tool.parse_args(["--sections", "warp-drive"])


def test_host_syncs_are_attributed_to_the_line_that_asked(tmp_path):
    """attribute_sync names the innermost frame outside torch / torchvision; a sync under
    torch's backward is the autograd engine's; record_host_syncs keeps the stack per sync."""
    import traceback
    import warnings

    import torchvision

    from gradaug_det.benchmark.gpu_check import attribute_sync, record_host_syncs

    torch_dir, tv_dir = os.path.dirname(torch.__file__), os.path.dirname(torchvision.__file__)
    step = os.path.join("/x", "site", "gradaug_det", "gradaug", "step.py")
    d2 = os.path.join("/opt", "torch", ".venv", "site-packages", "detectron2", "modeling", "proposal_generator", "rpn.py")

    def frames(*specs):
        return [traceback.FrameSummary(f, n, name, line=code) for f, n, name, code in specs]

    ours = attribute_sync(frames((step, 120, "gradaug_step", "check_finite_losses(out, finite)"),
                                 (step, 63, "check_finite_losses", "if bool(finite.all()):"),
                                 (os.path.join(torch_dir, "_tensor.py"), 40, "__bool__", "")))
    assert ours == {"category": "gradaug_det", "where": os.path.join("gradaug_det", "gradaug", "step.py") + ":63",
                    "function": "check_finite_losses", "code": "if bool(finite.all()):"}
    # detectron2 calling torchvision's nms, itself calling torch: detectron2's (a path with
    # "/torch/" in it, as the lent machine's /opt/torch/.venv, is not mistaken for torch)
    theirs = attribute_sync(frames((step, 130, "gradaug_step", "losses = model(batch)"),
                                   (d2, 470, "find_top_rpn_proposals", "keep = batched_nms(...)"),
                                   (os.path.join(tv_dir, "ops", "boxes.py"), 40, "nms", ""),
                                   (os.path.join(torch_dir, "_ops.py"), 10, "__call__", "")))
    assert theirs["category"] == "detectron2" and theirs["function"] == "find_top_rpn_proposals"
    assert theirs["where"] == os.path.join("detectron2", "modeling", "proposal_generator", "rpn.py") + ":470"
    engine = attribute_sync(frames((step, 140, "gradaug_step", "backward(loss)"),
                                   (os.path.join(torch_dir, "_tensor.py"), 600, "backward", ""),
                                   (os.path.join(torch_dir, "autograd", "__init__.py"), 300, "backward", "")))
    assert engine["category"] == "backward" and engine["function"] == "gradaug_step"

    def asks():  # stands for an op warning the way CUDA's sync debug mode does
        warnings.warn("called a synchronizing CUDA operation")

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with record_host_syncs(cuda=False) as records:
            asks()
            asks()  # every sync, not once per line
            warnings.warn("unrelated")
    assert [str(w.message) for w in seen] == ["unrelated"]  # other warnings pass through, syncs do not
    assert len(records) == 2
    got = attribute_sync(records[0])
    assert got["category"] == "other" and got["function"] == "asks" and "warnings.warn" in got["code"]
