"""Running the command-line tools as a pipeline and reading back what they wrote.

``tools/quickstart.py`` (``make demo``), ``tools/mmdet_quickstart.py`` (``make demo-mmdet``)
and ``tools/compare.py`` (``make compare``) chain the documented tools -- ``train_net.py``,
``convert_pretrained.py``, ``prune.py``, ``demo.py``, ``plot_metrics.py``, ``mmdet_train.py``,
``mmdet_test.py`` -- each in its own process, exactly as a user would type them, and read
the results from the files those tools write (detectron2's ``log.txt`` and
``metrics.json``). This module holds the few helpers they need; nothing here trains.
"""
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import yaml

__all__ = [
    "auto_device",
    "run_tool",
    "parse_copypaste",
    "read_final_results",
    "read_eval_curve",
    "read_training_speed",
    "flatten_config_opts",
    "pretrain_and_convert",
    "schedule_opts",
    "mmdet_schedule_options",
]

# detectron2's print_csv_format: "copypaste: Task: bbox", "copypaste: AP,AP50,...",
# "copypaste: 50.1,60.2,..." (detectron2/evaluation/testing.py).
_COPYPASTE_RE = re.compile(r"copypaste: (.*)$")
# detectron2's IterationTimer.after_train: "Overall training speed: 98 iterations in
# 0:01:02 (0.6327 s / it)" -- hooks (evaluation, checkpointing) excluded.
_SPEED_RE = re.compile(r"Overall training speed: (\d+) iterations in (\S+) \(([0-9.]+) s / it\)")


def auto_device(requested: str = "auto") -> str:
    """Returns the ``MODEL.DEVICE`` to use.

    Args:
        requested: ``"auto"`` (``"cuda"`` when ``torch.cuda.is_available()``, else ``"cpu"``)
            or an explicit device string, returned unchanged (``"cpu"``, ``"cuda"``, ``"cuda:1"``).

    Raises:
        SystemExit: if a CUDA device is requested but torch sees none.
    """
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {requested}: torch sees no CUDA device (torch {torch.__version__}); "
                         "use --device cpu or auto")
    return requested


def run_tool(tool: str, args: Sequence[str], stage: str, log_file: Optional[str] = None,
             env: Optional[Dict[str, str]] = None, quiet: bool = False,
             output_file: Optional[str] = None, stop_when: Optional[Callable[[], bool]] = None,
             poll_s: float = 5.0) -> float:
    """Runs ``python <tool> <args>`` in a child process, as a user would, and waits for it.

    The child's output goes to the terminal (detectron2's progress and ETA lines), or with
    ``quiet`` only to ``output_file`` (default ``log_file``); the command line is printed
    first and appended to ``log_file`` (the pipeline's record of what ran).

    Args:
        tool: path of the tool script.
        args: its arguments.
        stage: a short name of the stage, for messages.
        log_file: file the command (and with ``quiet`` the output) is appended to.
        env: environment of the child (default: this process's).
        quiet: do not show the child's output, only keep it in ``output_file``.
        output_file: where a quiet child's output is appended (default ``log_file``).
        stop_when: called every ``poll_s`` seconds while the tool runs; when it returns True the
            tool is terminated (SIGTERM, then SIGKILL after 60 s) and that is not an error
            (e.g. early stopping on the evaluations a training run has written so far).
        poll_s: seconds between ``stop_when`` calls.

    Returns:
        The wall-clock seconds the tool took.

    Raises:
        SystemExit: if the tool exits with an error (naming the stage and the command).
    """
    cmd = [sys.executable, tool, *[str(a) for a in args]]
    line = " ".join(shlex.quote(c) for c in cmd)
    print(f"\n[{stage}] {line}", flush=True)
    out = None
    if log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        with open(log_file, "a") as f:
            f.write(f"[{stage}] {line}\n")
    output_file = output_file or log_file
    if quiet and output_file:
        os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
        out = open(output_file, "a")
    start = time.perf_counter()
    stopped = False
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None)
        try:
            while True:
                try:
                    proc.wait(timeout=poll_s if stop_when is not None else None)
                    break
                except subprocess.TimeoutExpired:
                    if stop_when():
                        stopped = True
                        proc.terminate()
                        try:
                            proc.wait(timeout=60)
                        except subprocess.TimeoutExpired:
                            proc.kill()
                            proc.wait()
                        break
        except BaseException:  # Ctrl-C or an error in stop_when: do not leave the child running
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise
    finally:
        if out is not None:
            out.close()
    seconds = time.perf_counter() - start
    if stopped:
        print(f"[{stage}] stopped after {seconds:.0f} s (its stop condition was met)", flush=True)
        if log_file:
            with open(log_file, "a") as f:
                f.write(f"[{stage}] stopped after {seconds:.0f} s (its stop condition was met)\n")
    elif proc.returncode != 0:
        where = f" (its output is in {output_file})" if out is not None else ""
        raise SystemExit(f"[{stage}] failed with exit code {proc.returncode}{where}:\n  {line}")
    return seconds


