#!/usr/bin/env python
"""Benchmark the slimmable backbone against stock detectron2 and against its FLOP count.

Times one training step (forward + backward) of

* stock detectron2's backbone (``build_resnet_backbone`` / ``build_resnet_fpn_backbone``),
* the slimmable backbone with the *same weights* at width 1.0 (goal: within 3% of stock),
* the slimmable backbone at each ``--widths`` entry, with ``CHANNEL_DIVISOR`` 1 (the GradAug
  reference rule) and with ``--divisor`` (aligned channel counts),

and compares each sub-width's time ratio (time / time at width 1.0) with its training-FLOP
ratio (forward + backward FLOPs of the timed step, ``gradaug_det.benchmark.cost``; goal for
aligned widths: time ratio within 10% of the FLOP ratio). Every configuration is timed in
turn within each round, so that drifts of a busy machine hit all of them alike; the median
over ``--iters`` rounds is reported. The work is done by ``gradaug_det.benchmark.backbone``
(shared with ``tools/gpu_check.py``).

Example::

    python tools/benchmark_backbone.py --depth 50 --size 224 --batch 2 --iters 10 \\
        --divisor 8 --widths 0.9 0.75 0.5 --device cpu --plot bench.png
"""
import argparse
import warnings

import torch

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)

from gradaug_det.benchmark.backbone import (  # noqa: E402
    BackboneBench,
    backbone_markdown,
    check_backbone_bench,
    run_backbone_benchmark,
    width_one_overhead,
)


def parse_args(argv=None):
    """Command-line arguments (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=50, choices=[18, 34, 50, 101, 152], help="MODEL.RESNETS.DEPTH")
    p.add_argument("--backbone", choices=["resnet", "fpn"], default="fpn",
                   help="bare ResNet (res2-res5) or ResNet-FPN, as Mask R-CNN uses (default)")
    p.add_argument("--norm", default="FrozenBN", help="MODEL.RESNETS.NORM (FrozenBN, BN, GN, ...)")
    p.add_argument("--freeze-at", type=int, default=2, help="MODEL.BACKBONE.FREEZE_AT (detectron2 default 2)")
    p.add_argument("--size", type=int, default=224, help="square input size in pixels")
    p.add_argument("--batch", type=int, default=2, help="images per step")
    p.add_argument("--iters", type=int, default=10, help="timed rounds (median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration first")
    p.add_argument("--divisor", type=int, default=None,
                   help="aligned MODEL.SLIMMABLE.CHANNEL_DIVISOR (default: the device's, "
                        "gradaug_det.slim.preferred_channel_divisor: 8 on a GPU, 16 on an AVX-512 CPU, else 8)")
    p.add_argument("--widths", type=float, nargs="+", default=[0.9, 0.75, 0.5], help="sub-network widths")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-cudnn-benchmark", action="store_true", help="leave cudnn.benchmark off on GPU")
    p.add_argument("--plot", default="", help="write a bar plot (PNG) of time and FLOP ratios here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:  # the library's one check of the settings, before anything is built
        check_backbone_bench(bench_settings(args))
    except ValueError as e:
        p.error(f"--{e}")
    return args


def bench_settings(args) -> BackboneBench:
    """The :class:`BackboneBench` of the parsed arguments."""
    return BackboneBench(depth=args.depth, backbone=args.backbone, norm=args.norm, freeze_at=args.freeze_at,
                         size=args.size, batch=args.batch, iters=args.iters, warmup=args.warmup,
                         divisor=args.divisor, widths=list(args.widths), device=args.device,
                         cudnn_benchmark=not args.no_cudnn_benchmark, seed=args.seed)


def plot(rows, args, path):
    """Bar plot of time ratio and FLOP ratio per sub-width configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sub = rows[2:]
    labels = [f"w={r['width']:.2f}\nd={r['divisor']}" for r in sub]
    xs = range(len(sub))
    fig, ax = plt.subplots(figsize=(1.3 * len(sub) + 2, 4))
    ax.bar([i - 0.2 for i in xs], [r["flop_ratio"] for r in sub], width=0.4, label="FLOP ratio (fwd+bwd)")
    ax.bar([i + 0.2 for i in xs], [r["time_ratio"] for r in sub], width=0.4, label="time ratio (fwd+bwd)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels)
    ax.set_ylabel("relative to width 1.0")
    ax.set_title(f"R{args.depth}{'-FPN' if args.backbone == 'fpn' else ''} {args.size}px batch {args.batch} "
                 f"({args.device}); w=1.0 vs stock: {width_one_overhead(rows):+.1f}%")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    """Entry point: the table on stdout (and ``--plot``); returns the rows."""
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    bench = bench_settings(args)
    rows = run_backbone_benchmark(bench)
    print(backbone_markdown(rows, bench))
    if args.plot:
        plot(rows, args, args.plot)
        print(f"\nplot written to {args.plot}")
    return rows


if __name__ == "__main__":
    from gradaug_det.utils.cli import run_tool

    run_tool(main)  # a mistake: one "error: ..." line, exit status 2
