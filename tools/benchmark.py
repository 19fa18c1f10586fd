#!/usr/bin/env python
"""Baseline vs GradAug iteration, priced by a cost model of what each pass runs in training.

For one detectron2 config and one batch, three modes, each in its own process (so peak
memory is its own: CUDA allocator peak, or the CPU process's peak resident set):

* ``baseline``: detectron2's step (forward, backward, optimizer step);
* ``gradaug d=1``: the GradAug iteration with ``MODEL.SLIMMABLE.CHANNEL_DIVISOR 1``;
* ``gradaug d=D``: the same sub-networks (identical widths and scales, one plan replayed
  by every mode) with channels aligned to a multiple of ``--divisor`` (by default the
  device's own alignment, :func:`gradaug_det.slim.preferred_channel_divisor`).

The cost model (``gradaug_det.benchmark.cost``): every pass's training FLOPs (its forward
and backward, exactly the modules it runs, at its width and input size, counted by
``torch.utils.flop_counter.FlopCounterMode`` over the real pass) priced at the
baseline's measured seconds per FLOP; the GradAug iteration's model is the baseline
iteration plus its sub-network passes so priced. Reported: seconds per iteration and
time / model; per pass (full, each sub-network) FLOPs, model and measured time split into
phases (transform, preprocess, backbone, heads, teacher, backward); the overhead outside
the model (transforms, padding, teacher bookkeeping, optimizer, outside the passes).
Writes a Markdown table (stdout, ``--markdown``) and JSON (``--json``).

    python tools/benchmark.py --config-file configs/quickstart/mask_rcnn_gradaug.yaml --iters 8 --warmup 3 \\
        --json bench.json --markdown bench.md
"""
import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile

import torch
from tqdm import tqdm

import gradaug_det  # noqa: F401  (registers backbones and datasets)
from gradaug_det.benchmark.iteration import (compare, measure_iterations, measure_slicing, pool_rounds,
                                             synthetic_detection_batch)
from gradaug_det.benchmark.report import device_name, markdown_table, publish, write_json
from gradaug_det.config import merge_user_config
from gradaug_det.engine.setup import get_gradaug_cfg
from gradaug_det.utils.cli import run_tool

MODES = ("baseline", "gradaug", "gradaug_aligned")
AMP = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
#: iteration time / cost model goals (aligned channels) and the memory goal, issue 13
TIME_GOAL = {"cpu": 1.10, "cuda": 1.05}
MEMORY_GOAL = 1.05
#: --no-cpu-caches: glibc returns every freed block above 64 KiB to the system at once (no
#: retained free blocks, no growing mmap threshold); oneDNN keeps no convolution primitives
NO_CPU_CACHES = {"MALLOC_MMAP_THRESHOLD_": "65536", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}


