"""detectron2's model zoo x GradAug: what trains, with which sub-network loss (issue 10 §4).

Every yacs config shipped in ``detectron2/model_zoo/configs`` is loaded, its ResNet backbone
builder swapped for the slimmable twin (:data:`gradaug_det.modeling.SLIMMABLE_TWINS`), shrunk
by :data:`SHRINK` (a ResNet-18, or a narrow ResNet-50 where the config needs bottleneck
blocks; small heads; 64 px images) and trained with GradAug for
two iterations on :func:`register_matrix_dataset`'s generated images, which carry every field
the zoo's models read (boxes, polygon masks, COCO keypoints, a semantic map, precomputed
proposals). A config either trains with finite losses or is refused by
``GradAugTrainer.__init__`` before any data is read.

De-duplication: configs whose ``MODEL`` node (plus ``INPUT.FORMAT`` / ``INPUT.MASK_FORMAT``)
is identical once the shrink overrides are applied build the same model and are tested once
(the first in sorted order stands for its group). Schedules (1x / 3x / 9x), datasets (COCO /
LVIS / Cityscapes / VOC), class counts, pretrained weights, pixel statistics, loss scalars
(smooth-L1 beta, loss weights, pooler sampling ratio: :data:`_LOSS_SCALARS`), ResNet depth
(50 / 101 / 152 all become the shrunk network), test-time keys (``*_TEST``,
``PANOPTIC_FPN.COMBINE``) and the knobs :data:`SHRINK` sets anyway (input sizes, batch
sizes, proposal counts, head widths) do not make another model.

Run as a script to print the README table from the expectations (``python
tests/modeling/zoo_matrix.py``); the test checks that the README holds exactly that table.
"""
import functools
import glob
import json
import os
import pickle
from collections import OrderedDict
from typing import Dict, List, Tuple

import numpy as np

ZOO_ROOT = None  # set lazily (detectron2 import)
DATASET = "gradaug_zoo_matrix_train"
IMAGE_SIZES = ((64, 64), (64, 80), (80, 64), (64, 64))  # (height, width) of the generated images
NUM_THINGS, NUM_STUFF = 3, 3  # thing classes; semantic classes (PanopticFPN: stuff + "things")
NUM_KEYPOINTS = 17

