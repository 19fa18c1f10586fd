"""Whole detectors with the slimmable backbones: strict checkpoint exchange and equal outputs."""
import pytest
import torch

from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

import gradaug_det
from gradaug_det.slim import slim_channels

pytestmark = pytest.mark.filterwarnings("ignore:torch.meshgrid")


def _mask_rcnn_cfg(bb, backbone):
    """A small R18-FPN Mask R-CNN (detectron2's Base-RCNN-FPN settings, CPU)."""
    cfg = bb.make_cfg(18)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    cfg.MODEL.BACKBONE.NAME = backbone
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 100
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 50
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 100
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # random weights: keep every detection
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    cfg.MODEL.ROI_MASK_HEAD.NAME = "MaskRCNNConvUpsampleHead"
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 4
    cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION = 14
    cfg.TEST.DETECTIONS_PER_IMAGE = 20
    return cfg


def _c4_cfg(bb, backbone):
    """A small R50-C4 Faster R-CNN (res4 backbone, Res5ROIHeads)."""
    cfg = bb.make_cfg(50, MODEL__RESNETS__OUT_FEATURES=["res4"])
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = backbone
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 100
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 20
    cfg.MODEL.ROI_HEADS.NAME = "Res5ROIHeads"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.TEST.DETECTIONS_PER_IMAGE = 10
    return cfg


def _images(size=96):
    g = torch.Generator().manual_seed(0)
    return [{"image": (torch.rand(3, size, size, generator=g) * 255), "height": size, "width": size}
            for _ in range(2)]


def _pair(bb, make, stock_backbone, slim_backbone):
    torch.manual_seed(0)
    stock = build_model(make(bb, stock_backbone))
    bb.randomize_(stock.backbone, seed=2)
    torch.manual_seed(1)
    slim = build_model(make(bb, slim_backbone))
    assert list(stock.state_dict()) == list(slim.state_dict())
    slim.load_state_dict(stock.state_dict(), strict=True)
    return stock.eval(), slim.eval()


def _assert_same_detections(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        ia, ib = ra["instances"], rb["instances"]
        assert len(ia) == len(ib) > 0
        torch.testing.assert_close(ia.pred_boxes.tensor, ib.pred_boxes.tensor, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(ia.scores, ib.scores, rtol=1e-5, atol=1e-6)
        assert torch.equal(ia.pred_classes, ib.pred_classes)
        if ia.has("pred_masks"):
            assert torch.equal(ia.pred_masks, ib.pred_masks)


def test_mask_rcnn_fpn_is_stock_at_full_width(bb):
    stock, slim = _pair(bb, _mask_rcnn_cfg, "build_resnet_fpn_backbone", "build_slimmable_resnet_fpn_backbone")
    # and the other direction: slim -> stock, strictly
    stock.load_state_dict(slim.state_dict(), strict=True)
    images = _images()
    with torch.no_grad():
        expected = stock(images)
        out = slim(images)
    _assert_same_detections(expected, out)
    assert expected[0]["instances"].has("pred_masks")
    with torch.no_grad(), gradaug_det.width(slim, 0.5):
        features = slim.backbone(slim.preprocess_image(images).tensor)
        sub = slim(images)
    kept = slim_channels(256, 0.5)
    assert all(torch.count_nonzero(f[:, kept:]) == 0 for f in features.values())
    assert not torch.allclose(sub[0]["instances"].scores[:5], out[0]["instances"].scores[:5])


def test_mask_rcnn_trains_at_sub_width(bb):
    _, slim = _pair(bb, _mask_rcnn_cfg, "build_resnet_fpn_backbone", "build_slimmable_resnet_fpn_backbone")
    slim.train()
    batch = _images()
    for item in batch:
        inst = Instances((96, 96))
        inst.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 60.0, 70.0], [30.0, 5.0, 90.0, 40.0]]))
        inst.gt_classes = torch.tensor([0, 2])
        masks = torch.zeros(2, 96, 96, dtype=torch.bool)
        masks[0, 12:70, 10:60] = True
        masks[1, 5:40, 30:90] = True
        inst.gt_masks = BitMasks(masks)
        item["instances"] = inst
    with EventStorage(), gradaug_det.width(slim, 0.5):
        losses = slim(batch)
    assert set(losses) >= {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grad = slim.backbone.fpn_output3.weight.grad
    assert grad[:128, :128].abs().sum() > 0
    assert grad[128:].abs().sum() == 0 and grad[:, 128:].abs().sum() == 0


def test_faster_rcnn_c4_is_stock_at_full_width(bb):
    stock, slim = _pair(bb, _c4_cfg, "build_resnet_backbone", "build_slimmable_resnet_backbone")
    images = _images(64)
    with torch.no_grad():
        _assert_same_detections(stock(images), slim(images))
        with gradaug_det.width(slim, 0.75):
            sub = slim(images)
    assert len(sub[0]["instances"]) > 0
