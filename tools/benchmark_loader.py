#!/usr/bin/env python
"""Training-loader throughput: the resumable loader (DATALOADER.RESUMABLE, the default) vs detectron2's.

Both loaders are built from one config (``DatasetMapper``, ``SOLVER.IMS_PER_BATCH``,
``DATALOADER.ASPECT_RATIO_GROUPING``) over the same dataset dicts with one seeded
``TrainingSampler``, and read ``--batches`` batches after ``--warmup`` (worker start-up),
at each ``--workers`` count, in ``--rounds`` interleaved rounds (``gradaug_det.benchmark.loader``).
The data is the config's ``DATASETS.TRAIN``, or with ``--synthetic N SIZE`` N generated
shapes images of SIZE pixels (PNG, COCO json; in a temporary directory unless ``--data-dir``).
Writes a Markdown table (stdout, ``--markdown``) and JSON (``--json``).

    python tools/benchmark_loader.py --config-file configs/mask_rcnn_gradaug.yaml --synthetic 64 640 \\
        --workers 0 2 --batches 20 --warmup 4 --rounds 3 --markdown loader.md
"""
import argparse
import os
import sys
import tempfile

from tqdm import tqdm

import gradaug_det  # noqa: F401  (registers backbones and datasets)
from gradaug_det.benchmark.loader import loader_markdown, measure_loaders
from gradaug_det.benchmark.report import device_name, publish
from gradaug_det.config import merge_user_config
from gradaug_det.engine.setup import get_gradaug_cfg
from gradaug_det.utils.cli import run_tool


def parse_args(argv=None):
    """Command-line arguments; bad values exit with a message before any work."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default="configs/quickstart/mask_rcnn_gradaug.yaml")
    p.add_argument("--synthetic", type=int, nargs=2, metavar=("N", "SIZE"), default=None,
                   help="generated shapes data: N training images of SIZE x SIZE pixels instead of DATASETS.TRAIN")
    p.add_argument("--data-dir", default=None, help="where --synthetic writes (and reuses) its data; "
                                                   "default: a temporary directory, removed afterwards")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DATALOADER.NUM_WORKERS values")
    p.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    p.add_argument("--warmup", type=int, default=4, help="untimed batches first (worker start-up)")
    p.add_argument("--rounds", type=int, default=3, help="measurements per loader and worker count")
    p.add_argument("--seed", type=int, default=0, help="the sampler seed both loaders share")
    p.add_argument("--json", default=None, help="write every number here")
    p.add_argument("--markdown", default=None, help="also write the table here")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args(argv)
    for name in ("batches", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or min(args.workers) < 0:
        p.error(f"--warmup and --workers must be >= 0, got {args.warmup} and {args.workers}")
    if args.synthetic and (args.synthetic[0] < 1 or args.synthetic[1] < 32):
        p.error(f"--synthetic N SIZE needs N >= 1 images of SIZE >= 32 pixels, got {args.synthetic}")
    if args.data_dir and not args.synthetic:
        p.error("--data-dir is where --synthetic writes; give --synthetic N SIZE too")
    if not os.path.isfile(args.config_file):
        p.error(f"--config-file {args.config_file!r} does not exist")
    from gradaug_det.utils.io import check_output_path

    for name in ("json", "markdown"):
        if getattr(args, name):
            try:
                check_output_path(getattr(args, name), f"--{name}")
            except ValueError as e:
                p.error(str(e))
    return args


def dataset_dicts(cfg, args, tmp):
    """The dataset dicts to read: generated shapes data (``--synthetic``) or ``DATASETS.TRAIN``."""
    from detectron2.data import get_detection_dataset_dicts

    if not args.synthetic:
        return get_detection_dataset_dicts(cfg.DATASETS.TRAIN,
                                           filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
    from detectron2.data.datasets import load_coco_json

    from gradaug_det.data.synthetic import generate_coco_shapes

    n, size = args.synthetic
    paths = generate_coco_shapes(args.data_dir or tmp, num_train=n, num_val=1, image_size=size, seed=args.seed)
    return load_coco_json(paths["train"]["json_file"], paths["train"]["image_root"])


def main(argv=None):
    """Entry point: measure both loaders, print and write the table."""
    args = parse_args(argv)
    cfg = merge_user_config(get_gradaug_cfg(), args.config_file, args.opts)
    with tempfile.TemporaryDirectory() as tmp:
        data = dataset_dicts(cfg, args, tmp)
        total = args.rounds * len(args.workers) * 2
        with tqdm(total=total, desc="loaders", file=sys.stderr, leave=False) as bar:
            rows = measure_loaders(cfg, data, workers=args.workers, batches=args.batches, warmup=args.warmup,
                                   rounds=args.rounds, seed=args.seed, progress=lambda label: (bar.set_postfix_str(label), bar.update()))
    machine = device_name("cpu")
    source = (f"{args.synthetic[0]} generated {args.synthetic[1]} px images" if args.synthetic
              else ", ".join(cfg.DATASETS.TRAIN))
    header = (f"{args.config_file} ({source}; INPUT.MIN_SIZE_TRAIN {tuple(cfg.INPUT.MIN_SIZE_TRAIN)}, "
              f"MAX_SIZE_TRAIN {cfg.INPUT.MAX_SIZE_TRAIN}), {cfg.SOLVER.IMS_PER_BATCH} images per batch, "
              f"{args.batches} timed batches after {args.warmup}, {args.rounds} rounds; {machine}")
    doc = {"config_file": args.config_file, "synthetic": args.synthetic, "opts": args.opts,
           "batches": args.batches, "warmup": args.warmup, "rounds": args.rounds, "machine": machine,
           "rows": rows}
    publish(loader_markdown(rows, header), doc, args.json, args.markdown)
    return doc


if __name__ == "__main__":
    run_tool(main)  # a mistake: one "error: ..." line, exit status 2
