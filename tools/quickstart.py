#!/usr/bin/env python
"""The paper's pipeline in miniature on generated data (``make demo``), through the documented tools.

Each stage is the tool a user would run, in its own process, feeding the next:

1. data: the quickstart shapes (COCO instance segmentation: circles, rectangles, triangles,
   each class in its own hue band, that occlude each other, 15-77 px, with unannotated
   clutter of any colour, 128 px images) and the classification images of the same look
   (8 glyph classes), generated on first use under
   ``$DETECTRON2_DATASETS`` (default ``./datasets``; ``gradaug_det.data.QUICKSTART_SHAPES``,
   ``QUICKSTART_CLASSES``);
2. ``tools/train_net.py --config-file configs/quickstart/pretrain_r18_gradaug.yaml``: GradAug
   pretraining of the R18 backbone as a classifier (top-1 at width 1.0 and 0.75);
3. ``tools/convert_pretrained.py --source classifier ... --emit-config``: to detectron2;
4. ``tools/train_net.py --config-file configs/quickstart/mask_rcnn_gradaug.yaml`` with the
   converted weights: GradAug fine-tuning of Mask R-CNN R18-FPN, then detectron2's
   COCOEvaluator at width 1.0 and at ``TEST.SLIM_WIDTHS``;
5. ``tools/prune.py --width W``: a physically smaller model (stock detectron2 heads; the
   backbone is stock only at widths whose channels detectron2's ResNet rule can express,
   otherwise gradaug_det's ``build_pruned_resnet_fpn_backbone``), then
   ``tools/train_net.py --eval-only`` on it: its AP equals the slimmed evaluation at W;
6. ``tools/demo.py`` at width 1.0 and at W on the first validation images, assembled into
   one PNG grid (ground truth | width 1.0 | width W), and ``tools/plot_metrics.py``: loss
   and AP plots.

The last lines printed list every output. ``MODEL.DEVICE`` is ``cuda`` when torch sees a
GPU, else ``cpu`` (``--device`` overrides).

Examples::

    python tools/quickstart.py                                  # what `make demo` runs
    python tools/quickstart.py --device cpu --seed 1 --output-dir output/quickstart_s1
    python tools/quickstart.py --iters 1500 --opts SOLVER.BASE_LR 0.01   # detection overrides
"""
import argparse
import os
import sys
import time

import yaml

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
PRETRAIN_CONFIG = os.path.join(REPO, "configs", "quickstart", "pretrain_r18_gradaug.yaml")
DETECTION_CONFIG = os.path.join(REPO, "configs", "quickstart", "mask_rcnn_gradaug.yaml")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="output/quickstart", help="where every stage writes")
    parser.add_argument("--device", default="auto",
                        help="MODEL.DEVICE of every stage: auto (cuda if available, else cpu), cpu, cuda")
    parser.add_argument("--seed", type=int, default=None, help="SEED of both trainings (default: the configs')")
    parser.add_argument("--pretrain-config", default=PRETRAIN_CONFIG, metavar="FILE",
                        help="classification pretraining config (default: configs/quickstart/pretrain_r18_gradaug.yaml)")
    parser.add_argument("--config-file", default=DETECTION_CONFIG, metavar="FILE",
                        help="detection config (default: configs/quickstart/mask_rcnn_gradaug.yaml)")
    parser.add_argument("--pretrain-iters", type=int, default=None,
                        help="SOLVER.MAX_ITER of the pretraining (default: the config's)")
    parser.add_argument("--iters", type=int, default=None,
                        help="SOLVER.MAX_ITER of the detector; SOLVER.STEPS scale with it (default: the config's)")
    parser.add_argument("--prune-width", type=float, default=None,
                        help="width of the pruned model (default: the smallest of TEST.SLIM_WIDTHS)")
    parser.add_argument("--num-pictures", type=int, default=6, help="validation images in the picture grid")
    parser.add_argument("--confidence-threshold", type=float, default=0.5,
                        help="score threshold of the drawn predictions (default 0.5)")
    parser.add_argument("--pretrain-opts", default=[], nargs="*", metavar="KEY VALUE",
                        help="pretraining config overrides as KEY VALUE pairs (put --opts last)")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                        help="detection config overrides as KEY VALUE pairs, e.g. SOLVER.BASE_LR 0.01")
    return parser


