#!/usr/bin/env python
"""Plot training curves from detectron2 ``metrics.json`` files, several runs overlaid.

Writes up to three PNG files (matplotlib, no display needed):

* ``losses.png``: ``total_loss`` and every ``loss_*`` of the full network;
* ``gradaug.png``: the sub-network scalars logged under ``gradaug/`` (``sub{i}/loss_*``,
  ``sub{i}/total_loss``, ``sub{i}/width``, ``sub{i}/scale``, ``all_passes_loss``), one
  panel per scalar, one line per run and sub-network; only if a run has such keys;
* ``ap.png``: evaluation metrics over iterations (``bbox/AP``, ``segm/AP``, and the
  sub-network widths' ``bbox@w0.75/AP`` ... , ``classification/top1``), one panel per task,
  one line per run and width; only if a run was evaluated.

Example (GradAug vs. baseline side by side)::

    python tools/plot_metrics.py output/quickstart_gradaug output/quickstart_baseline \\
        --labels GradAug baseline --smooth 20 --output output/plots
"""
import argparse
import json
import os
import re
from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# One curve: iterations and values.
Series = Tuple[List[int], List[float]]

_EVAL_RE = re.compile(r"^(?:(?P<prefix>.+)/)?(?P<task>[^/@]+)(?:@w(?P<width>[0-9.]+))?/(?P<metric>AP|top1)$")
_SUB_RE = re.compile(r"^gradaug/sub(?P<index>\d+)/(?P<name>.+)$")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="output directories (or metrics.json files) of the runs")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="legend name of each run (default: the directory names)")
    parser.add_argument("--output", default=None,
                        help="directory for the PNG files (default: <first run>/plots)")
    parser.add_argument("--smooth", type=int, default=1,
                        help="moving-average window over logged points for loss curves (default 1: raw)")
    return parser


def metrics_file(run: str) -> str:
    """The ``metrics.json`` of ``run`` (a directory or the file itself)."""
    path = os.path.join(run, "metrics.json") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise SystemExit(f"no metrics.json at {path!r}; pass a training OUTPUT_DIR or a metrics.json file")
    return path


def read_metrics(path: str) -> Dict[str, Series]:
    """Every scalar of a detectron2 ``metrics.json`` (JSON lines) as ``key -> (iterations, values)``.

    Lines that are not complete JSON objects (e.g. the last line of a running job) are skipped.
    """
    series: Dict[str, Series] = OrderedDict()
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict) or "iteration" not in record:
                continue
            it = int(record["iteration"])
            for key, value in record.items():
                if key == "iteration" or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                xs, ys = series.setdefault(key, ([], []))
                xs.append(it)
                ys.append(float(value))
    return series


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average of ``window`` points (the first points average what exists)."""
    y = np.asarray(values, dtype=float)
    if window <= 1 or len(y) < 2:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, len(y) + 1)
    start = np.maximum(0, idx - window)
    return (c[idx] - c[start]) / (idx - start)


def _panel_grid(n: int):
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_losses(runs: "OrderedDict[str, Dict[str, Series]]", path: str, window: int) -> str:
    """``total_loss`` and each ``loss_*`` of the full network, one panel per loss."""
    keys = []
    for series in runs.values():
        for key in series:
            if (key == "total_loss" or key.startswith("loss_")) and key not in keys:
                keys.append(key)
    keys.sort(key=lambda k: (k != "total_loss", k))
    fig, axes = _panel_grid(max(1, len(keys)))
    for ax, key in zip(axes, keys):
        for label, series in runs.items():
            if key in series:
                xs, ys = series[key]
                ax.plot(xs, smooth(ys, window), label=label, linewidth=1.2)
        ax.set_title(key)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if not keys:
        axes[0].set_title("no losses logged")
    return _save(fig, path)


def plot_gradaug(runs: "OrderedDict[str, Dict[str, Series]]", path: str, window: int) -> str:
    """Sub-network scalars (``gradaug/...``), one panel per scalar, a line per run and sub-network."""
    panels: "OrderedDict[str, List[Tuple[str, Series]]]" = OrderedDict()
    for label, series in runs.items():
        for key, data in series.items():
            if not key.startswith("gradaug/"):
                continue
            m = _SUB_RE.match(key)
            name, line = (m.group("name"), f"{label} sub{m.group('index')}") if m else (key[len("gradaug/"):], label)
            panels.setdefault(name, []).append((line, data))
    order = sorted(panels, key=lambda k: (not k.startswith("loss"), k not in ("total_loss", "all_passes_loss"), k))
    fig, axes = _panel_grid(len(order))
    for ax, name in zip(axes, order):
        for line, (xs, ys) in sorted(panels[name], key=lambda t: t[0]):
            ax.plot(xs, smooth(ys, window), label=line, linewidth=1.0)
        ax.set_title(f"gradaug: {name}")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    return _save(fig, path)


def plot_ap(runs: "OrderedDict[str, Dict[str, Series]]", path: str) -> str:
    """Evaluation metrics per task, a line per run and width (1.0 solid, sub-networks dashed)."""
    panels: "OrderedDict[str, List[Tuple[str, float, Series]]]" = OrderedDict()
    for label, series in runs.items():
        for key, data in series.items():
            m = _EVAL_RE.match(key)
            if m is None:
                continue
            title = "/".join(filter(None, (m.group("prefix"), m.group("task"), m.group("metric"))))
            w = float(m.group("width") or 1.0)
            line = label if w == 1.0 else f"{label} @ width {w:g}"
            panels.setdefault(title, []).append((line, w, data))
    fig, axes = _panel_grid(len(panels))
    for ax, (title, lines) in zip(axes, panels.items()):
        for line, w, (xs, ys) in sorted(lines, key=lambda t: (t[0].split(" @ ")[0], -t[1])):
            ax.plot(xs, ys, "o-" if w == 1.0 else "s--", label=line, linewidth=1.2, markersize=4)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path)


def main(args) -> List[str]:
    if args.smooth < 1:
        raise SystemExit(f"--smooth must be >= 1 (points per moving-average window), got {args.smooth}")
    if args.labels is not None and len(args.labels) != len(args.runs):
        raise SystemExit(f"--labels gives {len(args.labels)} names for {len(args.runs)} runs")
    files = [metrics_file(r) for r in args.runs]
    labels = args.labels or [os.path.basename(os.path.dirname(os.path.abspath(f))) for f in files]
    if len(set(labels)) < len(labels):
        labels = [os.path.dirname(f) or "." for f in files]
    runs = OrderedDict((label, read_metrics(f)) for label, f in zip(labels, files))
    output = args.output or os.path.join(os.path.dirname(files[0]) or ".", "plots")
    os.makedirs(output, exist_ok=True)

    written = [plot_losses(runs, os.path.join(output, "losses.png"), args.smooth)]
    if any(k.startswith("gradaug/") for s in runs.values() for k in s):
        written.append(plot_gradaug(runs, os.path.join(output, "gradaug.png"), args.smooth))
    if any(_EVAL_RE.match(k) for s in runs.values() for k in s):
        written.append(plot_ap(runs, os.path.join(output, "ap.png")))
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    from gradaug_det.utils.cli import run_tool

    run_tool(main, get_parser().parse_args())  # a mistake: one "error: ..." line, exit status 2
