#!/usr/bin/env python
"""Evaluate an MMDetection checkpoint at width 1.0 and at its sub-network widths.

A GradAug-trained detector can be slimmed after training; this runs the config's test
loop (its evaluator, e.g. COCO bbox/segm AP) once per width and prints one table::

    python tools/mmdet_test.py configs/mmdet/mask-rcnn_r50_fpn_gradaug_1x_coco.py \\
        work_dirs/mask-rcnn_r50_fpn_gradaug_1x_coco/epoch_12.pth --widths 1.0 0.9 0.75
"""
import argparse
import json
import os.path as osp

from mmengine.config import DictAction


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", help="mmdet config file")
    p.add_argument("checkpoint", help="checkpoint to evaluate")
    p.add_argument("--widths", type=float, nargs="+", default=[1.0, 0.9],
                   help="network widths to evaluate, each in (0, 1] (default: 1.0 0.9)")
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
    from gradaug_det.slim import check_width, width
    from gradaug_det.slim.settings import strict_slimmable_settings

    for w in args.widths:
        try:
            check_width(w)
        except ValueError as e:
            raise SystemExit(f"--widths: {e}")
    if not osp.isfile(args.checkpoint):
        raise SystemExit(f"checkpoint not found: {args.checkpoint}")
    use_safe_checkpoint_loading()  # no code runs from the checkpoint
    cfg = load_runner_config(args.config, args.cfg_options, args.launcher, args.work_dir)
    cfg.load_from = args.checkpoint
    runner = Runner.from_cfg(cfg)
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    results = {}
    # the checkpoint loads in the first runner.test(); at sub-widths its slimmable settings must
    # be the model's (GradAugSamplerStateHook checks them), or other sub-networks would run
    with strict_slimmable_settings("tools/mmdet_test.py at --widths below 1.0", enabled=min(args.widths) < 1.0):
        for w in args.widths:
            runner.logger.info(f"Evaluating at width {w} ...")
            with width(model, w):
                try:
                    results[w] = runner.test()
                except (UntrustedPickleError, CheckpointFileError) as e:
                    raise SystemExit(f"error: {e}") from None
    keys = sorted({k for r in results.values() for k in r if isinstance(r[k], (int, float))})
    print("width  " + "  ".join(keys))
    for w, r in results.items():
        print(f"{w:<6} " + "  ".join(f"{r.get(k, float('nan')):.4f}".rjust(len(k)) for k in keys))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({str(w): r for w, r in results.items()}, f, indent=1)
    return results


if __name__ == "__main__":
    from gradaug_det.utils.cli import run_tool

    run_tool(main)  # a mistake: one "error: ..." line, exit status 2
