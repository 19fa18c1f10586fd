"""tools/plot_metrics.py writes loss, sub-network and AP plots from metrics.json files."""
import json
import os
import runpy

import matplotlib.image as mpimg
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def tool():
    return runpy.run_path(os.path.join(REPO, "tools", "plot_metrics.py"))


def _write_run(directory, gradaug):
    os.makedirs(directory)
    with open(os.path.join(directory, "metrics.json"), "w") as f:
        for it in range(19, 100, 20):
            rec = {"iteration": it, "total_loss": 2.0 - it / 100, "loss_cls": 1.0 - it / 200,
                   "loss_box_reg": 0.5, "lr": 0.01, "data_time": 0.01}
            if gradaug:
                for i, w in enumerate((1.0, 0.95, 0.9)):
                    rec.update({f"gradaug/sub{i}/loss_soft_cls": 0.1 * i, f"gradaug/sub{i}/width": w,
                                f"gradaug/sub{i}/scale": 0.8, f"gradaug/sub{i}/total_loss": 0.2})
                rec["gradaug/all_passes_loss"] = 2.5
            f.write(json.dumps(rec) + "\n")
            if it in (59, 99):
                f.write(json.dumps({"iteration": it, "bbox/AP": it / 3, "segm/AP": it / 4,
                                    "bbox@w0.75/AP": it / 5, "segm@w0.75/AP": it / 6}) + "\n")
        f.write('{"iteration": 100, "total_lo')  # a line still being written


def test_plots_written_and_overlaid(tmp_path, tool, capsys):
    _write_run(tmp_path / "gradaug", gradaug=True)
    _write_run(tmp_path / "baseline", gradaug=False)
    args = tool["get_parser"]().parse_args([
        str(tmp_path / "gradaug"), str(tmp_path / "baseline" / "metrics.json"),
        "--labels", "GradAug", "baseline", "--smooth", "3", "--output", str(tmp_path / "plots")])
    written = tool["main"](args)
    assert [os.path.basename(p) for p in written] == ["losses.png", "gradaug.png", "ap.png"]
    out = capsys.readouterr().out
    for path in written:
        assert mpimg.imread(path).shape[0] > 100
        assert f"wrote {path}" in out
    metrics = tool["read_metrics"](str(tmp_path / "gradaug" / "metrics.json"))
    assert metrics["bbox@w0.75/AP"] == ([59, 99], [59 / 5, 99 / 5])
    assert len(metrics["total_loss"][0]) == 5  # the partial last line is skipped


def test_single_run_defaults_and_errors(tmp_path, tool):
    _write_run(tmp_path / "run", gradaug=False)
    written = tool["main"](tool["get_parser"]().parse_args([str(tmp_path / "run")]))
    assert os.path.dirname(written[0]) == str(tmp_path / "run" / "plots")
    assert [os.path.basename(p) for p in written] == ["losses.png", "ap.png"]
    assert list(tool["smooth"]([1.0, 2.0, 3.0, 4.0], 2)) == [1.0, 1.5, 2.5, 3.5]
    with pytest.raises(SystemExit, match="--smooth"):
        tool["main"](tool["get_parser"]().parse_args([str(tmp_path / "run"), "--smooth", "0"]))
    with pytest.raises(SystemExit, match="metrics.json"):
        tool["main"](tool["get_parser"]().parse_args([str(tmp_path / "missing")]))
