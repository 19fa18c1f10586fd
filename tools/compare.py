#!/usr/bin/env python
"""Does GradAug help, at what cost: baseline vs GradAug fine-tuning, several seeds (``make compare``).

For every seed, one run of ``tools/train_net.py`` per arm (each in its own process, as a user
runs it) on the same data from the same pretrained backbone. The default arms:

* ``baseline``: ``GRADAUG.ENABLED False``, ``--iters`` iterations;
* ``gradaug``: the config as given (GradAug on), ``--iters`` iterations -- equal iterations;
* ``baseline_equal_time``: the baseline for as many iterations as GradAug's training took
  wall-clock (``iters x t_gradaug / t_baseline``, this seed's measured training times,
  evaluation excluded; the LR schedule scaled to the new length) -- equal time.

``--arms NAME=CONFIG[:KEY=VALUE,...]`` replaces the first two by any arms (the first is the
reference, "the baseline"; CONFIG empty means ``--config-file``), e.g. the reference recipe::

    --arms baseline=:GRADAUG.ENABLED=False gradaug_demo= \
           gradaug_ref=:GRADAUG.NUM_SUBNETS=3,GRADAUG.SUBNET_LOSS=soft,GRADAUG.MIN_WIDTH=0.9

(``pretrain=baseline`` in an arm's list starts it from a backbone pretrained without GradAug).
The schedule is ``--iters``, or ``--until-converged``: one probe run of the first arm at a
constant learning rate, evaluated every ``--eval-period`` iterations up to ``--max-iters``,
stopped once :func:`convergence` says so (``--patience`` evaluations in a row without an AP
gain above ``--min-delta``; checked every 5 s on the evaluations it has written); the
iteration of its best AP up to there is then every arm's and seed's schedule (written to
results.json; ``--schedule-from`` reuses it). ``--train-fraction F`` trains on a seeded
``F`` of the training images (:func:`gradaug_det.data.datasets.register_subset`). The
equal-time arm is on by default only without ``--arms`` / ``--until-converged``.

Each run is evaluated (detectron2's COCOEvaluator, width 1.0) ``--eval-points`` times (or
every ``--eval-period`` iterations) during training. Written to ``--output-dir``:
``results.md`` (mean ± std over seeds of final and best bbox / segm AP per arm, iterations,
training time, the time each arm needs to reach the first arm's best AP), ``results.json``
(every number, the schedule, the command, commit and device), ``ap_curves.png`` (AP against
iterations and against training time, every run) and each run's output directory.

A long study that stops (a killed job, the end of a session) continues with the same command
plus ``--resume``: the runs that finished are reused (each run directory's ``compare_run.json``
records its command and whether it finished), the unfinished ones start again. Without
``--resume`` a run directory left by an earlier call is refused before any work.

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
import re
import shlex
import shutil
import sys
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
PRETRAIN_CONFIG = os.path.join(REPO, "configs", "quickstart", "pretrain_r18_gradaug.yaml")
DETECTION_CONFIG = os.path.join(REPO, "configs", "quickstart", "mask_rcnn_gradaug.yaml")
DEFAULT_ARMS = ("baseline", "gradaug")
EQUAL_TIME = "baseline_equal_time"
ARMS = ("baseline", "gradaug", EQUAL_TIME)
ARM_LABELS = {"baseline": "baseline, equal iterations", "gradaug": "GradAug",
              EQUAL_TIME: "baseline, equal training time"}
#: arm options that are not config keys: where the arm's backbone comes from
PRETRAIN_CHOICES = ("gradaug", "baseline")
TASKS = ("bbox", "segm")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=DETECTION_CONFIG, metavar="FILE",
                        help="GradAug detection config (GRADAUG.ENABLED True); the baseline is the same "
                             "with GRADAUG.ENABLED False (default: configs/quickstart/mask_rcnn_gradaug.yaml)")
    parser.add_argument("--arms", nargs="+", default=None, metavar="NAME=CONFIG[:KEY=VALUE,...]",
                        help="the arms, the first the reference (baseline); CONFIG empty: --config-file; "
                             "KEY=VALUE config overrides, or pretrain=gradaug|baseline (the backbone). "
                             "Default: baseline=:GRADAUG.ENABLED=False gradaug=")
    parser.add_argument("--dataset", default=None,
                        help="registered training dataset (default: the config's DATASETS.TRAIN)")
    parser.add_argument("--val-dataset", default=None,
                        help="registered evaluation dataset (default: the config's DATASETS.TEST)")
    parser.add_argument("--train-fraction", type=float, default=None, metavar="F",
                        help="train on a seeded fraction F in (0, 1] of the training images (the same "
                             "images for every arm and seed; gradaug_det.data.datasets.register_subset)")
    parser.add_argument("--fraction-seed", type=int, default=0, help="seed choosing the --train-fraction images")
    parser.add_argument("--register", default=None, metavar="MODULE",
                        help="Python module that registers your datasets, imported by every process")
    parser.add_argument("--weights", default=None,
                        help="initial weights of every run; default: the config's MODEL.WEIGHTS, or for the "
                             "quickstart config a backbone pretrained once with --pretrain-config")
    parser.add_argument("--pretrain-config", default=PRETRAIN_CONFIG, metavar="FILE",
                        help="classification config pretraining that backbone (quickstart only)")
    parser.add_argument("--pretrain-dir", default=None, metavar="DIR",
                        help="where the pretrained backbones are made or reused (default: <output-dir>/pretrain)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="SEED of each repetition")
    parser.add_argument("--iters", type=int, default=None,
                        help="iterations of the equal-iteration arms (default: the config's SOLVER.MAX_ITER)")
    parser.add_argument("--until-converged", action="store_true",
                        help="find the schedule with one probe run of the first arm (see --eval-period, "
                             "--patience, --min-delta, --max-iters) and train every arm and seed that long")
    parser.add_argument("--schedule-from", default=None, metavar="RESULTS_JSON",
                        help="reuse the schedule (iterations, and --eval-period unless given) that an earlier "
                             "--until-converged run wrote to its results.json")
    parser.add_argument("--max-iters", type=int, default=None,
                        help="--until-converged: the probe's cap (default: 4 x the config's SOLVER.MAX_ITER)")
    parser.add_argument("--patience", type=int, default=5,
                        help="--until-converged: evaluations without a gain above --min-delta that stop the probe")
    parser.add_argument("--min-delta", type=float, default=0.5, help="--until-converged: AP points that count as a gain")
    parser.add_argument("--eval-points", type=int, default=4, help="evaluations during each run (>= 1)")
    parser.add_argument("--eval-period", type=int, default=None,
                        help="evaluate every N iterations instead (needed by --until-converged)")
    parser.add_argument("--equal-time", action=argparse.BooleanOptionalAction, default=None,
                        help="add the baseline at GradAug's training time (default: on, except with --arms "
                             "or --until-converged)")
    parser.add_argument("--device", default="auto", help="MODEL.DEVICE: auto (cuda if available), cpu, cuda")
    parser.add_argument("--output-dir", default="output/compare")
    parser.add_argument("--resume", action="store_true",
                        help="continue an earlier call with the same arguments and --output-dir: reuse its "
                             "finished runs (each run directory's compare_run.json records the run's command "
                             "and whether it finished), redo the unfinished ones")
    parser.add_argument("--quiet", action="store_true",
                        help="keep the runs' output in <output-dir>/runs.log instead of the terminal")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                        help="config overrides for every run, as KEY VALUE pairs")
    return parser


def _split_top_level(text: str, sep: str = ","):
    """Splits at ``sep`` outside brackets and parentheses ("A=[1,2],B=3" -> 2 items)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == sep and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def parse_arm(text: str, default_config: str) -> dict:
    """One ``--arms`` item, ``NAME=CONFIG[:KEY=VALUE,...]``, as a dict.

    Args:
        text: e.g. ``"gradaug_ref=:GRADAUG.NUM_SUBNETS=3,GRADAUG.SUBNET_LOSS=soft"``; CONFIG
            empty means ``default_config``; values may hold commas inside brackets
            (``MODEL.PIXEL_MEAN=[1,2,3]``); ``pretrain=gradaug|baseline`` picks the backbone.
        default_config: ``--config-file``.

    Returns:
        ``{"name", "config", "opts": [KEY, VALUE, ...], "pretrain": "gradaug" | "baseline"}``.

    Raises:
        UserError: a malformed item (naming it and the expected syntax).
    """
    from gradaug_det.utils.cli import UserError

    syntax = "expected NAME=CONFIG[:KEY=VALUE,...], e.g. gradaug_ref=:GRADAUG.NUM_SUBNETS=3"
    name, eq, rest = text.partition("=")
    if not eq or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise UserError(f"--arms {text!r}: {syntax} (NAME of letters, digits, _ . -)")
    config, _, overrides = rest.partition(":")
    arm = {"name": name, "config": config or default_config, "opts": [], "pretrain": "gradaug"}
    for item in (_split_top_level(overrides) if overrides else []):
        key, eq, value = item.partition("=")
        if not eq or not key or not value:
            raise UserError(f"--arms {text!r}: override {item!r} is not KEY=VALUE; {syntax}")
        if key == "pretrain":
            if value not in PRETRAIN_CHOICES:
                raise UserError(f"--arms {text!r}: pretrain={value!r}; allowed: {', '.join(PRETRAIN_CHOICES)}")
            arm["pretrain"] = value
        else:
            arm["opts"] += [key, value]
    return arm


