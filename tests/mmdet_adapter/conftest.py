"""Shared pieces of the MMDetection adapter tests: a small Mask R-CNN, the shapes data.

Collected only where mmdet is installed (tests/conftest.py; ``make test-mmdet`` installs
it). Models are small (R18 SlimmableResNet, 64-channel FPN, few RoIs) and images 128 px,
so a GradAug iteration takes well under a second on a 2-core CPU.
"""
import copy
import os

import pytest
import torch
from mmengine.config import Config

from mmdet.utils import register_all_modules

import gradaug_det.mmdet  # noqa: F401  (registers SlimmableResNet, GradAug detectors, the wrapper)

register_all_modules(init_default_scope=True)

CLASSES = ("circle", "rectangle", "triangle")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


QUICKSTART = os.path.join(ROOT, "configs", "mmdet", "quickstart", "mask-rcnn_r18_fpn_gradaug_shapes.py")


@pytest.fixture(autouse=True)
def _no_visualizer_across_tests():
    """Each test starts without mmengine's global visualizers. mmengine names a run's
    visualizer after its timestamp in seconds, so a run built in the same second as the
    previous test's would reuse that test's visualizer, whose ``save_dir`` under ``tmp_path``
    pytest has already deleted. Likewise the loggers keep no file handler of a finished run
    (mmengine closes it at the end of the run, and the next ``init_weights`` would write to the
    current logger's closed file). (Other global instances stay: the ``mmdet`` default scope
    set at import is one.)"""
    yield
    import logging

    from mmengine.logging import MMLogger
    from mmengine.visualization import Visualizer

    stack = [Visualizer]
    while stack:
        cls = stack.pop()
        cls._instance_dict.clear()
        stack.extend(cls.__subclasses__())
    for logger in list(MMLogger._instance_dict.values()):
        for handler in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
            logger.removeHandler(handler)
            handler.close()


def small_mask_rcnn_cfg(gradaug=None, backbone=None, detector="GradAugMaskRCNN"):
    """The shipped quickstart model (R18-FPN Mask R-CNN, GradAug) as a config dict.

    Args:
        gradaug: replaces ``model.gradaug`` (None keeps the config's).
        backbone: keys updated in ``model.backbone``.
        detector: the detector type; a stock one ("MaskRCNN") drops ``gradaug``.
    """
    cfg = Config.fromfile(QUICKSTART).model
    cfg["type"] = detector
    if gradaug is not None:
        cfg["gradaug"] = gradaug
    if backbone:
        cfg["backbone"].update(backbone)
    if not detector.startswith("GradAug"):
        cfg.pop("gradaug", None)
    return cfg


@pytest.fixture
def mask_rcnn_cfg():
    """``mask_rcnn_cfg(gradaug=None, backbone=None, detector=...)``: see :func:`small_mask_rcnn_cfg`."""
    return small_mask_rcnn_cfg


@pytest.fixture
def detector():
    """``detector(cfg, seed=0)``: build and initialise a detector from a config dict."""
    return build_detector


def build_detector(cfg, seed=0):
    from mmdet.registry import MODELS

    torch.manual_seed(seed)
    model = MODELS.build(copy.deepcopy(cfg))
    model.init_weights()
    return model


def train_pipeline(size=128):
    return [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
        dict(type="Resize", scale=(size, size), keep_ratio=True),
        dict(type="PackDetInputs"),
    ]


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
    """The project's synthetic COCO shapes data, small (12 train / 4 val images, 128 px)."""
    from gradaug_det.data.synthetic import generate_coco_shapes

    root = tmp_path_factory.mktemp("shapes")
    generate_coco_shapes(str(root), num_train=12, num_val=4, image_size=128, seed=0, progress=False)
    return root


@pytest.fixture(scope="session")
def shapes_dataset(shapes_root):
    from mmdet.datasets import CocoDataset

    return CocoDataset(data_root=str(shapes_root), ann_file="annotations/instances_train.json",
                       data_prefix=dict(img="train/"), metainfo=dict(classes=CLASSES),
                       filter_cfg=dict(filter_empty_gt=True), pipeline=train_pipeline())


@pytest.fixture
def make_batch(shapes_dataset):
    """``make_batch(indices)``: the data loader's batch (pseudo-collated) of those images."""
    from mmengine.dataset import pseudo_collate

    def make(indices=(0, 1)):
        return pseudo_collate([shapes_dataset[i] for i in indices])

    return make


@pytest.fixture
def shapes_data_options(shapes_root):
    """``--cfg-options`` that point the quickstart config's data at :func:`shapes_root`: no
    loader workers, validation and test images at 160 x 128."""
    options = [
        f"data_root={shapes_root}/", f"train_dataloader.dataset.data_root={shapes_root}/",
        f"val_dataloader.dataset.data_root={shapes_root}/",
        f"val_evaluator.ann_file={shapes_root}/annotations/instances_val.json",
        "train_dataloader.num_workers=0", "train_dataloader.persistent_workers=False",
        "val_dataloader.num_workers=0", "val_dataloader.persistent_workers=False",
        "val_dataloader.dataset.pipeline.1.scale=(160,128)"]
    # the config's test_* entries are copies of its val_* ones, made when it was parsed
    return options + [o.replace("val_", "test_", 1) for o in options if o.startswith("val_")]


@pytest.fixture
def short_train_options():
    """``short_train_options(iters)``: ``--cfg-options`` that shrink the quickstart config's
    training to ``iters`` iterations at 160 x 128, validated and checkpointed at the end,
    logged every iteration."""
    def options(iters):
        return [f"train_cfg.max_iters={iters}", f"train_cfg.val_interval={iters}", "default_hooks.logger.interval=1",
                f"default_hooks.checkpoint.interval={iters}",
                "train_pipeline.2.scales=[(160,128)]", "train_dataloader.dataset.pipeline.2.scales=[(160,128)]"]

    return options