def parse_copypaste(text: str) -> "OrderedDict[str, Dict[str, float]]":
    """Reads the results detectron2's ``print_csv_format`` logged, the last of each task.

    Args:
        text: log text holding ``copypaste: Task: <task>`` / ``copypaste: <names>`` /
            ``copypaste: <values>`` triples (``<task>`` as ``"bbox"`` or ``"bbox@w0.75"``).

    Returns:
        ``task -> {metric -> value}`` (AP in percent, as detectron2 prints it); a task
        printed several times keeps its last values.
    """
    lines = [m.group(1).strip() for m in map(_COPYPASTE_RE.search, text.splitlines()) if m]
    results: "OrderedDict[str, Dict[str, float]]" = OrderedDict()
    i = 0
    while i < len(lines):
        if lines[i].startswith("Task: ") and i + 2 < len(lines):
            task = lines[i][len("Task: "):]
            names, values = lines[i + 1].split(","), lines[i + 2].split(",")
            try:
                results[task] = {n: float(v) for n, v in zip(names, values)}
                results.move_to_end(task)
            except ValueError:  # not a results triple
                pass
            i += 3
        else:
            i += 1
    return results


# Evaluation scalars in metrics.json: "<task>/<metric>" or "<task>@w<width>/<metric>"
# (gradaug_det.evaluation.widths), task one of detectron2's evaluators' names, "+bncal"
# after it for results with calibrated BN statistics (TEST.BN_CALIBRATION_BATCHES).
_EVAL_KEY_RE = re.compile(
    r"^(?P<task>(?:bbox|segm|keypoints|classification|sem_seg|panoptic_seg)(?:\+bncal)?(?:@w[0-9.]+)?)"
    r"/(?P<metric>[^/]+)$")


def _read_metrics_rows(output_dir: str) -> List[dict]:
    path = os.path.join(output_dir, "metrics.json")
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
    return rows


def read_final_results(output_dir: str) -> "OrderedDict[str, Dict[str, float]]":
    """The last evaluation results of a ``train_net.py`` run in ``output_dir``.

    A training run's evaluations are read from ``metrics.json`` (the EvalHook's scalars,
    ``bbox/AP``, ``bbox@w0.75/AP``, ``classification/top1``, ...), an ``--eval-only`` run's
    from the ``copypaste:`` lines of ``log.txt`` (it writes no metrics.json).

    Returns:
        ``task -> {metric -> value}`` of the last evaluation, tasks as in
        :func:`parse_copypaste`.

    Raises:
        SystemExit: if neither file holds results.
    """
    results: "OrderedDict[str, Dict[str, float]]" = OrderedDict()
    for row in reversed(_read_metrics_rows(output_dir)):
        for key, value in row.items():
            m = _EVAL_KEY_RE.match(key)
            if m:
                results.setdefault(m.group("task"), {})[m.group("metric")] = float(value)
        if results:
            return results
    path = os.path.join(output_dir, "log.txt")
    if os.path.isfile(path):
        with open(path) as f:
            results = parse_copypaste(f.read())
    if not results:
        raise SystemExit(f"no evaluation results in {output_dir} (metrics.json, or the 'copypaste:' "
                         "lines of log.txt): did the run finish?")
    return results


def read_eval_curve(output_dir: str, key: str = "bbox/AP") -> List[Tuple[int, float]]:
    """``(iterations done, value)`` of every evaluation of ``key`` in ``<output_dir>/metrics.json``.

    detectron2 logs a periodic evaluation after the ``i``-th iteration (0-based) under
    ``iteration = i`` and the final one (after training) under ``iteration = MAX_ITER``;
    both are returned as the number of iterations done.
    """
    rows = [r for r in _read_metrics_rows(output_dir) if "iteration" in r]
    last = max((int(r["iteration"]) for r in rows), default=0)
    curve = []
    for r in rows:
        if key in r:
            it = int(r["iteration"])
            curve.append((it if it == last else it + 1, float(r[key])))
    return curve


