"""tools/mmdet_prune.py: a GradAug mmdet checkpoint pruned to a width is a model of stock mmdet
types that plain mmdet builds and loads strictly (gradaug_det cannot even be imported there), and
it predicts what the slimmable model predicts at that width.

The model is the quickstart's Mask R-CNN R18-FPN (64-channel slimmable FPN), its BN statistics,
BN affine parameters and FPN biases drawn at random (mmdet zero-initialises the last BN of every
residual block and the FPN biases; a wrong slice of them would not show otherwise). Channel counts
below are the "round" rule by hand: 64 * 0.75 = 48, 64 * 0.5 = 32, R18's stages 64 / 128 / 256 / 512.
"""
import os
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner
from mmdet.models.backbones import ResNet
from mmdet.models.necks import FPN
from mmdet.structures import DetDataSample
from mmengine.structures import InstanceData
from torch import nn

from gradaug_det.mmdet.calibration import calibration_forward
from gradaug_det.mmdet.config import load_runner_config
from gradaug_det.mmdet.prune import check_prunable_config, feature_difference, prune_detector
from gradaug_det.slim import width
from gradaug_det.slim.calibration import batch_norm_layers, calibrate_bn
from gradaug_det.slim.settings import RECORD_KEY, model_slimmable_settings
from gradaug_det.utils.cli import MissingFileError

from .conftest import CLASSES, QUICKSTART, ROOT, build_detector, small_mask_rcnn_cfg
from .test_mmdet_bn_calibration import _as_dict
from .test_mmdet_zoo_matrix import zoo_gradaug_cfg

HERE = os.path.dirname(os.path.abspath(__file__))
HEIGHT, WIDTH = 128, 160
BASELINE = os.path.join(ROOT, "configs", "mmdet", "mask-rcnn_r50_fpn_1x_coco.py")


