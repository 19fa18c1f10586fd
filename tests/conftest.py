"""Shared fixtures: a tiny Mask R-CNN config and synthetic detection batches."""
import importlib.util

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


@pytest.fixture
def rcnn_cfg():
    return tiny_rcnn_cfg()


@pytest.fixture
def make_batch():
    return detection_batch


@pytest.fixture
def make_rcnn_cfg():
    return tiny_rcnn_cfg


# The MMDetection adapter's tests need mmdet (`make test-mmdet` installs it and runs them).
if importlib.util.find_spec("mmdet") is None:
    collect_ignore = ["mmdet_adapter"]
