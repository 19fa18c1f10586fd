#!/usr/bin/env python
"""Does GradAug help, at what cost: baseline vs GradAug fine-tuning, several seeds (``make compare``).

For every seed, three runs of ``tools/train_net.py`` (each in its own process, as a user
runs it) on the same data from the same pretrained backbone:

* ``baseline``: ``GRADAUG.ENABLED False``, ``--iters`` iterations;
* ``gradaug``: the config as given (GradAug on), ``--iters`` iterations -- equal iterations;
* ``baseline_equal_time``: the baseline for as many iterations as GradAug's training took
  wall-clock (``iters x t_gradaug / t_baseline``, this seed's measured training times,
  evaluation excluded; the LR schedule scaled to the new length) -- equal time.

Each run is evaluated (detectron2's COCOEvaluator, width 1.0) ``--eval-points`` times during
training. Written to ``--output-dir``: ``results.md`` (mean ± std over seeds of bbox / segm AP
per arm, iterations, training time), ``results.json`` (every number), ``ap_curves.png`` (AP
against iterations and against training time, every run) and each run's output directory.

The default is the quickstart: its data, ``configs/quickstart/mask_rcnn_gradaug.yaml`` and a
backbone pretrained once with ``configs/quickstart/pretrain_r18_gradaug.yaml`` (reused by
later calls with the same output directory). On your own data::

    python tools/compare.py --config-file my_mask_rcnn_gradaug.yaml --dataset my_train \\
        --val-dataset my_val --register my_project.datasets --weights my_backbone.pkl --iters 5000

``--register MODULE`` is imported first in this process and in every training process
(``python -c "import MODULE; <run tools/train_net.py>"``), so datasets your code registers
are seen by the tools.
"""
import argparse
import json
import math
import os
import shlex
import sys
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
PRETRAIN_CONFIG = os.path.join(REPO, "configs", "quickstart", "pretrain_r18_gradaug.yaml")
DETECTION_CONFIG = os.path.join(REPO, "configs", "quickstart", "mask_rcnn_gradaug.yaml")
ARMS = ("baseline", "gradaug", "baseline_equal_time")
ARM_LABELS = {"baseline": "baseline, equal iterations", "gradaug": "GradAug",
              "baseline_equal_time": "baseline, equal training time"}


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=DETECTION_CONFIG, metavar="FILE",
                        help="GradAug detection config (GRADAUG.ENABLED True); the baseline is the same "
                             "with GRADAUG.ENABLED False (default: configs/quickstart/mask_rcnn_gradaug.yaml)")
    parser.add_argument("--dataset", default=None,
                        help="registered training dataset (default: the config's DATASETS.TRAIN)")
    parser.add_argument("--val-dataset", default=None,
                        help="registered evaluation dataset (default: the config's DATASETS.TEST)")
    parser.add_argument("--register", default=None, metavar="MODULE",
                        help="Python module that registers your datasets, imported by every process")
    parser.add_argument("--weights", default=None,
                        help="initial weights of every run; default: the config's MODEL.WEIGHTS, or for the "
                             "quickstart config a backbone pretrained once with --pretrain-config")
    parser.add_argument("--pretrain-config", default=PRETRAIN_CONFIG, metavar="FILE",
                        help="classification config pretraining that backbone (quickstart only)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="SEED of each repetition")
    parser.add_argument("--iters", type=int, default=None,
                        help="iterations of the equal-iteration arms (default: the config's SOLVER.MAX_ITER)")
    parser.add_argument("--eval-points", type=int, default=4, help="evaluations during each run (>= 1)")
    parser.add_argument("--device", default="auto", help="MODEL.DEVICE: auto (cuda if available), cpu, cuda")
    parser.add_argument("--output-dir", default="output/compare")
    parser.add_argument("--quiet", action="store_true",
                        help="keep the runs' output in <output-dir>/runs.log instead of the terminal")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                        help="config overrides for every run, as KEY VALUE pairs")
    return parser