def parse_arms(texts, default_config: str) -> list:
    """``--arms`` as a list of :func:`parse_arm` dicts (default: baseline and GradAug from
    ``default_config``); refuses repeated names and the reserved ``baseline_equal_time``."""
    from gradaug_det.utils.cli import UserError

    if texts is None:
        texts = ["baseline=:GRADAUG.ENABLED=False", "gradaug="]
    arms = [parse_arm(t, default_config) for t in texts]
    names = [a["name"] for a in arms]
    if len(arms) < 1 or len(set(names)) != len(names):
        raise UserError(f"--arms: the names must differ, got {names}")
    if EQUAL_TIME in names:
        raise UserError(f"--arms: {EQUAL_TIME!r} is reserved for the equal-time arm (--equal-time)")
    return arms


def convergence(curve, patience: int, min_delta: float) -> dict:
    """The schedule rule of ``--until-converged``: early stopping on a validation AP curve.

    Walking the evaluations in order, the first with an AP and every one whose AP exceeds the
    last gain's AP by more than ``min_delta`` is a gain; the run has converged at the first
    evaluation that ends ``patience`` evaluations in a row without a gain. An evaluation without
    an AP (NaN: nothing detected) before the first AP does not count; after it, it is no gain. The schedule is the iteration of the best
    AP up to there (the first one on ties).

    Args:
        curve: ``[(iteration, AP), ...]`` in increasing iterations (AP in points, 0-100).
        patience: evaluations without a gain that stop (>= 1).
        min_delta: AP points an evaluation must add to count as a gain (>= 0).

    Returns:
        ``{"converged": bool, "stop_iter": iteration where it stopped (the last one if it did
        not), "best_iter", "best_AP"}``; ``best_iter`` None for an empty or all-NaN curve.
    """
    ref = None
    since = 0
    stop = len(curve) - 1
    converged = False
    for i, (_, ap) in enumerate(curve):
        if ap is None or math.isnan(ap):
            if ref is None:  # no AP yet (a model that detects nothing): not a plateau
                continue
            ap = -math.inf
        if ref is None or ap > ref + min_delta:
            ref, since = ap, 0
        else:
            since += 1
            if since >= patience:
                stop, converged = i, True
                break
    seen = [(it, ap) for it, ap in curve[:stop + 1] if ap is not None and not math.isnan(ap)]
    if not seen:
        return {"converged": converged, "stop_iter": curve[stop][0] if curve else None,
                "best_iter": None, "best_AP": None}
    best_iter, best_ap = max(seen, key=lambda p: (p[1], -p[0]))
    return {"converged": converged, "stop_iter": curve[stop][0], "best_iter": best_iter, "best_AP": best_ap}