def read_training_speed(output_dir: str) -> Tuple[int, float]:
    """``(iterations, seconds)`` of a finished ``train_net.py`` run, hooks excluded.

    Read from detectron2's "Overall training speed" line in ``<output_dir>/log.txt``
    (``IterationTimer``: the time of the iterations alone, without evaluation and
    checkpointing, and without the first few warm-up iterations it leaves out).

    Raises:
        SystemExit: if the line is missing (the run did not finish).
    """
    path = os.path.join(output_dir, "log.txt")
    match = None
    if os.path.isfile(path):
        with open(path) as f:
            for match_ in map(_SPEED_RE.search, f):
                match = match_ or match
    if match is None:
        raise SystemExit(f"{path} has no 'Overall training speed' line: did the run finish?")
    iters, per_iter = int(match.group(1)), float(match.group(3))
    return iters, iters * per_iter


def schedule_opts(cfg, iters: Optional[int], eval_points: int = 0) -> List[str]:
    """``KEY VALUE`` overrides that shorten or lengthen a config's schedule to ``iters``.

    ``SOLVER.STEPS`` scale with ``SOLVER.MAX_ITER`` (each kept inside ``[1, iters - 1]``),
    ``SOLVER.WARMUP_ITERS`` is capped at ``iters - 1``; with ``eval_points > 0``,
    ``TEST.EVAL_PERIOD`` is set to evaluate that many times (the last at the end).

    Args:
        cfg: the config being shortened (its ``SOLVER`` is read).
        iters: the new ``SOLVER.MAX_ITER``; None keeps the config's (then only the
            evaluation period is set).
        eval_points: evaluations during the run; 0 leaves ``TEST.EVAL_PERIOD`` alone.

    Returns:
        The overrides, e.g. ``["SOLVER.MAX_ITER", "300", "SOLVER.STEPS", "(240,)", ...]``.
    """
    opts: List[str] = []
    if iters is not None:
        scale = iters / cfg.SOLVER.MAX_ITER
        steps = tuple(sorted({max(1, min(iters - 1, int(round(s * scale)))) for s in cfg.SOLVER.STEPS}))
        opts += ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", repr(steps if iters > 1 else ()),
                 "SOLVER.WARMUP_ITERS", str(min(cfg.SOLVER.WARMUP_ITERS, max(0, iters - 1)))]
    if eval_points > 0:
        n = cfg.SOLVER.MAX_ITER if iters is None else iters
        opts += ["TEST.EVAL_PERIOD", str(max(1, n // eval_points))]
    return opts


def mmdet_schedule_options(cfg, iters: Optional[int]) -> List[str]:
    """``--cfg-options`` (``key=value``) that shorten or lengthen an mmdet config's schedule to ``iters``.

    The rules of :func:`schedule_opts` in mmengine's terms, for an iteration-based config
    (``IterBasedTrainLoop``): ``train_cfg.max_iters``, ``train_cfg.val_interval`` (validated
    once, at the end) and ``default_hooks.checkpoint.interval`` become ``iters``; a
    ``MultiStepLR``'s milestones scale with it (each kept inside ``[1, iters - 1]``) and it
    ends at ``iters``; a ``LinearLR`` warm-up ends at ``iters - 1`` at the latest.

    Args:
        cfg: the mmengine ``Config`` (its ``train_cfg.max_iters`` and ``param_scheduler`` are read).
        iters: the new length; None returns no options.

    Returns:
        e.g. ``["train_cfg.max_iters=300", ..., "param_scheduler.1.milestones=[240]", ...]``.

    Raises:
        ValueError: a scheduler other than ``LinearLR`` / ``MultiStepLR`` (which this does not
            know how to scale), or no ``train_cfg.max_iters``.
    """
    if iters is None:
        return []
    old = cfg.get("train_cfg", {}).get("max_iters")
    if not old:
        raise ValueError("the config has no train_cfg.max_iters (an IterBasedTrainLoop) to rescale")
    opts = [f"train_cfg.max_iters={iters}", f"train_cfg.val_interval={iters}",
            f"default_hooks.checkpoint.interval={iters}"]
    schedulers = cfg.get("param_scheduler") or []
    for i, sched in enumerate([schedulers] if isinstance(schedulers, dict) else schedulers):
        key = "param_scheduler" if isinstance(schedulers, dict) else f"param_scheduler.{i}"
        if sched["type"] == "MultiStepLR":
            steps = sorted({max(1, min(iters - 1, int(round(m * iters / old)))) for m in sched["milestones"]})
            opts += [f"{key}.milestones=[{','.join(map(str, steps if iters > 1 else []))}]", f"{key}.end={iters}"]
        elif sched["type"] == "LinearLR":
            opts.append(f"{key}.end={min(sched['end'], max(1, iters - 1))}")
        else:
            raise ValueError(f"{key}: cannot rescale a {sched['type']} to {iters} iterations (LinearLR and "
                             "MultiStepLR only); set its keys with --cfg-options instead")
    return opts


def flatten_config_opts(yaml_file: str) -> List[str]:
    """Turns a YAML file of config overrides into ``KEY VALUE`` command-line pairs.

    Args:
        yaml_file: nested mapping, e.g. what ``tools/convert_pretrained.py --emit-config``
            writes (``MODEL: {WEIGHTS: ..., PIXEL_MEAN: [...]}``).

    Returns:
        ``["MODEL.WEIGHTS", "...", "MODEL.PIXEL_MEAN", "[123.675, ...]", ...]``; values are
        written so that yacs' ``merge_from_list`` (``literal_eval``) reads them back.
    """
    with open(yaml_file) as f:
        tree = yaml.safe_load(f) or {}
    opts: List[str] = []

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, name + ".")
            else:
                opts.extend([name, value if isinstance(value, str) else repr(value)])

    walk(tree, "")
    return opts


def pretrain_and_convert(tools_dir: str, config_file: str, output_dir: str, opts: Sequence[str] = (),
                         log_file: Optional[str] = None, env: Optional[Dict[str, str]] = None,
                         quiet: bool = False, target: str = "fpn", train: bool = True) -> Dict[str, object]:
    """Classification pretraining (``train_net.py``) and conversion (``convert_pretrained.py``).

    Runs ``train_net.py --config-file <config_file> OUTPUT_DIR <output_dir> <opts>`` (a
    ``SlimmableClassifier`` config, e.g. ``configs/quickstart/pretrain_r18_gradaug.yaml``),
    then ``convert_pretrained.py --source classifier <output_dir>/model_final.pth
    <output_dir>/backbone_d2.pkl --emit-config <output_dir>/backbone_d2.yaml`` (``target``
    "fpn"), or ``convert_pretrained.py --source classifier --target torchvision
    <output_dir>/model_final.pth <output_dir>/backbone_tv.pth`` (``target`` "torchvision": the
    torchvision-named ResNet that mmdet's ``ResNet`` / ``SlimmableResNet`` load).

    Args:
        tools_dir: the repository's ``tools/`` directory.
        config_file: the classification config.
        output_dir: the pretraining's ``OUTPUT_DIR``; the converted files go there too.
        opts: further ``KEY VALUE`` overrides of the pretraining.
        log_file, env, quiet: as :func:`run_tool`.
        target: ``"fpn"`` (detectron2) or ``"torchvision"`` (MMDetection).
        train: False reuses a finished pretraining in ``output_dir`` (its ``model_final.pth``,
            ``config.yaml`` and evaluation) and only converts it; ``config_file`` and ``opts``
            are then unused.

    Returns:
        ``{"weights": .pkl (.pth) path, "opts": the detectron2 KEY VALUE overrides that go with
        it (from the emitted YAML: MODEL.WEIGHTS, pixel mean/std, input format, ResNet layout;
        empty for "torchvision", whose conventions the converter checks instead),
        "results": the classifier's final evaluation, "seconds": pretraining wall-clock (0
        when reused)}``.

    Raises:
        ValueError: ``target`` is neither.
        SystemExit: a reused ``output_dir`` lacks ``model_final.pth`` or ``config.yaml``.
    """
    if target not in ("fpn", "torchvision"):
        raise ValueError(f"target must be 'fpn' or 'torchvision', got {target!r}")
    if train:
        seconds = run_tool(os.path.join(tools_dir, "train_net.py"),
                           ["--config-file", config_file, "OUTPUT_DIR", output_dir, *opts],
                           "pretrain", log_file, env, quiet)
    else:
        seconds = 0.0
        for name in ("model_final.pth", "config.yaml"):
            if not os.path.isfile(os.path.join(output_dir, name)):
                raise SystemExit(f"no {name} in {output_dir}: not a finished pretraining to reuse")
    results = read_final_results(output_dir)
    if target == "torchvision":
        pth = os.path.join(output_dir, "backbone_tv.pth")
        run_tool(os.path.join(tools_dir, "convert_pretrained.py"),
                 ["--source", "classifier", "--target", "torchvision", os.path.join(output_dir, "model_final.pth"),
                  pth, "--config-file", os.path.join(output_dir, "config.yaml")],
                 "convert", log_file, env, quiet)
        return {"weights": pth, "opts": [], "results": results, "seconds": seconds}
    pkl = os.path.join(output_dir, "backbone_d2.pkl")
    emitted = os.path.join(output_dir, "backbone_d2.yaml")
    run_tool(os.path.join(tools_dir, "convert_pretrained.py"),
             ["--source", "classifier", os.path.join(output_dir, "model_final.pth"), pkl,
              "--config-file", os.path.join(output_dir, "config.yaml"), "--emit-config", emitted],
             "convert", log_file, env, quiet)
    return {"weights": pkl, "opts": flatten_config_opts(emitted), "results": results, "seconds": seconds}
