#!/usr/bin/env python
"""The detectron2 quickstart's pipeline for MMDetection users (``make demo-mmdet``), through the documented tools.

Each stage is the tool a user would run, in its own process, feeding the next:

1. data: the quickstart shapes (COCO instance segmentation, 128 px, 3 classes, occlusion,
   clutter) and the classification images of the same look, generated on first use under
   ``$DETECTRON2_DATASETS`` (default ``./datasets``), exactly as ``make demo`` generates them
   (``gradaug_det.data.QUICKSTART_SHAPES``, ``QUICKSTART_CLASSES``);
2. ``tools/train_net.py --config-file configs/quickstart/pretrain_r18_gradaug.yaml``: the
   detectron2 quickstart's GradAug pretraining of the R18 backbone as a classifier (top-1 at
   width 1.0 and 0.75); ``--pretrain-dir`` reuses a finished one instead;
3. ``tools/convert_pretrained.py --source classifier --target torchvision``: the
   torchvision-named ResNet that mmdet's ``ResNet`` / ``SlimmableResNet`` load;
4. ``<output-dir>/mask-rcnn_r18_fpn_gradaug_quickstart.py``, written here: an mmdet config
   that inherits ``configs/mmdet/quickstart/mask-rcnn_r18_fpn_gradaug_shapes.py`` (the
   detectron2 quickstart's recipe in mmdet terms) with the converted backbone
   (``init_cfg=dict(type='Pretrained', ...)``) and the data's location; then
   ``tools/mmdet_train.py`` on it: GradAug fine-tuning of Mask R-CNN R18-FPN (its validation
   left to the next stage: ``val_cfg=None`` and the rest);
5. ``tools/mmdet_test.py --widths 1.0 0.9 0.75``: ``CocoMetric`` at width 1.0 and at the
   sub-networks' widths, one table (and ``coco_ap.json``);
6. mmdet's ``DetLocalVisualizer`` on the first validation images (in this process): one PNG
   grid, ground truth | width 1.0 | the smallest width.

The summary prints mmdet's ``coco/bbox_mAP: ...`` / ``coco/segm_mAP: ...`` for every width, the
time of each stage and where every output is. Examples::

    python tools/mmdet_quickstart.py                                 # what `make demo-mmdet` runs
    python tools/mmdet_quickstart.py --seed 1 --output-dir output/quickstart_mmdet_s1
    python tools/mmdet_quickstart.py --pretrain-dir output/quickstart/pretrain   # make demo's pretraining
"""
import argparse
import os
import sys
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
PRETRAIN_CONFIG = os.path.join(REPO, "configs", "quickstart", "pretrain_r18_gradaug.yaml")
MMDET_CONFIG = os.path.join(REPO, "configs", "mmdet", "quickstart", "mask-rcnn_r18_fpn_gradaug_shapes.py")
#: The metrics of the summary, mmdet's CocoMetric names.
METRICS = ("coco/bbox_mAP", "coco/bbox_mAP_50", "coco/bbox_mAP_75", "coco/segm_mAP", "coco/segm_mAP_50",
           "coco/segm_mAP_75")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="output/quickstart_mmdet", help="where every stage writes")
    parser.add_argument("--device", default="auto",
                        help="device of every stage: auto (cuda if available, else cpu), cpu, cuda")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of both trainings: the pretraining's SEED, the detector's randomness.seed "
                             "and GradAug sampler seed (default: the configs')")
    parser.add_argument("--pretrain-config", default=PRETRAIN_CONFIG, metavar="FILE",
                        help="classification pretraining config (default: configs/quickstart/pretrain_r18_gradaug.yaml)")
    parser.add_argument("--pretrain-dir", default=None, metavar="DIR",
                        help="reuse the finished pretraining in DIR (its model_final.pth and config.yaml, e.g. "
                             "make demo's output/quickstart/pretrain) instead of pretraining")
    parser.add_argument("--config", default=MMDET_CONFIG, metavar="FILE",
                        help="mmdet detection config (default: configs/mmdet/quickstart/mask-rcnn_r18_fpn_gradaug_shapes.py)")
    parser.add_argument("--pretrain-iters", type=int, default=None,
                        help="SOLVER.MAX_ITER of the pretraining (default: the config's)")
    parser.add_argument("--iters", type=int, default=None,
                        help="train_cfg.max_iters of the detector; the lr milestones scale with it (default: the config's)")
    parser.add_argument("--widths", type=float, nargs="+", default=[1.0, 0.9, 0.75],
                        help="widths CocoMetric evaluates, each in (0, 1] (default: 1.0 0.9 0.75)")
    parser.add_argument("--tiny-data", action="store_true",
                        help="the smoke-size twins of both data sets (8 / 4 detection images): checks the pipeline "
                             "in seconds, its AP means nothing")
    parser.add_argument("--num-pictures", type=int, default=6, help="validation images in the picture grid")
    parser.add_argument("--confidence-threshold", type=float, default=0.5,
                        help="score threshold of the drawn predictions (default 0.5)")
    parser.add_argument("--pretrain-opts", default=[], nargs="*", metavar="KEY VALUE",
                        help="pretraining config overrides as KEY VALUE pairs")
    parser.add_argument("--cfg-options", default=[], nargs=argparse.REMAINDER, metavar="KEY=VALUE",
                        help="mmdet config overrides for training and evaluation, e.g. optim_wrapper.optimizer.lr=0.02 "
                             "(put it last)")
    return parser


