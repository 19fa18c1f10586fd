#!/usr/bin/env python
"""Train or evaluate with a detectron2 LazyConfig (``.py``), GradAug when ``gradaug.enabled``.

detectron2's ``tools/lazyconfig_train_net.py`` with GradAug's step trainer, ``train.ddp``
honoured as detectron2 honours it (plus ``find_unused_parameters=True`` where GradAug needs
it), and evaluation at the extra widths of ``test.slim_widths``::

    python tools/lazyconfig_train_net.py --config-file configs/lazy/mask_rcnn_gradaug_R_50_FPN_1x.py \
        --num-gpus 8 [train.max_iter=...]
    python tools/lazyconfig_train_net.py --config-file ... --resume            # continue in train.output_dir
    python tools/lazyconfig_train_net.py --config-file ... --eval-only \
        train.init_checkpoint=output/model_final.pth test.slim_widths=[0.75,0.5]

Standard detectron2 flags: --num-gpus (on a machine without CUDA: CPU processes over gloo),
--num-machines, --machine-rank, --dist-url, --resume, --eval-only, and trailing
``key=value`` config overrides.
"""
import logging

import gradaug_det  # noqa: F401  (first: registers datasets and components; quiets detectron2's import)
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import default_argument_parser, default_setup, default_writers, hooks
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from gradaug_det.checkpoint.checkpointer import GradAugCheckpointer
from gradaug_det.data.resumable import instantiate_lazy_train_loader, resumable_data_hook
from gradaug_det.engine import create_ddp_model
from gradaug_det.engine.launch import launch_tool
from gradaug_det.engine.lazy import (build_lazy_step_trainer, lazy_test, lazy_test_widths, load_lazy_config,
                                     needs_unused_parameter_search_lazy)
from gradaug_det.engine.preemption import preemption_hook
from gradaug_det.slim.settings import strict_slimmable_settings
from gradaug_det.utils.cli import run_tool

logger = logging.getLogger("gradaug_det")


def do_train(args, cfg):
    """Build model, optimizer, loader and GradAug step trainer; train (``--resume``: continue)."""
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)
    # detectron2's build_detection_train_loader becomes the resumable loader: its hook checkpoints the
    # stream position and seeds the global generators per iteration, so --resume is exact
    train_loader = instantiate_lazy_train_loader(cfg.dataloader.train)
    model = create_ddp_model(model, **cfg.train.ddp,
                             unused_parameters_reason=needs_unused_parameter_search_lazy(cfg))
    trainer = build_lazy_step_trainer(cfg, model, train_loader, optim)
    checkpointer = GradAugCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
        hooks.EvalHook(cfg.train.eval_period, lambda: lazy_test(cfg, model)),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period)
        if comm.is_main_process() else None,
        preemption_hook(checkpointer),  # in a tools/submit.py job: checkpoint + stop on preemption
        resumable_data_hook(train_loader),  # last: seeds the global generators right before each step
    ])
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
    return trainer


def main(args):
    """The tool: returns the evaluation results for ``--eval-only``, else the trainer."""
    # a missing config file, a bad gradaug.* / test.* key or value, an unregistered dataset, missing
    # or unreachable weights: refused here, before any work (nothing written, no ./output)
    cfg = load_lazy_config(args.config_file, args.opts, eval_only=args.eval_only, resume=args.resume)
    default_setup(cfg, args)
    # gradaug-det's own messages (DDP settings, per-width tables) go to the same log
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="gradaug_det", abbrev_name="ga")
    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        model = create_ddp_model(model)
        # sub-widths of weights trained with other slimmable settings would be other networks
        with strict_slimmable_settings("--eval-only at test.slim_widths", enabled=len(lazy_test_widths(cfg)) > 1):
            GradAugCheckpointer(model).load(cfg.train.init_checkpoint)
        res = lazy_test(cfg, model)
        print(res)
        return res
    return do_train(args, cfg)


def get_parser():
    """detectron2's ``default_argument_parser`` (as tools/train_net.py)."""
    return default_argument_parser()


def launch_checked(args):
    """Refuse the user's mistakes before any worker starts, then detectron2's launch."""
    load_lazy_config(args.config_file, args.opts, eval_only=args.eval_only, resume=args.resume)
    return launch_tool(main, args)


if __name__ == "__main__":
    # a mistake (config, dataset, weights): one "error: ..." line, exit status 2 (GRADAUG_DET_DEBUG=1: traceback)
    run_tool(launch_checked, get_parser().parse_args())
