"""Measure baseline and GradAug iterations of a detectron2 model: time, memory, FLOPs, per pass.

Shared by ``tools/benchmark.py`` and ``tools/gpu_check.py``. One call measures one mode
(baseline, or GradAug with a fixed plan of sub-networks) on one batch:

1. ``warmup`` untimed iterations, then ``iters`` timed iterations exactly as a trainer runs
   them (no probes): seconds per iteration and the peak memory (CUDA: allocator peak
   over the timed iterations; CPU: the process's peak resident set);
2. the same iterations again under a ``"time"`` :class:`~.cost.PassProbe`: seconds per
   phase of every pass, the optimizer step, and what is left outside the passes;
3. the same iterations' passes under a ``"flops"`` probe: training FLOPs per pass.

:func:`measure_slicing` then splits each sub-network pass's backbone into what slicing
costs and what a physically narrow network of that width costs (the same backbone pruned,
timed on the same input), and :func:`compare` prices every GradAug iteration with :func:`~.cost.cost_model`,
calibrated on the baseline, and returns the per-pass and per-iteration table rows.
"""
import contextlib
import math
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..gradaug import SubnetSpec, gradaug_step
from .cost import PHASES, PassProbe, PassRecord, cost_model, count_train_flops, peak_rss_mb

__all__ = ["FixedSampler", "synthetic_detection_batch", "measure_iterations", "measure_slicing", "pool_rounds",
           "compare", "sync"]


class FixedSampler:
    """A sampler replaying a planned list of iterations (lists of :class:`SubnetSpec`).

    Every mode of a comparison replays the same plan, so they run identical sub-networks.

    Args:
        plan: one list of specs per iteration, in the order they will be drawn.
        sampling: "width" or "depth" (what :func:`gradaug_step` asks the sampler).
    """

    def __init__(self, plan: Sequence[Sequence[SubnetSpec]], sampling: str = "width"):
        self.plan = [list(p) for p in plan]
        self.sampling = sampling
        self.i = 0

    def sample(self, num_blocks: int = 0) -> List[SubnetSpec]:
        if self.i >= len(self.plan):
            raise RuntimeError(f"FixedSampler: the plan has {len(self.plan)} iterations, a further one was asked")
        self.i += 1
        return self.plan[self.i - 1]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_detection_batch(num_images: int, height: int, width: int, *, num_classes: int = 80,
                              instances: int = 8, seed: int = 0) -> List[Dict]:
    """A detectron2 training batch of random images with box, class and polygon-mask annotations.

    For benchmarks at sizes no dataset at hand has (e.g. COCO's 800 x 1333 pixels); the
    content is random, the work per pass is what a real batch of that size costs.

    Args:
        num_images: images in the batch.
        height, width: image size in pixels.
        num_classes: classes to draw ``gt_classes`` from.
        instances: objects per image (axis-aligned boxes, 5-60% of the image side, with
            an octagon polygon mask inside each).
        seed: RNG seed.

    Returns:
        list of dicts with "image" ((3, H, W) uint8 tensor, BGR), "height", "width" and
        "instances" (``gt_boxes``, ``gt_classes``, ``gt_masks`` as ``PolygonMasks``).

    Raises:
        ValueError: on non-positive sizes or counts.
    """
    from detectron2.structures import Boxes, Instances, PolygonMasks

    if min(num_images, height, width, num_classes, instances) < 1:
        raise ValueError(f"synthetic_detection_batch needs positive sizes and counts, got num_images={num_images}, "
                         f"height={height}, width={width}, num_classes={num_classes}, instances={instances}")
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(num_images):
        image = torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8)
        side = torch.empty(instances, 2).uniform_(0.05, 0.6, generator=g) * torch.tensor([width, height])
        x0 = torch.rand(instances, generator=g) * (width - side[:, 0])
        y0 = torch.rand(instances, generator=g) * (height - side[:, 1])
        boxes = torch.stack([x0, y0, x0 + side[:, 0], y0 + side[:, 1]], dim=1)
        angles = torch.arange(8) * (2 * math.pi / 8)
        polygons = []
        for b in boxes:
            cx, cy, rx, ry = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2, (b[2] - b[0]) / 2, (b[3] - b[1]) / 2
            pts = torch.stack([cx + rx * torch.cos(angles), cy + ry * torch.sin(angles)], dim=1)
            polygons.append([pts.reshape(-1).numpy().astype("float64")])
        inst = Instances((height, width))
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.randint(0, num_classes, (instances,), generator=g)
        inst.gt_masks = PolygonMasks(polygons)
        batch.append({"image": image, "height": height, "width": width, "instances": inst})
    return batch


