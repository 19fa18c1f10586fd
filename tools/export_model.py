#!/usr/bin/env python
"""Export one width of a slimmable detector as TorchScript or ONNX, and check the file.

At ``--width`` w the physically pruned network (what ``tools/prune.py`` writes; BN
statistics recalibrated at w with ``TEST.BN_CALIBRATION_BATCHES N``) is traced with
detectron2's ``TracingAdapter`` (detectron2's ``tools/deploy/export_model.py --export-method
tracing``) to ``DIR/model_w<w>.ts`` or ``DIR/model_w<w>.onnx``, with ``DIR/model_w<w>.json``
describing its input and outputs. The file runs with torch alone (TorchScript) or
onnxruntime (ONNX); see docs/deployment.md and ``gradaug_det.deploy.export``.

The tool then runs the file and the slimmable model at width w on the sample image and prints
the largest box / score / mask difference, the file size against the full-width weights and
the median latency of both; it exits 1 with one line, writing nothing, if they disagree beyond
float32 tolerance (``gradaug_det.deploy.export.RELATIVE_TOLERANCE``).

Example::

    python tools/export_model.py --config-file configs/quickstart/mask_rcnn_gradaug.yaml \\
        --output output/quickstart/export --format torchscript --width 0.75 \\
        MODEL.WEIGHTS output/quickstart/mask_rcnn/model_final.pth
"""
import argparse
import sys

from detectron2.utils.logger import setup_logger

from gradaug_det.config import is_mmdet_config, merge_user_config
from gradaug_det.engine.setup import get_gradaug_cfg
from gradaug_det.deploy.export import FORMATS, ExportMismatch, check_exportable, export_width, load_sample_image


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE", help="config of the slimmable model")
    parser.add_argument("--output", required=True, metavar="DIR", help="directory for the exported model")
    parser.add_argument("--format", choices=FORMATS, default="torchscript", help="output format")
    parser.add_argument("--width", type=float, default=1.0, help="width to export, in (0, 1] (default 1.0)")
    parser.add_argument("--sample-image", default=None, metavar="FILE",
                        help="image file, or a saved (C, H, W) tensor (.pt) in INPUT.FORMAT; default: the "
                             "first image of DATASETS.TEST[0]")
    parser.add_argument("--runs", type=int, default=5, help="runs per latency median (default 5)")
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER,
                        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model_final.pth")
    return parser


def setup(args):
    """The config (a mistake in the file or the overrides refused in one message)."""
    cfg = merge_user_config(get_gradaug_cfg(), args.config_file, args.opts or [])
    cfg.freeze()
    return cfg


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


def main(args) -> dict:
    if is_mmdet_config(args.config_file):  # before any work
        raise SystemExit(
            f"--config-file {args.config_file} is an MMDetection config: this tool exports detectron2 models, and "
            "mmdet's own export path is mmdeploy (not installed with gradaug-det). Prune the model to a stock "
            "mmdet one first (python tools/mmdet_prune.py CONFIG CHECKPOINT --width W --output DIR), then export "
            "DIR's config and checkpoint with mmdeploy's tools/deploy.py")
    if not 0.0 < args.width <= 1.0:
        raise SystemExit(f"--width must be in (0, 1], got {args.width:g}")
    if args.runs < 1:
        raise SystemExit(f"--runs must be at least 1, got {args.runs}")
    setup_logger(name="gradaug_det")
    cfg = setup(args)
    try:
        check_exportable(cfg, args.format)
        from gradaug_det.utils.io import check_output_path

        check_output_path(f"{args.output}/model.{args.format}", "--output", make_dirs=True)
        image = load_sample_image(cfg, args.sample_image)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(str(e)) from None
    try:
        stats = export_width(cfg, args.width, args.format, args.output, image, runs=args.runs)
    except ExportMismatch as e:
        print(f"export_model: width {args.width:g} ({args.format}): {e}; nothing written", file=sys.stderr)
        raise SystemExit(1) from None
    d = stats["diff"]
    print(f"Exported width {args.width:g} ({args.format}) to {stats['path']}")
    print(f"  input: float32 (C, H, W) in {cfg.INPUT.FORMAT}; outputs: {', '.join(stats['outputs'])}")
    print(f"  sample {tuple(image.shape)}: {d['detections']} detections; largest difference from the PyTorch "
          f"model at width {args.width:g}: boxes {d['boxes']:.2e} px (tolerance {d['box_tolerance']:.2e}), "
          f"scores {d['scores']:.2e}" + (f", masks {d['masks']:.2e}" if "masks" in d else "")
          + f" (tolerance {d['tolerance']:.0e})")
    if d["detections"] == 0:
        print("  WARNING: no detections on the sample image, so the comparison checked only that the exported "
              "model finds none either; give a --sample-image with objects")
    print(f"  file: {_mb(stats['file_bytes'])}; full-width weights {_mb(stats['full_bytes'])} "
          f"({stats['file_bytes'] / stats['full_bytes']:.1%}); parameters {stats['params'] / 1e6:.3f} M of "
          f"{stats['params_full'] / 1e6:.3f} M")
    print(f"  latency per image, median of {args.runs} on {stats['device']}: exported {stats['latency_ms']:.1f} ms, "
          f"PyTorch (slimmable at width {args.width:g}) {stats['latency_ms_pytorch']:.1f} ms")
    return stats


if __name__ == "__main__":
    from gradaug_det.utils.cli import run_tool

    run_tool(main, get_parser().parse_args())  # a mistake: one "error: ..." line, exit status 2
