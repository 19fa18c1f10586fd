"""Pruning to a width: the pruned stock model computes what the slimmed model computes."""
import copy
import os
import runpy

import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes

import gradaug_det
from gradaug_det.benchmark.cost import backbone_flops, count_parameters
from gradaug_det.config import add_pruned_config
from gradaug_det.checkpoint.prune import (
    feature_difference,
    prune_model,
    pruned_channels,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cfg(make_rcnn_cfg, depth=18, slim_fpn=True, groups=1, divisor=1):
    cfg = make_rcnn_cfg(depth=depth)
    if depth >= 50:  # a narrow bottleneck ResNet, fast on CPU
        cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 16
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
        cfg.MODEL.RESNETS.NUM_GROUPS = groups
        cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 16 // groups
    cfg.MODEL.SLIMMABLE.SLIM_FPN = slim_fpn
    cfg.MODEL.SLIMMABLE.CHANNEL_DIVISOR = divisor
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.TEST.DETECTIONS_PER_IMAGE = 20
    cfg.INPUT.MIN_SIZE_TEST = 96
    cfg.INPUT.MAX_SIZE_TEST = 128
    return cfg


def _randomize(model, seed=0):
    """Random weights and BN statistics, so that every sliced tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p[0].numel()) ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if name.endswith("norm.weight") else 0.0))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return model.eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return [{"image": (torch.rand(3, 96, 128, generator=g) * 255).to(torch.uint8)}]


def _head_outputs(model, w, proposals):
    """What the detector computes before its first threshold / top-k / sort (RPN objectness
    and anchor deltas on every anchor; box scores, box deltas and mask logits on the given
    proposals), at width ``w``. Everything after (box decoding, NMS, top-k) is a
    discontinuous function of these, so equality is claimed here, not on the detections."""
    images = model.preprocess_image(_inputs())
    with torch.no_grad(), gradaug_det.width(model, w):
        features = model.backbone(images.tensor)
        rpn, roi = model.proposal_generator, model.roi_heads
        objectness, anchor_deltas = rpn.rpn_head([features[f] for f in rpn.in_features])
        boxes = [Boxes(p.proposal_boxes.tensor.to(images.tensor.dtype)) for p in proposals]
        scores, box_deltas = roi.box_predictor(
            roi.box_head(roi.box_pooler([features[f] for f in roi.box_in_features], boxes)))
        masks = roi.mask_head.layers(roi.mask_pooler([features[f] for f in roi.mask_in_features], boxes))
    return {"objectness": objectness, "anchor_deltas": anchor_deltas, "scores": [scores],
            "box_deltas": [box_deltas], "mask_logits": [masks]}


def _assert_same_outputs(model, pruned, w):
    """The pruned model computes what the slimmed one computes: checked in float64 on every
    quantity before a threshold / top-k (so the verdict does not depend on which float32 CPU
    kernels run, issue 10 §1); the float32 detections are then only required to exist."""
    with torch.no_grad():
        with gradaug_det.width(model, w):
            a = model(_inputs())[0]["instances"]
            images = model.preprocess_image(_inputs())
            proposals, _ = model.proposal_generator(images, model.backbone(images.tensor))
        b = pruned(_inputs())[0]["instances"]
    assert len(a) > 0 and len(b) > 0
    slim64, pruned64 = copy.deepcopy(model).double(), copy.deepcopy(pruned).double()
    out_a, out_b = _head_outputs(slim64, w, proposals), _head_outputs(pruned64, 1.0, proposals)
    for key in out_a:
        for x, y in zip(out_a[key], out_b[key]):
            # float64: rounding ~1e-16 per operation, amplified by at most ~1e3 through the
            # network; a wrongly sliced channel moves these by >1e-3 of their magnitude
            torch.testing.assert_close(y, x, rtol=0, atol=1e-10 * max(1.0, x.abs().max().item()), msg=key)


@pytest.mark.parametrize(
    "depth,w,slim_fpn,groups,divisor,stock",
    [
        (18, 0.75, True, 1, 1, False),
        (18, 0.6, False, 1, 8, False),  # FPN not slimmed; channels aligned to 8
        (50, 0.6, True, 2, 1, False),  # ResNeXt-style grouped layout
        (50, 0.5, True, 1, 1, True),  # channels follow the stock rule: stock backbone
    ],
)
def test_pruned_equals_slimmed(make_rcnn_cfg, depth, w, slim_fpn, groups, divisor, stock):
    torch.manual_seed(0)
    cfg = _cfg(make_rcnn_cfg, depth, slim_fpn, groups, divisor)
    model = _randomize(build_model(cfg))
    pruned_cfg, pruned = prune_model(model, cfg, w)
    pruned.eval()
    expected = "build_resnet_fpn_backbone" if stock else "build_pruned_resnet_fpn_backbone"
    assert pruned_cfg.MODEL.BACKBONE.NAME == expected
    assert not any(isinstance(m, gradaug_det.slim.SlimConv2d) for m in pruned.modules())
    ch = pruned_channels(model, w)
    assert pruned_cfg.MODEL.FPN.OUT_CHANNELS == ch["fpn"]
    assert (ch["fpn"] < ch["fpn_full"]) == slim_fpn
    assert count_parameters(pruned) < count_parameters(model)
    # float64: the same sums in another order (float32 would give ~1e-6, kernel-dependent)
    assert feature_difference(copy.deepcopy(model).double(), copy.deepcopy(pruned).double(), w, 64, 96) < 1e-12
    _assert_same_outputs(model, pruned, w)
    if depth == 18 and slim_fpn:  # FLOPs really shrink, by as much as the slimmed network's
        with gradaug_det.width(model, w):
            slim_flops = backbone_flops(model, 64, 64)
        pruned_flops = backbone_flops(pruned, 64, 64)
        assert pruned_flops == slim_flops < backbone_flops(model, 64, 64)


def test_prune_width_one_is_stock(make_rcnn_cfg):
    cfg = _cfg(make_rcnn_cfg, 18)
    model = _randomize(build_model(cfg))
    pruned_cfg, pruned = prune_model(model, cfg, 1.0)
    assert pruned_cfg.MODEL.BACKBONE.NAME == "build_resnet_fpn_backbone"
    assert count_parameters(pruned) == count_parameters(model)
    _assert_same_outputs(model, pruned.eval(), 1.0)


def test_depth_scaled_model_rejected(make_rcnn_cfg):
    model = build_model(_cfg(make_rcnn_cfg, 18))
    gradaug_det.slim.residual_blocks(model)[-1].eval_scale = 0.8
    with pytest.raises(ValueError, match="GRADAUG.DEPTH_EVAL_SCALE"):
        pruned_channels(model, 0.75)


@pytest.mark.parametrize("depth,w,stock", [(18, 0.75, False), (50, 0.5, True)])
def test_tool_writes_loadable_checkpoint(tmp_path, make_rcnn_cfg, depth, w, stock):
    cfg = _cfg(make_rcnn_cfg, depth)
    torch.manual_seed(0)
    model = _randomize(build_model(cfg))
    full_ckpt = str(tmp_path / "full.pth")
    torch.save({"model": model.state_dict()}, full_ckpt)
    cfg_file = tmp_path / "full.yaml"
    cfg_file.write_text(cfg.dump())

    tool = runpy.run_path(os.path.join(REPO, "tools", "prune.py"))
    args = tool["get_parser"]().parse_args([
        "--config-file", str(cfg_file), "--weights", full_ckpt, "--width", str(w),
        "--output", str(tmp_path / "pruned"), "--flops-size", "64"])
    stats = tool["main"](args)
    assert stats["params_pruned"] < stats["params"]
    assert stats["flops_pruned"] < stats["flops"]
    assert os.path.getsize(stats["checkpoint"]) < os.path.getsize(full_ckpt)

    pruned_cfg = get_cfg()  # plain detectron2 config, plus the pruned-ResNet keys if needed
    if not stock:
        add_pruned_config(pruned_cfg)
    pruned_cfg.merge_from_file(stats["config"])
    assert pruned_cfg.MODEL.WEIGHTS == stats["checkpoint"]
    pruned = build_model(pruned_cfg)
    DetectionCheckpointer(pruned).load(pruned_cfg.MODEL.WEIGHTS)
    _assert_same_outputs(model, pruned.eval(), w)
