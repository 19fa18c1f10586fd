"""The sections of ``tools/gpu_check.py``: every GPU fact the README needs, in one run.

Each section is a function ``section_<name>(ctx) -> dict`` that returns its results
(JSON-ready) and a one-line ``summary``; :func:`run_sections` runs the selected ones in
order within an overall time budget, records a failing section's error instead of
stopping, and skips the sections that no longer fit. On a machine without CUDA (or with
``tiny``) every section runs at tiny sizes on the CPU, so the test suite runs the same
code (CUDA-only facts are then marked ``"cuda": false``).

Sections:

* ``env``: the GPU, CUDA, cuDNN and torch versions;
* ``amp``: detectron2's AMP loop (``GradAugAMPTrainer``, a real ``torch.amp.GradScaler``)
  in fp16 and bf16: finite losses, the scaler's scale, weights updated, s/iter;
* ``hostsync``: one GradAug step (:func:`~gradaug_det.gradaug.gradaug_step`, the
  ``iteration`` section's model) under ``torch.cuda.set_sync_debug_mode("warn")``, every
  host sync attributed to the Python line that asked for it (:func:`attribute_sync`):
  GradAug's own code may sync only in ``check_finite_losses`` (once per step); then the
  same step under ``"error"``, which stops at the first sync (detectron2's own). On the
  CPU there is nothing to detect: the step runs, no sync is recorded (``"cuda": false``);
* ``syncbn``: SyncBatchNorm (``SyncBN``: torch's; ``naiveSyncBN``: detectron2's) at
  sub-widths in a one-process group (nccl; gloo on CPU), under DDP: outputs and gradients
  equal those of BN with the same weights;
* ``cudnn``: ``cudnn.benchmark`` on and off while the width changes every step: time of
  the first and of later steps per width, outputs equal between the two settings;
* ``iteration``: Mask R-CNN (R50-FPN at 800 x 1333, batch 2; tiny: the quickstart R18 at
  64 x 96): baseline vs GradAug at divisor 1 and at the device's aligned divisor
  (:func:`~gradaug_det.slim.preferred_channel_divisor`: 8 on a GPU), fp32 and AMP --
  s/iter, allocator peak, time / cost model (:mod:`.iteration`);
* ``backbone``: the backbone benchmark (:mod:`.backbone`) at widths 1.0 / 0.9 / 0.75 / 0.5.
"""
import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List

import torch

__all__ = ["SECTIONS", "CheckContext", "run_sections", "markdown_report", "attribute_sync", "record_host_syncs"]

SECTIONS = ("env", "amp", "hostsync", "syncbn", "cudnn", "iteration", "backbone")
#: detectron2 config of the ``iteration`` and ``amp`` sections (full size / tiny)
FULL_CONFIG = "configs/mask_rcnn_gradaug.yaml"
TINY_CONFIG = "configs/quickstart/mask_rcnn_gradaug.yaml"


@dataclass
class CheckContext:
    """What every section reads.

    Attributes:
        device: "cuda" or "cpu".
        tiny: tiny sizes (the CPU test of the tool).
        repo: the repository root (configs are read from ``repo/configs``).
        budget_s: overall time budget of the run, seconds.
        iters, warmup: timed / untimed iterations of the ``iteration`` section.
        progress: prints one progress line.
    """

    device: str
    tiny: bool
    repo: str
    budget_s: float = 480.0
    iters: int = 10
    warmup: int = 3
    progress: Callable[[str], None] = print
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def aligned_divisor(self) -> int:
        """The aligned ``CHANNEL_DIVISOR`` compared with 1 (8 on a GPU; the CPU's own on a CPU)."""
        from ..slim import preferred_channel_divisor

        return preferred_channel_divisor(self.device)

    def cfg(self, divisor: int = 1):
        """The ``iteration`` / ``amp`` sections' detectron2 config on this device."""
        from ..engine.setup import get_gradaug_cfg

        cfg = get_gradaug_cfg()
        cfg.merge_from_file(os.path.join(self.repo, TINY_CONFIG if self.tiny else FULL_CONFIG))
        cfg.MODEL.DEVICE = self.device
        cfg.MODEL.WEIGHTS = ""
        cfg.MODEL.SLIMMABLE.CHANNEL_DIVISOR = divisor
        return cfg

    def image_size(self):
        return (64, 96) if self.tiny else (800, 1333)

    def batch(self, cfg):
        from .iteration import synthetic_detection_batch

        return synthetic_detection_batch(2, *self.image_size(), num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES, seed=0)

    def amp_dtypes(self):
        """AMP dtypes to check: fp16 and bf16 on a GPU (bf16 where supported); bf16 on the CPU.

        CPU fp16 autocast is no place to check the scaler: stock detectron2's Mask R-CNN at
        initialisation already gets non-finite fp16 gradients there (the box classifier's
        weight, at any loss scale), so every step would be skipped.
        """
        if not self.cuda:
            return [torch.bfloat16]
        return [torch.float16] + ([torch.bfloat16] if torch.cuda.is_bf16_supported() else [])


