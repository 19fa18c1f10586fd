#!/usr/bin/env python
"""Draw a detector's predictions on images, at any width of a slimmable model.

Example::

    python tools/demo.py --config-file configs/quickstart/mask_rcnn_gradaug.yaml \\
        --input 'datasets/gradaug_quickstart_shapes/val/*.png' --output output/demo --width 0.75 \\
        --opts MODEL.WEIGHTS output/quickstart/mask_rcnn/model_final.pth

``--input`` takes files and glob patterns. ``--output`` is a directory (one image per
input, same file name) or, for a single input, an image file name (.png / .jpg).
Pruned configs written by tools/prune.py work as well (at ``--width 1.0``).
"""
import argparse
import glob
import logging
import os

import gradaug_det  # noqa: F401  (first: registers backbones and the quickstart datasets' metadata; quiets detectron2)
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import ColorMode, Visualizer

from gradaug_det import add_gradaug_config, width
from gradaug_det.checkpoint.checkpointer import GradAugCheckpointer
from gradaug_det.checkpoint.io import check_weights_available
from gradaug_det.config import merge_user_config
from gradaug_det.slim import SlimmableModule
from gradaug_det.utils.cli import run_tool
from gradaug_det.utils.io import atomic_path

_IMAGE_EXTS = (".png", ".jpg", ".jpeg")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE", help="model config")
    parser.add_argument("--input", required=True, nargs="+", help="image files or glob patterns")
    parser.add_argument("--output", required=True, help="output directory, or an image file for one input")
    parser.add_argument("--width", type=float, default=1.0, help="network width in (0, 1] (default 1.0)")
    parser.add_argument("--confidence-threshold", type=float, default=0.5,
                        help="minimum score of the drawn instances (default 0.5)")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model_final.pth")
    return parser


def setup_cfg(args):
    # MODEL.PRUNED_RESNET too: pruned configs load; a mistake in the file or the overrides: one message
    cfg = merge_user_config(add_gradaug_config(get_cfg()), args.config_file, args.opts)
    check_weights_available(cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS")
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH = args.confidence_threshold
    cfg.freeze()
    return cfg


def expand_inputs(patterns):
    """Files named by ``patterns`` (paths or globs), in order, without duplicates."""
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern))) or (
            [pattern] if os.path.isfile(pattern) else [])
        if not matches:
            raise SystemExit(f"--input {pattern!r} matches no file")
        files.extend(m for m in matches if m not in files)
    return files


def output_path(output: str, image_file: str, num_inputs: int) -> str:
    """Where the drawing of ``image_file`` goes (see the module docstring)."""
    if output.lower().endswith(_IMAGE_EXTS) and not os.path.isdir(output):
        if num_inputs != 1:
            raise SystemExit(f"--output {output!r} is a file name but --input gives {num_inputs} images; "
                             "pass a directory")
        os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
        return output
    os.makedirs(output, exist_ok=True)
    name = os.path.basename(image_file)
    if not name.lower().endswith(_IMAGE_EXTS):
        name = os.path.splitext(name)[0] + ".png"
    return os.path.join(output, name)


def main(args) -> list:
    setup_logger(name="gradaug_det")
    logger = logging.getLogger("gradaug_det.demo")
    w = args.width
    if not 0.0 < w <= 1.0:
        raise SystemExit(f"--width must be in (0, 1], got {w}")
    cfg = setup_cfg(args)
    files = expand_inputs(args.input)
    bare = cfg.clone()  # DefaultPredictor would load MODEL.WEIGHTS with detectron2's unrestricted loader
    bare.defrost()
    bare.MODEL.WEIGHTS = ""
    bare.freeze()
    predictor = DefaultPredictor(bare)
    GradAugCheckpointer.from_config(cfg, predictor.model).load(cfg.MODEL.WEIGHTS)
    if w < 1.0 and not any(isinstance(m, SlimmableModule) for m in predictor.model.modules()):
        raise SystemExit(f"--width {w:g} needs a slimmable model, but MODEL.BACKBONE.NAME="
                         f"{cfg.MODEL.BACKBONE.NAME!r} has no slimmable layer; use --width 1.0")
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else "__unused")
    written = []
    for image_file in files:
        image = read_image(image_file, format="BGR")
        with width(predictor.model, w):
            predictions = predictor(image)
        instances = predictions["instances"].to("cpu")
        visualizer = Visualizer(image[:, :, ::-1], metadata, instance_mode=ColorMode.IMAGE)
        drawing = visualizer.draw_instance_predictions(predictions=instances)
        path = output_path(args.output, image_file, len(files))
        with atomic_path(path) as tmp:  # a killed run leaves no partial image
            drawing.save(tmp)
        logger.info(f"{image_file}: {len(instances)} instances at width {w:g} -> {path}")
        print(path)
        written.append(path)
    return written


if __name__ == "__main__":
    run_tool(main, get_parser().parse_args())  # a mistake: one "error: ..." line, exit status 2
