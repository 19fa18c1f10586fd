#!/usr/bin/env python
"""Write a physically smaller checkpoint of a GradAug/slimmable detector at one width.

The width-``w`` sub-network becomes a physically smaller model: a checkpoint with sliced
tensors and a config that builds it (see ``gradaug_det.checkpoint.prune``). Its heads and FPN
are stock detectron2 modules; its ResNet is detectron2's own (plain ``get_cfg()`` reads the
config) only where every stage's channel count is still double the previous one (e.g. R50 at
0.75 or 0.5), otherwise ``build_pruned_resnet_fpn_backbone`` with ``MODEL.PRUNED_RESNET.*``
(``import gradaug_det`` and ``add_pruned_config`` first; docs/own_project.md). The printed
backbone name and the config's header say which. Its outputs
equal the full checkpoint evaluated at ``--width`` (``TEST.SLIM_WIDTHS``), so does its AP.

Example::

    python tools/prune.py --config-file configs/quickstart/mask_rcnn_gradaug.yaml \\
        --weights output/quickstart_gradaug/model_final.pth --width 0.75 \\
        --output output/quickstart_gradaug/pruned

With ``TEST.BN_CALIBRATION_BATCHES N`` (a trailing override) and a model with BN/SyncBN, the
pruned model's BN statistics are recomputed at ``--width`` from N batches of ``DATASETS.TRAIN``.
"""
import argparse
import logging

import gradaug_det  # noqa: F401  (first: quiets detectron2's import)
from detectron2.config import get_cfg
from detectron2.utils.logger import setup_logger

from gradaug_det import add_gradaug_config
from gradaug_det.checkpoint.io import check_weights_available
from gradaug_det.config import is_mmdet_config, merge_user_config
from gradaug_det.deploy.prune import prune_checkpoint
from gradaug_det.utils.cli import run_tool

logger = logging.getLogger("gradaug_det.prune")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE", help="config of the slimmable model")
    parser.add_argument("--weights", default=None,
                        help="checkpoint to prune (default: MODEL.WEIGHTS of the config)")
    parser.add_argument("--width", type=float, required=True, help="width of the kept sub-network, in (0, 1]")
    parser.add_argument("--output", required=True, help="directory for the pruned checkpoint and config")
    parser.add_argument("--flops-size", type=int, default=None,
                        help="square input size for the backbone FLOP count (default: INPUT.MIN_SIZE_TEST)")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER,
                        help="config overrides as KEY VALUE pairs, e.g. MODEL.DEVICE cpu")
    return parser


def setup(args):
    """The config (a mistake in the file or the overrides refused in one message)."""
    cfg = merge_user_config(add_gradaug_config(get_cfg()), args.config_file, args.opts or [])
    cfg.freeze()
    return cfg


def main(args) -> dict:
    if is_mmdet_config(args.config_file):
        raise SystemExit(f"--config-file {args.config_file} is an MMDetection config; this tool prunes detectron2 "
                         "models: use python tools/mmdet_prune.py CONFIG CHECKPOINT --width W --output DIR")
    if not 0.0 < args.width <= 1.0:
        raise SystemExit(f"--width must be in (0, 1], got {args.width}")
    cfg = setup(args)
    if args.weights:
        check_weights_available(args.weights, "--weights")
    else:
        check_weights_available(cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS")
    setup_logger(name="gradaug_det")
    size = None if args.no_flops else (args.flops_size or cfg.INPUT.MIN_SIZE_TEST)
    stats = prune_checkpoint(cfg, args.width, args.output, weights=args.weights, flops_size=size)
    print(f"Pruned to width {args.width:g} (backbone {stats['builder']}):")
    print(f"  checkpoint: {stats['checkpoint']}")
    print(f"  config:     {stats['config']}")
    ratio = stats["params_pruned"] / stats["params"]
    print(f"  parameters: {stats['params'] / 1e6:.3f} M -> {stats['params_pruned'] / 1e6:.3f} M ({ratio:.1%})")
    if "flops" in stats:
        print(f"  backbone forward GFLOPs (2 per multiply-add) at {size}x{size}: full {stats['flops'] / 1e9:.3f}, "
              f"full at width {args.width:g} {stats['flops_slim'] / 1e9:.3f}, "
              f"pruned {stats['flops_pruned'] / 1e9:.3f}")
    print(f"  max relative feature difference pruned vs. slimmed: {stats['feature_diff']:.2e}")
    if stats.get("bn_calibration_batches"):
        print(f"  BN statistics calibrated at width {args.width:g} on {stats['bn_calibration_batches']} training "
              "batches (TEST.BN_CALIBRATION_BATCHES)")
    return stats


if __name__ == "__main__":
    run_tool(main, get_parser().parse_args())  # a mistake: one "error: ..." line, exit status 2
