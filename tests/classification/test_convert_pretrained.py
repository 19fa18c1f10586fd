"""Converted weights load into detectron2 Mask R-CNN with every backbone tensor matched."""
from pathlib import Path
from typing import List, NamedTuple, Tuple

import numpy as np
import pytest
import torch
import torchvision
import yaml
from detectron2 import model_zoo
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from gradaug_det import add_gradaug_config
from gradaug_det.checkpoint.checkpointer import GradAugCheckpointer
from gradaug_det.checkpoint import (
    check_pretrained_config,
    convert_classifier,
    convert_classifier_to_torchvision,
    convert_torchvision,
    d2_to_torchvision,
    pretrained_config_opts,
    rename,
    save_d2_checkpoint,
    torchvision_to_d2,
)
from gradaug_det.checkpoint.io import restricted_pickle_load

ROOT = Path(__file__).resolve().parents[2]


class LoadReport(NamedTuple):
    loaded: List[str]
    missing: List[str]
    unexpected: List[str]
    incorrect_shapes: List[Tuple[str, tuple, tuple]]


def load_pretrained(model, path):
    """Load ``path`` with the checkpointer the tools use, and report what it did not load."""
    incompatible = []

    class Recording(GradAugCheckpointer):
        def _load_model(self, checkpoint):
            incompatible.append(super()._load_model(checkpoint))
            return incompatible[-1]

    Recording(model).load(path)
    inc = incompatible[-1]
    shapes = [(k, tuple(a), tuple(b)) for k, a, b in inc.incorrect_shapes]
    not_loaded = set(inc.missing_keys) | {k for k, _, _ in shapes}
    model_keys = list(model.state_dict())
    return LoadReport([k for k in model_keys if k not in not_loaded],
                      [k for k in model_keys if k in set(inc.missing_keys)], list(inc.unexpected_keys), shapes)