def parse_args(argv=None):
    """Command-line arguments; bad values exit with a message before any work."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default="configs/quickstart/mask_rcnn_gradaug.yaml")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=2, help="images per iteration")
    p.add_argument("--iters", type=int, default=8, help="timed iterations per mode")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the modes one after another this many times and pool each mode's timed iterations "
                        "(drifts of the machine then weigh on every mode alike)")
    p.add_argument("--divisor", type=int, default=None,
                   help="aligned channel divisor to compare (default: the device's, "
                        "gradaug_det.slim.preferred_channel_divisor: 8 on a GPU, 16 on an AVX-512 CPU, else 8)")
    p.add_argument("--amp", choices=sorted(AMP), default="fp32", help="autocast dtype of every pass")
    p.add_argument("--synthetic", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="a random batch of this size (pixels) instead of the config's first training images")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-slicing", action="store_true",
                   help="skip timing each sub-network's backbone slimmed vs pruned (the slicing column)")
    p.add_argument("--no-cpu-caches", action="store_true",
                   help="CPU memory diagnosis: run every mode with glibc's retention of freed blocks and oneDNN's "
                        f"primitive cache off ({' '.join(f'{k}={v}' for k, v in NO_CPU_CACHES.items())}), so the "
                        "peak resident set counts tensors rather than those caches (times are then not representative)")
    p.add_argument("--json", default=None, help="write every number here")
    p.add_argument("--markdown", default=None, help="also write the tables here")
    p.add_argument("--worker", choices=MODES, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args(argv)
    if args.divisor is None:
        from gradaug_det.slim import preferred_channel_divisor

        args.divisor = preferred_channel_divisor(args.device)
    for name in ("batch", "iters", "divisor", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.synthetic and min(args.synthetic) < 32:
        p.error(f"--synthetic H W must be >= 32 pixels each, got {args.synthetic}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no GPU")
    if args.no_cpu_caches and args.device != "cpu":
        p.error("--no-cpu-caches diagnoses CPU resident memory; on a GPU the allocator peak is measured")
    if args.amp == "fp16" and args.device == "cpu":
        p.error("--amp fp16 needs --device cuda (CPU autocast runs bf16)")
    if not os.path.isfile(args.config_file):
        p.error(f"--config-file {args.config_file!r} does not exist")
    return args


def make_cfg(args, divisor=1):
    """The config of one mode (GradAug settings from the file, channel divisor set)."""
    cfg = merge_user_config(get_gradaug_cfg(), args.config_file, args.opts)
    cfg.MODEL.DEVICE = args.device
    cfg.MODEL.SLIMMABLE.CHANNEL_DIVISOR = divisor
    return cfg


def load_batch(cfg, args):
    """``--batch`` mapped training images of the config's first training set, or a random batch."""
    if args.synthetic:
        num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
        return synthetic_detection_batch(args.batch, *args.synthetic, num_classes=num_classes, seed=0)
    from detectron2.data import DatasetCatalog
    from detectron2.data.dataset_mapper import DatasetMapper

    from detectron2.utils.env import seed_all_rng

    data = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[:args.batch]
    mapper = DatasetMapper(cfg, is_train=True)
    seed_all_rng(0)  # the mapper's random resize / flip (numpy's RNG): the same batch in every mode
    return [mapper(d) for d in data]


def make_plan(cfg, n):
    """The sub-networks of ``n`` iterations, drawn once (every mode replays the same)."""
    from gradaug_det.gradaug import SubnetSampler

    sampler = SubnetSampler.from_config(cfg)
    return [sampler.sample() for _ in range(n)]


def run_mode(args, mode):
    """Measure one mode in this process (``measure_iterations``'s dict)."""
    from detectron2.modeling import build_model
    from gradaug_det.gradaug import DetectionTask, GradAugOptions

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = make_cfg(args, args.divisor if mode == "gradaug_aligned" else 1)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    batch = load_batch(cfg, args)
    total = args.warmup + args.iters
    plan = None if mode == "baseline" else make_plan(cfg, total)
    task = None if mode == "baseline" else DetectionTask(model, GradAugOptions.from_yacs(cfg))
    bar = tqdm(total=args.warmup + 3 * args.iters, desc=mode, file=sys.stderr, leave=False)
    out = measure_iterations(model, batch, optimizer, plan=plan, task=task, iters=args.iters,
                             warmup=args.warmup, amp=AMP[args.amp], progress=lambda _: bar.update(1))
    bar.close()
    out["environment"] = {k: os.environ.get(k) for k in NO_CPU_CACHES}  # what this worker ran under
    if plan is not None and not args.no_slicing:
        bar = tqdm(desc=f"{mode}: slimmed vs pruned backbones", file=sys.stderr, leave=False)
        with torch.autocast(args.device, dtype=AMP[args.amp]) if args.amp != "fp32" else contextlib.nullcontext():
            out["slicing"] = measure_slicing(model, cfg, out, plan, args.warmup, progress=lambda _: bar.update(1))
        bar.close()
    return out