def _check_args(args) -> None:
    """Refuses bad arguments before any stage runs."""
    from gradaug_det.slim import check_width
    from gradaug_det.utils.cli import check_stage_flags

    check_stage_flags(args, files=("pretrain_config", "config"), counts=("pretrain_iters", "iters"),
                      pairs=("pretrain_opts",))
    if args.pretrain_dir is not None and (args.pretrain_iters is not None or args.pretrain_opts):
        raise SystemExit("--pretrain-dir reuses a finished pretraining: --pretrain-iters / --pretrain-opts "
                         "would not apply to it")
    for w in args.widths:
        try:
            check_width(w)
        except ValueError as e:
            raise SystemExit(f"--widths: {e}")
    if args.num_pictures < 1:
        raise SystemExit(f"--num-pictures must be >= 1, got {args.num_pictures}")
    bad = [o for o in args.cfg_options if "=" not in o]
    if bad:
        raise SystemExit(f"--cfg-options takes KEY=VALUE items, got {bad}")


def write_quickstart_config(path: str, base: str, backbone: str, data_root: str) -> str:
    """Writes an mmdet config that inherits ``base`` with the pretrained backbone and the data.

    Args:
        path: the config file to write (``.py``).
        base: the detection config it inherits (``_base_``, absolute).
        backbone: the torchvision-named ResNet checkpoint (``convert_pretrained.py --target
            torchvision``), loaded by ``model.backbone.init_cfg``.
        data_root: the COCO-layout data directory (``annotations/instances_{train,val}.json``,
            ``train/``, ``val/``).

    Returns:
        ``path``.
    """
    from gradaug_det.utils.io import atomic_write

    root = os.path.join(os.path.abspath(data_root), "")
    text = f"""# Written by tools/mmdet_quickstart.py: {os.path.relpath(base, REPO)} with the GradAug-pretrained
# backbone and the quickstart data. Train / evaluate it with tools/mmdet_train.py / tools/mmdet_test.py.
_base_ = {base!r}

model = dict(backbone=dict(init_cfg=dict(_delete_=True, type='Pretrained',
                                         checkpoint={os.path.abspath(backbone)!r})))
data_root = {root!r}
train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator
"""
    with atomic_write(path, "w") as f:
        f.write(text)
    return path