def _randomised(model, seed=1):
    """BN statistics / affine parameters and conv biases away from their initial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.copy_((torch.rand(m.bias.shape, generator=g) - 0.5) * 0.2)
    return model.eval()


def _image(seed=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(3, HEIGHT, WIDTH, generator=g) * 255).to(torch.uint8)


def _predict(model, image):
    """As tests/mmdet_adapter/plain_mmdet_predict.py predicts (mmdet's test_step on one image)."""
    sample = DetDataSample(metainfo=dict(img_shape=(HEIGHT, WIDTH), ori_shape=(HEIGHT, WIDTH), scale_factor=(1.0, 1.0)))
    with torch.no_grad():
        out = model.test_step(dict(inputs=[image], data_samples=[sample]))[0].pred_instances
    return {"bboxes": out.bboxes, "scores": out.scores, "labels": out.labels, "masks": out.masks}


def _detections(pred):
    return [[(int(c), float(s), b.tolist()) for c, s, b in zip(pred["labels"], pred["scores"], pred["bboxes"])]]


def _assert_same_predictions(ref, pruned, assert_same_detections):
    """Same detections (float32 tolerance, conftest.py); each detection's mask (thresholded mask
    probabilities, 28 x 28 pasted into the image) differs in at most 0.5% of its pixels."""
    assert len(ref["scores"]) > 0
    assert_same_detections(_detections(ref), _detections(pruned), WIDTH)
    for i in range(len(ref["scores"])):
        j = int(((pruned["bboxes"] - ref["bboxes"][i]).abs().max(dim=1).values
                 + 1e3 * (pruned["labels"] != ref["labels"][i])).argmin())
        differ = (ref["masks"][i] != pruned["masks"][j]).float().mean().item()
        assert differ <= 0.005, (i, differ)


def _checkpoint(path, model):
    torch.save({"meta": {"dataset_meta": {"classes": CLASSES}}, "state_dict": model.state_dict(),
                RECORD_KEY: model_slimmable_settings(model)}, path)
    return str(path)


def test_refused_before_any_work(load_tool, tmp_path):
    tool = load_tool("mmdet_prune")
    out = tmp_path / "out"
    ckpt = tmp_path / "model.pth"
    ckpt.write_bytes(b"")  # never read: every refusal comes first
    with pytest.raises(SystemExit, match=r"^--width: width must be in \(0, 1\], got 1.5$"):
        tool.main([QUICKSTART, str(ckpt), "--width", "1.5", "--output", str(out)])
    with pytest.raises(SystemExit, match=r"^model.backbone.type='ResNet': only GradAug models with a slimmable "
                                         r"backbone \(model.backbone.type='SlimmableResNet'\) can be pruned"):
        tool.main([BASELINE, str(ckpt), "--width", "0.5", "--output", str(out)])
    with pytest.raises(MissingFileError, match=r"^CHECKPOINT '.*missing.pth': no such file"):
        tool.main([QUICKSTART, str(tmp_path / "missing.pth"), "--width", "0.5", "--output", str(out)])
    # a checkpoint trained with another channel divisor: its sub-networks keep other channels
    model = build_detector(small_mask_rcnn_cfg())
    torch.save({"state_dict": model.state_dict(), RECORD_KEY: dict(model_slimmable_settings(model), channel_divisor=8)},
               ckpt)
    with pytest.raises(SystemExit, match=r"CHANNEL_DIVISOR 8 in the file, 1 here.*\(refused: the "
                                                        r"pruned model is cut out of the sub-network of these settings\)"):
        tool.main([QUICKSTART, str(ckpt), "--width", "0.5", "--output", str(out)])
    assert not out.exists()
    gn = small_mask_rcnn_cfg()
    gn["neck"]["norm_cfg"] = dict(type="GN", num_groups=8)
    with pytest.raises(ValueError, match=r"^model.neck.norm_cfg.type='GN': a pruned GroupNorm"):
        check_prunable_config(gn, 0.5)
    check_prunable_config(gn, 1.0)  # width 1.0 slices nothing


def test_pruned_checkpoints_load_in_plain_mmdet_and_match(load_tool, tmp_path, assert_same_detections, capsys,
                                                           shapes_data_options):
    """About 20 s: a fresh process importing mmdet, and two test loops there and two here."""
    model = _randomised(build_detector(small_mask_rcnn_cfg()))
    ckpt = _checkpoint(tmp_path / "gradaug.pth", model)
    image = _image()
    torch.save({"image": image}, tmp_path / "input.pt")
    widths, stats = (0.75, 0.5), {}
    for w in widths:  # the data options are written into the pruned configs, for their test loop
        stats[w] = load_tool("mmdet_prune").main([QUICKSTART, ckpt, "--width", str(w), "--output",
                                                  str(tmp_path / "pruned"), "--cfg-options", *shapes_data_options])
        assert stats[w]["feature_diff"] < 1e-5
    printed = capsys.readouterr().out
    assert "parameters: " in printed and "max relative feature difference" in printed
    # the slimmable checkpoint's COCO AP at these widths, as tools/mmdet_test.py reports it
    ap = load_tool("mmdet_test").main([QUICKSTART, ckpt, "--widths", *map(str, widths), "--work-dir",
                                       str(tmp_path / "test"), "--cfg-options", *shapes_data_options])

    # what the files say: stock types, narrow channels, nothing of gradaug_det
    for w, k in ((0.75, 48), (0.5, 32)):
        assert stats[w]["config"].endswith(f"config_pruned_w{w:g}.py")
        cfg = Config.fromfile(stats[w]["config"])
        m = cfg.model
        assert (m.type, m.backbone.type, m.neck.type) == ("MaskRCNN", "ResNet", "FPN") and "gradaug" not in m
        assert (m.backbone.stem_channels, m.backbone.base_channels, m.backbone.init_cfg) == (k, k, None)
        assert "channel_divisor" not in m.backbone and "channel_divisor" not in m.neck
        assert m.neck.in_channels == [k, 2 * k, 4 * k, 8 * k] and m.neck.out_channels == k
        assert m.rpn_head.in_channels == k and m.rpn_head.feat_channels == 64  # its conv keeps its outputs
        assert m.roi_head.bbox_roi_extractor.out_channels == m.roi_head.mask_roi_extractor.out_channels == k
        assert m.roi_head.bbox_head.in_channels == m.roi_head.mask_head.in_channels == k
        source = Config.fromfile(QUICKSTART).model.roi_head  # the heads' own layers keep their sizes
        assert m.roi_head.mask_head.conv_out_channels == source.mask_head.conv_out_channels == 64
        assert m.roi_head.bbox_head.fc_out_channels == source.bbox_head.fc_out_channels == 256
        assert "custom_imports" not in cfg and "model_wrapper_cfg" not in cfg
        assert [h.type for h in cfg.get("custom_hooks", [])] == []
        assert cfg.load_from == stats[w]["checkpoint"]
        assert stats[w]["info"]["zero_channels"] == 0  # 48 / 96 / 192 / 384 and 32 / ... double per stage

    # plain mmdet, in a process that cannot import gradaug_det
    files = [p for w in widths for p in (stats[w]["config"], stats[w]["checkpoint"])]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "plain_mmdet_predict.py"), str(tmp_path / "input.pt"),
                           str(tmp_path / "plain.pt"), str(tmp_path / "plain"), *files], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = torch.load(tmp_path / "plain.pt", weights_only=True)
    full_params = sum(p.numel() for p in model.parameters())
    for w, result in zip(widths, results):
        assert (result["type"], result["backbone"], result["neck"]) == ("MaskRCNN", "ResNet", "FPN")
        assert result["params"] == stats[w]["params_pruned"] < stats[w]["params"] == full_params
        with width(model, w):
            ref = _predict(model, image)
        _assert_same_predictions(ref, result["pred"], assert_same_detections)
        # mmdet's test loop on the pruned config, with its weights (load_from): the AP of the
        # slimmable model at that width (random weights: AP about 0, a check of the loop, not of accuracy)
        assert result["loaded"]
        for metric in ("coco/bbox_mAP", "coco/bbox_mAP_50", "coco/segm_mAP"):
            assert abs(result["metrics"][metric] - ap[str(w)][metric]) <= 0.002, (w, metric)
    assert results[1]["params"] < results[0]["params"]


