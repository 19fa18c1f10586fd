"""Export one width of a slimmable Mask/Faster R-CNN as TorchScript or ONNX (tracing).

The exported network is the *pruned* one (:func:`gradaug_det.deploy.prune.pruned_from_config`:
a physically smaller stock detectron2 model, BN calibration honoured), traced the way
detectron2's ``tools/deploy/export_model.py`` traces with ``--export-method tracing``:
:class:`detectron2.export.TracingAdapter` around ``model.inference(..., do_postprocess=False)``.

The exported model
    takes one image, a float32 tensor ``(C, H, W)`` in ``cfg.INPUT.FORMAT`` (e.g. BGR,
    0-255), already resized as detectron2's test-time ``ResizeShortestEdge`` does
    (``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``); normalisation and padding happen inside.
    It returns detectron2's flattened ``Instances`` of that image, in this order
    (:data:`OUTPUT_NAMES` for Mask R-CNN): ``pred_boxes`` ``(N, 4)`` float32 XYXY in the
    input's pixels, ``pred_classes`` ``(N,)`` int64, ``pred_masks`` ``(N, 1, M, M)`` float32
    mask probabilities in each box (not pasted into the image: detectron2's
    ``paste_masks_in_image`` does that), ``scores`` ``(N,)`` float32, ``image_size`` ``(2,)``
    int64 (H, W). Faster R-CNN has no ``pred_masks``.

Limits (tracing)
    One image per call (no batch dimension); the number of detections N is data-dependent
    (both formats keep it dynamic); the ONNX graph is written with opset :data:`ONNX_OPSET`
    by torch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``):
    torch 2.14's default ``dynamo=True`` exporter needs ``onnxscript`` and ``torch.export``,
    which detectron2's data-dependent RoI heads do not pass. Only
    ``META_ARCHITECTURE: GeneralizedRCNN`` with a ``build_slimmable_resnet_fpn_backbone``
    backbone is exported (:func:`check_exportable`).
"""
import logging
import math
import os
import statistics
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

import detectron2.data.transforms as T
from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import read_image
from detectron2.export import TracingAdapter

from ..benchmark.report import write_json
from ..utils.io import atomic_path
from ..slim import check_width, width
from ..utils.analysis import count_parameters
from .prune import pruned_from_config

__all__ = [
    "FORMATS",
    "ONNX_OPSET",
    "OUTPUT_NAMES",
    "EXTENSIONS",
    "RELATIVE_TOLERANCE",
    "ExportMismatch",
    "check_exportable",
    "load_sample_image",
    "flattened_inference",
    "export_traced",
    "run_exported",
    "compare_detections",
    "median_latency_ms",
    "export_width",
]

logger = logging.getLogger(__name__)

#: Formats :func:`export_width` writes.
FORMATS = ("torchscript", "onnx")
#: File extension per format (detectron2's: model.ts / model.onnx).
EXTENSIONS = {"torchscript": "ts", "onnx": "onnx"}
#: ONNX opset of the exported graph (torch's TorchScript-based exporter supports up to 20).
ONNX_OPSET = 17
#: Output names of an exported Mask R-CNN (flattened ``Instances`` fields, then the image size).
OUTPUT_NAMES = ("pred_boxes", "pred_classes", "pred_masks", "scores", "image_size")

#: Relative tolerance of the exported model's outputs, derived from float32 arithmetic:
#: unit roundoff u = 2**-24 = 5.96e-8. The exported graph computes the same operations as
#: PyTorch but its kernels may sum in another order (oneDNN / ONNX Runtime fusions, pruned
#: instead of sliced weights). A sum of K rounded terms in another order differs by about
#: sqrt(K) u typically (K u at worst); the widest accumulation here is a 3x3 convolution over
#: 512 channels, K = 4608, sqrt(K) u = 4.0e-6, and errors add up over the ~25 layers between
#: the image and a box or score: 25 x 4.0e-6 = 1.0e-4. Boxes are compared at 1e-4 of the box
#: scale (the input's longer side, in pixels: every coordinate is within it), scores and mask
#: probabilities (in [0, 1]) at 1e-4 absolute; classes exactly.
RELATIVE_TOLERANCE = 1e-4


class ExportMismatch(RuntimeError):
    """The exported model's outputs differ from the PyTorch model's beyond the tolerance."""