def _dtype_name(dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", None: "fp32"}[dtype]


def _free(device):
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------
def section_env(ctx: CheckContext) -> Dict:
    """Device and library versions."""
    from .report import device_name

    out = {"device": device_name(ctx.device), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if ctx.cuda else None, "tiny": ctx.tiny}
    if ctx.cuda:
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, gpu_memory_gib=p.total_memory / 2**30, capability=f"{p.major}.{p.minor}",
                   bf16=torch.cuda.is_bf16_supported())
    out["summary"] = out["device"]
    return out


def section_amp(ctx: CheckContext) -> Dict:
    """GradAugAMPTrainer (detectron2's AMPTrainer) with a real GradScaler, fp16 and bf16."""
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from ..engine.runner import GradAugAMPTrainer
    from ..gradaug import SubnetSampler, build_task

    max_steps = 6 if ctx.tiny else 10
    rows = []
    for dtype in ctx.amp_dtypes():
        cfg = ctx.cfg(divisor=ctx.aligned_divisor)
        torch.manual_seed(0)
        model = build_model(cfg).train()
        before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        scaler = torch.amp.GradScaler(ctx.device)
        trainer = GradAugAMPTrainer(model, itertools.repeat(ctx.batch(cfg)), optimizer,
                                    sampler=SubnetSampler.from_config(cfg), task=build_task(cfg, model),
                                    grad_scaler=scaler, precision=dtype)
        times, scales = [], []
        with EventStorage(0) as storage:
            # fp16 starts at scale 2^16: the first steps may overflow and be skipped (the
            # scaler halves its scale); run until two steps have updated the weights
            for i in range(max_steps):
                trainer.iter = storage.iter = i
                if ctx.cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                trainer.run_step()
                if ctx.cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                scales.append(float(scaler.get_scale()))
                storage.step()
                skipped = sum(b < a for a, b in zip([65536.0] + scales, scales))
                if i + 1 - skipped >= 2:
                    break
            losses = [v for v, _ in storage.history("total_loss").values()]
            subnet = [v for k, h in storage.histories().items() if k.endswith("total_loss") and "sub" in k
                      for v, _ in h.values()]
        after = [p.detach() for p in model.parameters() if p.requires_grad]
        changed = sum(int(not torch.equal(a, b)) for a, b in zip(after, before))
        finite = all(map(lambda v: v == v and abs(v) != float("inf"), losses + subnet))
        rows.append({"precision": _dtype_name(dtype), "steps": len(times), "skipped_steps": skipped,
                     "grad_scales": scales, "finite_losses": finite,
                     "total_loss": losses, "subnet_losses_logged": len(subnet),
                     "grad_scale": float(scaler.get_scale()), "params_updated": changed,
                     "params": len(before), "s_per_iter_after_first": sum(times[1:]) / max(1, len(times) - 1),
                     "ok": finite and changed > 0})
        del trainer, model, optimizer
        _free(ctx.device)
    summary = "; ".join(f"{r['precision']}: {'ok' if r['ok'] else 'FAILED'} (scale {r['grad_scale']:g}, "
                        f"{r['skipped_steps']} of {r['steps']} steps skipped on overflow, "
                        f"{r['params_updated']}/{r['params']} params updated)" for r in rows)
    return {"rows": rows, "ok": all(r["ok"] for r in rows), "summary": summary}


#: the only function of GradAug's own code allowed to read a device value on the host
#: (one sync per step for the finite-loss check of every pass, gradaug/step.py)
ALLOWED_GRADAUG_SYNCS = ("check_finite_losses",)