@pytest.mark.parametrize("w, neck, base, zero, fpn", [
    # R18 at 0.9: stem 58, stages 58 / 115 / 230 / 461 -> base 58 (58 / 116 / 232 / 464: 6 zero channels)
    (0.9, "SlimmableFPN", 58, 6, 58),
    # at 0.6 with mmdet's FPN (backbone slimmed only): 38 / 77 / 154 / 307 -> base 39, and the stem
    # (38) grows to 39 too (res2's identity shortcut adds it): 1 + 1 + 2 + 5 zero channels
    (0.6, "FPN", 39, 9, 64),
])
def test_counts_that_do_not_double_get_zero_channels(w, neck, base, zero, fpn, assert_same_detections):
    cfg = small_mask_rcnn_cfg()
    if neck == "FPN":
        cfg["neck"]["type"] = "FPN"
        cfg["neck"].pop("channel_divisor")
    model = _randomised(build_detector(cfg))
    pruned = prune_detector(model, cfg, w)
    info = pruned.info
    assert (info["stem_channels"], info["base_channels"], info["zero_channels"], info["fpn_channels"]) == (
        base, base, zero, fpn)
    assert type(pruned.model.backbone) is ResNet and type(pruned.model.neck) is FPN
    assert pruned.model_cfg["rpn_head"]["in_channels"] == fpn
    assert feature_difference(model, pruned.model, w) < 1e-5
    # the added channels are exactly zero
    with torch.no_grad():
        outs = pruned.model.backbone(torch.randn(1, 3, HEIGHT, WIDTH))
    for out, active, full in zip(outs, info["active_stage_channels"], info["stage_channels"]):
        assert out.shape[1] == full and torch.count_nonzero(out[:, active:]) == 0 and out[:, :active].abs().sum() > 0
    image = _image()
    with width(model, w):
        ref = _predict(model, image)
    _assert_same_predictions(ref, _predict(pruned.model, image), assert_same_detections)