def _mean_std(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def _best(run, task):
    """(AP, iteration, training seconds) of a run's best evaluation of ``task``, or Nones."""
    points = [p for p in run.get("curves", {}).get(task) or [] if p["AP"] is not None and not math.isnan(p["AP"])]
    if not points:
        return None, None, None
    p = max(points, key=lambda p: (p["AP"], -p["iter"]))
    return p["AP"], p["iter"], p["time"]


def time_to_reach(runs, target: float, task: str = "bbox"):
    """Training seconds each run needs to first reach ``target`` AP (None if it never does).

    Args:
        runs: result dicts with ``curves[task] = [{"iter", "time", "AP"}, ...]``.
        target: the AP to reach (points), e.g. the baseline's mean best AP.
        task: "bbox" or "segm".

    Returns:
        ``[{"seed", "iter", "time"}, ...]``, one per run, ``iter``/``time`` None if not reached.
    """
    out = []
    for r in runs:
        hit = next((p for p in r.get("curves", {}).get(task) or []
                    if p["AP"] is not None and not math.isnan(p["AP"]) and p["AP"] >= target), None)
        out.append({"seed": r["seed"], "iter": hit["iter"] if hit else None, "time": hit["time"] if hit else None})
    return out


def summarize(runs, arm_names) -> dict:
    """Per arm: mean ± std over seeds of final and best AP, iterations, training time, and the
    time to reach the reference arm's (``arm_names[0]``) mean best AP, per task."""
    summary = {}
    ref_runs = [r for r in runs if r["arm"] == arm_names[0]]
    for arm in arm_names:
        rs = [r for r in runs if r["arm"] == arm]
        if not rs:
            continue
        s = {"seeds": [r["seed"] for r in rs], "iters": _mean_std([r["iters"] for r in rs]),
             "seconds": _mean_std([r["seconds"] for r in rs])}
        for task in TASKS:
            s[f"{task}_final"] = _mean_std([r[f"{task}_AP"] for r in rs])
            s[f"{task}_best"] = _mean_std([_best(r, task)[0] for r in rs])
            target = _mean_std([_best(r, task)[0] for r in ref_runs])[0]
            if arm != arm_names[0] and not math.isnan(target):
                reach = time_to_reach(rs, target, task)
                times = [x["time"] for x in reach if x["time"] is not None]
                s[f"{task}_reach"] = {"target_AP": target, "runs": reach, "reached": len(times),
                                      "time": _mean_std(times) if times else None}
        summary[arm] = s
    return summary


def _fmt(ms, digits=1):
    m, s = ms
    return "—" if math.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def results_table(runs, has_segm: bool, arm_names=ARMS) -> str:
    """Markdown table: one row per arm, mean ± std (sample std over seeds) of the final and the
    best AP, and for every arm but the first the training time to reach the first arm's mean
    best AP (mean over the seeds that reach it, and how many do)."""
    summary = summarize(runs, list(arm_names))
    tasks = TASKS if has_segm else TASKS[:1]
    head = "| arm | seeds | iterations | training time (s) |"
    rule = "|---|:-:|:-:|:-:|"
    for task in tasks:
        head += f" {task} AP | best {task} AP | time to {arm_names[0]}'s best {task} AP (s) |"
        rule += ":-:|:-:|:-:|"
    lines = [head, rule]
    for arm, s in summary.items():
        row = (f"| {ARM_LABELS.get(arm, arm)} | {len(s['seeds'])} | {s['iters'][0]:.0f} | "
               f"{_fmt(s['seconds'], 0)} |")
        for task in tasks:
            reach = s.get(f"{task}_reach")
            if reach is None:
                cell = "—"
            elif reach["time"] is None:
                cell = f"never (0/{len(reach['runs'])})"
            else:
                cell = f"{_fmt(reach['time'], 0)} ({reach['reached']}/{len(reach['runs'])})"
            row += f" {_fmt(s[f'{task}_final'])} | {_fmt(s[f'{task}_best'])} | {cell} |"
        lines.append(row)
    return "\n".join(lines)


def plot_curves(runs, path: str, has_segm: bool, arm_names=ARMS) -> str:
    """AP against iterations (left) and against training time (right), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    palette = ["tab:blue", "tab:red", "tab:orange", "tab:purple", "tab:brown", "tab:gray"]
    colors = {"baseline": "tab:blue", "gradaug": "tab:red", EQUAL_TIME: "tab:green"}
    for arm in arm_names:
        colors.setdefault(arm, palette[len(colors) % len(palette)])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, xkey, xlabel in ((axes[0], "iter", "iteration"), (axes[1], "time", "training time (s)")):
        for arm in arm_names:
            first = True
            for r in (r for r in runs if r["arm"] == arm):
                for task, style in (("bbox", "o-"), ("segm", "s--")):
                    curve = r["curves"].get(task) or []
                    if not curve or (task == "segm" and not has_segm):
                        continue
                    xs = [p[xkey] for p in curve]
                    ys = [p["AP"] for p in curve]
                    label = f"{ARM_LABELS.get(arm, arm)} ({task})" if first or task == "segm" else None
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


def _check_args(args, cfg, arms) -> dict:
    """Refuses bad arguments before any run starts (one UserError line); returns each arm's
    config (its file and overrides merged), by name."""
    from detectron2.data import DatasetCatalog
    from gradaug_det.config import merge_user_config
    from gradaug_det.engine.setup import get_gradaug_cfg
    from gradaug_det.utils.cli import UserError

    if args.arms is None and not cfg.GRADAUG.ENABLED:
        raise UserError(f"--config-file {args.config_file}: GRADAUG.ENABLED is False; pass the GradAug config "
                        "(the baseline arm sets GRADAUG.ENABLED False itself)")
    arm_cfgs = {arm["name"]: merge_user_config(get_gradaug_cfg(), arm["config"], [*arm["opts"], *args.opts],
                                               flag=f"--arms {arm['name']}")
                for arm in arms}  # every arm's config and overrides, now (unknown keys, bad values)
    if args.eval_points < 1:
        raise UserError(f"--eval-points must be >= 1, got {args.eval_points}")
    if args.eval_period is not None and args.eval_period < 1:
        raise UserError(f"--eval-period must be >= 1, got {args.eval_period}")
    if args.iters is not None and args.iters < args.eval_points:
        raise UserError(f"--iters must be >= --eval-points ({args.eval_points}), got {args.iters}")
    chosen = [f for f, on in (("--iters", args.iters is not None), ("--until-converged", args.until_converged),
                              ("--schedule-from", args.schedule_from is not None)) if on]
    if len(chosen) > 1:
        raise UserError(f"{' and '.join(chosen)}: pick one schedule")
    if args.until_converged:
        if args.eval_period is None:
            raise UserError("--until-converged needs --eval-period N (evaluate every N iterations)")
        if args.patience < 1 or args.min_delta < 0:
            raise UserError(f"--patience must be >= 1 and --min-delta >= 0, got {args.patience}, {args.min_delta}")
        cap = args.max_iters or 4 * cfg.SOLVER.MAX_ITER
        if cap < args.eval_period * (args.patience + 1):
            raise UserError(f"--max-iters {cap} leaves fewer than --patience + 1 ({args.patience + 1}) evaluations "
                            f"every --eval-period {args.eval_period}; raise --max-iters")
    if args.schedule_from is not None:
        _read_schedule(args.schedule_from)
    if args.train_fraction is not None and not 0 < args.train_fraction <= 1:
        raise UserError(f"--train-fraction must be in (0, 1], got {args.train_fraction}")
    if args.fraction_seed < 0:
        raise UserError(f"--fraction-seed must be >= 0, got {args.fraction_seed}")
    if args.equal_time and len(arms) < 2:
        raise UserError("--equal-time needs a second (GradAug) arm whose time the baseline gets")
    if len(set(args.seeds)) != len(args.seeds):
        raise UserError(f"--seeds must differ, got {args.seeds}")
    if len(args.opts) % 2:
        raise UserError(f"--opts needs KEY VALUE pairs, got an odd count: {args.opts}")
    registered = set(DatasetCatalog.list())
    for flag, names in (("--dataset", cfg.DATASETS.TRAIN), ("--val-dataset", cfg.DATASETS.TEST)):
        if len(names) == 0:
            raise UserError(f"{flag}: the config names no dataset; pass {flag} NAME")
        for name in names:
            if name not in registered:
                hint = " (pass --register MODULE, the module of yours that registers it)" if not args.register else ""
                raise UserError(f"{flag} {name!r} is not a registered dataset{hint}")
    if args.train_fraction is not None and len(cfg.DATASETS.TRAIN) != 1:
        raise UserError(f"--train-fraction needs one training dataset, got {list(cfg.DATASETS.TRAIN)}; "
                        "pass --dataset NAME")
    pre_baseline = [a["name"] for a in arms if a["pretrain"] == "baseline"]
    quickstart = os.path.abspath(args.config_file) == DETECTION_CONFIG and not args.dataset
    if pre_baseline and (args.weights or not quickstart):
        raise UserError(f"--arms {pre_baseline[0]}: pretrain=baseline pretrains the quickstart backbone without "
                        "GradAug; it needs the quickstart config and data and no --weights (for your own "
                        "backbones, give that arm MODEL.WEIGHTS=<file> instead)")
    if args.weights and not os.path.isfile(args.weights):
        raise UserError(f"--weights {args.weights!r}: no such file")
    return arm_cfgs


def _read_schedule(path: str) -> dict:
    """The ``schedule`` an earlier ``--until-converged`` run wrote to its results.json."""
    from gradaug_det.utils.cli import UserError

    try:
        with open(path) as f:
            schedule = json.load(f).get("schedule") or {}
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"--schedule-from {path!r}: cannot read a results.json ({e})")
    if schedule.get("rule") != "until-converged" or not schedule.get("iters"):
        raise UserError(f"--schedule-from {path!r}: it holds no --until-converged schedule; "
                        "pass the results.json of a tools/compare.py --until-converged run")
    return schedule


RUN_RECORD = "compare_run.json"


def _read_run_record(run_dir: str):
    """The record :func:`main` keeps in a run directory (``{"args": [...], "finished": bool}``),
    or None when there is none."""
    try:
        with open(os.path.join(run_dir, RUN_RECORD)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _check_run_dirs(run_dirs, resume: bool) -> None:
    """Refuses, before any run, run directories an earlier call left behind (their
    metrics.json would mix two runs' evaluations) unless ``--resume`` continues that call."""
    from gradaug_det.utils.cli import UserError

    for run_dir in run_dirs:
        if not os.path.isdir(run_dir) or not os.listdir(run_dir):
            continue
        if not resume:
            raise UserError(f"{run_dir} already holds a run of an earlier call: add --resume to reuse the "
                            "finished runs of the same command (and redo the unfinished ones), or choose "
                            "another --output-dir")
        if _read_run_record(run_dir) is None:
            raise UserError(f"--resume: {run_dir} holds files but no {RUN_RECORD} (not a tools/compare.py "
                            "run): move it away or choose another --output-dir")


def _tool_command(args, tool: str, subset=None):
    """The tool to run (path), or a ``python -c`` bootstrap that first imports ``--register`` and
    registers the ``--train-fraction`` subset ``subset = (source, fraction, seed)``."""
    if not args.register and subset is None:
        return tool, []
    code = "import sys, runpy, importlib; "
    if args.register:
        code += f"importlib.import_module({args.register!r}); "
    if subset is not None:
        code += f"from gradaug_det.data.datasets import register_subset; register_subset{tuple(subset)!r}; "
    code += f"sys.argv = [{tool!r}] + sys.argv[1:]; runpy.run_path({tool!r}, run_name='__main__')"
    return "-c", [code]


def _commit() -> str:
    """The repository's commit (with "+dirty" for uncommitted changes), or "unknown"."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("+dirty" if dirty else "")) if head else "unknown"


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
    from gradaug_det.benchmark.report import device_name, write_json, write_text
    from gradaug_det.config import merge_user_config
    from gradaug_det.data.datasets import register_subset
    from gradaug_det.engine.setup import get_gradaug_cfg
    from gradaug_det.utils.cli import UserError

    arms = parse_arms(args.arms, args.config_file)
    data_opts = []
    if args.dataset:
        data_opts += ["DATASETS.TRAIN", repr((args.dataset,))]
    if args.val_dataset:
        data_opts += ["DATASETS.TEST", repr((args.val_dataset,))]
    cfg = merge_user_config(get_gradaug_cfg(), args.config_file, [*data_opts, *args.opts])
    arm_cfgs = _check_args(args, cfg, arms)
    equal_time = args.equal_time if args.equal_time is not None else (args.arms is None and not args.until_converged)
    subset = None
    train_names = list(cfg.DATASETS.TRAIN)
    if args.train_fraction is not None:  # the same seeded subset in this process and every run's
        subset = (cfg.DATASETS.TRAIN[0], args.train_fraction, args.fraction_seed)
        train_names = [register_subset(*subset)]
        if args.dataset:
            del data_opts[:2]
        data_opts = ["DATASETS.TRAIN", repr(tuple(train_names)), *data_opts]
    device = auto_device(args.device)
    out = os.path.abspath(args.output_dir)
    planned = [os.path.join(out, f"{a['name']}_seed{s}") for s in args.seeds for a in arms]
    planned += [os.path.join(out, "probe")] if args.until_converged else []
    planned += [os.path.join(out, f"{EQUAL_TIME}_seed{s}") for s in args.seeds] if equal_time else []
    _check_run_dirs(planned, args.resume)
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "runs.log")
    tool, prefix = _tool_command(args, os.path.join(TOOLS, "train_net.py"), subset)
    for name in {*train_names, *cfg.DATASETS.TEST}:  # generated data: now, with progress bars
        DatasetCatalog.get(name)
    common = ["MODEL.DEVICE", device, "TEST.SLIM_WIDTHS", "[]", *data_opts]

    quickstart = (os.path.abspath(args.config_file) == DETECTION_CONFIG and not args.dataset)
    pre_root = os.path.abspath(args.pretrain_dir or os.path.join(out, "pretrain"))
    backbones = {}

    def init_opts(pretrain: str):
        """MODEL.WEIGHTS (and what goes with it) of an arm's backbone, pretrained once."""
        if args.weights:
            return ["MODEL.WEIGHTS", args.weights]
        if not quickstart:
            return []
        if pretrain not in backbones:
            pre_dir = pre_root if pretrain == "gradaug" else f"{pre_root}_baseline"
            emitted = os.path.join(pre_dir, "backbone_d2.yaml")
            if os.path.isfile(emitted) and os.path.isfile(os.path.join(pre_dir, "backbone_d2.pkl")):
                from gradaug_det.launch.pipeline import flatten_config_opts

                print(f"Reusing the pretrained backbone in {pre_dir}")
                backbones[pretrain] = flatten_config_opts(emitted)
            else:
                extra = ["GRADAUG.ENABLED", "False"] if pretrain == "baseline" else []
                backbones[pretrain] = pretrain_and_convert(TOOLS, args.pretrain_config, pre_dir,
                                                           ["MODEL.DEVICE", device, *extra], log,
                                                           quiet=args.quiet)["opts"]
        return backbones[pretrain]

    def eval_opts(n):
        if args.eval_period is not None:
            return ["TEST.EVAL_PERIOD", str(args.eval_period)]
        return ["TEST.EVAL_PERIOD", str(max(1, n // args.eval_points))]

    def train(arm, seed, n, name=None, run_dir=None, constant_lr=False, stop_when=None):
        name = name or arm["name"]
        run_dir = run_dir or os.path.join(out, f"{name}_seed{seed}")
        lr = ["SOLVER.STEPS", "()"] if constant_lr else []
        argv = [*prefix, "--config-file", arm["config"], *init_opts(arm["pretrain"]), *common, *arm["opts"],
                *schedule_opts(arm_cfgs[arm["name"]], n), *eval_opts(n), *lr, "SEED", str(seed),
                "OUTPUT_DIR", run_dir, *args.opts]
        record = _read_run_record(run_dir) if args.resume else None
        if record is not None and record.get("args") != argv:
            raise UserError(f"--resume: {run_dir} was made by another command ({shlex.join(record.get('args') or [])}"
                            f"), not this call's: move it away or choose another --output-dir")
        if record is not None and record.get("finished"):
            print(f"[{name} seed {seed}] reusing the finished run in {run_dir} (--resume)", flush=True)
        else:
            if os.path.isdir(run_dir) and os.listdir(run_dir):  # an unfinished run of this call: redo it
                shutil.rmtree(run_dir + ".unfinished", ignore_errors=True)
                os.replace(run_dir, run_dir + ".unfinished")
                print(f"[{name} seed {seed}] redoing an unfinished run (its files: {run_dir}.unfinished)", flush=True)
            write_json(os.path.join(run_dir, RUN_RECORD), {"args": argv, "finished": False})
            run_tool(tool, argv, f"{name} seed {seed}", log, quiet=args.quiet, stop_when=stop_when)
            write_json(os.path.join(run_dir, RUN_RECORD), {"args": argv, "finished": True})
        try:
            done, seconds = read_training_speed(run_dir)
            per_iter = seconds / max(done, 1)
        except SystemExit:
            if stop_when is None:
                raise
            per_iter = float("nan")  # the probe, stopped early: no training speed logged
        final = read_final_results(run_dir)
        curves = {task: [{"iter": i, "time": i * per_iter, "AP": ap}
                         for i, ap in read_eval_curve(run_dir, f"{task}/AP")] for task in TASKS}
        run = {"arm": name, "seed": seed, "iters": n, "seconds": n * per_iter, "dir": run_dir,
               "bbox_AP": final.get("bbox", {}).get("AP"), "segm_AP": final.get("segm", {}).get("AP"),
               "curves": curves}
        print(f"[{name} seed {seed}] {n} iterations, {run['seconds']:.0f} s training: bbox AP "
              f"{run['bbox_AP']}, segm AP {run['segm_AP']}", flush=True)
        return run

    # the schedule, fixed before any arm runs
    if args.until_converged:
        cap = args.max_iters or 4 * cfg.SOLVER.MAX_ITER
        probe_dir = os.path.join(out, "probe")
        evals = sorted({*range(args.eval_period, cap + 1, args.eval_period), cap})

        def probe_curve():
            """The probe's evaluations so far, NaN where detectron2 logged no bbox AP (a model
            that detects nothing). While it runs, the evaluation after i iterations is logged
            under i - 1: each logged iteration is mapped to the nearest evaluation point."""
            logged = {min(evals, key=lambda e: abs(e - it)): ap for it, ap in read_eval_curve(probe_dir, "bbox/AP")}
            last = max(logged, default=0)
            return [(e, logged.get(e, float("nan"))) for e in evals if e <= last]

        def converged():
            return convergence(probe_curve(), args.patience, args.min_delta)["converged"]

        probe = train(arms[0], args.seeds[0], cap, name=f"probe_{arms[0]['name']}", run_dir=probe_dir,
                      constant_lr=True, stop_when=converged)
        per_iter = probe["seconds"] / cap  # NaN when stopped early
        curve = [{"iter": i, "time": i * per_iter, "AP": ap} for i, ap in probe_curve()]
        rule = convergence([(p["iter"], p["AP"]) for p in curve], args.patience, args.min_delta)
        if rule["best_iter"] is None:
            raise SystemExit(f"--until-converged: the probe run ({probe['dir']}) has no bbox AP to converge on")
        schedule = {"rule": "until-converged", "iters": rule["best_iter"], "eval_period": args.eval_period,
                    "patience": args.patience, "min_delta": args.min_delta, "max_iters": cap,
                    "probe": {"arm": arms[0]["name"], "seed": args.seeds[0], "dir": probe["dir"],
                              "constant_lr": True, **rule, "curve": curve}}
        print(f"[probe] converged={rule['converged']} (stopped at {rule['stop_iter']}); best bbox AP "
              f"{rule['best_AP']:.1f} at iteration {rule['best_iter']}: every arm trains {rule['best_iter']} "
              "iterations", flush=True)
    elif args.schedule_from:
        schedule = dict(_read_schedule(args.schedule_from), source=os.path.abspath(args.schedule_from))
        if args.eval_period is None:  # evaluated as often as the study it continues
            args.eval_period = schedule["eval_period"]
    else:
        schedule = {"rule": "fixed", "iters": args.iters or cfg.SOLVER.MAX_ITER}
    iters = schedule["iters"]

    runs = []
    for seed in args.seeds:
        seed_runs = [train(arm, seed, iters) for arm in arms]
        runs += seed_runs
        if equal_time:
            base, grad = seed_runs[0], seed_runs[1]
            equal = max(args.eval_points, int(round(iters * grad["seconds"] / max(base["seconds"], 1e-9))))
            runs.append(train(arms[0], seed, equal, name=EQUAL_TIME))

    arm_names = [a["name"] for a in arms] + ([EQUAL_TIME] if equal_time else [])
    has_segm = any(r["segm_AP"] is not None for r in runs)
    table = results_table(runs, has_segm, arm_names)
    png = plot_curves(runs, os.path.join(out, "ap_curves.png"), has_segm, arm_names)
    command = shlex.join([sys.executable, *sys.argv])
    commit = _commit()
    train_desc = (f"{train_names[0]} ({args.train_fraction:g} of {subset[0]}, seed {args.fraction_seed})"
                  if subset else ", ".join(train_names))
    machine = device_name(device)
    md = os.path.join(out, "results.md")
    write_text(md, f"{command}\n\ncommit {commit}, device {device}: {machine}. Trained on {train_desc}, "
               f"{iters} iterations ({schedule['rule']} schedule). COCO AP at width 1.0 on "
               f"{cfg.DATASETS.TEST[0]}, mean ± std over seeds {args.seeds}; best = the best evaluation "
               f"of a run; time to reach = training seconds until a run first reaches the mean best AP "
               f"of {arm_names[0]}:\n\n{table}\n")
    js = os.path.join(out, "results.json")
    write_json(js, {"command": command, "commit": commit, "config": args.config_file, "device": device,
                    "machine": machine, "seeds": args.seeds, "arms": arms, "equal_time": equal_time,
                    "train_dataset": train_names,
                    "train_fraction": args.train_fraction, "fraction_seed": args.fraction_seed,
                    "schedule": schedule, "summary": summarize(runs, arm_names), "runs": runs})
    print("\n" + table)
    print(f"\nDone in {time.perf_counter() - start:.0f} s. Outputs:")
    for label, path in (("table", md), ("all numbers", js), ("AP curves", png), ("runs' commands", log)):
        print(f"  {label + ':':<16} {path}")
    return {"runs": runs, "table": table, "png": png}


if __name__ == "__main__":
    from gradaug_det.utils.cli import run_tool

    run_tool(main, get_parser().parse_args())  # a mistake: one "error: ..." line, exit status 2