def draw_pictures(config: str, checkpoint: str, widths, num_pictures: int, score_thr: float, out_dir: str,
                  device: str):
    """Draws ground truth and predictions at ``widths`` of the first validation images.

    mmdet's own inference (``init_detector``, ``inference_detector``) and drawing
    (``DetLocalVisualizer``), the model slimmed to each width.

    Returns:
        ``(columns, titles)``: one list of drawn files per column (ground truth, then each width).
    """
    import mmcv
    from mmengine.config import Config
    from mmdet.apis import inference_detector, init_detector
    from mmdet.registry import DATASETS
    from mmdet.utils import register_all_modules
    from mmdet.visualization import DetLocalVisualizer

    import gradaug_det.mmdet  # noqa: F401  (registers the slimmable modules and GradAug detectors)
    from gradaug_det.mmdet.checkpoint import use_safe_checkpoint_loading
    from gradaug_det.slim import width

    use_safe_checkpoint_loading()
    register_all_modules(init_default_scope=True)
    cfg = Config.fromfile(config)
    model = init_detector(cfg, checkpoint, device=device)
    dataset = DATASETS.build(cfg.test_dataloader.dataset)
    visualizer = DetLocalVisualizer.get_instance("gradaug_mmdet_quickstart")
    visualizer.dataset_meta = model.dataset_meta
    columns = [[] for _ in range(len(widths) + 1)]
    for i in range(min(num_pictures, len(dataset))):
        sample = dataset[i]["data_samples"]
        # the visualizer draws tensors and arrays (as mmdet's tools/analysis_tools/browse_dataset.py
        # converts them): the dataset's boxes are HorizontalBoxes, its masks BitmapMasks
        gt = sample.gt_instances
        gt.bboxes = gt.bboxes.tensor
        gt.masks = gt.masks.to_ndarray().astype(bool)
        image = mmcv.imread(sample.img_path, channel_order="rgb")
        name = os.path.basename(sample.img_path)
        path = os.path.join(out_dir, "ground_truth", name)
        visualizer.add_datasample(name, image, sample, draw_gt=True, draw_pred=False, out_file=path)
        columns[0].append(path)
        for column, w in zip(columns[1:], widths):
            with width(model, w):
                result = inference_detector(model, sample.img_path)
            path = os.path.join(out_dir, f"w{w:g}", name)
            visualizer.add_datasample(name, image, result, draw_gt=False, pred_score_thr=score_thr, out_file=path)
            column.append(path)
    return columns, ["ground truth", *[f"width {w}" for w in widths]]


def _last_checkpoint(work_dir: str) -> str:
    """The checkpoint mmengine's CheckpointHook saved last (its ``last_checkpoint`` file)."""
    marker = os.path.join(work_dir, "last_checkpoint")
    if not os.path.isfile(marker):
        raise SystemExit(f"no {marker}: did tools/mmdet_train.py save a checkpoint?")
    with open(marker) as f:
        return f.read().strip()


def metrics_line(metrics: dict) -> str:
    """mmengine's way of printing metrics: ``coco/bbox_mAP: 0.4940  coco/bbox_mAP_50: ...``."""
    return "  ".join(f"{k}: {metrics[k]:.4f}" for k in METRICS if k in metrics)


