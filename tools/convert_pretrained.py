#!/usr/bin/env python
"""Convert an ImageNet-pretrained ResNet into a detectron2 .pkl for detection fine-tuning
(or a GradAug classifier into torchvision names, for MMDetection).

Examples::

    # a GradAug (or baseline) classifier trained with configs/imagenet/*.yaml
    python tools/convert_pretrained.py --source classifier \\
        output/imagenet_r50_gradaug/model_final.pth r50_gradaug.pkl

    # a torchvision ResNet-50 state dict
    python tools/convert_pretrained.py --source torchvision resnet50-0676ba61.pth r50_tv.pkl

    # the same classifier for MMDetection (torchvision names; SlimmableResNet / ResNet init_cfg)
    python tools/convert_pretrained.py --source classifier --target torchvision \
        output/imagenet_r50_gradaug/model_final.pth r50_gradaug_tv.pth

Then train with ``MODEL.WEIGHTS r50_gradaug.pkl`` and the printed overrides (pixel
mean/std, input format, ResNet shape). ``--emit-config FILE`` also writes them to a YAML file;
with ``--base-config`` that file is a whole config for ``tools/train_net.py``::

    python tools/convert_pretrained.py --source classifier \
        output/imagenet_r50_gradaug/model_final.pth output/imagenet_r50_gradaug/r50_gradaug.pkl \
        --base-config configs/mask_rcnn_gradaug.yaml --emit-config output/imagenet_r50_gradaug/mask_rcnn.yaml
    python tools/train_net.py --config-file output/imagenet_r50_gradaug/mask_rcnn.yaml --num-gpus 8

See :mod:`gradaug_det.checkpoint.convert` for the layouts (``--target``).
"""
import argparse
import logging
import os
import sys

import yaml


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="classifier checkpoint (.pth) or torchvision state dict (.pth)")
    p.add_argument("output", help="detectron2 checkpoint to write (.pkl)")
    p.add_argument("--source", choices=("classifier", "torchvision"), required=True,
                   help="what the input is")
    p.add_argument("--target", choices=("fpn", "c4", "classifier", "heuristic", "torchvision"), default="fpn",
                   help="where the ResNet goes: FPN models (backbone.bottom_up.*, default), C4 models "
                        "(backbone.* + roi_heads.res5.*), a SlimmableClassifier, bare names with "
                        "detectron2's matching heuristics, or torchvision names in a .pth (MMDetection's "
                        "ResNet / SlimmableResNet; classifier source only)")
    p.add_argument("--config-file", default=None,
                   help="classifier source: its training config (for MODEL.PIXEL_MEAN/STD, INPUT.FORMAT, "
                        "MODEL.RESNETS.STRIDE_IN_1X1); default: config.yaml beside the checkpoint")
    p.add_argument("--emit-config", default=None, metavar="YAML",
                   help="also write the matching MODEL.WEIGHTS / PIXEL_MEAN / PIXEL_STD / INPUT.FORMAT / "
                        "RESNETS overrides to this YAML file. With --base-config it is a whole config "
                        "(_BASE_: the detection config) for tools/train_net.py --config-file; without, "
                        "merge it after your detection config (cfg.merge_from_file) in your own script")
    p.add_argument("--base-config", default=None, metavar="YAML",
                   help="with --emit-config: the detection config the emitted file inherits (_BASE_), "
                        "e.g. configs/mask_rcnn_gradaug.yaml")
    return p.parse_args(argv)


def _classifier_cfg(args):
    from detectron2.config import get_cfg

    from gradaug_det import add_gradaug_config

    path = args.config_file
    if path is None:
        guess = os.path.join(os.path.dirname(os.path.abspath(args.input)), "config.yaml")
        if not os.path.isfile(guess):
            sys.exit(f"error: no --config-file given and no {guess}; pass the classifier's training config")
        path = guess
    logging.getLogger("gradaug_det").info("Reading the classifier's conventions from %s", path)
    cfg = add_gradaug_config(get_cfg())
    cfg.set_new_allowed(True)  # a dumped config.yaml may hold keys of other extensions
    cfg.merge_from_file(path)
    return cfg


def _nested(opts):
    out = {}
    for key, value in zip(opts[::2], opts[1::2]):
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out


def main(argv=None):
    args = parse_args(argv)
    from gradaug_det.utils.io import atomic_write, check_output_path

    try:  # every output is checked before the input is read
        if args.target != "torchvision" and not args.output.endswith(".pkl"):
            raise ValueError(f"output {args.output!r} must end in .pkl (detectron2 reads .pkl files as "
                             "converted weights); --target torchvision writes a .pth")
        check_output_path(args.output, "output")
        if args.emit_config:
            check_output_path(args.emit_config, "--emit-config")
        if args.base_config is not None:
            if not args.emit_config:
                raise ValueError("--base-config names the config that the --emit-config file inherits; "
                                 "pass --emit-config FILE too")
            if not os.path.isfile(args.base_config):
                raise ValueError(f"--base-config {args.base_config!r}: no such file (a detection config, "
                                 "e.g. configs/mask_rcnn_gradaug.yaml)")
    except ValueError as e:
        sys.exit(f"error: {e}")
    from gradaug_det.checkpoint.io import check_weights_available

    check_weights_available(args.input, "input")
    from detectron2.utils.logger import setup_logger

    setup_logger(name="gradaug_det")
    from gradaug_det.checkpoint import (
        convert_classifier,
        convert_classifier_to_torchvision,
        convert_torchvision,
        pretrained_config_opts,
    )

    if args.target == "torchvision":
        if args.source != "classifier":
            sys.exit("error: --target torchvision converts a classifier (--source classifier); a torchvision "
                     "state dict is already in that layout")
        state = convert_classifier_to_torchvision(args.input, args.output, cfg=_classifier_cfg(args))
        print(f"Wrote {len(state)} tensors to {args.output}; in an mmdet config: "
              f"backbone=dict(..., init_cfg=dict(type='Pretrained', checkpoint='{args.output}'))")
        return
    if args.source == "classifier":
        ckpt = convert_classifier(args.input, args.output, target=args.target, cfg=_classifier_cfg(args))
    else:
        ckpt = convert_torchvision(args.input, args.output, target=args.target)
    opts = ["MODEL.WEIGHTS", args.output] + pretrained_config_opts(ckpt["gradaug_det"])
    print("Use these config overrides with the converted weights:")
    print("  " + " ".join(f'"{o}"' if " " in o else o for o in opts))
    if args.emit_config:
        tree = _nested(opts)
        if args.base_config:
            # detectron2 resolves a relative _BASE_ against the directory of the file naming it
            base = os.path.relpath(os.path.abspath(args.base_config),
                                   os.path.dirname(os.path.abspath(args.emit_config)))
            tree = {"_BASE_": base, **tree}
        with atomic_write(args.emit_config, "w") as f:
            yaml.safe_dump(tree, f, sort_keys=False)
        if args.base_config:
            print(f"Wrote {args.emit_config}: {args.base_config} with these overrides; train with "
                  f"tools/train_net.py --config-file {args.emit_config}")
        else:
            print(f"Wrote them to {args.emit_config} (merge it after your detection config; with "
                  "--base-config CONFIG it is a whole config for tools/train_net.py)")


if __name__ == "__main__":
    from gradaug_det.utils.cli import run_tool

    run_tool(main)  # a mistake: one "error: ..." line, exit status 2