def mask_rcnn_cfg(depth=50, kind="FPN", slimmable=False):
    cfg = add_gradaug_config(get_cfg())
    cfg.merge_from_file(model_zoo.get_config_file(f"COCO-InstanceSegmentation/mask_rcnn_R_50_{kind}_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.DEPTH = depth
    if depth in (18, 34):
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    if slimmable:
        cfg.MODEL.BACKBONE.NAME = "build_slimmable_resnet_fpn_backbone"
    return cfg


def tv_state(depth):
    torch.manual_seed(depth)
    net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    with torch.no_grad():  # non-trivial BN statistics, so that a mix-up would show
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return net.state_dict()


def tv_to_d2(name):
    """Independent reference renaming, for checking the loaded values."""
    name = name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
    for i in range(1, 5):
        name = name.replace(f"layer{i}.", f"res{i + 1}.")
    for j in range(1, 4):
        name = name.replace(f"bn{j}.", f"conv{j}.norm.")
    if name.startswith(("conv1", "stem")) or name.startswith("conv1.norm"):
        name = "stem." + name
    return name


def assert_backbone_loaded(model, source, prefix, rename):
    state = model.state_dict()
    expected = {prefix + rename(k): v for k, v in source.items() if not k.endswith("num_batches_tracked")
                and not k.startswith(("fc.", "head."))}
    model_keys = {k for k in state if k.startswith(prefix)}
    assert model_keys == set(expected), (sorted(model_keys ^ set(expected)))[:10]
    for k, v in expected.items():
        assert torch.equal(state[k], v), k


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_into_mask_rcnn_fpn(tmp_path, depth):
    src = tv_state(depth)
    path = str(tmp_path / f"r{depth}.pkl")
    ckpt = convert_torchvision(src, path, target="fpn")
    assert ckpt["__author__"] == "gradaug-det" and ckpt["matching_heuristics"] is False
    meta = ckpt["gradaug_det"]
    assert meta["FORMAT"] == "RGB" and meta["PIXEL_MEAN"] == [123.675, 116.28, 103.53]
    assert meta["PIXEL_STD"] == [58.395, 57.12, 57.375] and meta["STRIDE_IN_1X1"] is False
    assert meta["DEPTH"] == depth
    raw = restricted_pickle_load(path)  # detectron2's format, without any other object
    assert all(isinstance(v, np.ndarray) for v in raw["model"].values())

    cfg = mask_rcnn_cfg(depth)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(path)
    assert_backbone_loaded(model, src, "backbone.bottom_up.", lambda k: tv_to_d2(k))

    report = load_pretrained(build_model(cfg), path)
    assert not [k for k in report.missing if k.startswith("backbone.bottom_up.")]
    assert report.unexpected == [] and report.incorrect_shapes == []
    assert any(k.startswith("roi_heads.") for k in report.missing)  # the heads start from scratch


def test_torchvision_into_c4_and_heuristic(tmp_path):
    src = tv_state(50)
    c4 = str(tmp_path / "c4.pkl")
    convert_torchvision(src, c4, target="c4")
    model = build_model(mask_rcnn_cfg(50, kind="C4"))
    report = load_pretrained(model, c4)
    assert not [k for k in report.missing if k.startswith(("backbone.", "roi_heads.res5."))]
    assert report.unexpected == []
    state = model.state_dict()
    assert torch.equal(state["roi_heads.res5.2.conv3.norm.running_var"], src["layer4.2.bn3.running_var"])
    assert torch.equal(state["backbone.res4.5.conv2.weight"], src["layer3.5.conv2.weight"])

    heur = str(tmp_path / "heuristic.pkl")
    convert_torchvision(src, heur, target="heuristic")
    model = build_model(mask_rcnn_cfg(50))
    report = load_pretrained(model, heur)
    assert not [k for k in report.missing if k.startswith("backbone.bottom_up.")]
    assert_backbone_loaded(model, src, "backbone.bottom_up.", tv_to_d2)


def test_classifier_checkpoint_into_slimmable_mask_rcnn(tmp_path):
    clf_cfg = add_gradaug_config(get_cfg())
    clf_cfg.merge_from_file(str(ROOT / "configs" / "imagenet" / "quickstart.yaml"))
    clf_cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    clf = build_model(clf_cfg)
    with torch.no_grad():
        for name, t in clf.state_dict().items():
            if t.is_floating_point():
                t.normal_().abs_()
    DetectionCheckpointer(clf, str(tmp_path)).save("model_final")
    src = torch.load(tmp_path / "model_final.pth", weights_only=True)["model"]

    path = str(tmp_path / "r18_gradaug.pkl")
    ckpt = convert_classifier(str(tmp_path / "model_final.pth"), path, cfg=clf_cfg)
    meta = ckpt["gradaug_det"]
    assert meta["DEPTH"] == 18 and meta["NUM_CLASSES"] == 4 and meta["FORMAT"] == "RGB"

    det_cfg = mask_rcnn_cfg(18, slimmable=True)
    model = build_model(det_cfg)
    DetectionCheckpointer(model).load(path)
    assert_backbone_loaded(model, src, "backbone.bottom_up.", lambda k: k[len("backbone."):])

    # classifier -> classifier layout keeps the head: a lossless round trip
    back = str(tmp_path / "clf.pkl")
    convert_classifier(src, back, target="classifier", cfg=clf_cfg)
    clf2 = build_model(clf_cfg)
    report = load_pretrained(clf2, back)
    assert report.missing == [] and report.unexpected == []
    for k, v in clf2.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, src[k]), k


def test_config_check_and_overrides(tmp_path, caplog):
    path = str(tmp_path / "r18.pkl")
    ckpt = convert_torchvision(tv_state(18), path)
    cfg = mask_rcnn_cfg(18)
    cfg.MODEL.WEIGHTS = path
    msgs = check_pretrained_config(cfg)  # detectron2 defaults: BGR, caffe mean/std, stride in 1x1
    text = "\n".join(msgs)
    for key in ("MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD", "INPUT.FORMAT", "MODEL.RESNETS.STRIDE_IN_1X1"):
        assert key in text
    assert "MODEL.RESNETS.DEPTH" not in text
    cfg.merge_from_list(pretrained_config_opts(ckpt["gradaug_det"]))
    assert check_pretrained_config(cfg) == []
    c4 = mask_rcnn_cfg(18, kind="C4")
    c4.merge_from_list(pretrained_config_opts(ckpt["gradaug_det"]))
    c4.MODEL.WEIGHTS = path
    assert any("--target" in m for m in check_pretrained_config(c4))


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="torchvision ResNet"):
        convert_torchvision({"conv1.weight": torch.zeros(1), "features.0.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="SlimmableClassifier"):
        convert_classifier({"backbone.stem.conv1.weight": torch.zeros(1), "extra.w": torch.zeros(1)},
                           pixel_mean=[0, 0, 0], pixel_std=[1, 1, 1], input_format="RGB", stride_in_1x1=False)
    with pytest.raises(ValueError, match="training config"):
        convert_classifier({"backbone.stem.conv1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"\.pkl"):
        save_d2_checkpoint({"model": {}}, "out.pth")


def test_tool_cli(load_tool, tmp_path, capsys):
    tool = load_tool("convert_pretrained")
    src = tmp_path / "tv.pth"
    torch.save(tv_state(18), src)
    out, emitted = tmp_path / "tv.pkl", tmp_path / "over.yaml"
    tool.main(["--source", "torchvision", str(src), str(out), "--emit-config", str(emitted)])
    assert out.is_file() and "MODEL.PIXEL_MEAN" in capsys.readouterr().out
    over = yaml.safe_load(emitted.read_text())
    assert over["INPUT"]["FORMAT"] == "RGB" and over["MODEL"]["WEIGHTS"] == str(out)
    cfg = mask_rcnn_cfg(18)
    cfg.merge_from_file(str(emitted))
    assert check_pretrained_config(cfg) == []


def test_tool_emit_config_with_base_is_a_train_net_config(load_tool, tmp_path, capsys):
    """--emit-config with --base-config writes a whole config (_BASE_ the detection config) that
    tools/train_net.py reads as --config-file, as its help and the docs say; the help's
    description is the docstring's first sentence, whole."""
    tool = load_tool("convert_pretrained")
    with pytest.raises(SystemExit):
        tool.parse_args(["--help"])
    assert capsys.readouterr().out.split("\n\n")[1].startswith("Convert an ImageNet-pretrained ResNet")
    src = tmp_path / "tv.pth"
    torch.save(tv_state(18), src)
    out, emitted = tmp_path / "tv.pkl", tmp_path / "sub" / "mask_rcnn.yaml"
    emitted.parent.mkdir()
    base = Path(__file__).resolve().parents[2] / "configs" / "quickstart" / "mask_rcnn_gradaug.yaml"
    tool.main(["--source", "torchvision", str(src), str(out), "--emit-config", str(emitted),
               "--base-config", str(base)])
    assert "tools/train_net.py --config-file" in capsys.readouterr().out
    setup = load_tool("train_net").get_parser().parse_args(["--config-file", str(emitted)])
    cfg = add_gradaug_config(get_cfg())
    cfg.merge_from_file(setup.config_file)  # what gradaug_det.engine.setup does
    assert cfg.MODEL.WEIGHTS == str(out) and cfg.INPUT.FORMAT == "RGB"
    assert cfg.GRADAUG.ENABLED and cfg.OUTPUT_DIR == "./output/quickstart/mask_rcnn"  # from the base
    assert check_pretrained_config(cfg) == []
    with pytest.raises(SystemExit, match="pass --emit-config FILE too"):
        tool.main(["--source", "torchvision", str(src), str(tmp_path / "b.pkl"), "--base-config", str(base)])
    with pytest.raises(SystemExit, match="no such file"):
        tool.main(["--source", "torchvision", str(src), str(tmp_path / "c.pkl"), "--emit-config",
                   str(tmp_path / "c.yaml"), "--base-config", str(tmp_path / "missing.yaml")])
    assert not (tmp_path / "b.pkl").exists() and not (tmp_path / "c.pkl").exists()


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_names_round_trip(depth):
    source = tv_state(depth)
    backbone, head, _ = torchvision_to_d2(source)
    back = d2_to_torchvision(backbone, head)
    want = {k: v for k, v in source.items() if not k.endswith("num_batches_tracked")}
    assert list(back) == list(want)
    for k, v in want.items():
        assert torch.equal(back[k], v), k


def test_classifier_to_torchvision_resnet_same_logits(load_tool, tmp_path):
    """A GradAug classifier converted for MMDetection/torchvision computes the same logits."""
    clf_cfg = add_gradaug_config(get_cfg())
    clf_cfg.merge_from_file(str(ROOT / "configs" / "imagenet" / "quickstart.yaml"))
    torch.manual_seed(0)
    clf = build_model(clf_cfg)
    with torch.no_grad():
        for t in clf.state_dict().values():
            if t.is_floating_point():
                t.uniform_(0.5, 1.5)
    DetectionCheckpointer(clf, str(tmp_path)).save("model_final")
    out = tmp_path / "r18_tv.pth"
    tool = load_tool("convert_pretrained")
    (tmp_path / "config.yaml").write_text(clf_cfg.dump())
    tool.main(["--source", "classifier", "--target", "torchvision", str(tmp_path / "model_final.pth"), str(out)])
    net = torchvision.models.resnet18(num_classes=clf_cfg.MODEL.CLASSIFIER.NUM_CLASSES)
    net.load_state_dict(torch.load(out, weights_only=True), strict=False)  # num_batches_tracked only
    clf.eval(), net.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x), clf.logits(x), rtol=1e-4, atol=1e-4)
    # a classifier trained with detectron2's own conventions is refused, naming the key
    clf_cfg.INPUT.FORMAT = "BGR"
    with pytest.raises(ValueError, match="INPUT.FORMAT='BGR'"):
        convert_classifier_to_torchvision(str(tmp_path / "model_final.pth"), cfg=clf_cfg)


def test_name_table_both_directions():
    """One table relates the three namings; every direction reads it."""
    assert rename("layer4.2.downsample.1.running_var", "torchvision", "detectron2") == (
        "res5.2.shortcut.norm.running_var", False)
    assert rename("res5.2.shortcut.norm.running_var", "detectron2", "torchvision")[0] == \
        "layer4.2.downsample.1.running_var"
    assert rename("backbone.res3.1.conv2.norm.bias", "classifier", "torchvision")[0] == "layer2.1.bn2.bias"
    assert rename("fc.weight", "torchvision", "detectron2") == ("weight", True)
    assert rename("head.bias", "classifier", "torchvision")[0] == "fc.bias"
    assert rename("layer5.0.conv1.weight", "torchvision", "detectron2")[0] is None
    assert rename("res2.0.conv2_offset.weight", "detectron2", "torchvision")[0] is None
    with pytest.raises(ValueError, match="naming"):
        rename("conv1.weight", "mmdet", "detectron2")
