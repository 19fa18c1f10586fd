#!/usr/bin/env python
"""Benchmark the slimmable backbone against stock detectron2 and against its FLOP count.

Times one training step (forward + backward) of

* stock detectron2's backbone (``build_resnet_backbone`` / ``build_resnet_fpn_backbone``),
* the slimmable backbone with the *same weights* at width 1.0 (goal: within 3% of stock),
* the slimmable backbone at each ``--widths`` entry, with ``CHANNEL_DIVISOR`` 1 (the GradAug
  reference rule) and with ``--divisor`` (aligned channel counts),

and compares each sub-width's time ratio (time / time at width 1.0) with the forward FLOP
ratio fvcore counts for it (goal for aligned widths: time ratio within 10% of the FLOP
ratio). Every configuration is timed in turn within each round, so that drifts of a busy
machine hit all of them alike; the median over ``--iters`` rounds is reported.

Example::

    python tools/benchmark_backbone.py --depth 50 --size 224 --batch 2 --iters 10 \\
        --divisor 8 --widths 0.9 0.75 0.5 --device cpu --plot bench.png
"""
import argparse
import os
import platform
import statistics
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)

from detectron2.config import get_cfg  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone  # noqa: E402
from detectron2.modeling.backbone.resnet import build_resnet_backbone  # noqa: E402
from fvcore.nn import FlopCountAnalysis  # noqa: E402

import gradaug_det  # noqa: E402
from gradaug_det.modeling import build_slimmable_resnet_backbone, build_slimmable_resnet_fpn_backbone  # noqa: E402
from gradaug_det.slim import SlimConv2d, check_width  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm ships with the test extras
    tqdm = None


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
    p.add_argument("--divisor", type=int, default=8, help="aligned MODEL.SLIMMABLE.CHANNEL_DIVISOR")
    p.add_argument("--widths", type=float, nargs="+", default=[0.9, 0.75, 0.5], help="sub-network widths")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-cudnn-benchmark", action="store_true", help="leave cudnn.benchmark off on GPU")
    p.add_argument("--plot", default="", help="write a bar plot (PNG) of time and FLOP ratios here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for w in args.widths:
        try:
            check_width(w)
        except ValueError as e:
            p.error(f"--widths: {e}")
    if args.divisor < 1:
        p.error("--divisor must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no GPU")
    return args


def make_cfg(args, divisor=1):
    """detectron2 config of the benchmarked backbone."""
    cfg = get_cfg()
    gradaug_det.add_gradaug_config(cfg)
    r = cfg.MODEL.RESNETS
    r.DEPTH = args.depth
    r.NORM = args.norm
    r.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    if args.depth in (18, 34):
        r.RES2_OUT_CHANNELS = 64
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = args.freeze_at
    cfg.MODEL.SLIMMABLE.CHANNEL_DIVISOR = divisor
    return cfg


def build(args, device):
    """Stock backbone and slimmable ones (divisor 1 and ``--divisor``), all with one set of weights."""
    shape = ShapeSpec(channels=3)
    fpn = args.backbone == "fpn"
    torch.manual_seed(args.seed)
    stock = (build_resnet_fpn_backbone if fpn else build_resnet_backbone)(make_cfg(args), shape)
    slims = {}
    for divisor in sorted({1, args.divisor}):
        model = (build_slimmable_resnet_fpn_backbone if fpn else build_slimmable_resnet_backbone)(
            make_cfg(args, divisor), shape)
        model.load_state_dict(stock.state_dict(), strict=True)
        slims[divisor] = model.to(device).train()
    return stock.to(device).train(), slims


def channel_signature(model):
    """The (in, out) channels every slimmable convolution uses at the model's current width."""
    return tuple(m.active_channels() for m in model.modules() if isinstance(m, SlimConv2d))


def kept_channels(model, width):
    """Output channels of the stem and of each stage's last convolution at ``width``."""
    resnet = getattr(model, "bottom_up", model)
    with gradaug_det.width(model, width):
        counts = [resnet.stem.conv1.active_channels()[1]]
        for name in resnet.stage_names:
            last = getattr(resnet, name)[-1]
            conv = last.conv3 if hasattr(last, "conv3") else last.conv2
            counts.append(conv.active_channels()[1])
    return "/".join(map(str, counts))


def forward_flops(model, x, width=1.0):
    """Forward FLOPs (fvcore: one per multiply-add) of ``model`` at ``width``."""
    training = model.training
    model.eval()
    with torch.no_grad(), gradaug_det.width(model, width):
        counter = FlopCountAnalysis(model, x)
        counter.unsupported_ops_warnings(False)
        counter.uncalled_modules_warnings(False)
        total = counter.total()
    model.train(training)
    return total


def step(model, x, width, device):
    """One timed training step: forward + backward at ``width``; returns seconds."""
    for p in model.parameters():
        p.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with gradaug_det.width(model, width):  # a no-op on the stock model
        out = model(x)
    loss = sum(v.float().mean() for v in out.values())
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def run(args):
    """Build, count FLOPs, time, and return the result rows."""
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not args.no_cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    stock, slims = build(args, device)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device)

    # the configurations: (label, model, width, divisor); identical sub-networks are timed once
    configs = [("stock detectron2", stock, 1.0, "-"), ("slimmable", slims[1], 1.0, "-")]
    signatures = {}
    duplicates = {}
    for divisor in sorted(slims):
        for w in args.widths:
            model = slims[divisor]
            with gradaug_det.width(model, w):
                sig = channel_signature(model)
            if sig in signatures:
                duplicates[(divisor, w)] = signatures[sig]
                continue
            signatures[sig] = (divisor, w)
            configs.append(("slimmable", model, w, divisor))

    flops = {}
    for label, model, w, divisor in configs:
        flops[(label, w, divisor)] = forward_flops(model, x, w)

    times = {(label, w, divisor): [] for label, _, w, divisor in configs}
    total_steps = len(configs) * (args.warmup + args.iters)
    bar = tqdm(total=total_steps, desc="timing", unit="step", file=sys.stderr) if tqdm else None
    done = 0
    for _, model, w, _ in configs:
        for _ in range(args.warmup):
            step(model, x, w, device)
            done += 1
            _progress(bar, done, total_steps)
    for _ in range(args.iters):
        for label, model, w, divisor in configs:
            times[(label, w, divisor)].append(step(model, x, w, device))
            done += 1
            _progress(bar, done, total_steps)
    if bar is not None:
        bar.close()

    base = ("slimmable", 1.0, "-")
    # a ratio is the median over rounds of (this configuration / width 1.0 in the same
    # round): robust to the load of a shared machine changing between rounds
    ratios = {k: [t / b for t, b in zip(v, times[base])] for k, v in times.items()}
    base_f = flops[base]

    def row(label, w, divisor, key, channels, note=""):
        return dict(model=label, width=w, divisor=divisor, channels=channels, gflops=flops[key] / 1e9,
                    flop_ratio=flops[key] / base_f, ms=statistics.median(times[key]) * 1e3,
                    time_ratio=statistics.median(ratios[key]), spread=_spread(ratios[key]), note=note)

    rows = [row(label, w, divisor, (label, w, divisor), kept_channels(slims[1], 1.0))
            for label, _, w, divisor in configs[:2]]
    for divisor in sorted(slims):
        for w in args.widths:
            src = duplicates.get((divisor, w), (divisor, w))
            note = f"same channels as divisor {src[0]}" if src != (divisor, w) else ""
            rows.append(row("slimmable", w, divisor, ("slimmable", src[1], src[0]),
                            kept_channels(slims[divisor], w), note))
    return rows