def _library_roots():
    """Folders / files of library code whose syncs belong to whoever called it."""
    import torchvision

    return (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(torchvision.__file__) + os.sep,
            warnings.__file__, contextlib.__file__)


def attribute_sync(frames) -> Dict:
    """Name the code that asked for one host sync, from the Python stack at that moment.

    The innermost frame outside torch / torchvision / the standard library's warnings and
    contextlib is the caller. A sync raised while a ``backward`` of torch's was on the stack
    ran in the autograd engine, whose ops have no Python line: category ``backward``.

    Args:
        frames: ``traceback.FrameSummary`` list, outermost first (``traceback.extract_stack()``
            or ``traceback.extract_tb()``), or objects with ``filename``, ``lineno``, ``name``, ``line``.

    Returns:
        dict with ``category`` ("gradaug_det", "detectron2", "backward" or "other"),
        ``where`` ("path:line", the path from the package folder on), ``function`` and ``code``.
    """
    roots = _library_roots()
    in_backward = any(f.name == "backward" and f.filename.startswith(roots[0]) for f in frames)
    caller = next((f for f in reversed(frames) if not f.filename.startswith(roots)
                   and os.path.abspath(f.filename) != os.path.abspath(__file__)), None)
    if caller is None:
        return {"category": "other", "where": "?", "function": "?", "code": ""}
    path = caller.filename
    for package in ("gradaug_det", "detectron2"):
        marker = os.sep + package + os.sep
        if marker in path:
            path = package + os.sep + path.rsplit(marker, 1)[1]
            break
    category = next((p for p in ("gradaug_det", "detectron2") if path.startswith(p + os.sep)), "other")
    if in_backward:
        category = "backward"
    return {"category": category, "where": f"{path}:{caller.lineno}", "function": caller.name,
            "code": (caller.line or "").strip()}


@contextlib.contextmanager
def record_host_syncs(cuda: bool):
    """Record the Python stack of every host sync inside the block (CUDA's sync debug mode "warn").

    Yields:
        A list that receives one ``traceback.extract_stack()`` per synchronizing CUDA call.
        Without CUDA (``cuda=False``) nothing is set and the list stays empty.
    """
    records = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # every sync, not the first per line
        previous = warnings.showwarning

        def hook(message, category, filename, lineno, file=None, line=None):
            if "synchronizing CUDA operation" in str(message):
                records.append(traceback.extract_stack()[:-1])
            else:
                previous(message, category, filename, lineno, file, line)

        warnings.showwarning = hook
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield records
        finally:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode(0)


def section_hostsync(ctx: CheckContext) -> Dict:
    """Host syncs of one GradAug step, attributed to the code that asked for them."""
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from ..gradaug import SubnetSampler, build_task, gradaug_step

    cfg = ctx.cfg(divisor=ctx.aligned_divisor)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    sampler, task, batch = SubnetSampler.from_config(cfg), build_task(cfg, model), ctx.batch(cfg)
    with EventStorage(0):
        gradaug_step(model, batch, sampler, task)  # warm-up: lazy initialisations out of the way
        with record_host_syncs(ctx.cuda) as records:
            out = gradaug_step(model, batch, sampler, task)
        first_error = None
        if ctx.cuda:
            torch.cuda.set_sync_debug_mode("error")
            try:
                gradaug_step(model, batch, sampler, task)
            except RuntimeError as e:
                if "synchronizing CUDA operation" not in str(e):
                    raise
                first_error = attribute_sync(traceback.extract_tb(e.__traceback__))
            finally:
                torch.cuda.set_sync_debug_mode(0)
    syncs = [attribute_sync(frames) for frames in records]
    sites = {}
    for s in syncs:
        sites.setdefault(s["where"], dict(s, count=0))["count"] += 1
    ours = [s for s in syncs if s["category"] == "gradaug_det"]
    unexpected = sorted({s["where"] for s in ours if s["function"] not in ALLOWED_GRADAUG_SYNCS})
    allowed = sum(s["function"] in ALLOWED_GRADAUG_SYNCS for s in ours)
    ok = not unexpected and (allowed == 1 or not ctx.cuda)
    counts = {c: sum(s["category"] == c for s in syncs) for c in ("gradaug_det", "detectron2", "backward", "other")}
    del model, task
    _free(ctx.device)
    if ctx.cuda:
        summary = (f"{len(syncs)} host syncs in one step with {len(out.specs)} sub-networks: " +
                   ", ".join(f"{v} {k}" for k, v in counts.items() if v) +
                   (f"; GradAug's own: {allowed} in check_finite_losses" if not unexpected
                    else f"; UNEXPECTED GradAug syncs at {', '.join(unexpected)}") +
                   (f"; 'error' mode stops at {first_error['where']} ({first_error['category']})" if first_error else ""))
    else:
        summary = "no CUDA: sync debug mode not set, nothing recorded (the step ran)"
    return {"cuda": ctx.cuda, "syncs": len(syncs), "by_category": counts,
            "sites": sorted(sites.values(), key=lambda s: -s["count"]), "unexpected_gradaug_sites": unexpected,
            "allowed_gradaug_syncs": allowed, "first_sync_in_error_mode": first_error, "ok": ok, "summary": summary}


