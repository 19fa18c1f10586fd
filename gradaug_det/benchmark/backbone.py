"""Slimmable backbone vs stock detectron2, and time vs training FLOPs at several widths.

Times one training step (forward + backward) of stock detectron2's backbone
(``build_resnet_backbone`` / ``build_resnet_fpn_backbone``), of the slimmable backbone with
the *same weights* at width 1.0, and of the slimmable backbone at each sub-width with
``CHANNEL_DIVISOR`` 1 and ``divisor``. A sub-width's time ratio (time / time at width 1.0,
the median over rounds of the ratio within a round, so a busy machine's drift hits all
configurations alike) is compared with its training-FLOP ratio: forward + backward FLOPs
counted by :mod:`.cost` on the very step that is timed. Channel counts come from the
library's one channel rule (:func:`gradaug_det.slim.channels.resnet_channel_counts`).
Used by ``tools/benchmark_backbone.py`` and ``tools/gpu_check.py``.
"""
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from .cost import count_train_flops

__all__ = ["BackboneBench", "check_backbone_bench", "backbone_cfg", "backbone_step", "run_backbone_benchmark",
           "backbone_markdown", "width_one_overhead"]


@dataclass
class BackboneBench:
    """Settings of one backbone benchmark (``tools/benchmark_backbone.py``'s arguments).

    Attributes:
        depth: ``MODEL.RESNETS.DEPTH`` (18, 34, 50, 101, 152).
        backbone: "fpn" (ResNet-FPN, as Mask R-CNN) or "resnet" (res2-res5).
        norm: ``MODEL.RESNETS.NORM``.
        freeze_at: ``MODEL.BACKBONE.FREEZE_AT``.
        size: square input size, pixels.
        batch: images per step.
        iters, warmup: timed rounds (median reported) and untimed steps per configuration.
        divisor: the aligned ``CHANNEL_DIVISOR`` compared with 1 (None: the device's,
            :func:`~gradaug_det.slim.preferred_channel_divisor`).
        widths: sub-network widths.
        device: "cpu" or "cuda".
        cudnn_benchmark: set ``torch.backends.cudnn.benchmark`` on GPU.
        seed: weights and input seed.
    """

    depth: int = 50
    backbone: str = "fpn"
    norm: str = "FrozenBN"
    freeze_at: int = 2
    size: int = 224
    batch: int = 2
    iters: int = 10
    warmup: int = 2
    divisor: Optional[int] = None
    widths: List[float] = field(default_factory=lambda: [0.9, 0.75, 0.5])
    device: str = "cpu"
    cudnn_benchmark: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.divisor is None:
            from ..slim import preferred_channel_divisor

            self.divisor = preferred_channel_divisor(self.device)


