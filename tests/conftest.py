"""Shared fixtures: a tiny Mask R-CNN config and synthetic detection batches."""
import importlib.util
import json
import logging
import os
import shutil

import pytest
import torch

from detectron2.structures import Boxes, Instances, PolygonMasks

from gradaug_det.engine.setup import get_gradaug_cfg


def tiny_rcnn_cfg(depth: int = 18, norm: str = "BN"):
    """A Mask R-CNN R18-FPN small enough for CPU tests (random init)."""
    cfg = get_gradaug_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.BACKBONE.NAME = "build_slimmable_resnet_fpn_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth in (18, 34) else 256
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[16], [32], [64], [128], [256]]
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 200
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 100
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    cfg.MODEL.ROI_MASK_HEAD.NAME = "MaskRCNNConvUpsampleHead"
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 1
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 16
    cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION = 14
    return cfg


def detection_batch(n: int = 2, size: int = 96, seed: int = 0):
    """``n`` random images with two boxes each and matching rectangle polygons."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        img = (torch.rand(3, size, size, generator=g) * 255).to(torch.uint8)
        inst = Instances((size, size))
        x0, y0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
        boxes = torch.tensor([[x0, y0, x0 + 30, y0 + 25], [10, size // 2, size // 2 + 10, size - 6]],
                             dtype=torch.float32)
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.randint(0, 3, (2,), generator=g)
        inst.gt_masks = PolygonMasks([[b[[0, 1, 2, 1, 2, 3, 0, 3]].numpy()] for b in boxes])
        out.append({"image": img, "instances": inst, "height": size, "width": size})
    return out


@pytest.fixture(autouse=True)
def _project_logs_reach_caplog():
    """Tools call detectron2's ``setup_logger(name="gradaug_det")``, which stops the
    project's logger from propagating to the root logger, where pytest's ``caplog`` listens:
    a test that reads log records would then pass or fail depending on which test ran first."""
    logger = logging.getLogger("gradaug_det")
    propagate = logger.propagate
    logger.propagate = True
    yield
    logger.propagate = propagate


@pytest.fixture
def rcnn_cfg():
    return tiny_rcnn_cfg()


@pytest.fixture
def make_batch():
    return detection_batch


@pytest.fixture
def make_rcnn_cfg():
    return tiny_rcnn_cfg


def _load_tool(name: str):
    """``tools/<name>.py`` imported as a module, so a test calls its ``main(argv)`` (and its
    parsers and helpers) as the command line does."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"{name}_tool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def load_tool():
    """``load_tool(name)``: ``tools/<name>.py`` as a module (see :func:`_load_tool`)."""
    return _load_tool


#: Tolerance of a score computed by two float32 models that do the same sums in another order
#: (a physically pruned model and the slimmed one): a few units of float32's 2**-24 per layer
#: over ~20 layers; 2**-13 (1.2e-4) leaves room. A box coordinate (pixels) gets it relative to
#: the image side.
FLOAT32_SCORE_TOL = 2.0 ** -13


def _assert_same_detections(a, b, image_side: float, tol: float = FLOAT32_SCORE_TOL):
    """``a`` and ``b``: per image, lists of ``(class, score, [x0, y0, x1, y1])``. Asserts they
    match one to one, image by image: same class, scores within ``tol``, box coordinates within
    ``tol * image_side`` pixels (near-equal scores may come in either order)."""
    assert len(a) == len(b)
    for i, (dets_a, dets_b) in enumerate(zip(a, b)):
        assert len(dets_a) == len(dets_b), f"image {i}: {len(dets_a)} and {len(dets_b)} detections"
        left = list(dets_b)
        for cls, score, box in dets_a:
            match = next((j for j, (c, s, bx) in enumerate(left) if c == cls and abs(s - score) <= tol
                          and max(abs(x - y) for x, y in zip(bx, box)) <= tol * image_side), None)
            assert match is not None, f"image {i}: no match for class {cls}, score {score}, box {box}"
            left.pop(match)


@pytest.fixture(scope="session")
def assert_same_detections():
    """``assert_same_detections(a, b, image_side)`` (see :func:`_assert_same_detections`)."""
    return _assert_same_detections


# ---------------------------------------------------------------------------------------------
# Tiny generated data and small-model overrides for running the tools and shipped configs as a
# user runs them (tests/tools/test_*_cli.py, tests/configs/test_shipped_configs.py).

#: Names under which :func:`tiny_coco` registers its splits in the test process.
TINY_TRAIN, TINY_VAL = "gradaug_test_tiny_train", "gradaug_test_tiny_val"
TINY_CLS_TRAIN, TINY_CLS_VAL = "gradaug_test_tiny_cls_train", "gradaug_test_tiny_cls_val"

#: yacs overrides (KEY VALUE ...) making any shipped R-CNN config a small CPU model at 64 px:
#: R18 with trainable BN (random init), 32-channel FPN, 64-unit box head, few RoIs.
TINY_RCNN_OPTS = [
    "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.RESNETS.NORM", "BN", "MODEL.BACKBONE.FREEZE_AT", "0", "MODEL.FPN.OUT_CHANNELS", "32",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200", "MODEL.RPN.PRE_NMS_TOPK_TEST", "100",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.RPN.POST_NMS_TOPK_TEST", "32",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "MODEL.ROI_MASK_HEAD.CONV_DIM", "16", "MODEL.ROI_MASK_HEAD.NUM_CONV", "1",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "96", "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.BASE_LR", "0.002", "SOLVER.WARMUP_ITERS", "0",
    "DATASETS.TRAIN", f"('{TINY_TRAIN}',)", "DATASETS.TEST", f"('{TINY_VAL}',)",
]

