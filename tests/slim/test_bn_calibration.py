"""Post-hoc BN calibration at a sub-width (issue 14 §2): the calibrated statistics equal those
of a physically narrow network run over the same batches; width 1.0 is left untouched."""
import itertools
import logging

import pytest
import torch
from torch import nn

from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet
from fvcore.nn.precise_bn import update_bn_stats

import gradaug_det
from gradaug_det.checkpoint.prune import _slice_slim_conv
from gradaug_det.data import generate_imagefolder
from gradaug_det.data.classification import build_classification_train_loader
from gradaug_det.data.datasets import load_imagefolder
from gradaug_det.slim import SlimConv2d, width
from gradaug_det.slim.calibration import calibrate_bn, calibrated_bn


def _cfg(norm="BN"):
    cfg = gradaug_det.add_gradaug_config(get_cfg())
    cfg.MODEL.META_ARCHITECTURE = "SlimmableClassifier"
    cfg.MODEL.BACKBONE.NAME = "build_slimmable_resnet_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    cfg.MODEL.CLASSIFIER.NUM_CLASSES = 4
    cfg.MODEL.DEVICE = "cpu"
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.CLASSIFICATION.CROP_SIZE = 32
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.DATALOADER.NUM_WORKERS = 0
    return cfg


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    """3 training batches of 4 generated ImageFolder images (RandomResizedCrop 32 px)."""
    paths = generate_imagefolder(str(tmp_path_factory.mktemp("imagefolder")), num_classes=4, train_per_class=4,
                                 val_per_class=1, image_size=48)
    torch.manual_seed(0)
    loader = build_classification_train_loader(_cfg(), dataset=load_imagefolder(paths["train"]))
    return list(itertools.islice(iter(loader), 3))


def _trained_like(model, seed=0):
    """Non-trivial running statistics and affine parameters (as after training), float64."""
    g = torch.Generator().manual_seed(seed)
    model.double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64) * 0.2)
    return model.eval()


def _narrow_backbone(model, w):
    """A stock detectron2 ResNet-18 with the sub-network's channels and sliced weights."""
    bb = model.backbone
    with width(model, w):
        stem = bb.stem.conv1.active_channels()[1]
        outs = [stage[0].conv2.active_channels()[1] for stage in bb.stages]
        sliced = {}
        for name, m in bb.named_modules():
            if isinstance(m, SlimConv2d):
                sliced.update({f"{name}.{k}": v for k, v in _slice_slim_conv(m).items()})
    stages, cin = [], stem
    for i, cout in enumerate(outs):
        stages.append(ResNet.make_stage(BasicBlock, 2, stride_per_block=[1 if i == 0 else 2, 1], in_channels=cin,
                                        out_channels=cout, norm="BN"))
        cin = cout
    narrow = ResNet(BasicStem(3, stem, "BN"), stages, out_features=["res5"]).double()
    narrow.load_state_dict(sliced, strict=True)
    return narrow


def _bn_convs(model):
    return [(n, m) for n, m in model.backbone.named_modules() if isinstance(m, SlimConv2d) and m.norm is not None]


@pytest.mark.parametrize("w", [0.5, 0.8])
def test_calibrated_stats_equal_narrow_network(batches, w):
    torch.manual_seed(0)
    model = _trained_like(build_model(_cfg()))
    narrow = _narrow_backbone(model, w).train()
    images = [model.preprocess_image(b) for b in batches]
    update_bn_stats(narrow, images, num_iters=len(images))  # fvcore precise BN on the narrow network
    before = {k: v.clone() for k, v in model.state_dict().items()}

    assert calibrate_bn(model, w, batches, len(batches)) == len(_bn_convs(model))
    narrow_norms = dict(narrow.named_modules())
    for name, conv in _bn_convs(model):
        ref = narrow_norms[name + ".norm"]
        c = ref.num_features
        torch.testing.assert_close(conv.norm.running_mean[:c], ref.running_mean, rtol=0, atol=1e-10)
        torch.testing.assert_close(conv.norm.running_var[:c], ref.running_var, rtol=0, atol=1e-10)
        # the channels the sub-network does not use keep the full network's statistics
        assert torch.equal(conv.norm.running_mean[c:], before[f"backbone.{name}.norm.running_mean"][c:])
        # and the calibration changed something (the full network's statistics are not the narrow one's)
        assert not torch.allclose(conv.norm.running_mean[:c], before[f"backbone.{name}.norm.running_mean"][:c])
    assert model.training is False  # the mode is restored