def section_syncbn(ctx: CheckContext) -> Dict:
    """SyncBN at sub-widths in a one-process group, in a child process (the group dies with it)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "syncbn.json")
        cmd = [sys.executable, "-m", "gradaug_det.benchmark.gpu_check", "syncbn", ctx.device,
               "1" if ctx.tiny else "0", result, tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(60.0, ctx.left()))
        if proc.returncode != 0 or not os.path.exists(result):
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"the SyncBN worker failed (exit {proc.returncode}): {last}\n{proc.stderr[-4000:]}")
        with open(result) as f:
            out = json.load(f)
    out["summary"] = (f"{out['backend']}, {out['world_size']} process, DDP: " + "; ".join(
        f"{r['norm']} w={r['width']:g} max abs diff out {r['max_abs_diff_out']:.1e} grad {r['max_abs_diff_grad']:.1e}"
        for r in out["rows"] if r["width"] in (1.0, 0.5)) + (" -> ok" if out["ok"] else " -> MISMATCH"))
    return out


def _syncbn_worker(device: str, tiny: bool, result: str, tmp: str) -> None:
    """Child process of :func:`section_syncbn`: build, compare, write ``result``, exit hard."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from detectron2.layers import ShapeSpec

    from .. import slim
    from ..modeling import build_slimmable_resnet_fpn_backbone
    from ..slim import preferred_channel_divisor

    from .backbone import backbone_cfg

    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
    if device == "cuda":
        torch.cuda.set_device(0)
    size = 64 if tiny else 320
    depth = 18 if tiny else 50
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size, device=device)
    rows = []
    reference = None
    # detectron2's "SyncBN" is torch's nn.SyncBatchNorm, which DDP refuses on CPU modules;
    # "naiveSyncBN" is detectron2's NaiveSyncBatchNorm (all-reduce of mean and mean of squares)
    for norm in ("BN", "SyncBN", "naiveSyncBN") if device == "cuda" else ("BN", "naiveSyncBN"):
        cfg = backbone_cfg(depth=depth, norm=norm, freeze_at=0, divisor=preferred_channel_divisor(device))
        torch.manual_seed(0)
        model = build_slimmable_resnet_fpn_backbone(cfg, ShapeSpec(channels=3)).to(device).train()
        if reference is not None:
            model.load_state_dict(reference.module.state_dict())
        ddp = DDP(model, device_ids=[0] if device == "cuda" else None)
        for w in (1.0, 0.9, 0.75, 0.5):
            for p in model.parameters():
                p.grad = None
            with slim.width(model, w):
                out = ddp(x)
                loss = sum((v.float() ** 2).mean() for v in out.values())
            loss.backward()
            outs = torch.cat([v.detach().float().flatten() for v in out.values()])
            grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            if reference is None:
                rows.append({"norm": norm, "width": w, "out": outs, "grad": grads})
            else:
                ref = next(r for r in rows if r["norm"] == "BN" and r["width"] == w)
                rows.append({"norm": norm, "width": w,
                             "max_abs_diff_out": float((outs - ref["out"]).abs().max()),
                             "max_abs_diff_grad": float((grads - ref["grad"]).abs().max()),
                             "out_scale": float(ref["out"].abs().max()), "grad_scale": float(ref["grad"].abs().max())})
        if reference is None:
            reference = ddp
    rows = [r for r in rows if r["norm"] != "BN"]
    # same arithmetic up to reduction order (cuDNN's BN vs the sliced path): relative 1e-4
    ok = all(r["max_abs_diff_out"] <= 1e-4 * max(1.0, r["out_scale"])
             and r["max_abs_diff_grad"] <= 1e-4 * max(1.0, r["grad_scale"]) for r in rows)
    with open(result, "w") as f:
        json.dump({"backend": backend, "world_size": dist.get_world_size(), "rows": rows, "ok": ok,
                   "note": "one process: SyncBN's statistics are the local batch's (no all-reduce); "
                           "tests/slim/test_slim_syncbn_gloo.py checks the 2-process reduction"}, f)
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # see tests/slim/test_slim_syncbn_gloo.py: gloo's run-loop thread at finalization


