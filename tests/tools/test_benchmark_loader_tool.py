"""tools/benchmark_loader.py: the resumable loader against detectron2's, run as a user runs it (tiny)."""
import json
from pathlib import Path

import pytest

from gradaug_det.engine.setup import get_gradaug_cfg

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "quickstart" / "mask_rcnn_gradaug.yaml")


@pytest.fixture(scope="module")
def tool(load_tool):
    return load_tool("benchmark_loader")


def test_both_loaders_read_the_same_stream_and_are_timed(tool, tmp_path, capsys):
    out_json, out_md = tmp_path / "l.json", tmp_path / "l.md"
    doc = tool.main(["--config-file", CONFIG, "--synthetic", "10", "64", "--data-dir", str(tmp_path / "data"),
                     "--workers", "0", "1", "--batches", "3", "--warmup", "1", "--rounds", "2",
                     "--json", str(out_json), "--markdown", str(out_md)])
    cfg = get_gradaug_cfg()
    cfg.merge_from_file(CONFIG)
    rows = {(r["loader"], r["workers"]): r for r in doc["rows"]}
    assert sorted(rows) == [("detectron2", 0), ("detectron2", 1), ("resumable", 0), ("resumable", 1)]
    for (kind, workers), r in rows.items():
        # 3 timed batches of the config's batch size, in the order of the shared seeded sampler:
        # the resumable loader reads detectron2's own stream, with or without a worker process
        assert len(r["file_names"]) == 3 * cfg.SOLVER.IMS_PER_BATCH
        assert r["file_names"] == rows[("detectron2", 0)]["file_names"]
        assert len(r["per_round"]) == 2 and r["images_per_s"] > 0 and r["median_batch_ms"] > 0
        if kind == "resumable":
            ref = rows[("detectron2", workers)]["images_per_s"]
            assert r["vs_detectron2"] == pytest.approx(r["images_per_s"] / ref)
    assert len(set(rows[("detectron2", 0)]["file_names"])) > 1  # several images, not one repeated
    assert json.loads(out_json.read_text())["rows"][0]["loader"] == "detectron2"
    table = out_md.read_text()
    assert "| resumable | 1 |" in table and "| detectron2 | 0 |" in table
    assert table.strip() == capsys.readouterr().out.strip()


@pytest.mark.parametrize("argv, message", [
    (["--synthetic", "0", "64"], "--synthetic N SIZE needs N >= 1"),
    (["--data-dir", "somewhere"], "--data-dir is where --synthetic writes"),
    (["--workers", "-1"], "--warmup and --workers must be >= 0"),
    (["--batches", "0"], "--batches must be >= 1"),
    (["--config-file", "no/such.yaml"], "does not exist"),
    (["--json", "/no/such/dir/l.json"], "--json '/no/such/dir/l.json'"),
])
def test_bad_arguments_stop_before_any_work(tool, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        tool.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