def report(args, results, plan):
    """The JSON document and the Markdown text of a finished comparison."""
    device = device_name(args.device)
    pooled_plan = list(plan[:args.warmup]) + list(plan[args.warmup:]) * args.rounds  # round after round
    comparisons = {m: compare(results["baseline"], results[m], pooled_plan, args.warmup) for m in MODES[1:]}
    divisor = {"baseline": "-", "gradaug": 1, "gradaug_aligned": args.divisor}
    base = results["baseline"]
    rows = [["baseline", "-", f"{base['median_s']:.3f}", "1.00", f"{base['median_s']:.3f}", "1.00",
             f"{base['peak_mb']:.0f}", "1.000"]]
    for m, c in comparisons.items():
        it = c["iteration"]
        rows.append([m, divisor[m], f"{it['median_s']:.3f}", f"{it['time_over_baseline']:.2f}",
                     f"{it['model_s']:.3f}", f"{it['time_over_model']:.2f}", f"{it['peak_mb']:.0f}",
                     f"{it['memory_ratio']:.3f}"])
    kind = base["memory_kind"]
    images = "random " + "x".join(map(str, args.synthetic)) if args.synthetic else "dataset images"
    caches = (" with " + " ".join(f"{k}={v}" for k, v in NO_CPU_CACHES.items()) + " (times not representative)"
              if args.no_cpu_caches else "")
    pooled = (f"; {args.rounds} rounds pooled, median s/iter per round: " + ", ".join(
        f"{m} " + " / ".join(f"{t:.3f}" for t in results[m]["round_median_s"]) for m in MODES)
        if args.rounds > 1 else "")
    text = [f"{args.config_file}, batch {args.batch} ({images}), "
            f"{args.amp}, {args.iters} timed iterations after {args.warmup} warm-up, {device}{caches}{pooled}",
            "", markdown_table(["mode", "divisor", "median s/iter", "time / baseline", "cost model s",
                                "time / model", f"{kind} MiB", "memory / baseline"], rows)]
    pass_memory = "peak alloc" if args.device == "cuda" else "RSS"
    for m, c in comparisons.items():
        text += ["", f"Per pass, {m} (divisor {divisor[m]}; mean over the timed iterations; model = training "
                     f"GFLOPs x baseline's {c['rate_s_per_gflop'] * 1e3:.1f} ms/GFLOP):", ""]
        prow = []
        for r in [c["baseline"]["pass"]] + c["passes"]:
            ph = r["phases_s"]
            prow.append([r["pass"], f"{r['width_mean']:.3f}", f"{r['scale_mean']:.3f}",
                         "x".join(f"{v:.0f}" for v in r["input_hw_mean"]),
                         f"{r['fwd_gflops']:.2f}", f"{r['bwd_gflops']:.2f}", f"{r['model_s'] * 1e3:.0f}",
                         f"{r['measured_s'] * 1e3:.0f}", f"{r['time_over_model']:.2f}",
                         *(f"{ph.get(p, 0.0) * 1e3:.1f}" for p in ("backbone", "heads", "backward", "transform",
                                                                    "preprocess", "teacher")),
                         f"{r['peak_mb']:.0f}"])
        text.append(markdown_table(["pass", "width", "scale", "input HxW", "fwd GFLOP", "bwd GFLOP", "model ms",
                                    "measured ms", "time / model", "backbone ms", "heads ms", "backward ms",
                                    "transform ms", "preprocess ms", "teacher ms", f"{pass_memory} MiB"], prow))
        subs = [r for r in c["passes"] if "slicing_s" in r and r["pass"] != "full"]
        if subs:
            full = results[m]["slicing"]["full"]
            text += ["", f"Sub-network backbones of {m} (backbone + FPN forward and backward timed alone on each "
                         "pass's padded input; slimmed = the model's own under its width, pruned = the same weights "
                         "in a stock network of that width; slicing = slimmed - pruned, ours; narrow kernels = "
                         "pruned - its training FLOPs at the full backbone's rate "
                         f"({full['dense_s'] * 1e3:.1f} ms for {full['dense_flops'] / 1e9:.2f} GFLOP at "
                         f"{'x'.join(map(str, full['input_hw']))}), the hardware's, paid by any network of that "
                         "width; beyond model = the pass's measured time - its cost model; ms):", ""]
            srow = [[r["pass"], f"{r['width_mean']:.3f}", f"{r['backbone_slim_s'] * 1e3:.1f}",
                     f"{r['backbone_dense_s'] * 1e3:.1f}", f"{r['slicing_s'] * 1e3:.1f}",
                     f"{100 * r['slicing_s'] / r['backbone_slim_s']:.0f}%", f"{r['narrow_s'] * 1e3:.1f}",
                     f"{(r['measured_s'] - r['model_s']) * 1e3:.1f}"] for r in subs]
            text.append(markdown_table(["pass", "width", "backbone slimmed ms", "backbone pruned ms", "slicing ms",
                                        "slicing / slimmed", "narrow kernels ms", "beyond model ms"], srow))
        ov = c["overhead_s"]
        text += ["", "Overhead per iteration outside the model's own compute (ms): " + ", ".join(
            f"{k} {v * 1e3:.1f}" for k, v in ov.items()) + f" (baseline: optimizer "
            f"{c['baseline']['optimizer_s'] * 1e3:.1f}, outside {c['baseline']['outside_s'] * 1e3:.1f})"]
    goal = TIME_GOAL["cuda" if args.device == "cuda" else "cpu"]
    aligned = comparisons["gradaug_aligned"]["iteration"]
    text += ["", f"- aligned (divisor {args.divisor}) time / cost model: {aligned['time_over_model']:.2f} "
                 f"(goal <= {goal:.2f}) -> {'met' if aligned['time_over_model'] <= goal else 'NOT met'}"]
    for m, c in comparisons.items():
        r = c["iteration"]["memory_ratio"]
        text.append(f"- {m} {kind} / baseline: {r:.3f} (goal <= {MEMORY_GOAL:.2f}) -> "
                    f"{'met' if r <= MEMORY_GOAL else 'NOT met'}")
    if args.device == "cpu" and not args.no_cpu_caches:
        text.append("- (CPU resident memory includes glibc's retained blocks and oneDNN's primitive cache; "
                    "--no-cpu-caches measures the tensors alone)")
    doc = {"config": args.config_file, "device": device, "batch": args.batch, "amp": args.amp,
           "no_cpu_caches": args.no_cpu_caches, "rounds": args.rounds,
           "iters": args.iters, "warmup": args.warmup, "divisor": args.divisor,
           "synthetic": args.synthetic, "opts": args.opts,
           "plan": [[s.describe() for s in specs] for specs in plan],
           "modes": results, "comparisons": comparisons}
    return doc, "\n".join(text)