def check_backbone_bench(bench: BackboneBench) -> BackboneBench:
    """Refuse settings the benchmark cannot run, before anything is built.

    Args:
        bench: the settings.

    Returns:
        ``bench``, for chaining.

    Raises:
        ValueError: naming the setting (``widths``, ``divisor``, ``backbone``, ``device``)
            and what is allowed.
    """
    from ..slim import check_width

    for w in bench.widths:
        try:
            check_width(w)
        except ValueError as e:
            raise ValueError(f"widths: {e}") from None
    if bench.divisor < 1:
        raise ValueError(f"divisor must be >= 1, got {bench.divisor}")
    if bench.backbone not in ("fpn", "resnet"):
        raise ValueError(f"backbone must be 'fpn' or 'resnet', got {bench.backbone!r}")
    if torch.device(bench.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {bench.device!r}, but torch sees no GPU")
    return bench


def backbone_cfg(depth: int = 50, norm: str = "FrozenBN", freeze_at: int = 2, divisor: int = 1):
    """detectron2 config of a ResNet(-FPN) backbone with every gradaug-det key.

    Args:
        depth: ``MODEL.RESNETS.DEPTH``.
        norm: ``MODEL.RESNETS.NORM`` (also the FPN's norm when not FrozenBN).
        freeze_at: ``MODEL.BACKBONE.FREEZE_AT``.
        divisor: ``MODEL.SLIMMABLE.CHANNEL_DIVISOR``.
    """
    from detectron2.config import get_cfg

    from ..config import add_gradaug_config

    cfg = get_cfg()
    add_gradaug_config(cfg)
    r = cfg.MODEL.RESNETS
    r.DEPTH = depth
    r.NORM = norm
    r.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    if depth in (18, 34):
        r.RES2_OUT_CHANNELS = 64
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    cfg.MODEL.SLIMMABLE.CHANNEL_DIVISOR = divisor
    return cfg


def _build(bench: BackboneBench, device):
    """Stock backbone and slimmable ones (divisor 1 and ``bench.divisor``), one set of weights."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    from ..modeling import build_slimmable_resnet_backbone, build_slimmable_resnet_fpn_backbone

    shape = ShapeSpec(channels=3)
    fpn = bench.backbone == "fpn"
    torch.manual_seed(bench.seed)
    stock = (build_resnet_fpn_backbone if fpn else build_resnet_backbone)(
        backbone_cfg(bench.depth, bench.norm, bench.freeze_at), shape)
    slims = {}
    for divisor in sorted({1, bench.divisor}):
        model = (build_slimmable_resnet_fpn_backbone if fpn else build_slimmable_resnet_backbone)(
            backbone_cfg(bench.depth, bench.norm, bench.freeze_at, divisor), shape)
        model.load_state_dict(stock.state_dict(), strict=True)
        slims[divisor] = model.to(device).train()
    return stock.to(device).train(), slims


def kept_channels(bench: BackboneBench, width: float, divisor: int) -> str:
    """"stem/res2/res3/res4/res5" output channels at ``width`` (the library's channel rule)."""
    from ..slim.channels import resnet_channel_counts

    cfg = backbone_cfg(bench.depth, bench.norm, bench.freeze_at, divisor)
    r = cfg.MODEL.RESNETS
    counts = resnet_channel_counts(bench.depth, width, divisor, cfg.MODEL.SLIMMABLE.CHANNEL_RULE,
                                   stem_out=r.STEM_OUT_CHANNELS, res2_out=r.RES2_OUT_CHANNELS,
                                   bottleneck_channels=r.NUM_GROUPS * r.WIDTH_PER_GROUP, num_groups=r.NUM_GROUPS)
    return "/".join(map(str, [counts["stem"]] + counts["out"]))


def backbone_step(model, x, width, device, probe_autocast=None, probe_backward=None, *,
                  keep_grads: bool = False) -> float:
    """One training step of a backbone, forward + backward, at ``width``.

    Args:
        model: a backbone returning a dict of feature maps (slimmable, or stock: then
            ``width`` must be 1.0, the width context is a no-op).
        x: ``(N, 3, H, W)`` input on ``device``.
        width: the width the forward runs at.
        device: where ``model`` lives (CUDA is synchronised around the step).
        probe_autocast, probe_backward: a :class:`~.cost.PassProbe`'s hooks, to count or
            time the step as a pass.
        keep_grads: accumulate into the parameters' ``.grad`` (as a GradAug sub-network
            pass does after the full pass) instead of clearing them first.

    Returns:
        Wall seconds of the step.
    """
    import contextlib

    from .. import slim

    if not keep_grads:
        for p in model.parameters():
            p.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with slim.width(model, width), (probe_autocast or contextlib.nullcontext)():  # no-op on stock
        out = model(x)
        loss = sum(v.float().mean() for v in out.values())
    (probe_backward or torch.Tensor.backward)(loss)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def run_backbone_benchmark(bench: BackboneBench, progress: bool = True) -> List[Dict]:
    """Build, count training FLOPs, time; one row per configuration.

    Returns:
        dicts with ``model``, ``width``, ``divisor`` ("-" at width 1.0), ``channels``,
        ``gflops`` (forward + backward), ``fwd_gflops``, ``flop_ratio``, ``ms`` (median),
        ``time_ratio``, ``spread`` (IQR of the ratio, %), ``note``.

    Raises:
        ValueError: from :func:`check_backbone_bench`, before anything is built.
    """
    check_backbone_bench(bench)
    device = torch.device(bench.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bench.cudnn_benchmark
    stock, slims = _build(bench, device)
    g = torch.Generator().manual_seed(bench.seed)
    x = torch.randn(bench.batch, 3, bench.size, bench.size, generator=g).to(device)

    # the configurations: (label, model, width, divisor); identical channel counts are timed once
    configs = [("stock detectron2", stock, 1.0, "-"), ("slimmable", slims[1], 1.0, "-")]
    seen, duplicates = {}, {}
    for divisor in sorted(slims):
        for w in bench.widths:
            channels = _signature(slims[divisor], w)
            if channels in seen:
                duplicates[(divisor, w)] = seen[channels]
                continue
            seen[channels] = (divisor, w)
            configs.append(("slimmable", slims[divisor], w, divisor))

    flops = {}
    for label, model, w, divisor in configs:
        (rec,) = count_train_flops(lambda a, b: backbone_step(model, x, w, device, a, b), model)
        flops[(label, w, divisor)] = rec

    times = {(label, w, divisor): [] for label, _, w, divisor in configs}
    total = len(configs) * (bench.warmup + bench.iters)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="timing", unit="step", file=sys.stderr, leave=False)
    for _, model, w, _ in configs:
        for _ in range(bench.warmup):
            backbone_step(model, x, w, device)
            bar and bar.update(1)
    for _ in range(bench.iters):
        for label, model, w, divisor in configs:
            times[(label, w, divisor)].append(backbone_step(model, x, w, device))
            bar and bar.update(1)
    if bar is not None:
        bar.close()

    base = ("slimmable", 1.0, "-")
    ratios = {k: [t / b for t, b in zip(v, times[base])] for k, v in times.items()}
    base_f = flops[base].flops

    def row(label, w, divisor, key, note=""):
        rec = flops[key]
        return dict(model=label, width=w, divisor=divisor,
                    channels=kept_channels(bench, w, 1 if divisor == "-" else divisor),
                    gflops=rec.flops / 1e9, fwd_gflops=rec.fwd_flops / 1e9, flop_ratio=rec.flops / base_f,
                    ms=statistics.median(times[key]) * 1e3, time_ratio=statistics.median(ratios[key]),
                    spread=_spread(ratios[key]), note=note)

    rows = [row(label, w, divisor, (label, w, divisor)) for label, _, w, divisor in configs[:2]]
    for divisor in sorted(slims):
        for w in bench.widths:
            src = duplicates.get((divisor, w), (divisor, w))
            note = f"same channels as divisor {src[0]}" if src != (divisor, w) else ""
            rows.append(row("slimmable", w, divisor, ("slimmable", src[1], src[0]), note))
    return rows


def _signature(model, width):
    """The (in, out) channels of every slimmable convolution at ``width`` (what runs)."""
    from .. import slim
    from ..slim import SlimConv2d

    with slim.width(model, width):
        return tuple(m.active_channels() for m in model.modules() if isinstance(m, SlimConv2d))


def _spread(values):
    """Inter-quartile range relative to the median, in percent (nan below 4 values)."""
    if len(values) < 4:
        return float("nan")
    q = statistics.quantiles(values, n=4)
    med = statistics.median(values)
    return 100.0 * (q[2] - q[0]) / med if med else 0.0


def width_one_overhead(rows) -> float:
    """Per cent by which the slimmable backbone at width 1.0 is slower than stock detectron2."""
    return 100.0 * (1.0 / rows[0]["time_ratio"] - 1.0)


def backbone_markdown(rows: List[Dict], settings) -> str:
    """The result table, in Markdown, with the goals checked underneath.

    Args:
        rows: :func:`run_backbone_benchmark`'s rows.
        settings: the :class:`BackboneBench` (or its ``__dict__``).
    """
    from .report import device_name, markdown_table

    s = settings if isinstance(settings, dict) else settings.__dict__
    lines = [
        f"Backbone: R{s['depth']}{'-FPN' if s['backbone'] == 'fpn' else ''}, {s['norm']}, FREEZE_AT={s['freeze_at']}, "
        f"input {s['batch']}x3x{s['size']}x{s['size']}, forward+backward, median of {s['iters']} rounds after "
        f"{s['warmup']} warm-up steps; device: {device_name(s['device'])}",
        "",
        markdown_table(
            ["model", "width", "divisor", "channels (stem/res2/res3/res4/res5)", "fwd+bwd GFLOP", "FLOP ratio",
             "time (ms)", "time ratio", "time/FLOP ratio", "ratio IQR %", "note"],
            [[r["model"], f"{r['width']:.2f}", r["divisor"], r["channels"], f"{r['gflops']:.2f}",
              f"{r['flop_ratio']:.3f}", f"{r['ms']:.1f}", f"{r['time_ratio']:.3f}",
              f"{r['time_ratio'] / r['flop_ratio']:.2f}", f"{r['spread']:.1f}", r["note"]] for r in rows]),
    ]
    overhead = width_one_overhead(rows)
    lines += ["", "time ratio: median over rounds of time / (slimmable, width 1.0) in the same round; FLOPs: "
                  "training (forward + backward) FLOPs of the timed step (torch FlopCounterMode, 2 per multiply-add)",
              f"- width 1.0 vs stock detectron2: {overhead:+.1f}% (goal: within 3%) "
              f"-> {'met' if abs(overhead) <= 3.0 else 'NOT met'}"]
    for r in rows[2:]:
        if r["divisor"] == s["divisor"]:
            dev = 100.0 * (r["time_ratio"] / r["flop_ratio"] - 1.0)
            lines.append(f"- width {r['width']:.2f}, divisor {s['divisor']}: time ratio {r['time_ratio']:.3f} vs "
                         f"FLOP ratio {r['flop_ratio']:.3f} ({dev:+.1f}%; goal: within 10%) -> "
                         f"{'met' if abs(dev) <= 10.0 else 'NOT met'}")
    return "\n".join(lines)
