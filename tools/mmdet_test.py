#!/usr/bin/env python
"""Evaluate an MMDetection checkpoint at width 1.0 and at its sub-network widths.

A GradAug-trained detector can be slimmed after training; this runs the config's test
loop (its evaluator, e.g. COCO bbox/segm AP) once per width and prints one table::

    python tools/mmdet_test.py configs/mmdet/mask-rcnn_r50_fpn_gradaug_1x_coco.py \\
        work_dirs/mask-rcnn_r50_fpn_gradaug_1x_coco/epoch_12.pth --widths 1.0 0.9 0.75

With ``--bn-calibration-batches N`` every width below 1.0 is evaluated a second time, with
its BN statistics recomputed at that width from N batches of the config's
``train_dataloader`` (:mod:`gradaug_det.slim.calibration`, the detectron2 side's estimator);
those rows are named ``<width>+bncal``. The checkpoint's statistics are restored after each.
"""
import argparse
import json
import os.path as osp
from collections import OrderedDict

from mmengine.config import DictAction


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", help="mmdet config file")
    p.add_argument("checkpoint", help="checkpoint to evaluate")
    p.add_argument("--widths", type=float, nargs="+", default=[1.0, 0.9],
                   help="network widths to evaluate, each in (0, 1] (default: 1.0 0.9)")
    p.add_argument("--bn-calibration-batches", type=int, default=0, metavar="N",
                   help="also evaluate every width below 1.0 with BN statistics recomputed at that width "
                        "from N batches of the config's train_dataloader (rows '<width>+bncal'; default 0: off)")
    p.add_argument("--work-dir", help="output folder (default: work_dirs/<config name>)")
    p.add_argument("--out", help="also write {width: metrics} to this JSON file")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, metavar="KEY=VALUE",
                   help="override config keys")
    p.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from mmengine.model import is_model_wrapper
    from mmengine.runner import Runner

    from gradaug_det.checkpoint.io import CheckpointFileError, UntrustedPickleError
    from gradaug_det.mmdet.checkpoint import use_safe_checkpoint_loading
    from gradaug_det.mmdet.config import load_runner_config
    from gradaug_det.mmdet.calibration import calibration_forward, train_batches
    from gradaug_det.slim import check_width, width
    from gradaug_det.slim.calibration import (CALIBRATED_SUFFIX, batch_norm_layers, calibrated_bn,
                                              check_calibration_batches)
    from gradaug_det.slim.settings import strict_slimmable_settings

    for w in args.widths:
        try:
            check_width(w)
        except ValueError as e:
            raise SystemExit(f"--widths: {e}")
    try:
        num_batches = check_calibration_batches(args.bn_calibration_batches, "--bn-calibration-batches")
    except ValueError as e:
        raise SystemExit(str(e))
    if not osp.isfile(args.checkpoint):
        raise SystemExit(f"checkpoint not found: {args.checkpoint}")
    use_safe_checkpoint_loading()  # no code runs from the checkpoint
    cfg = load_runner_config(args.config, args.cfg_options, args.launcher, args.work_dir)
    calibrate = num_batches > 0 and min(args.widths) < 1.0
    if calibrate and not cfg.get("train_dataloader"):
        raise SystemExit(f"--bn-calibration-batches {num_batches}: {args.config} has no train_dataloader to "
                         "calibrate on; add one or drop the flag")
    cfg.load_from = args.checkpoint
    runner = Runner.from_cfg(cfg)
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    if calibrate and not batch_norm_layers(model):
        runner.logger.info("--bn-calibration-batches: the model has no BN layer with running statistics "
                           "(FrozenBN / GN), nothing to calibrate")
        calibrate = False
    # consecutive widths calibrate on consecutive batches of one loader (built at the first use)
    batches = train_batches(runner, cfg.train_dataloader) if calibrate else None
    results = OrderedDict()  # row ("1.0", "0.9", "0.9+bncal") -> metrics
    # the checkpoint loads in the first runner.test() (always before a calibration); at
    # sub-widths its slimmable settings must be the model's (GradAugSamplerStateHook checks
    # them), or other sub-networks would run
    with strict_slimmable_settings("tools/mmdet_test.py at --widths below 1.0", enabled=min(args.widths) < 1.0):
        try:
            for w in args.widths:
                runner.logger.info(f"Evaluating at width {w} ...")
                with width(model, w):
                    results[str(w)] = runner.test()
                if not calibrate or w == 1.0:
                    continue
                with calibrated_bn(model, w, batches, num_batches, calibration_forward):
                    runner.logger.info(f"Evaluating at width {w} with BN statistics calibrated on "
                                       f"{num_batches} training batches ...")
                    with width(model, w):
                        results[str(w) + CALIBRATED_SUFFIX] = runner.test()
        except (UntrustedPickleError, CheckpointFileError) as e:
            raise SystemExit(f"error: {e}") from None
    keys = sorted({k for r in results.values() for k in r if isinstance(r[k], (int, float))})
    rows = max(len(row) for row in results)
    print("width".ljust(rows) + "  " + "  ".join(keys))
    for row, r in results.items():
        print(row.ljust(rows) + "  " + "  ".join(f"{r.get(k, float('nan')):.4f}".rjust(len(k)) for k in keys))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    from gradaug_det.utils.cli import run_tool

    run_tool(main)  # a mistake: one "error: ..." line, exit status 2