def test_calibrated_bn_restores_width_one(batches):
    torch.manual_seed(0)
    model = _trained_like(build_model(_cfg()))
    eval_batch = [{"image": b["image"]} for b in batches[0]]
    with torch.no_grad():
        full = torch.stack([o["logits"] for o in model(eval_batch)])
        with width(model, 0.5):
            sliced = torch.stack([o["logits"] for o in model(eval_batch)])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with calibrated_bn(model, 0.5, batches, 2) as count:
        assert count > 0
        with torch.no_grad(), width(model, 0.5):
            calibrated = torch.stack([o["logits"] for o in model(eval_batch)])
    assert not torch.allclose(calibrated, sliced)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    with torch.no_grad():
        assert torch.equal(torch.stack([o["logits"] for o in model(eval_batch)]), full)


def test_frozen_bn_model_skips(batches, caplog):
    model = build_model(_cfg(norm="FrozenBN")).eval()
    with caplog.at_level(logging.INFO, logger="gradaug_det.slim.calibration"):
        assert calibrate_bn(model, 0.5, batches, 1) == 0
    assert "BN calibration skipped" in caplog.text


def test_too_few_batches_refused(batches):
    model = build_model(_cfg())
    with pytest.raises(ValueError, match="asked for 5 batches .* ended after 3"):
        calibrate_bn(model, 0.5, batches, 5)
    with pytest.raises(ValueError, match="at least 1 batch"):
        calibrate_bn(model, 0.5, batches, 0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The generated ImageFolder registered as train / val datasets."""
    import uuid

    from detectron2.data import DatasetCatalog, MetadataCatalog

    paths = generate_imagefolder(str(tmp_path_factory.mktemp("imagefolder_reg")), num_classes=4, train_per_class=4,
                                 val_per_class=2, image_size=48)
    tag = uuid.uuid4().hex[:8]
    names = {}
    for split in ("train", "val"):
        name = f"gradaug_test_bncal_{split}_{tag}"
        DatasetCatalog.register(name, lambda d=paths[split]: load_imagefolder(d))
        MetadataCatalog.get(name).set(evaluator_type="classification", thing_classes=[str(i) for i in range(4)])
        names[split] = name
    yield names
    for name in names.values():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_trainer_widths_table_with_and_without_calibration(folder):
    from gradaug_det.engine import GradAugTrainer
    from gradaug_det.evaluation.widths import width_results_table

    cfg = _cfg()
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (folder["train"],), (folder["val"],)
    cfg.INPUT.CLASSIFICATION.RESIZE_SIZE = 40
    cfg.TEST.SLIM_WIDTHS = [0.5]
    torch.manual_seed(0)
    model = _trained_like(build_model(cfg)).float()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain = GradAugTrainer.test(cfg, model)
    cfg.TEST.BN_CALIBRATION_BATCHES = 2
    calibrated = GradAugTrainer.test(cfg, model)
    assert set(plain) == {"classification", "classification@w0.5"}
    assert set(calibrated) == set(plain) | {"classification+bncal@w0.5"}
    for key in plain:  # the plain numbers do not change, width 1.0 included
        assert calibrated[key] == plain[key], key
    assert set(calibrated["classification+bncal@w0.5"]) == {"top1", "top5"}
    table = width_results_table(calibrated)
    assert "classification+bncal top1" in table.splitlines()[0]
    assert table.splitlines()[2].split("|")[1].strip() == "1.0"
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_detector_with_bn_calibrates_at_widths(make_rcnn_cfg, make_batch):
    """A detector with trainable BN: training-mode forwards over detection batches, results
    under "+bncal"; calibrated outputs differ from the sliced statistics' and width 1.0 is kept."""
    from detectron2.evaluation import DatasetEvaluator

    from gradaug_det.evaluation.widths import BNCalibration, evaluate_at_widths

    class MeanScore(DatasetEvaluator):
        def reset(self):
            self.scores = []

        def process(self, inputs, outputs):
            self.scores += [o["instances"].scores.sum().item() for o in outputs]

        def evaluate(self):
            return {"det": {"AP": sum(self.scores)}}

    cfg = make_rcnn_cfg(norm="BN")
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    torch.manual_seed(0)
    model = _trained_like(build_model(cfg)).float()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    test_data = [[{k: v for k, v in d.items() if k != "instances"}] for d in make_batch(2, 64, seed=3)]
    calib = BNCalibration([make_batch(2, 64, seed=s) for s in range(2)], 2)
    res = evaluate_at_widths(model, test_data, MeanScore(), [0.5], calib)
    plain = evaluate_at_widths(model, test_data, MeanScore(), [0.5])
    assert list(res[0.5]) == ["det", "det+bncal"] and list(res[1.0]) == ["det"]
    assert res[0.5]["det"] == plain[0.5]["det"] and res[1.0] == plain[1.0]
    assert res[0.5]["det+bncal"] != res[0.5]["det"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_prune_tool_writes_calibrated_statistics(tmp_path, make_rcnn_cfg):
    """tools/prune.py with TEST.BN_CALIBRATION_BATCHES: the pruned model's BN statistics are
    those calibrated at the width (not the full network's slice), the rest is unchanged."""
    import os
    import runpy
    import uuid

    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    from gradaug_det.data import generate_coco_shapes

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = generate_coco_shapes(str(tmp_path / "coco"), num_train=4, num_val=1, image_size=64, progress=False)
    name = f"gradaug_test_bncal_coco_{uuid.uuid4().hex[:8]}"
    register_coco_instances(name, {}, paths["train"]["json_file"], paths["train"]["image_root"])
    try:
        cfg = make_rcnn_cfg(norm="BN")
        cfg.DATASETS.TRAIN = (name,)
        cfg.SOLVER.IMS_PER_BATCH = 2
        cfg.DATALOADER.NUM_WORKERS = 0
        cfg.INPUT.MIN_SIZE_TRAIN = (64,)
        cfg.INPUT.MAX_SIZE_TRAIN = 96
        torch.manual_seed(0)
        model = _trained_like(build_model(cfg)).float()
        torch.save({"model": model.state_dict()}, tmp_path / "full.pth")
        (tmp_path / "cfg.yaml").write_text(cfg.dump())
        tool = runpy.run_path(os.path.join(repo, "tools", "prune.py"))
        out = {}
        for n in (0, 2):
            args = tool["get_parser"]().parse_args([
                "--config-file", str(tmp_path / "cfg.yaml"), "--weights", str(tmp_path / "full.pth"),
                "--width", "0.5", "--output", str(tmp_path / f"pruned{n}"), "--no-flops",
                "TEST.BN_CALIBRATION_BATCHES", str(n)])
            stats = tool["main"](args)
            assert stats["bn_calibration_batches"] == n
            assert stats["feature_diff"] < 1e-4  # the pruned model = the (calibrated) slimmed one
            data = torch.load(stats["checkpoint"], weights_only=True)
            assert data["gradaug_prune"]["bn_calibration_batches"] == n
            out[n] = data["model"]
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    stat_keys = [k for k in out[0] if k.endswith(("running_mean", "running_var"))]
    assert stat_keys and all(not torch.equal(out[0][k], out[2][k]) for k in stat_keys)
    for k in out[0]:
        if k not in stat_keys and not k.endswith("num_batches_tracked"):
            assert torch.equal(out[0][k], out[2][k]), k


def _listed(items):
    return list(items)


def test_lazy_test_calibrates(make_rcnn_cfg, make_batch):
    """LazyConfig evaluation (engine/lazy.py) with test.bn_calibration_batches."""
    from detectron2.config import LazyCall as L
    from detectron2.evaluation import DatasetEvaluator
    from omegaconf import OmegaConf

    from gradaug_det.engine.lazy import lazy_test

    class Count(DatasetEvaluator):
        def reset(self):
            self.total = 0.0

        def process(self, inputs, outputs):
            self.total += sum(o["instances"].scores.sum().item() for o in outputs)

        def evaluate(self):
            return {"det": {"AP": self.total}}

    cfg = make_rcnn_cfg(norm="BN")
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    torch.manual_seed(0)
    model = _trained_like(build_model(cfg)).float()
    test_data = [[{k: v for k, v in d.items() if k != "instances"}] for d in make_batch(1, 64, seed=3)]
    lazy = OmegaConf.create({"test": {"slim_widths": [0.5], "bn_calibration_batches": 2}})
    lazy.dataloader = OmegaConf.create({
        "test": L(_listed)(items=test_data), "evaluator": L(Count)(),
        "train": L(_listed)(items=[make_batch(2, 64, seed=s) for s in range(2)])})
    res = lazy_test(lazy, model)
    assert set(res) == {"det", "det@w0.5", "det+bncal@w0.5"}
    assert res["det+bncal@w0.5"] != res["det@w0.5"]


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_calibration_batches_refused_before_work(bad):
    from gradaug_det.engine.trainer import validate_config

    cfg = _cfg()
    cfg.TEST.BN_CALIBRATION_BATCHES = bad
    with pytest.raises(ValueError, match=r"TEST.BN_CALIBRATION_BATCHES=.* is invalid: 0 \(off\)"):
        validate_config(cfg)


# ---- batches in which a head receives no input (issue 20 §3) ------------------------------
def _without_objects(batch):
    """The images of ``batch`` with no annotated object: the mask head gets 0 RoIs in training."""
    from detectron2.structures import Boxes, Instances, PolygonMasks

    out = []
    for d in batch:
        inst = Instances(d["instances"].image_size)
        inst.gt_boxes = Boxes(torch.zeros(0, 4))
        inst.gt_classes = torch.zeros(0, dtype=torch.int64)
        inst.gt_masks = PolygonMasks([])
        out.append({**d, "instances": inst})
    return out


def _mask_bn_detector(make_rcnn_cfg):
    cfg = make_rcnn_cfg(norm="BN")
    cfg.MODEL.ROI_MASK_HEAD.NORM = "BN"  # a BN layer in the mask head, which sees only foreground RoIs
    torch.manual_seed(0)
    model = _trained_like(build_model(cfg)).float()
    return model, model.roi_heads.mask_head.mask_fcn1.norm


def test_empty_head_input_adds_nothing(make_rcnn_cfg, make_batch):
    """A batch without objects gives the mask head 0 RoIs: it adds nothing to the estimate
    (was: NaN running statistics). The mask head's statistics are those of exactly the RoI
    features it received in the other batches, computed by hand."""
    model, norm = _mask_bn_detector(make_rcnn_cfg)
    seen = []
    handle = norm.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0].detach().double()))
    batches = [make_batch(2, 64, seed=0), _without_objects(make_batch(2, 64, seed=1)), make_batch(2, 64, seed=2)]
    try:
        count = calibrate_bn(model, 0.5, batches, 3)
    finally:
        handle.remove()
    assert count == len(gradaug_det.slim.calibration.batch_norm_layers(model))
    assert [x.shape[0] > 0 for x in seen] == [True, False, True]  # the mask head got 0 RoIs in batch 2
    x = torch.cat(seen)
    mean, var = x.mean(dim=[0, 2, 3]), x.var(dim=[0, 2, 3], unbiased=False)
    torch.testing.assert_close(norm.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm.running_var.double(), var, rtol=1e-5, atol=1e-6)
    for name, b in model.named_buffers():
        assert torch.isfinite(b.float()).all(), name


def test_layer_without_input_keeps_statistics(make_rcnn_cfg, make_batch, caplog):
    """A BN layer that received no sample in any calibration batch keeps its statistics; one
    warning names it; the other layers are calibrated."""
    model, norm = _mask_bn_detector(make_rcnn_cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [_without_objects(make_batch(2, 64, seed=s)) for s in range(2)]
    with caplog.at_level(logging.INFO, logger="gradaug_det.slim.calibration"):
        count = calibrate_bn(model, 0.5, batches, 2)
    assert count == len(gradaug_det.slim.calibration.batch_norm_layers(model)) - 1
    for key in ("running_mean", "running_var"):
        assert torch.equal(getattr(norm, key), before[f"roi_heads.mask_head.mask_fcn1.norm.{key}"])
    assert not torch.equal(model.backbone.bottom_up.stem.conv1.norm.running_mean,
                           before["backbone.bottom_up.stem.conv1.norm.running_mean"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "received no input in 2 batches" in warnings[0]
    assert warnings[0].endswith(": roi_heads.mask_head.mask_fcn1.norm")