def check_exportable(cfg, fmt: str) -> None:
    """Refuse, before any work, what :func:`export_width` cannot export.

    Args:
        cfg: the slimmable model's config.
        fmt: one of :data:`FORMATS`.

    Raises:
        ValueError: one line naming the key or format, its value and what is supported.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not supported; use one of {', '.join(FORMATS)}")
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch != "GeneralizedRCNN":
        raise ValueError(f"MODEL.META_ARCHITECTURE {arch!r} cannot be exported: only GeneralizedRCNN "
                         "(Faster / Mask R-CNN) models are (tracing of model.inference)")
    backbone = cfg.MODEL.BACKBONE.NAME
    if backbone != "build_slimmable_resnet_fpn_backbone":
        raise ValueError(f"MODEL.BACKBONE.NAME {backbone!r} is not a slimmable backbone: export prunes "
                         "'build_slimmable_resnet_fpn_backbone' models (for a stock detectron2 model use "
                         "detectron2's tools/deploy/export_model.py)")
    if cfg.MODEL.KEYPOINT_ON:
        raise ValueError("MODEL.KEYPOINT_ON True: keypoint heads are not supported by this export; set it False")
    if fmt == "onnx":
        import importlib.util

        missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            raise ValueError(f"--format onnx needs {' and '.join(missing)}: pip install -e '.[export]'")


def load_sample_image(cfg, path: Optional[str] = None) -> torch.Tensor:
    """The sample image as the exported model takes it: float32 ``(C, H, W)`` in ``INPUT.FORMAT``.

    An image file is read in ``cfg.INPUT.FORMAT`` and resized as detectron2's
    ``DefaultPredictor`` does (``ResizeShortestEdge`` to ``INPUT.MIN_SIZE_TEST``, longer side
    at most ``INPUT.MAX_SIZE_TEST``); a ``.pt`` file (``torch.load(weights_only=True)``) must
    hold a ``(C, H, W)`` tensor already in that form, used as it is. Without ``path``: the first
    image of ``DatasetCatalog.get(cfg.DATASETS.TEST[0])``, read and resized likewise.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a tensor that is not ``(C, H, W)`` with ``C = len(MODEL.PIXEL_MEAN)``, or no
            test set.
    """
    channels = len(cfg.MODEL.PIXEL_MEAN)
    if path is not None and not os.path.isfile(path):
        raise FileNotFoundError(f"--sample-image {path}: no such file")
    if path is not None and path.endswith(".pt"):
        image = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != channels:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"--sample-image {path} holds {shape}; expected a ({channels}, H, W) tensor "
                             f"in INPUT.FORMAT {cfg.INPUT.FORMAT}")
        return image.float().contiguous()
    if path is None:
        if not cfg.DATASETS.TEST:
            raise ValueError("DATASETS.TEST is empty: give --sample-image")
        path = DatasetCatalog.get(cfg.DATASETS.TEST[0])[0]["file_name"]
    array = read_image(path, format=cfg.INPUT.FORMAT)
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
    array = aug.get_transform(array).apply_image(array)
    return torch.as_tensor(array.astype("float32").transpose(2, 0, 1)).contiguous()


def _inference(model, inputs):
    # do_postprocess=False: boxes in the input's pixels and RoI masks (detectron2's export does so)
    return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]


def flattened_inference(model: nn.Module, image: torch.Tensor) -> List[torch.Tensor]:
    """What the exported model returns, computed by ``model`` in PyTorch (eval mode, no grad).

    Args:
        model: a ``GeneralizedRCNN`` (slimmable under :func:`gradaug_det.width`, or pruned).
        image: ``(C, H, W)`` float32 (:func:`load_sample_image`).

    Returns:
        The flattened outputs (:data:`OUTPUT_NAMES`), on the CPU.
    """
    adapter = TracingAdapter(model, [{"image": image}], _inference)
    with torch.no_grad():
        return [t.cpu() for t in adapter(image)]


def _output_names(adapter) -> List[str]:
    schema = adapter.outputs_schema.schemas[0].schemas[0]  # list -> dict "instances" -> Instances
    return list(schema.keys) + ["image_size"]


def export_traced(model: nn.Module, image: torch.Tensor, fmt: str, path: str) -> List[str]:
    """Trace ``model`` on ``image`` and write it to ``path`` (not atomically: see :func:`export_width`).

    Args:
        model: a stock ``GeneralizedRCNN`` in eval mode (the pruned model).
        image: ``(C, H, W)`` float32 sample; H and W stay dynamic in ONNX.
        fmt: ``"torchscript"`` (``torch.jit.trace``) or ``"onnx"`` (``torch.onnx.export``,
            ``dynamo=False``, opset :data:`ONNX_OPSET`).
        path: the file to write.

    Returns:
        The output names (:data:`OUTPUT_NAMES` for Mask R-CNN).
    """
    image = image.to(next(model.parameters()).device)
    adapter = TracingAdapter(model, [{"image": image}], _inference)
    with torch.no_grad():
        adapter(image)  # sets adapter.outputs_schema
    names = _output_names(adapter)
    with warnings.catch_warnings(), torch.no_grad():
        # the tracer warns about every Python bool / int of detectron2's code (shape checks); the
        # comparison after export is what tells whether the trace is right
        warnings.simplefilter("ignore")
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(adapter, (image,), check_trace=False), path)
        else:
            dynamic = {"image": {1: "height", 2: "width"}}
            dynamic.update({n: {0: "detections"} for n in names if n != "image_size"})
            torch.onnx.export(adapter.cpu(), (image.cpu(),), path, dynamo=False, opset_version=ONNX_OPSET,
                              input_names=["image"], output_names=names, dynamic_axes=dynamic)
            model.to(image.device)
    return names


def run_exported(path: str, fmt: str) -> Callable[[torch.Tensor], List[torch.Tensor]]:
    """Load an exported file; returns ``image (C, H, W) -> outputs`` (CPU tensors).

    TorchScript runs with ``torch.jit.load`` on the image's device; ONNX with ONNX Runtime's
    CPU provider.
    """
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in favour of torch.export
            module = torch.jit.load(path, map_location="cpu")

        def run(image):
            module.to(image.device)
            with torch.no_grad():
                return [t.cpu() for t in module(image)]
        return run
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda image: [torch.from_numpy(o) for o in session.run(None, {"image": image.cpu().numpy()})]


def _match(ref_boxes, ref_classes, ref_scores, boxes, classes, scores) -> List[int]:
    """For each reference detection, the index of the same-class exported detection closest
    in box and score (greedy, each used once): sorting by score cannot order near-ties alike."""
    free = set(range(len(boxes)))
    order = []
    for i in range(len(ref_boxes)):
        best, cost = None, math.inf
        for j in free:
            if classes[j] != ref_classes[i]:
                continue
            c = float((boxes[j] - ref_boxes[i]).abs().max()) + float((scores[j] - ref_scores[i]).abs())
            if c < cost:
                best, cost = j, c
        if best is None:
            raise ExportMismatch(f"detection {i} (class {int(ref_classes[i])}, score {float(ref_scores[i]):.4f}) "
                                 "of the PyTorch model has no counterpart in the exported model")
        free.discard(best)
        order.append(best)
    return order


def compare_detections(ref: Sequence[torch.Tensor], out: Sequence[torch.Tensor], names: Sequence[str],
                       box_scale: float) -> Dict[str, float]:
    """Largest differences of the exported model's detections from the reference's.

    Detections are matched one to one (same class, nearest box and score), so detections whose
    scores tie to float rounding may come in another order.

    Args:
        ref, out: flattened outputs (:func:`flattened_inference`, :func:`run_exported`).
        names: their names (:data:`OUTPUT_NAMES`).
        box_scale: the box scale in pixels (the input's longer side) for the box tolerance.

    Returns:
        ``{"detections", "boxes", "scores", "masks" (if any), "box_tolerance", "tolerance"}``:
        the number of detections, the largest absolute differences (pixels; probabilities) and the
        tolerances (:data:`RELATIVE_TOLERANCE`).

    Raises:
        ExportMismatch: different numbers of detections, an unmatched detection, or a difference
            beyond the tolerance (one line).
    """
    r, o = dict(zip(names, ref)), dict(zip(names, out))
    n_ref, n_out = len(r["scores"]), len(o["scores"])
    if n_ref != n_out:
        raise ExportMismatch(f"the exported model returns {n_out} detections, the PyTorch model {n_ref}")
    order = _match(r["pred_boxes"], r["pred_classes"], r["scores"], o["pred_boxes"], o["pred_classes"], o["scores"])
    idx = torch.as_tensor(order, dtype=torch.long)
    diffs = {"detections": n_ref}
    for key, name in (("boxes", "pred_boxes"), ("scores", "scores"), ("masks", "pred_masks")):
        if name in r:
            diff = (r[name].float() - o[name].float()[idx]).abs()
            diffs[key] = float(diff.max()) if diff.numel() else 0.0
    diffs["box_tolerance"] = RELATIVE_TOLERANCE * box_scale
    diffs["tolerance"] = RELATIVE_TOLERANCE
    bad = [f"{k} {diffs[k]:.3g} > {diffs['box_tolerance'] if k == 'boxes' else RELATIVE_TOLERANCE:.3g}"
           for k in ("boxes", "scores", "masks")
           if k in diffs and diffs[k] > (diffs["box_tolerance"] if k == "boxes" else RELATIVE_TOLERANCE)]
    if bad:
        raise ExportMismatch("the exported model disagrees with the PyTorch model beyond float32 tolerance: "
                             + ", ".join(bad))
    return diffs


def median_latency_ms(fn: Callable[[], object], runs: int = 5, device=None) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``runs`` calls after one warm-up call
    (CUDA synchronised before and after each call on a CUDA ``device``)."""
    cuda = device is not None and torch.device(device).type == "cuda"
    times = []
    for i in range(runs + 1):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        if i:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _tensor_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def export_width(cfg, w: float, fmt: str, output_dir: str, image: torch.Tensor, *,
                 weights: Optional[str] = None, runs: int = 5) -> Dict:
    """Export ``cfg``'s model at width ``w`` and check it against the slimmable model.

    Builds the pruned model (:func:`gradaug_det.deploy.prune.pruned_from_config`: BN
    calibration per ``TEST.BN_CALIBRATION_BATCHES``), traces it (:func:`export_traced`) into a
    temporary file beside ``<output_dir>/model_w<w>.<ts|onnx>``, runs that file on ``image``
    and compares its detections with the slimmable model's at width ``w``
    (:func:`compare_detections`). Only when they agree is the file renamed into place
    (:func:`gradaug_det.utils.io.atomic_path`) and a JSON description of its input and
    outputs written beside it; on a mismatch nothing is written.

    Args:
        cfg: the slimmable model's config (:func:`check_exportable` passed).
        w: the width, in (0, 1].
        fmt: one of :data:`FORMATS`.
        output_dir: where to write (created if missing).
        image: the sample, ``(C, H, W)`` float32 (:func:`load_sample_image`).
        weights: checkpoint; default ``cfg.MODEL.WEIGHTS``.
        runs: calls per latency median.

    Returns:
        dict: ``path``, ``format``, ``width``, ``outputs`` (names), ``diff``
        (:func:`compare_detections`), ``file_bytes``, ``full_bytes`` (float tensors of the
        full-width model's state dict), ``params`` / ``params_full``, ``latency_ms`` /
        ``latency_ms_pytorch`` (median per image of the exported file and of the slimmable
        PyTorch model at width ``w``), ``device``, ``bn_calibration_batches``.

    Raises:
        ExportMismatch: the exported model disagrees (nothing written).
    """
    w = check_width(w)
    path = os.path.join(output_dir, f"model_w{w:g}.{EXTENSIONS[fmt]}")
    device = torch.device(cfg.MODEL.DEVICE)
    image = image.to(device)
    box_scale = float(max(image.shape[-2:]))
    with pruned_from_config(cfg, w, weights) as pruned:
        model, pruned_model = pruned.model, pruned.pruned_model
        with width(model, w):
            ref = flattened_inference(model, image)
        with atomic_path(path) as tmp:
            names = export_traced(pruned_model, image, fmt, tmp)
            run = run_exported(tmp, fmt)
            run_image = image if fmt == "torchscript" else image.cpu()
            diff = compare_detections(ref, run(run_image), names, box_scale)
            latency = median_latency_ms(lambda: run(run_image), runs, run_image.device)
            file_bytes = os.path.getsize(tmp)
        with width(model, w):
            latency_pt = median_latency_ms(lambda: flattened_inference(model, image), runs, device)
        full_bytes = _tensor_bytes(model)
        stats = {"path": path, "format": fmt, "width": w, "outputs": names, "diff": diff,
                 "file_bytes": file_bytes, "full_bytes": full_bytes,
                 "params": count_parameters(pruned_model), "params_full": count_parameters(model),
                 "latency_ms": latency, "latency_ms_pytorch": latency_pt, "device": str(device),
                 "bn_calibration_batches": pruned.info["bn_calibration_batches"]}
    description = {
        "format": fmt, "width": w, "opset": ONNX_OPSET if fmt == "onnx" else None,
        "source": pruned.info["source"], "bn_calibration_batches": stats["bn_calibration_batches"],
        "input": {"name": "image", "shape": ["C", "H", "W"], "dtype": "float32", "format": cfg.INPUT.FORMAT,
                  "min_size_test": cfg.INPUT.MIN_SIZE_TEST, "max_size_test": cfg.INPUT.MAX_SIZE_TEST},
        "outputs": names,
    }
    write_json(os.path.splitext(path)[0] + ".json", description)
    logger.info("Exported width %g (%s) to %s", w, fmt, path)
    return stats