def section_cudnn(ctx: CheckContext) -> Dict:
    """cudnn.benchmark on / off while the width changes at every step."""
    from detectron2.layers import ShapeSpec

    from .. import slim
    from ..modeling import build_slimmable_resnet_fpn_backbone

    from .backbone import backbone_cfg

    widths = [1.0, 0.95, 0.9, 0.85, 0.8, 0.75] if not ctx.tiny else [1.0, 0.9, 0.75]
    size, depth = (64, 18) if ctx.tiny else (512, 50)
    cfg = backbone_cfg(depth=depth, norm="FrozenBN", freeze_at=2, divisor=1)
    torch.manual_seed(0)
    model = build_slimmable_resnet_fpn_backbone(cfg, ShapeSpec(channels=3)).to(ctx.device).train()
    x = torch.randn(2, 3, size, size, device=ctx.device)
    previous = torch.backends.cudnn.benchmark
    rows, outputs = [], {}
    try:
        for bench in (False, True):
            torch.backends.cudnn.benchmark = bench
            for rnd in range(2):
                for w in widths:
                    for p in model.parameters():
                        p.grad = None
                    if ctx.cuda:
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    with slim.width(model, w):
                        out = model(x)
                    sum(v.float().mean() for v in out.values()).backward()
                    if ctx.cuda:
                        torch.cuda.synchronize()
                    rows.append({"benchmark": bench, "round": rnd, "width": w, "ms": (time.perf_counter() - t0) * 1e3})
                    if rnd == 1:
                        outputs[(bench, w)] = out["p2"].detach().float()
    finally:
        torch.backends.cudnn.benchmark = previous
    diffs = {w: float((outputs[(True, w)] - outputs[(False, w)]).abs().max()) for w in widths}
    scale = max(float(o.abs().max()) for o in outputs.values())
    ok = all(d <= 1e-3 * max(1.0, scale) for d in diffs.values())  # TF32/algorithm choice may differ slightly

    def ms(bench, rnd):
        return sum(r["ms"] for r in rows if r["benchmark"] == bench and r["round"] == rnd)

    summary = (f"one sweep of {len(widths)} widths, fwd+bwd: benchmark off {ms(False, 0):.0f} / {ms(False, 1):.0f} ms, "
               f"on {ms(True, 0):.0f} (autotuning) / {ms(True, 1):.0f} ms (first / second sweep); "
               f"outputs {'equal' if ok else 'DIFFER'} (max {max(diffs.values()):.1e})")
    return {"rows": rows, "max_abs_diff": diffs, "ok": ok, "cuda": ctx.cuda, "input": [2, 3, size, size],
            "depth": depth, "summary": summary}


