"""The cost model of a GradAug iteration: what each pass actually runs in training.

A GradAug iteration is the full network's pass followed by one pass per sub-network. Each
pass runs the forward *and the backward* of exactly the modules it executes, at its width
and on its input size: a ``soft`` sub-network pass, for example, runs the backbone and FPN
and the box head on the teacher's RoIs, but no RPN, no proposal sampling, no mask head.
An inference-mode FLOP count of the whole model at each width (what ``tools/benchmark.py``
used before) counts work the sub-network passes never do, and no backward at all.

This module counts the real thing. :class:`PassProbe` plugs into :func:`gradaug_step`
through its two hooks (``autocast``: wraps every forward; ``backward``: back-propagates
every loss), so the iteration that is counted or timed is the library's own, unchanged.
In ``"flops"`` mode every forward and every backward runs under
:class:`torch.utils.flop_counter.FlopCounterMode`; in ``"time"`` mode each phase of each
pass is timed (and its memory sampled).

Why ``FlopCounterMode`` and not fvcore's ``FlopCountAnalysis``: fvcore traces the model
with ``torch.jit.trace`` and counts the traced graph: one forward, in the mode it was
traced in, with inputs it can trace (detectron2 wraps inference-mode models for it; a
training-mode R-CNN with ``Instances`` inputs and loss-dict outputs does not trace), and
no backward. ``FlopCounterMode`` is a ``TorchDispatchMode``: it sees every aten op that
runs, forward or backward (``convolution_backward`` with its output mask, so frozen
layers get no weight-gradient FLOPs and the first layer no input-gradient FLOPs), in any
mode, under autocast, on any device. Both count matrix products and convolutions only
(element-wise work, norms, RoIAlign and NMS are free to both). Units differ: fvcore counts
one FLOP per multiply-add, ``FlopCounterMode`` two; on the same forward, ``FlopCounterMode``
= 2 x fvcore for convolutions and linear layers (tested).

The time model (:func:`cost_model`): a pass costs its training FLOPs at the throughput the
*baseline* achieved (seconds of the baseline's forward+backward per training FLOP of it),
and a GradAug iteration costs the baseline iteration plus its sub-network passes so
priced. What a GradAug iteration takes beyond that is overhead: slicing, the batch
transforms, teacher bookkeeping, and smaller layers running below the baseline's
throughput -- all visible per pass and per phase.
"""
import contextlib
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, ContextManager, Dict, List, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "PHASES",
    "PassRecord",
    "PassProbe",
    "cost_model",
    "count_train_flops",
    "rss_mb",
    "peak_rss_mb",
]

#: The phases of one pass, in the order they run. ``transform``: from the start of the
#: pass to the model's forward (the sub-network's batch transform, teacher RoIs mapped);
#: ``preprocess``: the model's input normalisation and padding (detectron2's
#: ``preprocess_image``), up to the backbone; ``backbone``: backbone (+FPN) forward,
#: weight slicing included; ``heads``: everything after the backbone inside the model's
#: forward (RPN, RoI heads, the soft-label loss); ``teacher``: after the model's forward
#: to the end of the pass's forward (the teacher's soft labels collected, losses summed);
#: ``backward``: the pass's backward.
PHASES = ("transform", "preprocess", "backbone", "heads", "teacher", "backward")


def rss_mb() -> float:
    """The process's current resident set size, in MiB (Linux ``/proc/self/statm``; else the peak).

    Returns:
        Resident memory in MiB.
    """
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):  # not Linux
        return peak_rss_mb()


