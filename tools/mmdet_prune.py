#!/usr/bin/env python
"""Prune an MMDetection GradAug checkpoint to one width: a stock mmdet model that plain mmdet loads.

The width-``W`` sub-network of a ``SlimmableResNet`` (+ ``SlimmableFPN``) detector is written
as a physically narrower detector of stock mmdet types (``ResNet``, ``FPN``, ``MaskRCNN``
...): ``DIR/config_pruned_w<W>.py`` (the whole config, no ``custom_imports`` of gradaug_det;
its ``load_from`` is the checkpoint) and ``DIR/model_pruned_w<W>.pth``. Its outputs equal the
GradAug checkpoint evaluated at width W (``tools/mmdet_test.py --widths W``) up to float32
rounding (``gradaug_det.mmdet.prune``)::

    python tools/mmdet_prune.py configs/mmdet/quickstart/mask-rcnn_r18_fpn_gradaug_shapes.py \\
        work_dirs/mask-rcnn_r18_fpn_gradaug_shapes/iter_850.pth --width 0.75 \\
        --output work_dirs/mask-rcnn_r18_fpn_gradaug_shapes/pruned

With ``--bn-calibration-batches N`` the pruned model's BN statistics are first recomputed at
width W from N batches of the config's ``train_dataloader`` (as ``tools/mmdet_test.py
--bn-calibration-batches`` evaluates the ``W+bncal`` row). Export the result with mmdeploy.
"""
import argparse

from mmengine.config import DictAction


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", help="mmdet config of the GradAug (slimmable) model")
    p.add_argument("checkpoint", help="its checkpoint")
    p.add_argument("--width", type=float, required=True, help="width of the kept sub-network, in (0, 1]")
    p.add_argument("--output", required=True, metavar="DIR", help="directory for the pruned config and checkpoint")
    p.add_argument("--bn-calibration-batches", type=int, default=0, metavar="N",
                   help="recompute the BN statistics at --width from N batches of the config's train_dataloader "
                        "first (default 0: the checkpoint's statistics)")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, metavar="KEY=VALUE",
                   help="override config keys (also in the written config)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from gradaug_det.checkpoint.io import CheckpointFileError, UntrustedPickleError
    from gradaug_det.mmdet.prune import prune_mmdet_checkpoint

    try:
        stats = prune_mmdet_checkpoint(args.config, args.checkpoint, args.width, args.output,
                                       cfg_options=args.cfg_options,
                                       bn_calibration_batches=args.bn_calibration_batches)
    except (ValueError, UntrustedPickleError, CheckpointFileError) as e:
        raise SystemExit(str(e)) from None
    info = stats["info"]
    print(f"Pruned to width {args.width:g} (stock mmdet types, loads without gradaug_det):")
    print(f"  checkpoint: {stats['checkpoint']}")
    print(f"  config:     {stats['config']}")
    ratio = stats["params_pruned"] / stats["params"]
    print(f"  parameters: {stats['params'] / 1e6:.3f} M -> {stats['params_pruned'] / 1e6:.3f} M ({ratio:.1%})")
    print(f"  ResNet stem {info['stem_channels']}, stages {info['stage_channels']} channels"
          + (f" ({info['zero_channels']} of them zero: the sub-network's {info['active_stage_channels']} do not "
             "double per stage as a stock ResNet's do)" if info["zero_channels"] else "")
          + f"; FPN {info['fpn_channels']} channels")
    print(f"  max relative feature difference pruned vs. slimmed: {stats['feature_diff']:.2e}")
    if stats["bn_calibration_batches"]:
        print(f"  BN statistics calibrated at width {args.width:g} on {stats['bn_calibration_batches']} training "
              "batches (--bn-calibration-batches)")
    return stats


if __name__ == "__main__":
    from gradaug_det.utils.cli import run_tool

    run_tool(main)  # a mistake: one "error: ..." line, exit status 2
