#!/usr/bin/env python
"""Train and evaluate Mask R-CNN with GradAug on the embedded synthetic data (``make demo``).

1. generates the quickstart "shapes" dataset (COCO format, 3 classes, 256 px) on first use,
   under ``$DETECTRON2_DATASETS/gradaug_quickstart`` (default ``./datasets``);
2. trains ``configs/quickstart/mask_rcnn_gradaug.yaml`` with gradaug-det's trainer;
3. evaluates COCO box and mask AP at width 1.0 and at every ``TEST.SLIM_WIDTHS``;
4. prints the AP table and plots the training curves (``tools/plot_metrics.py``).

Examples::

    python tools/quickstart.py
    python tools/quickstart.py --config-file configs/quickstart/mask_rcnn_baseline.yaml
    python tools/quickstart.py --output-dir output/qs --opts SOLVER.MAX_ITER 100
    python tools/quickstart.py --eval-only   # evaluate <output-dir>/model_final.pth again
"""
import argparse
import os
import subprocess
import sys
import time

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils import comm

import gradaug_det  # noqa: F401  (registers backbones and datasets)
from gradaug_det.data import register_quickstart
from gradaug_det.engine import GradAugTrainer, setup
from gradaug_det.evaluation.widths import width_results_table

TOOLS = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(os.path.dirname(TOOLS), "configs", "quickstart", "mask_rcnn_gradaug.yaml")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=DEFAULT_CONFIG, metavar="FILE",
                        help="quickstart config (default: configs/quickstart/mask_rcnn_gradaug.yaml)")
    parser.add_argument("--output-dir", default=None, help="OUTPUT_DIR (default: the config's)")
    parser.add_argument("--eval-only", action="store_true",
                        help="skip training; evaluate MODEL.WEIGHTS, default <output-dir>/model_final.pth")
    parser.add_argument("--no-plots", action="store_true", help="do not run tools/plot_metrics.py")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                        help="config overrides as KEY VALUE pairs, e.g. SOLVER.MAX_ITER 100")
    return parser


def main(args) -> dict:
    start = time.perf_counter()
    opts = list(args.opts)
    if args.output_dir:
        opts += ["OUTPUT_DIR", args.output_dir]
    # Generate the data now (with a progress bar) rather than inside the first data loader.
    register_quickstart(eager=True)
    cfg = setup(argparse.Namespace(config_file=args.config_file, opts=opts, eval_only=args.eval_only))

    if args.eval_only:
        model = GradAugTrainer.build_model(cfg)
        weights = cfg.MODEL.WEIGHTS or os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
        if not os.path.isfile(weights):
            raise SystemExit(f"--eval-only: no checkpoint at {weights!r}; train first or pass "
                             "--opts MODEL.WEIGHTS <file>")
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).load(weights)
        results = GradAugTrainer.test(cfg, model)
    else:
        trainer = GradAugTrainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        # The final EvalHook evaluated at width 1.0 and TEST.SLIM_WIDTHS.
        results = getattr(trainer, "_last_eval_results", None) or GradAugTrainer.test(cfg, trainer.model)
    if not comm.is_main_process():
        return results

    print("\nCOCO AP per network width (width 1.0 = the full network; the others are its "
          "sub-networks, TEST.SLIM_WIDTHS):")
    print(width_results_table(results))
    print(f"\nOutputs in {os.path.abspath(cfg.OUTPUT_DIR)}:")
    if not args.eval_only:
        print(f"  model:       {os.path.join(cfg.OUTPUT_DIR, 'model_final.pth')}")
    print(f"  metrics:     {os.path.join(cfg.OUTPUT_DIR, 'metrics.json')}")
    print(f"  log:         {os.path.join(cfg.OUTPUT_DIR, 'log.txt')}")
    print(f"  predictions: {os.path.join(cfg.OUTPUT_DIR, 'inference')}")
    if not args.no_plots and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "metrics.json")):
        subprocess.run([sys.executable, os.path.join(TOOLS, "plot_metrics.py"), cfg.OUTPUT_DIR,
                        "--smooth", "5"], check=False)
    print(f"Done in {time.perf_counter() - start:.0f} s.")
    return results


if __name__ == "__main__":
    main(get_parser().parse_args())