def _load_cfg(config_file: str, opts=()):
    from gradaug_det.config import merge_user_config
    from gradaug_det.engine.setup import get_gradaug_cfg

    return merge_user_config(get_gradaug_cfg(), config_file, list(opts))


def _check_args(args) -> None:
    """Refuses bad arguments before any stage runs."""
    from gradaug_det.utils.cli import check_stage_flags

    check_stage_flags(args, files=("pretrain_config", "config_file"), counts=("pretrain_iters", "iters"),
                      pairs=("pretrain_opts", "opts"))
    if args.num_pictures < 1:
        raise SystemExit(f"--num-pictures must be >= 1, got {args.num_pictures}")
    if args.prune_width is not None and not 0.0 < args.prune_width < 1.0:
        raise SystemExit(f"--prune-width must be in (0, 1), got {args.prune_width}")


def draw_ground_truth(dataset: str, files, out_dir: str) -> list:
    """Draws the annotations of ``files`` (images of the registered ``dataset``) into ``out_dir``."""
    import cv2
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.utils.visualizer import Visualizer

    by_file = {os.path.abspath(d["file_name"]): d for d in DatasetCatalog.get(dataset)}
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for f in files:
        image = cv2.imread(f)
        drawing = Visualizer(image[:, :, ::-1], MetadataCatalog.get(dataset)).draw_dataset_dict(
            by_file[os.path.abspath(f)])
        path = os.path.join(out_dir, os.path.basename(f))
        drawing.save(path)
        written.append(path)
    return written


def _fmt(value: float) -> str:
    return f"{value:.1f}"


