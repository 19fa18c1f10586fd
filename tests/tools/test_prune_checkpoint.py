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
from gradaug_det.utils.analysis import backbone_flops, count_parameters
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


@pytest.fixture
def coco_without_objects(tmp_path):
    """4 generated 64 px training images with every annotation removed, registered as a COCO
    dataset: in training, the mask head gets 0 RoIs on every batch."""
    import json
    import uuid

    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    from gradaug_det.data import generate_coco_shapes

    paths = generate_coco_shapes(str(tmp_path / "coco"), num_train=4, num_val=1, image_size=64, progress=False)
    train = paths["train"]
    with open(train["json_file"]) as f:
        data = json.load(f)
    data["annotations"] = []
    empty_json = str(tmp_path / "coco" / "train_no_objects.json")
    with open(empty_json, "w") as f:
        json.dump(data, f)
    name = f"gradaug_test_prune_empty_{uuid.uuid4().hex[:8]}"
    register_coco_instances(name, {}, empty_json, train["image_root"])
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _mask_bn_cfg(make_rcnn_cfg, dataset):
    cfg = _cfg(make_rcnn_cfg)
    cfg.MODEL.ROI_MASK_HEAD.NORM = "BN"
    cfg.DATASETS.TRAIN = (dataset,)
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    cfg.INPUT.MAX_SIZE_TRAIN = 96
    return cfg


def test_tool_calibration_without_mask_head_input_writes_finite_statistics(tmp_path, make_rcnn_cfg,
                                                                            coco_without_objects, load_tool):
    """tools/prune.py with TEST.BN_CALIBRATION_BATCHES on images without objects: the mask
    head's BN sees no RoI, keeps the checkpoint's statistics (was: NaN written into the pruned
    checkpoint) and is named in a warning; the backbone's BN statistics are calibrated."""
    cfg = _mask_bn_cfg(make_rcnn_cfg, coco_without_objects)
    torch.manual_seed(0)
    model = _randomize(build_model(cfg))
    full_ckpt = str(tmp_path / "full.pth")
    torch.save({"model": model.state_dict()}, full_ckpt)
    (tmp_path / "full.yaml").write_text(cfg.dump())
    tool = load_tool("prune")
    args = tool.get_parser().parse_args([
        "--config-file", str(tmp_path / "full.yaml"), "--weights", full_ckpt, "--width", "0.5",
        "--output", str(tmp_path / "pruned"), "--no-flops", "TEST.BN_CALIBRATION_BATCHES", "2"])
    import logging

    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # the tool's setup_logger may stop propagation to caplog's root handler
    logging.getLogger("gradaug_det.slim.calibration").addHandler(handler)
    try:
        stats = tool.main(args)
    finally:
        logging.getLogger("gradaug_det.slim.calibration").removeHandler(handler)
    assert stats["bn_calibration_batches"] == 2
    state = torch.load(stats["checkpoint"], weights_only=True)["model"]
    for k, v in state.items():
        assert torch.isfinite(v.float()).all(), k
    source = model.state_dict()
    for key in ("running_mean", "running_var"):
        k = f"roi_heads.mask_head.mask_fcn1.norm.{key}"
        assert torch.equal(state[k], source[k]), k
    k = "backbone.bottom_up.stem.conv1.norm.running_mean"
    assert not torch.equal(state[k], source[k][: state[k].numel()])  # calibrated, not the slice
    assert [r.getMessage().split(": ")[-1] for r in records] == ["roi_heads.mask_head.mask_fcn1.norm"]


def test_tool_refuses_nonfinite_weights_and_writes_nothing(tmp_path, make_rcnn_cfg, load_tool, capsys):
    """A NaN in the weights to be written: one-line error naming the tensor; no file written."""
    from gradaug_det.utils.cli import run_tool

    cfg = _cfg(make_rcnn_cfg)
    torch.manual_seed(0)
    model = _randomize(build_model(cfg))
    with torch.no_grad():
        model.backbone.bottom_up.res3[0].conv1.norm.running_var[0] = float("nan")
    full_ckpt = str(tmp_path / "full.pth")
    torch.save({"model": model.state_dict()}, full_ckpt)
    (tmp_path / "full.yaml").write_text(cfg.dump())
    tool = load_tool("prune")
    args = tool.get_parser().parse_args([
        "--config-file", str(tmp_path / "full.yaml"), "--weights", full_ckpt, "--width", "0.5",
        "--output", str(tmp_path / "pruned"), "--no-flops"])
    with pytest.raises(SystemExit) as e:
        run_tool(tool.main, args)
    assert e.value.code == 2
    msg = capsys.readouterr().err.strip()
    assert msg.startswith("error: ") and "\n" not in msg
    assert "model_pruned_w0.5.pth: refused to write weights holding NaN or Inf" in msg
    assert "model.backbone.bottom_up.res3.0.conv1.norm.running_var" in msg
    assert not os.path.exists(tmp_path / "pruned")