def section_iteration(ctx: CheckContext) -> Dict:
    """Baseline vs GradAug d=1 / aligned (d=8 on a GPU), fp32 and AMP: s/iter, allocator peak, time / cost model."""
    from detectron2.modeling import build_model

    from ..gradaug import DetectionTask, GradAugOptions, SubnetSampler
    from .iteration import compare, measure_iterations, measure_slicing

    iters, warmup = (1, 0) if ctx.tiny else (ctx.iters, ctx.warmup)
    precisions = [None, ctx.amp_dtypes()[0]]
    plan_cfg = ctx.cfg()
    sampler = SubnetSampler.from_config(plan_cfg)
    plan = [sampler.sample() for _ in range(warmup + iters)]
    results = []
    for dtype in precisions:
        measured = {}
        modes = [("baseline", 1), ("gradaug", 1), ("gradaug", ctx.aligned_divisor)]
        if ctx.tiny and dtype is not None:  # the CPU smoke run: AMP's code path once, not every mode
            modes.remove(("gradaug", 1))
        for mode, divisor in modes:
            ctx.progress(f"iteration: {_dtype_name(dtype)} {mode} d={divisor} ({ctx.elapsed():.0f} s)")
            cfg = ctx.cfg(divisor)
            torch.manual_seed(0)
            model = build_model(cfg).train()
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
            task = DetectionTask(model, GradAugOptions.from_yacs(cfg))
            measured[(mode, divisor)] = measure_iterations(
                model, ctx.batch(cfg), optimizer, plan=None if mode == "baseline" else plan, task=task,
                iters=iters, warmup=warmup, amp=dtype)
            if dtype is None and (mode, divisor) == ("gradaug", ctx.aligned_divisor):
                # slicing vs narrow kernels per sub-network (fp32, aligned; the first timed
                # iteration's sub-networks: one pruned model each)
                ctx.progress(f"iteration: slimmed vs pruned backbones ({ctx.elapsed():.0f} s)")
                measured[(mode, divisor)]["slicing"] = measure_slicing(
                    model, cfg, measured[(mode, divisor)], plan, warmup, reps=1 if ctx.tiny else 3, iterations=1)
            del model, optimizer, task
            _free(ctx.device)
        base = measured[("baseline", 1)]
        results.append({"precision": _dtype_name(dtype), "mode": "baseline", "divisor": "-",
                        "median_s": base["median_s"], "peak_mb": base["peak_mb"], "time_over_baseline": 1.0,
                        "model_s": base["median_s"], "time_over_model": 1.0, "memory_ratio": 1.0})
        for divisor in (d for m, d in modes if m == "gradaug"):
            c = compare(base, measured[("gradaug", divisor)], plan, warmup)
            it = c["iteration"]
            results.append({"precision": _dtype_name(dtype), "mode": "gradaug", "divisor": divisor,
                            "median_s": it["median_s"], "peak_mb": it["peak_mb"],
                            "time_over_baseline": it["time_over_baseline"], "model_s": it["model_s"],
                            "time_over_model": it["time_over_model"], "memory_ratio": it["memory_ratio"],
                            "passes": c["passes"], "overhead_s": c["overhead_s"],
                            "slicing": measured[("gradaug", divisor)].get("slicing")})
    kind = "CUDA allocator peak" if ctx.cuda else "peak RSS (one process: not per mode)"
    aligned = [r for r in results if r["divisor"] == ctx.aligned_divisor]
    summary = "; ".join(f"{r['precision']} d={r['divisor']}: {r['median_s']:.3f} s/iter, {r['time_over_model']:.2f}x model, "
                        f"memory {r['memory_ratio']:.2f}x" for r in aligned)
    return {"config": TINY_CONFIG if ctx.tiny else FULL_CONFIG, "image_hw": list(ctx.image_size()), "batch": 2,
            "iters": iters, "warmup": warmup, "memory_kind": kind, "rows": results,
            "plan": [[s.describe() for s in specs] for specs in plan], "summary": summary}


def section_backbone(ctx: CheckContext) -> Dict:
    """The backbone benchmark at widths 1.0 / 0.9 / 0.75 / 0.5 (divisor 1 and the aligned one)."""
    from .backbone import BackboneBench, run_backbone_benchmark

    bench = BackboneBench(depth=18 if ctx.tiny else 50, size=32 if ctx.tiny else 800, batch=2,
                          iters=1 if ctx.tiny else 10, warmup=0 if ctx.tiny else 2, divisor=ctx.aligned_divisor,
                          widths=[0.9, 0.75, 0.5], device=ctx.device)
    rows = run_backbone_benchmark(bench)
    aligned = [r for r in rows if r["divisor"] == ctx.aligned_divisor]
    summary = ", ".join(f"w={r['width']:g}: {r['time_ratio']:.2f} time vs {r['flop_ratio']:.2f} FLOPs" for r in aligned)
    return {"settings": bench.__dict__, "rows": rows, "summary": summary}


_FUNCS = {name: globals()[f"section_{name}"] for name in SECTIONS}
#: rough share of the budget each section needs on a GPU (to skip what cannot finish)
_NEEDS_S = {"env": 1, "amp": 40, "hostsync": 30, "syncbn": 30, "cudnn": 30, "iteration": 240, "backbone": 60}