def peak_rss_mb() -> float:
    """The process's peak resident set size so far, in MiB (``getrusage``; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class PassRecord:
    """What one pass ran and cost.

    Attributes:
        name: "full" for the full network (and the baseline's only pass), "sub1", ... for
            sub-networks in the order they ran.
        input_hw: the largest (height, width) in pixels of the images the model was given
            in this pass (before padding to the size divisibility).
        num_images: images in the pass's batch.
        fwd_flops, bwd_flops: training FLOPs (``FlopCounterMode``: 2 per multiply-add) of
            the pass's forward and backward (``"flops"`` mode only; 0 otherwise).
        backbone_fwd_flops: the part of ``fwd_flops`` spent in the model's ``backbone``.
        seconds: per phase of :data:`PHASES`, wall seconds (``"time"`` mode only).
        rss_mb: the largest resident set sampled at this pass's phase boundaries, MiB (CPU).
        peak_alloc_mb: CUDA allocator peak during this pass, MiB (CUDA only, else 0).
    """

    name: str
    input_hw: tuple = (0, 0)
    num_images: int = 0
    fwd_flops: int = 0
    bwd_flops: int = 0
    backbone_fwd_flops: int = 0
    seconds: Dict[str, float] = field(default_factory=dict)
    rss_mb: float = 0.0
    peak_alloc_mb: float = 0.0

    @property
    def flops(self) -> int:
        """Forward + backward training FLOPs of the pass."""
        return self.fwd_flops + self.bwd_flops

    @property
    def total_seconds(self) -> float:
        """Wall seconds of the pass, every phase."""
        return sum(self.seconds.values())

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists; ``flops`` and ``total_seconds`` included)."""
        out = asdict(self)
        out["input_hw"] = list(self.input_hw)
        out["flops"] = self.flops
        out["total_seconds"] = self.total_seconds
        return out


class PassProbe:
    """Counts or times every pass of whatever runs between its ``autocast`` and ``backward``.

    Use it as :func:`~gradaug_det.gradaug.gradaug_step`'s ``autocast`` and ``backward``
    (or around a baseline's ``model(batch)`` and ``loss.backward()``); each
    ``autocast()`` block opens a pass, the following ``backward(loss)`` closes it::

        probe = PassProbe(model, mode="flops")
        with probe:
            gradaug_step(model, batch, sampler, task, autocast=probe.autocast, backward=probe.backward)
        probe.passes   # [PassRecord("full", ...), PassRecord("sub1", ...), ...]

    Phase boundaries come from forward hooks on the model and on ``model.backbone`` (if
    it has one); on CUDA each boundary synchronises the device in ``"time"`` mode, so the
    phases are exact but the iteration is slower than an unprobed one (time those apart).

    Args:
        model: the network (DDP-wrapped or not) whose forward each pass calls.
        mode: "flops" (``FlopCounterMode`` over every forward and backward) or "time"
            (wall time per phase, resident memory / allocator peak per pass).
        autocast: the caller's own autocast factory (e.g. AMP), entered inside each pass.
        backward: the caller's own backward (e.g. through a grad scaler).

    Raises:
        ValueError: if ``mode`` is not "flops" or "time".
    """

    def __init__(self, model: nn.Module, mode: str = "time", *,
                 autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                 backward: Callable[[torch.Tensor], None] = torch.Tensor.backward):
        if mode not in ("flops", "time"):
            raise ValueError(f"PassProbe mode must be 'flops' or 'time', got {mode!r}")
        self.mode = mode
        self.model = model
        net = getattr(model, "module", model)  # DDP
        self.backbone = getattr(net, "backbone", None)
        self._inner_autocast = autocast
        self._inner_backward = backward
        try:
            self.device = next(model.parameters()).device
        except StopIteration:
            self.device = torch.device("cpu")
        self.passes: List[PassRecord] = []
        self._handles = []
        self._counter: Optional[FlopCounterMode] = None
        self._marks: Dict[str, float] = {}
        self._depth = 0

    # -- hooks --------------------------------------------------------------------------
    def __enter__(self) -> "PassProbe":
        self._handles = [self.model.register_forward_pre_hook(self._on_model_start),
                         self.model.register_forward_hook(self._on_model_end)]
        if self.backbone is not None:
            self._handles += [self.backbone.register_forward_pre_hook(self._on_backbone_start),
                              self.backbone.register_forward_hook(self._on_backbone_end)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _now(self) -> float:
        if self.mode == "flops":
            return float(self._counter.get_total_flops()) if self._counter is not None else 0.0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _mark(self, name: str) -> None:
        if not self.passes or self._depth == 0:
            return
        self._marks[name] = self._now()
        if self.mode == "time" and self.device.type != "cuda":
            self.passes[-1].rss_mb = max(self.passes[-1].rss_mb, rss_mb())

    def _on_model_start(self, module, args):
        if self.passes and self._depth and "model_start" not in self._marks:
            rec = self.passes[-1]
            images = _images_of(args[0]) if args else []
            if images:
                rec.num_images = len(images)
                rec.input_hw = (max(int(i.shape[-2]) for i in images), max(int(i.shape[-1]) for i in images))
            self._mark("model_start")

    def _on_model_end(self, module, args, output):
        if "model_end" not in self._marks:
            self._mark("model_end")

    def _on_backbone_start(self, module, args):
        if "backbone_start" not in self._marks:
            self._mark("backbone_start")

    def _on_backbone_end(self, module, args, output):
        if "backbone_end" not in self._marks:
            self._mark("backbone_end")

    # -- the two hooks of gradaug_step ---------------------------------------------------
    @contextlib.contextmanager
    def autocast(self):
        """Opens a pass; runs its forward under the caller's autocast (and the FLOP counter)."""
        rec = PassRecord("full" if not self.passes else f"sub{len(self.passes)}")
        self.passes.append(rec)
        self._marks = {}
        self._depth += 1
        if self.mode == "time" and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        counter = FlopCounterMode(display=False) if self.mode == "flops" else contextlib.nullcontext()
        try:
            with counter:
                self._counter = counter if self.mode == "flops" else None
                self._mark("start")
                with self._inner_autocast():
                    yield
                self._mark("end")
        finally:
            self._depth -= 1
        marks = self._marks
        if self.mode == "flops":
            rec.fwd_flops = int(counter.get_total_flops())
            if "backbone_start" in marks and "backbone_end" in marks:
                rec.backbone_fwd_flops = int(marks["backbone_end"] - marks["backbone_start"])
        else:
            order = ["start", "model_start", "backbone_start", "backbone_end", "model_end", "end"]
            present = [k for k in order if k in marks]
            # a phase without its marks (no backbone attribute, a model without hooks seen)
            # folds into the next one that is present
            seconds = {p: 0.0 for p in PHASES}
            names = {"model_start": "transform", "backbone_start": "preprocess", "backbone_end": "backbone",
                     "model_end": "heads", "end": "teacher"}
            for a, b in zip(present, present[1:]):
                seconds[names[b]] += marks[b] - marks[a]
            rec.seconds = seconds
        self._counter = None

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagates ``loss`` (through the caller's backward), counted or timed."""
        rec = self.passes[-1]
        if self.mode == "flops":
            with FlopCounterMode(display=False) as counter:
                self._inner_backward(loss)
            rec.bwd_flops = int(counter.get_total_flops())
            return
        start = self._timestamp()
        self._inner_backward(loss)
        end = self._timestamp()
        rec.seconds["backward"] = end - start
        if self.device.type == "cuda":
            rec.peak_alloc_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            rec.rss_mb = max(rec.rss_mb, rss_mb())

    def _timestamp(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def _images_of(batched_inputs) -> List[torch.Tensor]:
    """The image tensors of a detectron2 batch (list of dicts) or of a plain tensor batch."""
    if isinstance(batched_inputs, torch.Tensor):
        return [batched_inputs] if batched_inputs.dim() == 3 else list(batched_inputs)
    if isinstance(batched_inputs, (list, tuple)):
        return [d["image"] for d in batched_inputs if isinstance(d, dict) and isinstance(d.get("image"), torch.Tensor)]
    return []


def count_train_flops(run: Callable[[Callable, Callable], None], model: nn.Module) -> List[PassRecord]:
    """Training FLOPs of every pass ``run`` executes.

    Args:
        run: called as ``run(autocast, backward)``; it must open each pass's forward with
            ``with autocast():`` and back-propagate its loss with ``backward(loss)`` -- e.g.
            ``lambda a, b: gradaug_step(model, batch, sampler, task, autocast=a, backward=b)``.
        model: the network the passes call (for the phase hooks).

    Returns:
        One :class:`PassRecord` per pass with ``fwd_flops``, ``bwd_flops`` and
        ``backbone_fwd_flops`` filled in.
    """
    with PassProbe(model, "flops") as probe:
        run(probe.autocast, probe.backward)
    return probe.passes


def cost_model(baseline: PassRecord, baseline_iter_s: float, passes: List[PassRecord]) -> dict:
    """Price each pass and the iteration at the baseline's throughput.

    ``rate = baseline.total_seconds / baseline.flops`` (seconds per training FLOP: the
    baseline's forward + backward, every phase, over its forward + backward FLOPs). A
    pass's model time is ``rate * pass.flops``; the iteration's is the measured baseline
    iteration plus the sub-network passes priced so (the full pass *is* the baseline's
    pass; the optimizer step is the baseline's).

    Args:
        baseline: the baseline's one pass, with FLOPs and phase times filled in.
        baseline_iter_s: the baseline's measured seconds per iteration (median).
        passes: the GradAug iteration's passes (FLOPs filled in), full pass first.

    Returns:
        dict with ``rate_s_per_gflop``, ``pass_model_s`` (list, one per pass) and
        ``iteration_model_s``.

    Raises:
        ValueError: if the baseline has no FLOPs or no time recorded.
    """
    if baseline.flops <= 0 or baseline.total_seconds <= 0:
        raise ValueError(f"the baseline pass needs FLOPs and times to calibrate the cost model, got "
                         f"{baseline.flops} FLOPs and {baseline.total_seconds} s")
    rate = baseline.total_seconds / baseline.flops
    pass_model = [rate * p.flops for p in passes]
    return {"rate_s_per_gflop": rate * 1e9, "pass_model_s": pass_model,
            "iteration_model_s": baseline_iter_s + sum(pass_model[1:])}