def _loss(losses) -> torch.Tensor:
    return sum(losses.values())


def measure_iterations(model, batch, optimizer, *, plan: Optional[Sequence[Sequence[SubnetSpec]]], task=None,
                       iters: int = 8, warmup: int = 2, amp: Optional[torch.dtype] = None,
                       progress: Optional[Callable[[str], None]] = None) -> Dict:
    """Measure one mode: the baseline (``plan=None``) or GradAug replaying ``plan``.

    Args:
        model: the detector, in training mode, on its device.
        batch: the batch every iteration uses (detectron2 list of dicts).
        optimizer: steps once per iteration.
        plan: ``warmup + iters`` lists of sub-network specs (GradAug), or None (baseline).
        task: the GradAug task (``DetectionTask``); needed with a plan.
        iters, warmup: timed and untimed iterations (>= 1, >= 0).
        amp: None (fp32) or the autocast dtype (torch.float16 / torch.bfloat16); fp16
            back-propagates through a ``torch.amp.GradScaler``, as detectron2's AMPTrainer.
        progress: called with a short label after every iteration (progress bars).

    Returns:
        dict with ``times`` (s per timed iteration), ``median_s``, ``peak_mb`` (CUDA
        allocator peak or CPU peak RSS, MiB), ``memory_kind``, ``probed`` (per timed
        iteration: its passes' :class:`PassRecord` dicts, ``optimizer_s``, ``outside_s``,
        ``iteration_s``) and ``flops`` (per timed iteration: its passes' FLOP records).

    Raises:
        ValueError: on a plan of the wrong length, a plan without task, or bad counts.
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    if plan is not None:
        if task is None:
            raise ValueError("a GradAug plan needs its task (e.g. DetectionTask(model))")
        if len(plan) < warmup + iters:
            raise ValueError(f"the plan has {len(plan)} iterations, warmup + iters = {warmup + iters} are needed")
    device = next(model.parameters()).device
    scaler = None
    if amp is not None:
        scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

    def autocast():
        return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()

    def backward(loss):
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def step_optimizer():
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()

    def one(specs, probe: Optional[PassProbe] = None, step: bool = True):
        a = probe.autocast if probe is not None else autocast
        b = probe.backward if probe is not None else backward
        optimizer.zero_grad(set_to_none=True)
        if specs is None:
            with a():
                loss = _loss(model(batch))
            b(loss)
            del loss
        else:
            gradaug_step(model, batch, FixedSampler([specs]), task, backward=b, autocast=a)
        if step:
            step_optimizer()

    plan_of = (lambda i: None) if plan is None else (lambda i: plan[i])
    tick = progress or (lambda label: None)
    from detectron2.utils.events import EventStorage

    with EventStorage(0):  # detectron2's losses log into the current storage
        return _measure(model, optimizer, device, one, plan_of, warmup, iters, autocast, backward, step_optimizer,
                        tick)


def _measure(model, optimizer, device, one, plan_of, warmup, iters, autocast, backward, step_optimizer, tick):
    for i in range(warmup):
        one(plan_of(i))
        tick("warm-up")

    # 1. plain timed iterations
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup, warmup + iters):
        sync(device)
        start = time.perf_counter()
        one(plan_of(i))
        sync(device)
        times.append(time.perf_counter() - start)
        tick("timed")
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "CUDA allocator peak"
    else:
        peak, kind = peak_rss_mb(), "peak RSS"

    # 2. the same iterations, every phase timed
    probed = []
    for i in range(warmup, warmup + iters):
        with PassProbe(model, "time", autocast=autocast, backward=backward) as probe:
            sync(device)
            start = time.perf_counter()
            one(plan_of(i), probe, step=False)
            t_opt = time.perf_counter()
            step_optimizer()
            sync(device)
            end = time.perf_counter()
        passes = [p.to_dict() for p in probe.passes]
        total = end - start
        optimizer_s = end - t_opt
        probed.append({"passes": passes, "iteration_s": total, "optimizer_s": optimizer_s,
                       "outside_s": total - optimizer_s - sum(p["total_seconds"] for p in passes)})
        tick("phases")

    # 3. the same passes, FLOPs counted (no optimizer step: the counted passes are the same)
    flops = []
    for i in range(warmup, warmup + iters):
        with PassProbe(model, "flops", autocast=autocast, backward=backward) as probe:
            one(plan_of(i), probe, step=False)
        flops.append([p.to_dict() for p in probe.passes])
        tick("FLOPs")
    optimizer.zero_grad(set_to_none=True)
    return {"times": times, "median_s": statistics.median(times), "peak_mb": peak, "memory_kind": kind,
            "probed": probed, "flops": flops}


def measure_slicing(model, cfg, gradaug: Dict, plan: Sequence[Sequence[SubnetSpec]], warmup: int, *,
                    reps: int = 5, iterations: Optional[int] = None,
                    progress: Optional[Callable[[str], None]] = None) -> Dict:
    """What slicing costs in every timed sub-network pass: slimmed vs pruned backbone.

    For each sub-network pass of the timed iterations, the backbone (+FPN) forward and
    backward at the pass's width, on a random batch of the pass's size (its images
    padded to the backbone's ``size_divisibility``, as detectron2's ``ImageList`` pads
    them), is timed twice, interleaved: the model's own backbone under
    :func:`gradaug_det.width`, and the same weights pruned to that width
    (:func:`~gradaug_det.checkpoint.prune.prune_model`: a stock detectron2 backbone with
    exactly the sub-network's channels); both accumulate into existing ``.grad``, as a
    sub-network pass does after the full pass. The difference is what slicing costs
    (weight copies, full-size weight gradients added into ``.grad``, the sliced norms).
    The full backbone is timed and counted the same way on the full pass's input, so the
    pruned backbone's time can be set against its training FLOPs at the full backbone's
    own rate: what remains is what the hardware charges for narrower, smaller
    convolutions, which a physically narrow network pays too.

    Args:
        model: the slimmable detector the GradAug mode measured (DDP looked through).
        cfg: its detectron2 config (for pruning).
        gradaug: :func:`measure_iterations`' result of that mode (input sizes per pass).
        plan: the plan it replayed; warmup: its warm-up iterations at the head of ``plan``.
        reps: timed steps per backbone and shape (median; 2 untimed steps first).
        iterations: only the first this many timed iterations (None: all); :func:`compare`
            averages the slicing columns over those.
        progress: called with a short label after every shape.

    Returns:
        ``{"full": entry, "passes": [[entry per sub-network pass] per timed iteration]}``;
        an entry is ``{"width", "input_hw" (padded, pixels), "num_images", "slim_s",
        "dense_s", "slicing_s" (slim - dense), "dense_flops"}`` (the full entry: width
        1.0, ``slim_s == dense_s``, nothing sliced; so are width-1.0 sub-network passes,
        e.g. of depth sampling).

    Raises:
        ValueError: if ``reps < 1`` or ``iterations < 1``.
    """
    from ..utils.parallel import unwrap_model

    if reps < 1 or (iterations is not None and iterations < 1):
        raise ValueError(f"measure_slicing needs reps >= 1 and iterations >= 1 (or None), got reps={reps}, "
                         f"iterations={iterations}")
    net = unwrap_model(model)
    device = next(net.parameters()).device
    div = max(1, int(getattr(net.backbone, "size_divisibility", 0) or 1))
    shapes: Dict[tuple, Dict] = {}

    def entry(w, rec):
        hw = [-(-int(v) // div) * div for v in rec["input_hw"]]
        key = (w, *hw, rec["num_images"])
        if key not in shapes:
            shapes[key] = _slim_vs_dense(net, cfg, w, hw, rec["num_images"], device, reps)
            (progress or (lambda label: None))("slicing")
        return dict(shapes[key])

    full = entry(1.0, gradaug["flops"][0][0])
    passes = [[entry(spec.width, rec) for spec, rec in zip(plan[warmup + j], flop_passes[1:])]
              for j, flop_passes in enumerate(gradaug["flops"][:iterations])]
    for p in net.parameters():
        p.grad = None
    return {"full": full, "passes": passes}


def _slim_vs_dense(net, cfg, width, hw, num_images, device, reps):
    """One shape of :func:`measure_slicing` (at width 1.0: the full backbone alone)."""
    from ..checkpoint.prune import prune_model
    from .backbone import backbone_step

    torch.manual_seed(0)
    x = torch.randn(num_images, 3, *hw, device=device)
    dense = net.backbone if width >= 1.0 else prune_model(net, cfg, width)[1].backbone
    (rec,) = count_train_flops(lambda a, b: backbone_step(dense, x, 1.0, device, a, b), dense)
    slim_t, dense_t = [], []
    for i in range(reps + 2):  # into existing .grad (the full pass made it), as a sub-network pass
        d = backbone_step(dense, x, 1.0, device, keep_grads=i > 0)
        s = d if width >= 1.0 else backbone_step(net.backbone, x, width, device, keep_grads=i > 0)
        if i >= 2:
            slim_t.append(s)
            dense_t.append(d)
    slim_s, dense_s = statistics.median(slim_t), statistics.median(dense_t)
    return {"width": width, "input_hw": list(hw), "num_images": num_images, "slim_s": slim_s, "dense_s": dense_s,
            "slicing_s": slim_s - dense_s, "dense_flops": rec.flops}


def pool_rounds(rounds: Sequence[Dict]) -> Dict:
    """One mode's :func:`measure_iterations` results of several rounds, as one result.

    A benchmark that runs its modes one after another in rounds (baseline, GradAug, ...,
    then again) and pools each mode's timed iterations compares the modes over the same
    stretch of time, so slow drifts of the machine weigh on all of them alike.

    Args:
        rounds: the mode's results, one per round, each replaying the same plan.

    Returns:
        A result of the same form: ``times``, ``probed`` and ``flops`` concatenated round
        after round (timed iteration ``j`` of round ``r`` is index ``r * iters + j``; give
        :func:`compare` the plan's timed part repeated as often), ``median_s`` over all
        timed iterations, ``peak_mb`` the largest round's, ``round_median_s`` each round's
        median; ``slicing`` (if measured: in the first rounds, e.g. only the first) with
        the first round's ``full`` entry and those rounds' passes.

    Raises:
        ValueError: for no rounds, or rounds of different lengths.
    """
    if not rounds:
        raise ValueError("pool_rounds needs at least one round")
    if len({len(r["times"]) for r in rounds}) != 1:
        raise ValueError(f"rounds of different lengths: {[len(r['times']) for r in rounds]} timed iterations")
    out = dict(rounds[0])
    for key in ("times", "probed", "flops"):
        out[key] = [x for r in rounds for x in r[key]]
    out["median_s"] = statistics.median(out["times"])
    out["peak_mb"] = max(r["peak_mb"] for r in rounds)
    out["round_median_s"] = [r["median_s"] for r in rounds]
    out.pop("slicing", None)
    sliced = [r["slicing"] for r in rounds if "slicing" in r]
    if sliced:
        if any("slicing" not in r for r in rounds[:len(sliced)]):
            raise ValueError("slicing must be measured in the first rounds (its passes are indexed from round 1)")
        out["slicing"] = {"full": sliced[0]["full"], "passes": [p for x in sliced for p in x["passes"]]}
    return out


def _pass_memory_mb(time_dict: Dict) -> float:
    """A timed pass's memory high-water mark, MiB: its CUDA allocator peak, or on the CPU the
    largest resident set sampled at its phase boundaries."""
    return time_dict.get("peak_alloc_mb") or time_dict.get("rss_mb", 0.0)


def _record(flop_dict: Dict, time_dicts: List[Dict]) -> PassRecord:
    """A PassRecord with one pass's FLOPs and its phase seconds averaged over ``time_dicts``."""
    rec = PassRecord(flop_dict["name"], tuple(flop_dict["input_hw"]), flop_dict["num_images"],
                     flop_dict["fwd_flops"], flop_dict["bwd_flops"], flop_dict["backbone_fwd_flops"])
    rec.seconds = {p: statistics.mean(t["seconds"].get(p, 0.0) for t in time_dicts) for p in PHASES}
    return rec


def compare(baseline: Dict, gradaug: Dict, plan: Sequence[Sequence[SubnetSpec]], warmup: int) -> Dict:
    """Price GradAug's iterations with the cost model calibrated on the baseline.

    Args:
        baseline, gradaug: :func:`measure_iterations` results of the two modes.
        plan: the plan the GradAug mode replayed (for the widths and scales of each pass).
        warmup: the warm-up iterations at the head of ``plan``.

    Returns:
        dict with ``rate_s_per_gflop``; ``iteration`` (measured median s, model median s,
        median of per-iteration time / model, memory ratio); ``passes``: one row per pass
        slot (full, sub1, ...) averaged over the timed iterations: width, scale, input
        size, forward / backward GFLOPs, model s, measured s per phase, time / model,
        ``peak_mb`` (the largest over the timed iterations of the pass's CUDA allocator peak,
        or CPU resident set at its phase boundaries);
        ``overhead``: mean seconds per iteration by phase outside the model's own compute
        (transform, preprocess, teacher, optimizer, outside passes). When ``gradaug`` has
        a ``"slicing"`` entry (:func:`measure_slicing`), every pass row also has
        ``backbone_slim_s`` / ``backbone_dense_s`` (backbone forward + backward, slimmed /
        pruned), ``slicing_s`` (their difference) and ``narrow_s`` (the pruned backbone's
        time beyond its training FLOPs at the full backbone's measured rate: the hardware's
        price of narrower, smaller convolutions), and ``overhead`` has ``slicing``.
    """
    base_time = [p["passes"][0] for p in baseline["probed"]]
    base = _record(baseline["flops"][0][0], base_time)
    probed_iters = baseline["probed"]
    base_opt = statistics.mean(p["optimizer_s"] for p in probed_iters)
    rate = base.total_seconds / base.flops
    slicing = gradaug.get("slicing")
    if slicing is not None:  # the full backbone's own seconds per training FLOP
        backbone_rate = slicing["full"]["dense_s"] / slicing["full"]["dense_flops"]
    iteration_models, ratios = [], []
    slots: Dict[int, Dict[str, list]] = {}
    for j, (t_iter, flop_passes, probed) in enumerate(zip(gradaug["times"], gradaug["flops"], gradaug["probed"])):
        recs = [_record(f, [t]) for f, t in zip(flop_passes, probed["passes"])]
        model = cost_model(base, baseline["median_s"], recs)
        iteration_models.append(model["iteration_model_s"])
        ratios.append(t_iter / model["iteration_model_s"])
        specs = [None] + list(plan[warmup + j])
        for k, (rec, spec, m) in enumerate(zip(recs, specs, model["pass_model_s"])):
            s = slots.setdefault(k, {"name": rec.name, "width": [], "scale": [], "hw": [], "fwd": [], "bwd": [],
                                     "backbone": [], "model": [], "seconds": [], "phases": [], "slicing": [],
                                     "memory": []})
            s["memory"].append(_pass_memory_mb(probed["passes"][k]))
            if slicing is not None and k > 0 and j < len(slicing["passes"]):
                sl = slicing["passes"][j][k - 1]
                s["slicing"].append((sl["slim_s"], sl["dense_s"], sl["slicing_s"],
                                     sl["dense_s"] - backbone_rate * sl["dense_flops"]))
            s["width"].append(1.0 if spec is None else spec.width)
            s["scale"].append(1.0 if spec is None else spec.scale)
            s["hw"].append(rec.input_hw)
            s["fwd"].append(rec.fwd_flops)
            s["bwd"].append(rec.bwd_flops)
            s["backbone"].append(rec.backbone_fwd_flops)
            s["model"].append(m)
            s["seconds"].append(rec.total_seconds)
            s["phases"].append(rec.seconds)
    mean = statistics.mean
    rows = []
    for k in sorted(slots):
        s = slots[k]
        rows.append({
            "pass": s["name"], "width_mean": mean(s["width"]), "scale_mean": mean(s["scale"]),
            "input_hw_mean": [mean(h[0] for h in s["hw"]), mean(h[1] for h in s["hw"])],
            "fwd_gflops": mean(s["fwd"]) / 1e9, "bwd_gflops": mean(s["bwd"]) / 1e9,
            "backbone_fwd_gflops": mean(s["backbone"]) / 1e9,
            "model_s": mean(s["model"]), "measured_s": mean(s["seconds"]),
            "phases_s": {p: mean(ph[p] for ph in s["phases"]) for p in PHASES},
            "time_over_model": mean(s["seconds"]) / mean(s["model"]) if mean(s["model"]) else float("nan"),
            "peak_mb": max(s["memory"]),
        })
        if slicing is not None:
            parts = s["slicing"] or [(0.0, 0.0, 0.0, 0.0)]  # the full pass slices nothing
            rows[-1].update({name: mean(v[i] for v in parts) for i, name in enumerate(
                ("backbone_slim_s", "backbone_dense_s", "slicing_s", "narrow_s"))})
    overhead = {p: sum(r["phases_s"][p] for r in rows) for p in ("transform", "preprocess", "teacher")}
    if slicing is not None:
        overhead["slicing"] = sum(r["slicing_s"] for r in rows)
    overhead["optimizer"] = mean(p["optimizer_s"] for p in gradaug["probed"])
    overhead["outside passes"] = mean(p["outside_s"] for p in gradaug["probed"])
    baseline_row = {
        "pass": "baseline", "width_mean": 1.0, "scale_mean": 1.0, "input_hw_mean": list(base.input_hw),
        "fwd_gflops": base.fwd_flops / 1e9, "bwd_gflops": base.bwd_flops / 1e9,
        "backbone_fwd_gflops": base.backbone_fwd_flops / 1e9, "model_s": base.total_seconds,
        "measured_s": base.total_seconds, "phases_s": dict(base.seconds), "time_over_model": 1.0,
        "peak_mb": max(_pass_memory_mb(t) for t in base_time),
    }
    return {
        "rate_s_per_gflop": rate * 1e9,
        "baseline": {"median_s": baseline["median_s"], "peak_mb": baseline["peak_mb"], "pass": baseline_row,
                     "optimizer_s": base_opt,
                     "outside_s": mean(p["outside_s"] for p in probed_iters)},
        "iteration": {"median_s": gradaug["median_s"], "model_s": statistics.median(iteration_models),
                      "time_over_model": statistics.median(ratios), "time_over_baseline":
                      gradaug["median_s"] / baseline["median_s"],
                      "memory_ratio": gradaug["peak_mb"] / baseline["peak_mb"], "peak_mb": gradaug["peak_mb"]},
        "passes": rows,
        "overhead_s": overhead,
    }
