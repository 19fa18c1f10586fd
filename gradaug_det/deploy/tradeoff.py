"""Accuracy against cost of one slimmable detector over widths and test sizes.

For every width ``w`` (with and, for ``w < 1`` where asked, without BN calibration) the
model is pruned once (:func:`gradaug_det.deploy.prune.pruned_from_config`), then for
every test size ``s`` (``INPUT.MIN_SIZE_TEST = s``, ``MAX_SIZE_TEST`` scaled alike) the
pruned model is evaluated with detectron2's ``COCOEvaluator`` on ``DATASETS.TEST[0]``, its
backbone FLOPs counted on an ``s x s`` image (padded to the backbone's ``size_divisibility``,
as the model pads)
(:func:`gradaug_det.utils.analysis.backbone_flops`, 2 per multiply-add) and its latency per
image measured (:func:`gradaug_det.deploy.export.median_latency_ms` on the first test image,
on ``MODEL.DEVICE``). :func:`pareto_front` marks the configurations no other one beats in
both AP and cost; :func:`best_under_budget` picks one under a budget.
"""
import logging
import math
from typing import Dict, List, Optional, Sequence

import torch
from tqdm import tqdm

from detectron2.data import build_detection_test_loader
from detectron2.evaluation import COCOEvaluator, inference_on_dataset

from ..benchmark.report import markdown_table
from ..utils.io import atomic_path
from ..utils.analysis import backbone_flops, count_parameters
from .export import median_latency_ms
from .prune import pruned_from_config

__all__ = ["evaluate_tradeoff", "pareto_front", "best_under_budget", "tradeoff_markdown", "plot_tradeoff",
           "size_cfg"]

logger = logging.getLogger(__name__)


def size_cfg(cfg, size: int):
    """A copy of ``cfg`` testing at shorter side ``size`` (``MAX_SIZE_TEST`` scaled by
    ``size / MIN_SIZE_TEST``, rounded)."""
    out = cfg.clone()
    out.defrost()
    out.INPUT.MAX_SIZE_TEST = int(round(cfg.INPUT.MAX_SIZE_TEST * size / cfg.INPUT.MIN_SIZE_TEST))
    out.INPUT.MIN_SIZE_TEST = int(size)
    out.freeze()
    return out


def _evaluate(cfg, model) -> Dict[str, float]:
    dataset = cfg.DATASETS.TEST[0]
    results = inference_on_dataset(model, build_detection_test_loader(cfg, dataset),
                                   COCOEvaluator(dataset, output_dir=None))
    return {f"{task}_AP": float(results[task]["AP"]) for task in ("bbox", "segm") if task in results}


def _latency(cfg, model, runs: int) -> float:
    inputs = next(iter(build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])))[:1]

    def run():
        with torch.no_grad():
            model(inputs)
    return median_latency_ms(run, runs, cfg.MODEL.DEVICE)


def evaluate_tradeoff(cfg, widths: Sequence[float], sizes: Sequence[int], *, bn_calibration_batches: int = 0,
                      runs: int = 5, progress: bool = True) -> List[Dict]:
    """One row per (width, BN calibration, test size).

    Args:
        cfg: the slimmable model's config (``MODEL.WEIGHTS`` the checkpoint).
        widths: widths in (0, 1] (:func:`gradaug_det.evaluation.widths.normalize_widths` order).
        sizes: test sizes (shorter side, pixels), each > 0.
        bn_calibration_batches: N > 0 adds, for every width < 1, rows with BN statistics
            recomputed at that width on N training batches (``TEST.BN_CALIBRATION_BATCHES``).
        runs: calls per latency median.
        progress: a tqdm bar over the evaluations.

    Returns:
        Rows ``{"width", "size", "bn_calibration_batches", "bbox_AP", "segm_AP" (Mask R-CNN),
        "gflops" (backbone, s x s image padded as the model pads), "params", "latency_ms", "device"}``.
    """
    variants = [(w, n) for w in widths for n in ([0] + ([bn_calibration_batches] if bn_calibration_batches and w < 1
                                                         else []))]
    rows = []
    with tqdm(total=len(variants) * len(sizes), desc="tradeoff", disable=not progress) as bar:
        for w, n in variants:
            vcfg = cfg.clone()
            vcfg.defrost()
            vcfg.TEST.BN_CALIBRATION_BATCHES = n
            vcfg.freeze()
            with pruned_from_config(vcfg, w) as pruned:
                model = pruned.pruned_model
                params = count_parameters(model)
                for s in sizes:
                    bar.set_postfix_str(f"width {w:g}, size {s}" + (f", BN calibrated ({n})" if n else ""))
                    scfg = size_cfg(vcfg, s)
                    row = {"width": w, "size": int(s), "bn_calibration_batches": pruned.info["bn_calibration_batches"]}
                    row.update(_evaluate(scfg, model))
                    side = _padded(model, s)
                    row.update({"gflops": backbone_flops(model, side, side) / 1e9, "params": params,
                                "latency_ms": _latency(scfg, model, runs), "device": str(cfg.MODEL.DEVICE)})
                    rows.append(row)
                    bar.update()
    return rows