def main(argv=None):
    """Entry point: each mode in its own process, then the comparison."""
    args = parse_args(argv)
    if args.worker:
        write_json(args.result, run_mode(args, args.worker))
        return None
    argv = list(sys.argv[1:] if argv is None else argv)
    make_cfg(args)  # a mistake in the config or its overrides: refused here, before any worker starts
    rounds = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for mode in MODES:
                path = os.path.join(tmp, f"{mode}.json")
                # slicing vs pruned backbones: measured in the first round only (flags before
                # argv: its config overrides take the rest of the line)
                cmd = ([sys.executable, os.path.abspath(__file__), "--worker", mode, "--result", path]
                       + (["--no-slicing"] if r > 0 else []) + argv)
                proc = subprocess.run(cmd, env={**os.environ, **(NO_CPU_CACHES if args.no_cpu_caches else {})})
                if proc.returncode != 0:
                    print(f"benchmark: the {mode} worker failed (exit code {proc.returncode}); see its output above",
                          file=sys.stderr)
                    sys.exit(proc.returncode)  # a worker refusing a mistake exits 2 (gradaug_det.utils.cli)
                with open(path) as f:
                    rounds[mode].append(json.load(f))
                print(f"done: {mode} (round {r + 1} of {args.rounds})", file=sys.stderr)
    results = {mode: pool_rounds(rounds[mode]) for mode in MODES}
    cfg = make_cfg(args)
    plan = make_plan(cfg, args.warmup + args.iters)
    doc, text = report(args, results, plan)
    publish(text, doc, args.json, args.markdown)
    return doc


if __name__ == "__main__":
    run_tool(main)  # a mistake: one "error: ..." line, exit status 2
