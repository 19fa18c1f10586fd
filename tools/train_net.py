#!/usr/bin/env python
"""Train or evaluate a detectron2 model with GradAug.

    python tools/train_net.py --config-file configs/mask_rcnn_gradaug.yaml --num-gpus 8
    python tools/train_net.py --config-file configs/mask_rcnn_gradaug.yaml --eval-only MODEL.WEIGHTS model.pth

Standard detectron2 flags: --num-gpus, --num-machines, --machine-rank, --dist-url, --resume,
--eval-only, and config overrides as trailing KEY VALUE pairs.
"""
import gradaug_det  # noqa: F401  (first: registers backbones, meta-architectures, datasets; quiets detectron2's import)
from detectron2.engine import default_argument_parser
from detectron2.evaluation import verify_results
from detectron2.utils import comm

from gradaug_det.checkpoint.checkpointer import GradAugCheckpointer
from gradaug_det.engine import GradAugTrainer, setup
from gradaug_det.engine.launch import launch_tool
from gradaug_det.engine.setup import build_config
from gradaug_det.slim.settings import strict_slimmable_settings
from gradaug_det.utils.cli import run_tool


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = GradAugTrainer.build_model(cfg)
        # sub-widths of weights trained with other slimmable settings would be other networks
        with strict_slimmable_settings("--eval-only at TEST.SLIM_WIDTHS", enabled=bool(cfg.TEST.SLIM_WIDTHS)):
            GradAugCheckpointer.from_config(cfg, model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
                cfg.MODEL.WEIGHTS, resume=args.resume)
        res = GradAugTrainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = GradAugTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def get_parser():
    """detectron2's ``default_argument_parser`` (also used by tools/submit.py)."""
    return default_argument_parser()


def launch_checked(args):
    """Refuse the user's mistakes (config file, keys, datasets, weights) here, before any worker
    starts or anything is written; then detectron2's launch (clean gloo worker exit)."""
    build_config(args)
    return launch_tool(main, args)


if __name__ == "__main__":
    # a mistake (config, dataset, weights): one "error: ..." line, exit status 2 (GRADAUG_DET_DEBUG=1: traceback)
    run_tool(launch_checked, get_parser().parse_args())
