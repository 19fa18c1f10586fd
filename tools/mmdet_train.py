#!/usr/bin/env python
"""Train an MMDetection 3.x config (GradAug or baseline) with mmengine's Runner.

A thin equivalent of mmdet's ``tools/train.py`` (which the mmdet wheel does not ship)::

    python tools/mmdet_train.py configs/mmdet/mask-rcnn_r50_fpn_gradaug_1x_coco.py
    python -m torch.distributed.run --nproc_per_node 8 tools/mmdet_train.py CONFIG --launcher pytorch
    python tools/mmdet_train.py configs/mmdet/quickstart/mask-rcnn_r18_fpn_gradaug_shapes.py \\
        --generate-shapes --cfg-options train_cfg.max_iters=20

GradAug configs import ``gradaug_det.mmdet`` themselves (``custom_imports``).
"""
import argparse
import os
import sys

from mmengine.config import DictAction


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", help="mmdet config file")
    p.add_argument("--work-dir", help="output folder (default: work_dirs/<config name>)")
    p.add_argument("--amp", action="store_true", help="mixed precision (AmpOptimWrapper; CUDA)")
    p.add_argument("--resume", action="store_true", help="resume from the latest checkpoint in the work dir")
    p.add_argument("--generate-shapes", action="store_true",
                   help="first write the quickstart's shapes data (gradaug_det.data.QUICKSTART_SHAPES, the data "
                        "make demo generates) at the config's data_root, if it is not there yet")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, metavar="KEY=VALUE",
                   help="override config keys, e.g. train_cfg.max_iters=20")
    p.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    p.add_argument("--local-rank", "--local_rank", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    from mmengine.runner import Runner

    from gradaug_det.checkpoint.io import CheckpointFileError, UntrustedPickleError
    from gradaug_det.mmdet.checkpoint import use_safe_checkpoint_loading
    from gradaug_det.mmdet.config import load_runner_config
    from gradaug_det.mmdet.preemption import mmengine_preemption_hook

    use_safe_checkpoint_loading()  # load_from / --resume / Pretrained paths: no code runs from a file

    cfg = load_runner_config(args.config, args.cfg_options, args.launcher, args.work_dir)
    if args.amp:
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.loss_scale = "dynamic"
    cfg.resume = args.resume
    if args.generate_shapes:
        from gradaug_det.data.synthetic import QUICKSTART_SHAPES, generate_coco_shapes

        generate_coco_shapes(cfg.data_root, **QUICKSTART_SHAPES)
    try:
        runner = Runner.from_cfg(cfg)
        # in a tools/submit.py job (its signal handler is installed): on the preemption signal,
        # checkpoint after the current iteration and requeue
        hook = mmengine_preemption_hook()
        if hook is not None:
            runner.register_hook(hook)
        runner.train()
    except (UntrustedPickleError, CheckpointFileError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    from gradaug_det.utils.cli import run_tool

    run_tool(main)  # a mistake: one "error: ..." line, exit status 2