def _padded(model, size: int) -> int:
    """``size`` padded up to the backbone's ``size_divisibility`` (as the model pads its input)."""
    d = max(1, getattr(model.backbone, "size_divisibility", 1))
    return int(math.ceil(size / d) * d)


def _ap(row: Dict, metric: str) -> float:
    value = row.get(f"{metric}_AP", float("nan"))
    return -math.inf if value is None or math.isnan(value) else value


def pareto_front(rows: Sequence[Dict], cost: str, metric: str = "bbox") -> List[bool]:
    """Whether each row is on the Pareto front of ``metric`` AP (higher is better) against
    ``cost`` (``"gflops"`` or ``"latency_ms"``, lower is better): no other row has at least
    its AP at no more cost and is better in one of the two."""
    flags = []
    for r in rows:
        ap, c = _ap(r, metric), r[cost]
        flags.append(not any(_ap(o, metric) >= ap and o[cost] <= c and (_ap(o, metric) > ap or o[cost] < c)
                             for o in rows if o is not r))
    return flags


def best_under_budget(rows: Sequence[Dict], cost: str, budget: float, metric: str = "bbox") -> Optional[Dict]:
    """The row of highest ``metric`` AP with ``row[cost] <= budget`` (ties: the cheaper), or None."""
    fits = [r for r in rows if r[cost] <= budget]
    return max(fits, key=lambda r: (_ap(r, metric), -r[cost])) if fits else None


def _f(value, digits=1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def tradeoff_markdown(rows: Sequence[Dict], metric: str = "bbox", device: str = "") -> str:
    """The rows as a Markdown table, Pareto-front rows marked (``*``: GFLOPs, ``+``: latency)."""
    by_flops, by_time = pareto_front(rows, "gflops", metric), pareto_front(rows, "latency_ms", metric)
    headers = ["width", "size", "BN cal.", "bbox AP", "segm AP", "backbone GFLOPs", "params (M)", "ms / image",
               "Pareto"]
    table = [[f"{r['width']:g}", r["size"], r["bn_calibration_batches"] or "-", _f(r.get("bbox_AP")),
              _f(r.get("segm_AP")), _f(r["gflops"], 3), _f(r["params"] / 1e6, 3), _f(r["latency_ms"]),
              ("*" if f else "") + ("+" if t else "")] for r, f, t in zip(rows, by_flops, by_time)]
    return (f"# Width / test size trade-off\n\n{markdown_table(headers, table)}\n\n"
            f"Pareto front of {metric} AP: `*` against backbone GFLOPs (s x s image, 2 per multiply-add), "
            f"`+` against latency (median per image{', ' + device if device else ''}).\n")


def plot_tradeoff(rows: Sequence[Dict], path: str, metric: str = "bbox") -> None:
    """AP against GFLOPs and against latency, one marker per row, the Pareto front drawn as a
    line; written atomically (:func:`gradaug_det.utils.io.atomic_path`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, cost, label in ((axes[0], "gflops", "backbone GFLOPs"), (axes[1], "latency_ms", "ms / image")):
        for r in rows:
            ax.scatter(r[cost], _ap(r, metric), color="tab:blue" if not r["bn_calibration_batches"] else "tab:orange",
                       s=18)
            ax.annotate(f"w{r['width']:g}/{r['size']}", (r[cost], _ap(r, metric)), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
        front = sorted((r for r, f in zip(rows, pareto_front(rows, cost, metric)) if f), key=lambda r: r[cost])
        ax.plot([r[cost] for r in front], [_ap(r, metric) for r in front], color="tab:red", marker="o",
                mfc="none", ms=9, label="Pareto front")
        ax.set_xlabel(label)
        ax.set_ylabel(f"{metric} AP")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