def main(args) -> dict:
    _check_args(args)
    start = time.perf_counter()
    import json

    from mmengine.config import Config

    import gradaug_det  # noqa: F401  (registers the quickstart datasets)
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from gradaug_det.data.datasets import QUICKSTART_CLS_TRAIN, QUICKSTART_CLS_VAL, QUICKSTART_TINY, \
        QUICKSTART_TRAIN, QUICKSTART_VAL
    from gradaug_det.launch.pictures import picture_grid
    from gradaug_det.launch.pipeline import (
        auto_device,
        mmdet_schedule_options,
        pretrain_and_convert,
        run_tool,
        schedule_opts,
    )

    device = auto_device(args.device)
    det_cfg = Config.fromfile(args.config)
    try:
        schedule = mmdet_schedule_options(det_cfg, args.iters)
    except ValueError as e:
        raise SystemExit(f"--iters {args.iters}: {e}")
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    commands = os.path.join(out, "commands.txt")
    if os.path.exists(commands):
        os.remove(commands)
    # mmengine takes the GPU whenever torch sees one: --device cpu hides it from the mmdet stages
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="") if device == "cpu" else None
    print(f"gradaug-det MMDetection quickstart: device {device}, outputs in {out}")

    # 1. data: generated now, with progress bars (the tools then find it up to date)
    if args.tiny_data:
        names = [QUICKSTART_TINY[k] for k in ("train", "val", "cls_train", "cls_val")]
    else:
        names = [QUICKSTART_TRAIN, QUICKSTART_VAL, QUICKSTART_CLS_TRAIN, QUICKSTART_CLS_VAL]
    for name in names:
        DatasetCatalog.get(name)
    # the registered detection data's directory (annotations/instances_*.json, train/, val/)
    data_root = os.path.dirname(os.path.dirname(MetadataCatalog.get(names[0]).json_file))

    # 2-3. GradAug pretraining of the backbone (classification), conversion to torchvision names
    seed = [] if args.seed is None else ["SEED", str(args.seed)]
    pre_opts = ["MODEL.DEVICE", device, *seed]
    if args.tiny_data:
        pre_opts += ["DATASETS.TRAIN", f'("{names[2]}",)', "DATASETS.TEST", f'("{names[3]}",)']
    if args.pretrain_iters is not None:
        from gradaug_det.config import merge_user_config
        from gradaug_det.engine.setup import get_gradaug_cfg

        pre_opts += schedule_opts(merge_user_config(get_gradaug_cfg(), args.pretrain_config, []), args.pretrain_iters)
    pre_dir = os.path.abspath(args.pretrain_dir) if args.pretrain_dir else os.path.join(out, "pretrain")
    pre = pretrain_and_convert(TOOLS, args.pretrain_config, pre_dir, [*pre_opts, *args.pretrain_opts], commands,
                               target="torchvision", train=args.pretrain_dir is None)

    # 4. GradAug fine-tuning of Mask R-CNN (mmdet); the next stage evaluates (all widths in one table)
    config = write_quickstart_config(os.path.join(out, "mask-rcnn_r18_fpn_gradaug_quickstart.py"),
                                     os.path.abspath(args.config), pre["weights"], data_root)
    work_dir = os.path.join(out, "mask_rcnn")
    seed_options = [] if args.seed is None else [f"randomness.seed={args.seed}", f"model.gradaug.seed={args.seed}"]
    no_val = ["val_cfg=None", "val_dataloader=None", "val_evaluator=None"]
    options = [*schedule, *no_val, *seed_options, *args.cfg_options]
    t_det = run_tool(os.path.join(TOOLS, "mmdet_train.py"),
                     [config, "--work-dir", work_dir, *(["--cfg-options", *options] if options else [])],
                     "fine-tune", commands, env=env)
    checkpoint = _last_checkpoint(work_dir)

    # 5. COCO AP (CocoMetric) at width 1.0 and the sub-widths
    results_file = os.path.join(out, "coco_ap.json")
    t_eval = run_tool(os.path.join(TOOLS, "mmdet_test.py"),
                      [config, checkpoint, "--widths", *args.widths, "--work-dir", os.path.join(work_dir, "test"),
                       "--out", results_file, *(["--cfg-options", *args.cfg_options] if args.cfg_options else [])],
                      "evaluate", commands, env=env)
    with open(results_file) as f:
        results = json.load(f)

    # 6. the picture: ground truth | width 1.0 | the smallest width
    pic_widths = sorted({1.0, min(args.widths)}, reverse=True)
    print(f"\n[draw] mmdet DetLocalVisualizer, widths {' '.join(f'{w:g}' for w in pic_widths)}", flush=True)
    columns, titles = draw_pictures(config, checkpoint, pic_widths, args.num_pictures, args.confidence_threshold,
                                    os.path.join(out, "pictures"), device)
    grid = picture_grid(columns, titles, os.path.join(out, "predictions.png"))

    # summary
    print("\n" + "=" * 78)
    print("GradAug pretraining (classification, top-1 on the generated validation images)"
          + (f", reused from {pre_dir}:" if args.pretrain_dir else ":"))
    for task, metrics in pre["results"].items():
        if "top1" in metrics:
            print(f"  {task:<24} top-1 {metrics['top1']:.1f}")
    print("\nMMDetection Mask R-CNN R18-FPN fine-tuned with GradAug, COCO AP (mmdet CocoMetric) on the "
          "generated validation split:")
    for w, metrics in results.items():
        print(f"  width {w}: {metrics_line(metrics)}")
    total = time.perf_counter() - start
    print(f"\nTime: {total:.0f} s in all (pretraining {pre['seconds']:.0f} s, fine-tuning {t_det:.0f} s, "
          f"evaluation at {len(args.widths)} widths {t_eval:.0f} s).")
    outputs = [
        ("commands run", commands),
        ("pretraining", pre_dir),
        ("converted backbone", pre["weights"]),
        ("detector config", config),
        ("detector", checkpoint),
        ("training logs", work_dir),
        ("COCO AP per width", results_file),
        ("predictions grid", grid),
        ("drawn images", os.path.join(out, "pictures")),
    ]
    outputs = [(label, path) for label, path in outputs if os.path.exists(path)]
    print("Outputs:")
    for label, path in outputs:
        print(f"  {label + ':':<20} {path}")
    return {"device": device, "pretrain": pre["results"], "detection": results, "outputs": dict(outputs),
            "seconds": total}


if __name__ == "__main__":
    from gradaug_det.utils.cli import run_tool

    run_tool(main, get_parser().parse_args(sys.argv[1:]))  # a mistake: one "error: ..." line, exit status 2