def main(args) -> dict:
    _check_args(args)
    start = time.perf_counter()
    import gradaug_det  # noqa: F401  (registers the quickstart datasets)
    from detectron2.data import DatasetCatalog
    from gradaug_det.launch.pipeline import (
        auto_device,
        pretrain_and_convert,
        read_final_results,
        run_tool,
        schedule_opts,
    )
    from gradaug_det.data.datasets import check_datasets_registered
    from gradaug_det.launch.pictures import picture_grid
    from gradaug_det.evaluation.widths import width_task_key

    device = auto_device(args.device)
    # a mistake in the configs or their overrides: refused before the output directory is made
    pre_cfg = _load_cfg(args.pretrain_config, args.pretrain_opts)
    det_cfg = _load_cfg(args.config_file, args.opts)
    for cfg, flag in ((pre_cfg, "--pretrain-config"), (det_cfg, "--config-file")):
        check_datasets_registered(cfg.DATASETS.TRAIN, f"DATASETS.TRAIN of {flag}")
        check_datasets_registered(cfg.DATASETS.TEST, f"DATASETS.TEST of {flag}")
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    commands = os.path.join(out, "commands.txt")
    tool_log = os.path.join(out, "tools_output.log")  # the drawing and plotting tools' output
    for path in (commands, tool_log):
        if os.path.exists(path):
            os.remove(path)
    seed = [] if args.seed is None else ["SEED", str(args.seed)]
    common = ["MODEL.DEVICE", device, *seed]
    print(f"gradaug-det quickstart: MODEL.DEVICE {device}, outputs in {out}")

    # 1. data: generated now, with progress bars (the tools then find it up to date)
    for name in {*pre_cfg.DATASETS.TRAIN, *pre_cfg.DATASETS.TEST, *det_cfg.DATASETS.TRAIN, *det_cfg.DATASETS.TEST}:
        DatasetCatalog.get(name)
    val_name = det_cfg.DATASETS.TEST[0]

    # 2-3. GradAug pretraining of the backbone (classification), conversion to detectron2
    pre_dir = os.path.join(out, "pretrain")
    pre = pretrain_and_convert(TOOLS, args.pretrain_config, pre_dir,
                               [*common, *schedule_opts(pre_cfg, args.pretrain_iters), *args.pretrain_opts],
                               commands)
    pre_results, t_pre, pkl = pre["results"], pre["seconds"], pre["weights"]

    # 4. GradAug fine-tuning of Mask R-CNN, COCO AP at width 1.0 and TEST.SLIM_WIDTHS
    det_dir = os.path.join(out, "mask_rcnn")
    det_opts = [*pre["opts"], "OUTPUT_DIR", det_dir, *common,
                *schedule_opts(det_cfg, args.iters), *args.opts]
    t_det = run_tool(os.path.join(TOOLS, "train_net.py"), ["--config-file", args.config_file, *det_opts],
                     "fine-tune", commands)
    det_results = read_final_results(det_dir)
    widths = sorted({float(w) for w in det_cfg.TEST.SLIM_WIDTHS} - {1.0}, reverse=True)
    prune_width = args.prune_width if args.prune_width is not None else (min(widths) if widths else 0.75)

    # 5. prune to prune_width, evaluate the pruned stock model
    det_config = os.path.join(det_dir, "config.yaml")  # written by train_net.py (default_setup)
    det_weights = os.path.join(det_dir, "model_final.pth")
    pruned_dir = os.path.join(out, f"pruned_w{prune_width:g}")
    run_tool(os.path.join(TOOLS, "prune.py"),
             ["--config-file", det_config, "--weights", det_weights, "--width", prune_width,
              "--output", pruned_dir, "MODEL.DEVICE", device], "prune", commands)
    pruned_config = os.path.join(pruned_dir, f"config_pruned_w{prune_width:g}.yaml")  # prune.py's name
    pruned_weights = os.path.join(pruned_dir, f"model_pruned_w{prune_width:g}.pth")  # prune.py's name
    pruned_eval = os.path.join(pruned_dir, "eval")
    run_tool(os.path.join(TOOLS, "train_net.py"),
             ["--config-file", pruned_config, "--eval-only", "MODEL.WEIGHTS", pruned_weights,
              "OUTPUT_DIR", pruned_eval, "MODEL.DEVICE", device, "TEST.SLIM_WIDTHS", "[]"],
             "evaluate pruned", commands)
    pruned_results = read_final_results(pruned_eval)

    # 6. pictures and plots
    val = sorted(DatasetCatalog.get(val_name), key=lambda d: d["image_id"])[: args.num_pictures]
    files = [d["file_name"] for d in val]
    pic_dir = os.path.join(out, "pictures")
    columns = [draw_ground_truth(val_name, files, os.path.join(pic_dir, "ground_truth"))]
    for w in (1.0, prune_width):
        w_dir = os.path.join(pic_dir, f"w{w:g}")
        run_tool(os.path.join(TOOLS, "demo.py"),
                 ["--config-file", det_config, "--input", *files, "--output", w_dir, "--width", w,
                  "--confidence-threshold", args.confidence_threshold,
                  "--opts", "MODEL.WEIGHTS", det_weights, "MODEL.DEVICE", device], f"draw w{w:g}", commands,
                 quiet=True, output_file=tool_log)
        columns.append([os.path.join(w_dir, os.path.basename(f)) for f in files])
    grid = picture_grid(columns, ["ground truth", "width 1.0", f"width {prune_width:g}"],
                        os.path.join(out, "predictions.png"))
    plots = os.path.join(out, "plots")
    run_tool(os.path.join(TOOLS, "plot_metrics.py"), [det_dir, "--smooth", "5", "--output", plots],
             "plot", commands, quiet=True, output_file=tool_log)
    run_tool(os.path.join(TOOLS, "plot_metrics.py"),
             [pre_dir, "--smooth", "5", "--output", os.path.join(plots, "pretrain")], "plot pretrain",
             commands, quiet=True, output_file=tool_log)

    # summary
    print("\n" + "=" * 78)
    print("GradAug pretraining (classification, top-1 on the generated validation images):")
    for task, metrics in pre_results.items():
        if "top1" in metrics:
            print(f"  {task:<24} top-1 {_fmt(metrics['top1'])}")
    print("\nMask R-CNN R18-FPN fine-tuned with GradAug, COCO AP (detectron2 COCOEvaluator) on "
          "the generated validation split:")
    print(f"  {'width':<8}{'bbox AP':>9}{'AP50':>7}{'AP75':>7}{'segm AP':>9}{'AP50':>7}{'AP75':>7}")
    rows = {}
    for w in [1.0, *widths]:
        b, s = det_results.get(width_task_key("bbox", w)), det_results.get(width_task_key("segm", w))
        if b is None:
            continue
        rows[w] = {"bbox": b, "segm": s}
        s = s or {}
        print(f"  {str(w):<8}{_fmt(b['AP']):>9}{_fmt(b['AP50']):>7}{_fmt(b['AP75']):>7}"
              f"{_fmt(s.get('AP', float('nan'))):>9}{_fmt(s.get('AP50', float('nan'))):>7}"
              f"{_fmt(s.get('AP75', float('nan'))):>7}")
    pb, ps = pruned_results.get("bbox", {}), pruned_results.get("segm", {})
    slim = rows.get(prune_width, {})
    with open(pruned_config) as f:  # prune.py's config says which backbone builds the pruned model
        builder = yaml.safe_load(f)["MODEL"]["BACKBONE"]["NAME"]
    kind = ("stock detectron2 model" if builder == "build_resnet_fpn_backbone"
            else f"backbone {builder}: import gradaug_det to load it")
    print(f"  pruned to width {prune_width:g} ({kind}): bbox AP {_fmt(pb.get('AP', float('nan')))}, "
          f"segm AP {_fmt(ps.get('AP', float('nan')))} (slimmed evaluation: "
          f"{_fmt(slim.get('bbox', {}).get('AP', float('nan')))} / {_fmt((slim.get('segm') or {}).get('AP', float('nan')))})")
    total = time.perf_counter() - start
    print(f"\nTime: {total:.0f} s in all (pretraining {t_pre:.0f} s, fine-tuning with evaluation {t_det:.0f} s).")
    outputs = [
        ("commands run", commands),
        ("drawing/plot logs", tool_log),
        ("pretraining", pre_dir),
        ("converted backbone", pkl),
        ("detector", det_weights),
        ("detector config", det_config),
        ("detector log", os.path.join(det_dir, "log.txt")),
        ("metrics", os.path.join(det_dir, "metrics.json")),
        ("pruned model", pruned_weights),
        ("pruned config", pruned_config),
        ("predictions grid", grid),
        ("drawn images", pic_dir),
        ("loss plot", os.path.join(plots, "losses.png")),
        ("AP plot", os.path.join(plots, "ap.png")),
        ("GradAug plot", os.path.join(plots, "gradaug.png")),
        ("pretraining plots", os.path.join(plots, "pretrain")),
    ]
    outputs = [(label, path) for label, path in outputs if os.path.exists(path)]
    print("Outputs:")
    for label, path in outputs:
        print(f"  {label + ':':<20} {path}")
    return {"device": device, "pretrain": pre_results, "detection": det_results, "pruned": pruned_results,
            "prune_width": prune_width, "outputs": dict(outputs), "seconds": total}


if __name__ == "__main__":
    from gradaug_det.utils.cli import run_tool

    run_tool(main, get_parser().parse_args(sys.argv[1:]))  # a mistake: one "error: ..." line, exit status 2