def _tensors(out):
    """Every tensor of a head's nested outputs, in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in _tensors(o)]


ZOO = ["faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py", "mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py",
       "cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py", "cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py",
       "retinanet/retinanet_r50_fpn_1x_coco.py"]


@pytest.mark.parametrize("config", ZOO, ids=[c.split("/")[1][:-3] for c in ZOO])
def test_mmdet_zoo_detectors_prune_to_stock_types(config, detector):
    """mmdet's own configs (small: R18, 32-channel FPN and heads; test_mmdet_zoo_matrix.py) at 0.75:
    stock types, a 24-channel FPN, and every head's raw outputs (RPN, RetinaNet's dense head, the
    RoI heads of every cascade stage with their masks, on fixed proposals) equal the slimmable
    model's."""
    cfg = zoo_gradaug_cfg(config, "gt")
    model = _randomised(detector(cfg))
    pruned = prune_detector(model, cfg, 0.75)
    net = pruned.model
    assert type(net).__name__ == cfg["type"][len("GradAug"):] == pruned.model_cfg["type"]
    assert type(net.backbone) is ResNet and type(net.neck) is FPN and net.neck.out_channels == 24
    g = torch.Generator().manual_seed(3)
    inputs = torch.randn(1, 3, HEIGHT, WIDTH, generator=g)
    xy = torch.rand(16, 2, generator=g) * torch.tensor([WIDTH - 40.0, HEIGHT - 40.0])
    boxes = torch.cat([xy, xy + 8 + torch.rand(16, 2, generator=g) * 32], dim=1)
    samples = [DetDataSample(metainfo=dict(img_shape=(HEIGHT, WIDTH), ori_shape=(HEIGHT, WIDTH),
                                           scale_factor=(1.0, 1.0), batch_input_shape=(HEIGHT, WIDTH)))]
    with torch.no_grad():
        with width(model, 0.75):
            slim = model.extract_feat(inputs)
        cut = net.extract_feat(inputs)
        for s, c in zip(slim, cut):
            assert c.shape[1] == 24 and torch.count_nonzero(s[:, 24:]) == 0
            torch.testing.assert_close(c, s[:, :24], rtol=1e-5, atol=1e-5 * s.abs().max().item())
        if hasattr(net, "roi_head"):
            ref = _tensors(model.rpn_head(slim)) + _tensors(model.roi_head(slim, [InstanceData(bboxes=boxes)], samples))
            out = _tensors(net.rpn_head(cut)) + _tensors(net.roi_head(cut, [InstanceData(bboxes=boxes)], samples))
        else:
            ref, out = _tensors(model.bbox_head(slim)), _tensors(net.bbox_head(cut))
    assert len(ref) == len(out) > 0
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-5 * max(1.0, r.abs().max().item()))


def test_bn_calibration_through_the_tool(load_tool, tmp_path, shapes_data_options):
    """--bn-calibration-batches 2: the pruned BN statistics are those calibrate_bn computes at the
    width on the same two training batches, sliced (bit for bit)."""
    model = build_detector(small_mask_rcnn_cfg())
    ckpt = _checkpoint(tmp_path / "init.pth", model)
    options = [*shapes_data_options, "randomness.seed=0", "train_dataloader.dataset.pipeline.2.scales=[(160,128)]",
               "train_dataloader.dataset.pipeline.3.prob=0.0"]
    stats = load_tool("mmdet_prune").main([QUICKSTART, ckpt, "--width", "0.75", "--output", str(tmp_path / "out"),
                                           "--bn-calibration-batches", "2", "--cfg-options", *options])
    assert stats["bn_calibration_batches"] == 2
    pruned = torch.load(stats["checkpoint"], weights_only=True)
    assert pruned["meta"]["gradaug_prune"]["bn_calibration_batches"] == 2
    assert pruned["meta"]["dataset_meta"] == {"classes": CLASSES}
    pruned = pruned["state_dict"]

    cfg = load_runner_config(QUICKSTART, _as_dict(options))
    batches = []
    for batch in Runner.build_dataloader(cfg.train_dataloader, seed=0):
        batches.append(batch)
        if len(batches) == 2:
            break
    reference = build_detector(small_mask_rcnn_cfg(), seed=1)
    reference.load_state_dict(model.state_dict())
    assert calibrate_bn(reference, 0.75, batches, 2, calibration_forward) == len(batch_norm_layers(reference))
    names = {m: n for n, m in reference.named_modules()}
    for bn in batch_norm_layers(reference):
        mean, var = pruned[f"{names[bn]}.running_mean"], pruned[f"{names[bn]}.running_var"]
        k = mean.shape[0]
        assert k == int(bn.num_features * 0.75)  # 0.75 of 64 ... 512: whole numbers
        assert torch.equal(mean, bn.running_mean[:k]) and torch.equal(var, bn.running_var[:k]), names[bn]
        assert not torch.equal(mean, model.state_dict()[f"{names[bn]}.running_mean"][:k])  # calibrated