def _spread(values):
    """Inter-quartile range relative to the median, in percent (nan below 4 values)."""
    if len(values) < 4:
        return float("nan")
    q = statistics.quantiles(values, n=4)
    med = statistics.median(values)
    return 100.0 * (q[2] - q[0]) / med if med else 0.0


def _progress(bar, done, total):
    if bar is not None:
        bar.update(1)
    elif done == total or done % 10 == 0:
        print(f"timing: {done}/{total} steps", file=sys.stderr, flush=True)


def device_name(args):
    """A human-readable description of the machine the benchmark ran on."""
    if args.device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cores = os.cpu_count()
    return f"{cores}-core CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def markdown(rows, args):
    """The result table, in markdown, with the goals checked underneath."""
    lines = [
        f"Backbone: R{args.depth}{'-FPN' if args.backbone == 'fpn' else ''}, {args.norm}, "
        f"FREEZE_AT={args.freeze_at}, input {args.batch}x3x{args.size}x{args.size}, forward+backward, "
        f"median of {args.iters} rounds after {args.warmup} warm-up steps; device: {device_name(args)}",
        "",
        "| model | width | divisor | channels (stem/res2/res3/res4/res5) | fwd GFLOPs | FLOP ratio | time (ms) | time ratio | time/FLOP ratio | ratio IQR % | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['width']:.2f} | {r['divisor']} | {r['channels']} | {r['gflops']:.2f} | "
            f"{r['flop_ratio']:.3f} | {r['ms']:.1f} | {r['time_ratio']:.3f} | "
            f"{r['time_ratio'] / r['flop_ratio']:.2f} | {r['spread']:.1f} | {r['note']} |"
        )
    overhead = width_one_overhead(rows)
    lines += ["", "time ratio: median over rounds of time / (slimmable, width 1.0) in the same round",
              f"- width 1.0 vs stock detectron2: {overhead:+.1f}% (goal: within 3%) "
              f"-> {'met' if abs(overhead) <= 3.0 else 'NOT met'}"]
    for r in rows[2:]:
        if r["divisor"] == args.divisor:
            dev = 100.0 * (r["time_ratio"] / r["flop_ratio"] - 1.0)
            lines.append(f"- width {r['width']:.2f}, divisor {args.divisor}: time ratio {r['time_ratio']:.3f} vs "
                         f"FLOP ratio {r['flop_ratio']:.3f} ({dev:+.1f}%; goal: within 10%) -> "
                         f"{'met' if abs(dev) <= 10.0 else 'NOT met'}")
    return "\n".join(lines)


def width_one_overhead(rows):
    """Per cent by which the slimmable backbone at width 1.0 is slower than stock detectron2."""
    return 100.0 * (1.0 / rows[0]["time_ratio"] - 1.0)


def plot(rows, args, path):
    """Bar plot of time ratio and FLOP ratio per sub-width configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sub = rows[2:]
    labels = [f"w={r['width']:.2f}\nd={r['divisor']}" for r in sub]
    xs = range(len(sub))
    fig, ax = plt.subplots(figsize=(1.3 * len(sub) + 2, 4))
    ax.bar([i - 0.2 for i in xs], [r["flop_ratio"] for r in sub], width=0.4, label="FLOP ratio (fvcore)")
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
    """Entry point."""
    args = parse_args(argv)
    rows = run(args)
    print(markdown(rows, args))
    if args.plot:
        plot(rows, args, args.plot)
        print(f"\nplot written to {args.plot}")
    return rows


if __name__ == "__main__":
    main()