def run_sections(ctx: CheckContext, sections: List[str]) -> Dict[str, Dict]:
    """Run ``sections`` in order; each records ``status`` (ok / failed / skipped), ``seconds``
    and its results or its error; a failure never stops the others.

    Raises:
        ValueError: for an unknown section name (before anything runs).
    """
    unknown = [s for s in sections if s not in _FUNCS]
    if unknown:
        raise ValueError(f"unknown gpu_check section(s) {unknown}; known: {', '.join(SECTIONS)}")
    out = {}
    for name in sections:
        need = 0 if ctx.tiny else _NEEDS_S[name]
        if ctx.left() < need:
            out[name] = {"status": "skipped", "reason": f"time budget: {ctx.left():.0f} s left, needs ~{need} s",
                         "summary": "skipped (time budget)"}
            ctx.progress(f"[{ctx.elapsed():5.0f} s] {name}: skipped (budget)")
            continue
        ctx.progress(f"[{ctx.elapsed():5.0f} s] {name} ...")
        t0 = time.perf_counter()
        try:
            res = _FUNCS[name](ctx)
            res["status"] = "ok" if res.get("ok", True) else "failed"
        except Exception as e:  # recorded, the run goes on
            res = {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
                   "summary": f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
            _free(ctx.device)
        res["seconds"] = time.perf_counter() - t0
        out[name] = res
        ctx.progress(f"[{ctx.elapsed():5.0f} s] {name}: {res['status']} ({res['seconds']:.0f} s) "
                     f"{res.get('summary', '')}")
    return out


def markdown_report(ctx: CheckContext, results: Dict[str, Dict]) -> str:
    """One Markdown document: the check table, then the iteration and backbone tables."""
    from .report import device_name, markdown_table

    lines = [f"# gpu_check on {device_name(ctx.device)}" + (" (tiny sizes)" if ctx.tiny else ""), "",
             markdown_table(["section", "status", "seconds", "result"],
                            [[k, v["status"], f"{v.get('seconds', 0):.0f}", v.get("summary", "")]
                             for k, v in results.items()])]
    it = results.get("iteration", {})
    if it.get("status") == "ok":
        h, w = it["image_hw"]
        lines += ["", f"Mask R-CNN ({it['config']}), batch {it['batch']} at {h}x{w}, {it['iters']} timed iterations "
                      f"after {it['warmup']}; memory: {it['memory_kind']}", "",
                  markdown_table(["precision", "mode", "divisor", "s/iter", "time / baseline", "cost model s",
                                  "time / model", "peak MiB", "memory / baseline"],
                                 [[r["precision"], r["mode"], r["divisor"], f"{r['median_s']:.3f}",
                                   f"{r['time_over_baseline']:.2f}", f"{r['model_s']:.3f}",
                                   f"{r['time_over_model']:.2f}", f"{r['peak_mb']:.0f}", f"{r['memory_ratio']:.3f}"]
                                  for r in it["rows"]])]
        for r in it["rows"]:
            if r["mode"] != "gradaug" or r["precision"] != "fp32" or not r.get("slicing"):
                continue
            lines += ["", f"Per pass, fp32, divisor {r['divisor']} (mean over the timed iterations; slicing = "
                          "backbone + FPN forward and backward slimmed - pruned to a stock network of the width, "
                          "narrow kernels = pruned - its training FLOPs at the full backbone's rate; both from the "
                          "first timed iteration):", "",
                      markdown_table(["pass", "width", "input HxW", "model ms", "measured ms", "time / model",
                                      "slicing ms", "narrow kernels ms"],
                                     [[p["pass"], f"{p['width_mean']:.3f}",
                                       "x".join(f"{v:.0f}" for v in p["input_hw_mean"]), f"{p['model_s'] * 1e3:.1f}",
                                       f"{p['measured_s'] * 1e3:.1f}", f"{p['time_over_model']:.2f}",
                                       f"{p.get('slicing_s', 0.0) * 1e3:.1f}", f"{p.get('narrow_s', 0.0) * 1e3:.1f}"]
                                      for p in r["passes"]])]
    bb = results.get("backbone", {})
    if bb.get("status") == "ok":
        from .backbone import backbone_markdown

        lines += ["", backbone_markdown(bb["rows"], bb["settings"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "syncbn":
    _syncbn_worker(sys.argv[2], sys.argv[3] == "1", sys.argv[4], sys.argv[5])
