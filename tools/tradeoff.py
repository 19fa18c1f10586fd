#!/usr/bin/env python
"""AP against cost of a slimmable detector over widths and test sizes; the best under a budget.

For every (width, test size): bbox / segm AP (detectron2's COCOEvaluator on DATASETS.TEST[0])
of the model pruned to that width (``tools/prune.py``'s surgery; with
``--bn-calibration-batches N`` each width < 1 also with BN statistics recomputed at it),
parameters, backbone GFLOPs on a size x size image and latency per image on MODEL.DEVICE
(median of ``--runs``). Writes ``DIR/tradeoff.json``, ``DIR/tradeoff.md`` and ``DIR/tradeoff.png``
(AP against GFLOPs and against latency, the Pareto front drawn). With ``--budget-gflops`` or
``--budget-ms`` it names the best configuration under the budget and exports it
(``tools/export_model.py``'s export, ``--export-format``) to ``DIR/export``.

Example (on ``make demo``'s model; ``make tradeoff`` runs this)::

    python tools/tradeoff.py --config-file output/quickstart/mask_rcnn/config.yaml \\
        --widths 1.0 0.9 0.75 0.5 --sizes 128 112 96 --output output/quickstart/tradeoff \\
        --budget-gflops 0.5 MODEL.WEIGHTS output/quickstart/mask_rcnn/model_final.pth
"""
import argparse
import os

from detectron2.utils.logger import setup_logger

from gradaug_det.config import merge_user_config
from gradaug_det.engine.setup import get_gradaug_cfg
from gradaug_det.deploy.export import FORMATS


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE", help="config of the slimmable model")
    parser.add_argument("--widths", type=float, nargs="+", default=[1.0, 0.9, 0.75, 0.5], help="widths in (0, 1]")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="test sizes (shorter side, px; default: INPUT.MIN_SIZE_TEST)")
    parser.add_argument("--output", required=True, metavar="DIR", help="directory for tradeoff.{json,md,png}")
    parser.add_argument("--bn-calibration-batches", type=int, default=0, metavar="N",
                        help="also evaluate every width < 1 with BN statistics recomputed on N training batches")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--budget-gflops", type=float, default=None, help="backbone GFLOPs budget per image")
    budget.add_argument("--budget-ms", type=float, default=None, help="latency budget per image (ms)")
    parser.add_argument("--metric", choices=["bbox", "segm"], default="bbox", help="AP that ranks configurations")
    parser.add_argument("--export-format", choices=FORMATS, default="torchscript",
                        help="format of the exported best configuration under the budget")
    parser.add_argument("--runs", type=int, default=5, help="runs per latency median (default 5)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER,
                        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model_final.pth")
    return parser


def setup(args):
    """The config (a mistake in the file or the overrides refused in one message)."""
    cfg = merge_user_config(get_gradaug_cfg(), args.config_file, args.opts or [])
    cfg.freeze()
    return cfg


def _check(args, cfg):
    """Every bad input as one line, before any work."""
    from gradaug_det.utils.io import check_output_path
    from gradaug_det.deploy.export import check_exportable
    from gradaug_det.evaluation.widths import normalize_widths
    from gradaug_det.slim.calibration import check_calibration_batches

    widths = normalize_widths(args.widths, "--widths")
    if 1.0 not in args.widths:
        widths.remove(1.0)
    sizes = args.sizes or [cfg.INPUT.MIN_SIZE_TEST]
    if any(s <= 0 for s in sizes):
        raise ValueError(f"--sizes must be positive pixel counts, got {sizes}")
    check_calibration_batches(args.bn_calibration_batches, "--bn-calibration-batches")
    if args.runs < 1:
        raise ValueError(f"--runs must be at least 1, got {args.runs}")
    for name in ("budget_gflops", "budget_ms"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value:g}")
    if not cfg.DATASETS.TEST:
        raise ValueError("DATASETS.TEST is empty: the trade-off evaluates on DATASETS.TEST[0]")
    check_exportable(cfg, args.export_format)
    check_output_path(os.path.join(args.output, "tradeoff.json"), "--output", make_dirs=True)
    return widths, list(dict.fromkeys(sizes))


def main(args) -> dict:
    setup_logger(name="gradaug_det")
    cfg = setup(args)
    try:
        widths, sizes = _check(args, cfg)
    except ValueError as e:
        raise SystemExit(str(e)) from None

    from gradaug_det.benchmark.report import device_name, publish
    from gradaug_det.deploy.export import ExportMismatch, export_width, load_sample_image
    from gradaug_det.deploy.tradeoff import (
        best_under_budget,
        evaluate_tradeoff,
        pareto_front,
        plot_tradeoff,
        size_cfg,
        tradeoff_markdown,
    )

    rows = evaluate_tradeoff(cfg, widths, sizes, bn_calibration_batches=args.bn_calibration_batches,
                             runs=args.runs, progress=not args.no_progress)
    for cost, key in (("gflops", "pareto_gflops"), ("latency_ms", "pareto_latency")):
        for row, flag in zip(rows, pareto_front(rows, cost, args.metric)):
            row[key] = flag
    device = device_name(cfg.MODEL.DEVICE)
    doc = {"config": args.config_file, "weights": cfg.MODEL.WEIGHTS, "metric": args.metric, "device": device,
           "rows": rows}
    text = tradeoff_markdown(rows, args.metric, device)
    cost = "gflops" if args.budget_gflops is not None else "latency_ms" if args.budget_ms is not None else None
    if cost is not None:
        budget = args.budget_gflops if cost == "gflops" else args.budget_ms
        best = best_under_budget(rows, cost, budget, args.metric)
        doc["budget"] = {"cost": cost, "value": budget, "best": best}
        if best is None:
            text += f"\nNo configuration fits the budget of {budget:g} {cost}.\n"
        else:
            text += (f"\nBest under {budget:g} {'GFLOPs' if cost == 'gflops' else 'ms'}: width {best['width']:g} at "
                     f"size {best['size']} ({args.metric} AP {best.get(args.metric + '_AP', float('nan')):.1f}"
                     + (f", BN calibrated on {best['bn_calibration_batches']} batches" if best["bn_calibration_batches"]
                        else "") + ").\n")
    plot_tradeoff(rows, os.path.join(args.output, "tradeoff.png"), args.metric)
    publish(text, doc, os.path.join(args.output, "tradeoff.json"), os.path.join(args.output, "tradeoff.md"))
    if cost is not None and doc["budget"]["best"] is not None:
        best = doc["budget"]["best"]
        ecfg = size_cfg(cfg, best["size"]).clone()
        ecfg.defrost()
        ecfg.TEST.BN_CALIBRATION_BATCHES = best["bn_calibration_batches"]
        ecfg.freeze()
        try:
            stats = export_width(ecfg, best["width"], args.export_format, os.path.join(args.output, "export"),
                                 load_sample_image(ecfg), runs=args.runs)
        except ExportMismatch as e:
            raise SystemExit(f"tradeoff: exporting width {best['width']:g}: {e}") from None
        doc["export"] = stats
        print(f"Exported width {best['width']:g} (size {best['size']}) to {stats['path']}; largest box difference "
              f"{stats['diff']['boxes']:.2e} px, score {stats['diff']['scores']:.2e}")
    return doc


if __name__ == "__main__":
    from gradaug_det.utils.cli import run_tool

    run_tool(main, get_parser().parse_args())  # a mistake: one "error: ..." line, exit status 2