#: yacs overrides making any shipped ImageNet classification config a small CPU model (R18, 32 px).
TINY_CLS_OPTS = [
    "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.CLASSIFIER.NUM_CLASSES", "4", "INPUT.CLASSIFICATION.CROP_SIZE", "32",
    "INPUT.CLASSIFICATION.RESIZE_SIZE", "32", "INPUT.CLASSIFICATION.TEST_IMS_PER_BATCH", "4",
    "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.BASE_LR", "0.01", "SOLVER.WARMUP_ITERS", "0",
    "DATASETS.TRAIN", f"('{TINY_CLS_TRAIN}',)", "DATASETS.TEST", f"('{TINY_CLS_VAL}',)",
]


@pytest.fixture
def tiny_rcnn_opts():
    """:data:`TINY_RCNN_OPTS` (a fresh list)."""
    return list(TINY_RCNN_OPTS)


@pytest.fixture
def tiny_cls_opts():
    """:data:`TINY_CLS_OPTS` (a fresh list)."""
    return list(TINY_CLS_OPTS)


def _write_tiny_coco(root, *, num_train: int, num_val: int, names=None, portrait=None):
    """COCO 2017's layout under ``root/coco`` with generated 64 px shapes (see :func:`tiny_coco`).

    Args:
        names: (train name, val name) to register the splits under in this process, or None.
        portrait: None (square images), or ``i -> bool`` for the i-th training image: padded at
            the bottom to 64 x 96 (portrait, True) or at the right to 96 x 64 (landscape, False);
            the annotations stay valid (the shapes keep their coordinates).
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
    from PIL import Image

    from gradaug_det.data import generate_coco_shapes

    paths = generate_coco_shapes(str(root / "shapes"), num_train=num_train, num_val=num_val, image_size=64,
                                 progress=False)
    coco = root / "coco"
    os.makedirs(coco / "annotations")
    categories = [{"id": c["id"], "name": c["name"], "supercategory": "thing"} for c in COCO_CATEGORIES if c["isthing"]]
    for name, split in zip(names or (None, None), ("train", "val")):
        image_dir = coco / f"{split}2017"
        shutil.copytree(paths[split]["image_root"], image_dir)
        with open(paths[split]["json_file"]) as f:
            data = json.load(f)
        data["categories"] = categories  # shape ids 1..3 are COCO's first three
        for i, im in enumerate(data["images"] if split == "train" and portrait is not None else []):
            size = (im["width"], im["height"] + 32) if portrait(i) else (im["width"] + 32, im["height"])
            with Image.open(image_dir / im["file_name"]) as small:
                padded = Image.new(small.mode, size)
                padded.paste(small, (0, 0))
            padded.save(image_dir / im["file_name"])
            im["width"], im["height"] = size
        json_file = str(coco / "annotations" / f"instances_{split}2017.json")
        with open(json_file, "w") as f:
            json.dump(data, f)
        if name is None:
            continue
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(name, {}, json_file, str(image_dir))


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory):
    """A ``DETECTRON2_DATASETS`` root whose ``coco/`` holds 4 training and 3 validation
    images (64 px generated shapes) with COCO 2017's layout and its 80 categories (the shapes
    are labelled person/bicycle/car), so detectron2's ``coco_2017_train`` / ``coco_2017_val``
    read them in a process started with ``DETECTRON2_DATASETS`` set to it. The splits are
    also registered in this process as ``gradaug_test_tiny_{train,val}``.

    Returns:
        (root, train name, val name)
    """
    root = tmp_path_factory.mktemp("datasets")
    _write_tiny_coco(root, num_train=4, num_val=3, names=(TINY_TRAIN, TINY_VAL))
    return str(root), TINY_TRAIN, TINY_VAL


@pytest.fixture(scope="session")
def tiny_coco_mixed(tmp_path_factory):
    """As :func:`tiny_coco` (``DETECTRON2_DATASETS`` root only, nothing registered), with 8
    training images of mixed orientation: images 1, 4 and 7 portrait (64 x 96), the others
    landscape (96 x 64), so aspect-ratio grouping makes processes read unequal parts of their
    streams. Returns the root."""
    root = tmp_path_factory.mktemp("datasets_mixed")
    _write_tiny_coco(root, num_train=8, num_val=2, portrait=lambda i: i % 3 == 1)
    return str(root)


@pytest.fixture(scope="session")
def tiny_imagefolder(tmp_path_factory):
    """4 classes x 4 training / 2 validation images (32 px ImageFolder), registered in this
    process as ``gradaug_test_tiny_cls_{train,val}`` (classification). Returns the names."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from gradaug_det.data import generate_imagefolder, list_imagefolder_classes, load_imagefolder

    root = str(tmp_path_factory.mktemp("imagefolder"))
    generate_imagefolder(root, num_classes=4, train_per_class=4, val_per_class=2, image_size=32)
    classes = list_imagefolder_classes(os.path.join(root, "train"))
    for name, split in ((TINY_CLS_TRAIN, "train"), (TINY_CLS_VAL, "val")):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        split_dir = os.path.join(root, split)
        DatasetCatalog.register(name, lambda d=split_dir: load_imagefolder(d, classes))
        MetadataCatalog.get(name).set(image_root=split_dir, evaluator_type="classification",
                                      thing_classes=classes, classes=classes)
    return TINY_CLS_TRAIN, TINY_CLS_VAL


# The MMDetection adapter's tests need mmdet (`make test-mmdet` installs it and runs them).
if importlib.util.find_spec("mmdet") is None:
    collect_ignore = ["mmdet_adapter"]