#: Overrides that shrink every zoo model to a few MFLOPs at 64 px (keys every config has).
#: Head widths are multiples of 32 so that the GroupNorm(32, C) configs build.
SHRINK = OrderedDict([
    ("MODEL.DEVICE", "cpu"),
    ("MODEL.WEIGHTS", ""),
    ("MODEL.FPN.OUT_CHANNELS", 32),
    ("MODEL.RPN.BATCH_SIZE_PER_IMAGE", 32),
    ("MODEL.RPN.PRE_NMS_TOPK_TRAIN", 200),
    ("MODEL.RPN.POST_NMS_TOPK_TRAIN", 50),
    ("MODEL.RPN.PRE_NMS_TOPK_TEST", 200),
    ("MODEL.RPN.POST_NMS_TOPK_TEST", 50),
    ("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 16),
    ("MODEL.ROI_HEADS.NUM_CLASSES", NUM_THINGS),
    ("MODEL.ROI_BOX_HEAD.FC_DIM", 32),
    ("MODEL.ROI_BOX_HEAD.CONV_DIM", 32),
    ("MODEL.ROI_MASK_HEAD.CONV_DIM", 32),
    ("MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS", (32, 32)),
    ("MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS", NUM_KEYPOINTS),
    ("MODEL.RETINANET.NUM_CLASSES", NUM_THINGS),
    ("MODEL.RETINANET.NUM_CONVS", 1),
    ("MODEL.SEM_SEG_HEAD.CONVS_DIM", 32),
    ("MODEL.SEM_SEG_HEAD.NUM_CLASSES", NUM_STUFF + 1),
    ("INPUT.MIN_SIZE_TRAIN", (64,)),
    ("INPUT.MAX_SIZE_TRAIN", 96),
    ("INPUT.MIN_SIZE_TEST", 64),
    ("INPUT.MAX_SIZE_TEST", 96),
    ("SOLVER.IMS_PER_BATCH", 2),
    ("SOLVER.MAX_ITER", 2),
    ("SOLVER.STEPS", ()),
    ("SOLVER.CHECKPOINT_PERIOD", 100000),
    ("DATALOADER.NUM_WORKERS", 0),
    ("DATASETS.TRAIN", (DATASET,)),
    ("DATASETS.TEST", ()),
    ("TEST.EVAL_PERIOD", 0),
    ("TEST.PRECISE_BN.NUM_ITER", 2),
    ("TEST.EXPECTED_RESULTS", []),  # quick_schedules' COCO AP checks
    ("SEED", 7),
])

#: The backbone: ResNet-18 (the res5 head of C4 models 64 channels wide), except where the
#: config needs bottleneck blocks (``RES5_DILATION`` 2, ResNeXt groups): a narrow ResNet-50
#: that keeps the config's dilation / groups / stride placement.
R18 = OrderedDict([("MODEL.RESNETS.DEPTH", 18), ("MODEL.RESNETS.RES2_OUT_CHANNELS", 64),
                   ("MODEL.RESNETS.NUM_GROUPS", 1), ("MODEL.RESNETS.WIDTH_PER_GROUP", 8)])
NARROW_R50 = OrderedDict([("MODEL.RESNETS.DEPTH", 50), ("MODEL.RESNETS.STEM_OUT_CHANNELS", 32),
                          ("MODEL.RESNETS.RES2_OUT_CHANNELS", 128)])
PLAIN = OrderedDict([("MODEL.RESNETS.WIDTH_PER_GROUP", 32)])
GROUPED = OrderedDict([("MODEL.RESNETS.NUM_GROUPS", 8), ("MODEL.RESNETS.WIDTH_PER_GROUP", 4)])


def needs_bottleneck(cfg) -> bool:
    """Whether the config's ResNet cannot be a ResNet-18 (dilated res5 or ResNeXt groups)."""
    return cfg.MODEL.RESNETS.RES5_DILATION != 1 or cfg.MODEL.RESNETS.NUM_GROUPS > 1


#: GradAug settings of every run: two sub-networks, down to half width (tiny, quick passes).
GRADAUG = OrderedDict([
    ("GRADAUG.ENABLED", True),
    ("GRADAUG.NUM_SUBNETS", 2),
    ("GRADAUG.MIN_WIDTH", 0.5),
    ("GRADAUG.MAX_WIDTH", 1.0),
])


def zoo_root() -> str:
    import detectron2

    return os.path.join(os.path.dirname(detectron2.__file__), "model_zoo", "configs")


def zoo_configs() -> List[str]:
    """Every yacs config of detectron2's model zoo, relative to its ``configs`` folder (no Base-*)."""
    root = zoo_root()
    paths = glob.glob(os.path.join(root, "**", "*.yaml"), recursive=True)
    return sorted(os.path.relpath(p, root) for p in paths if not os.path.basename(p).startswith("Base-"))


def matrix_cfg(rel_path: str, subnet_loss: str, output_dir: str = "", proposal_file: str = ""):
    """The zoo config at ``rel_path`` with its slimmable twin, shrunk, GradAug on.

    Nothing else of the zoo config changes (norms, heads, losses, deformable stages...).
    """
    from detectron2.config import get_cfg

    import gradaug_det
    from gradaug_det.modeling import SLIMMABLE_TWINS

    cfg = get_cfg()
    gradaug_det.add_gradaug_config(cfg)
    cfg.merge_from_file(os.path.join(zoo_root(), rel_path))
    name = cfg.MODEL.BACKBONE.NAME
    cfg.MODEL.BACKBONE.NAME = SLIMMABLE_TWINS[name]
    overrides = OrderedDict(SHRINK)
    if needs_bottleneck(cfg):
        overrides.update(NARROW_R50)
        overrides.update(GROUPED if cfg.MODEL.RESNETS.NUM_GROUPS > 1 else PLAIN)
    else:
        overrides.update(R18)
    overrides.update(GRADAUG)
    overrides["GRADAUG.SUBNET_LOSS"] = subnet_loss
    overrides["OUTPUT_DIR"] = output_dir
    if cfg.MODEL.LOAD_PROPOSALS:
        overrides["DATASETS.PROPOSAL_FILES_TRAIN"] = (proposal_file,)
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


#: Numbers inside a loss or a pooler's sampling: they change no module, no field and no code
#: path GradAug touches (the loss *types*, e.g. ``BBOX_REG_LOSS_TYPE`` "giou", do count).
_LOSS_SCALARS = ("SMOOTH_L1_BETA", "LOSS_WEIGHT", "POOLER_SAMPLING_RATIO", "NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS")


def model_signature(rel_path: str) -> str:
    """What makes a model different, once shrunk: ``MODEL`` minus the keys named in the
    module docstring, plus the input format keys."""
    cfg = matrix_cfg(rel_path, "gt")

    def flat(node, prefix=""):
        out = {}
        for k, v in node.items():
            if isinstance(v, dict):
                out.update(flat(v, prefix + k + "."))
            else:
                out[prefix + k] = v
        return out

    model = {k: v for k, v in flat(cfg.MODEL).items()
             if k not in ("WEIGHTS", "PIXEL_MEAN", "PIXEL_STD", "DEVICE") and not k.endswith("_TEST")
             and not k.startswith("PANOPTIC_FPN.COMBINE.") and not k.endswith(_LOSS_SCALARS)}
    model["INPUT.FORMAT"], model["INPUT.MASK_FORMAT"] = cfg.INPUT.FORMAT, cfg.INPUT.MASK_FORMAT
    return json.dumps(model, sort_keys=True, default=str)


@functools.lru_cache(maxsize=None)
def distinct_models() -> "OrderedDict[str, List[str]]":
    """Representative config -> every zoo config building the same (shrunk) model (computed
    once per process: ~0.15 s per config)."""
    groups: Dict[str, List[str]] = OrderedDict()
    for path in zoo_configs():
        groups.setdefault(model_signature(path), []).append(path)
    return OrderedDict((paths[0], paths) for paths in groups.values())


#: How the README states a setting a model needs (the test uses the shrunk model's value).
NEEDS_README = {"MODEL.SLIMMABLE.CHANNEL_DIVISOR": "`MODEL.SLIMMABLE.CHANNEL_DIVISOR` a multiple of every GN "
                "layer's channels per group (R-50-GN: 64; the refusal names it)"}


def render_table(groups, expected, needs, losses) -> str:
    """The README's Markdown table: one row per distinct model (its configs), one column per
    sub-network loss: "trains" (with any setting it needs) or the key its refusal names."""
    lines = ["| detectron2 model-zoo configs (one model per row) | " + " | ".join(
        f'`SUBNET_LOSS "{loss}"`' for loss in losses) + " |", "|---|" + "---|" * len(losses)]
    for rep, paths in groups.items():
        names = ", ".join(f"`{p[:-5]}`" for p in paths)
        cells = []
        for outcome in expected[rep]:
            if outcome == "trains":
                extra = ", ".join(NEEDS_README.get(k, f"`{k} {v}`") for k, v in needs.get(rep, {}).items())
                cells.append("trains" + (f" with {extra}" if extra else ""))
            else:
                cells.append(f"refused: `{outcome}`")
        lines.append(f"| {names} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---- Generated data --------------------------------------------------------------------------

def _keypoint_names():
    return [f"kp{i}" for i in range(NUM_KEYPOINTS)]


def register_matrix_dataset(root: str, counter: list) -> Tuple[str, str]:
    """Write :data:`IMAGE_SIZES` images (PNG), their semantic maps and a proposal file under
    ``root``; register :data:`DATASET` (every call of its loader appends to ``counter``).

    Each image holds two rectangles (classes 0..2) with polygon masks, 17 visible keypoints
    inside each box (COCO keypoint metadata: names, flip map), a semantic map with
    :data:`NUM_STUFF` stuff regions and label 0 on the things (PanopticFPN's convention), and
    8 precomputed proposals around the objects.

    Returns:
        (dataset name, proposal file path).
    """
    import cv2

    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.structures import BoxMode

    rng = np.random.RandomState(0)
    dicts, proposals = [], {"ids": [], "boxes": [], "objectness_logits": [], "bbox_mode": BoxMode.XYXY_ABS}
    for i, (h, w) in enumerate(IMAGE_SIZES):
        image = rng.randint(0, 255, (h, w, 3)).astype(np.uint8)
        sem = np.zeros((h, w), np.uint8)
        sem[: h // 2, :] = 1
        sem[h // 2:, : w // 2] = 2
        sem[h // 2:, w // 2:] = 3
        sem[:2, :] = 255  # an ignored strip
        annos = []
        for j in range(2):
            x0, y0 = int(rng.randint(2, w // 2 - 4)), int(rng.randint(2, h // 2 - 4))
            bw, bh = int(rng.randint(14, w // 2)), int(rng.randint(14, h // 2))
            x1, y1 = x0 + bw, y0 + bh
            image[y0:y1, x0:x1] = (60 + 80 * j, 200 - 60 * j, 40 * (i + 1))
            sem[y0:y1, x0:x1] = 0
            kx = rng.uniform(x0 + 1, x1 - 1, NUM_KEYPOINTS)
            ky = rng.uniform(y0 + 1, y1 - 1, NUM_KEYPOINTS)
            annos.append({
                "bbox": [x0, y0, bw, bh], "bbox_mode": BoxMode.XYWH_ABS, "category_id": (i + j) % NUM_THINGS,
                "iscrowd": 0, "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
                "keypoints": np.stack([kx, ky, np.full(NUM_KEYPOINTS, 2.0)], 1).reshape(-1).tolist(),
            })
        file_name = os.path.join(root, f"{i}.png")
        sem_name = os.path.join(root, f"{i}_sem.png")
        cv2.imwrite(file_name, image[:, :, ::-1])
        cv2.imwrite(sem_name, sem)
        dicts.append({"file_name": file_name, "sem_seg_file_name": sem_name, "height": h, "width": w,
                      "image_id": i, "annotations": annos})
        boxes = []
        for a in annos:
            x, y, bw, bh = a["bbox"]
            for dx, dy in ((0, 0), (3, 2), (-2, 3), (4, -3)):
                boxes.append([max(0, x + dx), max(0, y + dy), min(w, x + bw + dx), min(h, y + bh + dy)])
        proposals["ids"].append(i)
        proposals["boxes"].append(np.asarray(boxes, np.float32))
        proposals["objectness_logits"].append(np.linspace(2.0, -2.0, len(boxes)).astype(np.float32))
    proposal_file = os.path.join(root, "proposals.pkl")
    with open(proposal_file, "wb") as f:
        pickle.dump(proposals, f)

    def load():
        counter.append(1)
        return [dict(d, annotations=[dict(a) for a in d["annotations"]]) for d in dicts]

    if DATASET in DatasetCatalog.list():
        DatasetCatalog.remove(DATASET)
        MetadataCatalog.remove(DATASET)
    DatasetCatalog.register(DATASET, load)
    names = _keypoint_names()
    MetadataCatalog.get(DATASET).set(
        thing_classes=[f"thing{c}" for c in range(NUM_THINGS)],
        stuff_classes=["things"] + [f"stuff{c}" for c in range(NUM_STUFF)],
        ignore_label=255,
        keypoint_names=names,
        keypoint_flip_map=[(names[k], names[k + 1]) for k in range(1, NUM_KEYPOINTS, 2)],
        keypoint_connection_rules=[],
    )
    return DATASET, proposal_file


if __name__ == "__main__":
    import importlib.util
    import logging

    logging.disable(logging.WARNING)
    spec = importlib.util.spec_from_file_location(
        "test_model_zoo_matrix", os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_model_zoo_matrix.py"))
    t = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(t)
    print(render_table(distinct_models(), t.EXPECTED, t.NEEDS, t.LOSSES), end="")