def _check_args(args, cfg) -> None:
    """Refuses bad arguments before any run starts."""
    from detectron2.data import DatasetCatalog

    if not cfg.GRADAUG.ENABLED:
        raise SystemExit(f"--config-file {args.config_file}: GRADAUG.ENABLED is False; pass the GradAug config "
                         "(the baseline arm sets GRADAUG.ENABLED False itself)")
    if args.eval_points < 1:
        raise SystemExit(f"--eval-points must be >= 1, got {args.eval_points}")
    if args.iters is not None and args.iters < args.eval_points:
        raise SystemExit(f"--iters must be >= --eval-points ({args.eval_points}), got {args.iters}")
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"--seeds must differ, got {args.seeds}")
    if len(args.opts) % 2:
        raise SystemExit(f"--opts needs KEY VALUE pairs, got an odd count: {args.opts}")
    registered = set(DatasetCatalog.list())
    for flag, names in (("--dataset", cfg.DATASETS.TRAIN), ("--val-dataset", cfg.DATASETS.TEST)):
        if len(names) == 0:
            raise SystemExit(f"{flag}: the config names no dataset; pass {flag} NAME")
        for name in names:
            if name not in registered:
                hint = " (pass --register MODULE, the module of yours that registers it)" if not args.register else ""
                raise SystemExit(f"{flag} {name!r} is not a registered dataset{hint}")
    if args.weights and not os.path.isfile(args.weights):
        raise SystemExit(f"--weights {args.weights!r}: no such file")


def _tool_command(args, tool: str):
    """The tool to run (path), or with --register a ``python -c`` bootstrap importing it first."""
    if not args.register:
        return tool, []
    code = (f"import sys, runpy, importlib; importlib.import_module({args.register!r}); "
            f"sys.argv = [{tool!r}] + sys.argv[1:]; runpy.run_path({tool!r}, run_name='__main__')")
    return "-c", [code]


