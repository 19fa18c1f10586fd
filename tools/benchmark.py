#!/usr/bin/env python
"""Baseline iteration vs GradAug iteration: median time, peak memory, FLOP-predicted ratio.

For one model and one batch, in one run:

* ``baseline``: detectron2's step (forward, backward, optimizer step);
* ``gradaug d=1``: the GradAug iteration with the reference channel rule;
* ``gradaug d=D``: the same sub-networks (identical widths and scales) with channel counts
  aligned to a multiple of D (``MODEL.SLIMMABLE.CHANNEL_DIVISOR``).

The FLOP-predicted ratio is sum over passes of fvcore's FLOP count of the model at that
pass's width and input size, divided by the full pass's count (inference-mode heads; the
backbone dominates). Each mode runs in its own process so peak memory (GPU: allocator
peak; CPU: peak resident set) is its own.

    python tools/benchmark.py --config-file configs/quickstart/mask_rcnn_gradaug.yaml --iters 10
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from tqdm import tqdm

import gradaug_det
from detectron2.data import DatasetCatalog
from detectron2.data.dataset_mapper import DatasetMapper
from detectron2.modeling import build_model
from detectron2.utils.analysis import FlopCountAnalysis
from detectron2.utils.events import EventStorage
from gradaug_det.engine.setup import get_gradaug_cfg
from gradaug_det.gradaug import DetectionTask, SubnetSampler, gradaug_step, transform_detection_batch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config-file", default="configs/quickstart/mask_rcnn_gradaug.yaml")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=2, help="images per iteration")
    p.add_argument("--iters", type=int, default=8, help="timed iterations per mode")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--divisor", type=int, default=8, help="aligned channel divisor to compare")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return p.parse_args(argv)


def make_cfg(args, divisor=1):
    cfg = get_gradaug_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.DEVICE = args.device
    cfg.MODEL.SLIMMABLE.CHANNEL_DIVISOR = divisor
    return cfg


def load_batch(cfg, n):
    """``n`` mapped training images of the config's first training set."""
    data = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[:n]
    mapper = DatasetMapper(cfg, is_train=True)
    torch.manual_seed(0)
    return [mapper(d) for d in data]


def plan(cfg, iters):
    """The sub-networks of every iteration, drawn once so all modes use the same ones."""
    sampler = SubnetSampler.from_config(cfg)
    return [sampler.sample() for _ in range(iters)]


class _Fixed:
    """A sampler replaying a planned sequence of sub-networks."""

    sampling = "width"

    def __init__(self, specs):
        self.specs = list(specs)

    def sample(self, num_blocks=0):
        return self.specs.pop(0)


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_mode(args, mode):
    """Time one mode in this process; return its numbers."""
    divisor = args.divisor if mode == "gradaug_aligned" else 1
    cfg = make_cfg(args, divisor)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    batch = load_batch(cfg, args.batch)
    total = args.warmup + args.iters
    specs = plan(cfg, total)
    task = DetectionTask(model, cfg.GRADAUG.SUBNET_LOSS, cfg.GRADAUG.SOFT_WEIGHT, cfg.GRADAUG.GT_WEIGHT)
    sampler = _Fixed(specs)
    times = []
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with EventStorage(0):
        for i in tqdm(range(total), desc=mode, leave=False):
            _sync(args.device)
            start = time.perf_counter()
            optimizer.zero_grad()
            if mode == "baseline":
                sum(model(batch).values()).backward()
            else:
                gradaug_step(model, batch, sampler, task)
            optimizer.step()
            _sync(args.device)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    if args.device.startswith("cuda"):
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"mode": mode, "divisor": divisor, "median_s": statistics.median(times), "peak_mb": peak_mb}
    if mode != "baseline":
        out["flop_ratio"] = flop_ratio(model, batch, specs[args.warmup:])
    return out


def flop_ratio(model, batch, iterations):
    """Mean over iterations of (sum of pass FLOPs) / (full pass FLOPs), by fvcore."""
    model.eval()
    cache = {}

    def flops(width, scale):
        key = (round(width, 6), scale)
        if key not in cache:
            sub, _ = transform_detection_batch([{"image": d["image"]} for d in batch], _Spec(scale))
            with gradaug_det.width(model, width), torch.no_grad():
                counter = FlopCountAnalysis(model, sub)
                counter.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
                cache[key] = counter.total()
        return cache[key]

    full = flops(1.0, 1.0)
    ratios = [(full + sum(flops(s.width, s.scale) for s in specs)) / full for specs in iterations]
    model.train()
    return statistics.mean(ratios)


class _Spec:
    def __init__(self, scale):
        self.scale, self.angle = scale, 0.0


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_mode(args, args.worker)))
        return
    rows = []
    for mode in ("baseline", "gradaug", "gradaug_aligned"):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode] + [
            a for a in (argv or sys.argv[1:]) if a != "--worker"]
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
        line = next(x for x in res.stdout.splitlines() if x.startswith("RESULT "))
        rows.append(json.loads(line[len("RESULT "):]))
        print(f"done: {mode}", file=sys.stderr)
    base = rows[0]
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    print(f"\n{args.config_file}, batch {args.batch}, {args.iters} timed iterations, {device}, torch {torch.__version__}")
    print("| mode | divisor | median s/iter | time ratio | FLOP-predicted ratio | peak MB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["median_s"] / base["median_s"]
        flop = f"{r['flop_ratio']:.2f}" if "flop_ratio" in r else "1.00"
        print(f"| {r['mode']} | {r['divisor']} | {r['median_s']:.3f} | {ratio:.2f} | {flop} | "
              f"{r['peak_mb']:.0f} | {r['peak_mb'] / base['peak_mb']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