def _mean_std(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def results_table(runs, has_segm: bool) -> str:
    """Markdown table: one row per arm, mean ± std (sample std over seeds) of the final AP."""
    lines = ["| arm | seeds | iterations | training time (s) | bbox AP |" + (" segm AP |" if has_segm else ""),
             "|---|:-:|:-:|:-:|:-:|" + (":-:|" if has_segm else "")]
    for arm in ARMS:
        rs = [r for r in runs if r["arm"] == arm]
        if not rs:
            continue
        it_m, _ = _mean_std([r["iters"] for r in rs])
        t_m, t_s = _mean_std([r["seconds"] for r in rs])
        b_m, b_s = _mean_std([r["bbox_AP"] for r in rs])
        row = f"| {ARM_LABELS[arm]} | {len(rs)} | {it_m:.0f} | {t_m:.0f} ± {t_s:.0f} | {b_m:.1f} ± {b_s:.1f} |"
        if has_segm:
            s_m, s_s = _mean_std([r["segm_AP"] for r in rs])
            row += f" {s_m:.1f} ± {s_s:.1f} |"
        lines.append(row)
    return "\n".join(lines)


def plot_curves(runs, path: str, has_segm: bool) -> str:
    """AP against iterations (left) and against training time (right), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"baseline": "tab:blue", "gradaug": "tab:red", "baseline_equal_time": "tab:green"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, xkey, xlabel in ((axes[0], "iter", "iteration"), (axes[1], "time", "training time (s)")):
        for arm in ARMS:
            first = True
            for r in (r for r in runs if r["arm"] == arm):
                for task, style in (("bbox", "o-"), ("segm", "s--")):
                    curve = r["curves"].get(task) or []
                    if not curve or (task == "segm" and not has_segm):
                        continue
                    xs = [p[xkey] for p in curve]
                    ys = [p["AP"] for p in curve]
                    label = f"{ARM_LABELS[arm]} ({task})" if first or task == "segm" else None
                    ax.plot(xs, ys, style, color=colors[arm], alpha=0.7, markersize=3, linewidth=1,
                            label=label if r["seed"] == runs[0]["seed"] else None)
                first = False
        ax.set_xlabel(xlabel)
        ax.set_ylabel("COCO AP (width 1.0)")
        ax.grid(alpha=0.3)
    axes[0].set_title("AP vs iterations (bbox solid, segm dashed; one line per seed)")
    axes[1].set_title("AP vs training time (evaluation excluded)")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(args) -> dict:
    start = time.perf_counter()
    if args.register:
        import importlib

        try:
            importlib.import_module(args.register)
        except ImportError as e:
            raise SystemExit(f"--register {args.register!r}: cannot import it ({e})")
    import gradaug_det  # noqa: F401  (registers the quickstart datasets)
    from detectron2.data import DatasetCatalog
    from gradaug_det.launch.pipeline import (
        auto_device,
        pretrain_and_convert,
        read_eval_curve,
        read_final_results,
        read_training_speed,
        run_tool,
        schedule_opts,
    )
    from gradaug_det.config import merge_user_config
    from gradaug_det.engine.setup import get_gradaug_cfg

    data_opts = []
    if args.dataset:
        data_opts += ["DATASETS.TRAIN", repr((args.dataset,))]
    if args.val_dataset:
        data_opts += ["DATASETS.TEST", repr((args.val_dataset,))]
    cfg = merge_user_config(get_gradaug_cfg(), args.config_file, [*data_opts, *args.opts])
    _check_args(args, cfg)
    device = auto_device(args.device)
    iters = args.iters or cfg.SOLVER.MAX_ITER
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "runs.log")
    tool, prefix = _tool_command(args, os.path.join(TOOLS, "train_net.py"))
    for name in {*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST}:  # generated data: now, with progress bars
        DatasetCatalog.get(name)
    common = ["MODEL.DEVICE", device, "TEST.SLIM_WIDTHS", "[]", *data_opts]

    init_opts = []
    quickstart = (os.path.abspath(args.config_file) == DETECTION_CONFIG and not args.dataset)
    if args.weights:
        init_opts = ["MODEL.WEIGHTS", args.weights]
    elif quickstart:
        pre_dir = os.path.join(out, "pretrain")
        emitted = os.path.join(pre_dir, "backbone_d2.yaml")
        if os.path.isfile(emitted) and os.path.isfile(os.path.join(pre_dir, "backbone_d2.pkl")):
            from gradaug_det.launch.pipeline import flatten_config_opts

            print(f"Reusing the pretrained backbone in {pre_dir}")
            init_opts = flatten_config_opts(emitted)
        else:
            init_opts = pretrain_and_convert(TOOLS, args.pretrain_config, pre_dir, ["MODEL.DEVICE", device],
                                             log, quiet=args.quiet)["opts"]

    runs = []

    def train(arm, seed, n):
        run_dir = os.path.join(out, f"{arm}_seed{seed}")
        arm_opts = ["GRADAUG.ENABLED", "False"] if arm.startswith("baseline") else []
        run_tool(tool, [*prefix, "--config-file", args.config_file, *init_opts, *common, *arm_opts,
                        *schedule_opts(cfg, n, args.eval_points), "SEED", str(seed), "OUTPUT_DIR", run_dir,
                        *args.opts], f"{arm} seed {seed}", log, quiet=args.quiet)
        done, seconds = read_training_speed(run_dir)
        final = read_final_results(run_dir)
        per_iter = seconds / max(done, 1)
        curves = {task: [{"iter": i, "time": i * per_iter, "AP": ap}
                         for i, ap in read_eval_curve(run_dir, f"{task}/AP")] for task in ("bbox", "segm")}
        run = {"arm": arm, "seed": seed, "iters": n, "seconds": n * per_iter, "dir": run_dir,
               "bbox_AP": final.get("bbox", {}).get("AP"), "segm_AP": final.get("segm", {}).get("AP"),
               "curves": curves}
        runs.append(run)
        print(f"[{arm} seed {seed}] {n} iterations, {run['seconds']:.0f} s training: bbox AP "
              f"{run['bbox_AP']}, segm AP {run['segm_AP']}", flush=True)
        return run

    for seed in args.seeds:
        base = train("baseline", seed, iters)
        grad = train("gradaug", seed, iters)
        equal = max(args.eval_points, int(round(iters * grad["seconds"] / max(base["seconds"], 1e-9))))
        train("baseline_equal_time", seed, equal)

    has_segm = any(r["segm_AP"] is not None for r in runs)
    table = results_table(runs, has_segm)
    png = plot_curves(runs, os.path.join(out, "ap_curves.png"), has_segm)
    md = os.path.join(out, "results.md")
    with open(md, "w") as f:
        f.write(f"{shlex.join([sys.executable, *sys.argv])}\n\nCOCO AP at width 1.0 on "
                f"{cfg.DATASETS.TEST[0]}, mean ± std over seeds {args.seeds}, device {device}:\n\n{table}\n")
    js = os.path.join(out, "results.json")
    with open(js, "w") as f:
        json.dump({"config": args.config_file, "device": device, "seeds": args.seeds, "runs": runs}, f, indent=1)
    print("\n" + table)
    print(f"\nDone in {time.perf_counter() - start:.0f} s. Outputs:")
    for label, path in (("table", md), ("all numbers", js), ("AP curves", png), ("runs' commands", log)):
        print(f"  {label + ':':<16} {path}")
    return {"runs": runs, "table": table, "png": png}


if __name__ == "__main__":
    from gradaug_det.utils.cli import run_tool

    run_tool(main, get_parser().parse_args())  # a mistake: one "error: ..." line, exit status 2
