"""Checkpoints record their slimmable settings; loads warn (training) or refuse (sub-width
evaluation, pruning) on a mismatch (issue 10 §6)."""
import logging
import os
import runpy

import pytest
import torch

from detectron2.modeling import build_model

from gradaug_det.checkpoint.checkpointer import GradAugCheckpointer
from gradaug_det.config import slimmable_settings
from gradaug_det.slim.settings import (
    RECORD_KEY,
    SlimmableSettingsMismatch,
    check_slimmable_settings,
    model_slimmable_settings,
    strict_slimmable_settings,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _model(make_rcnn_cfg, divisor=1, slim_fpn=True, rule="round"):
    cfg = make_rcnn_cfg()
    cfg.MODEL.SLIMMABLE.CHANNEL_DIVISOR = divisor
    cfg.MODEL.SLIMMABLE.SLIM_FPN = slim_fpn
    cfg.MODEL.SLIMMABLE.CHANNEL_RULE = rule
    torch.manual_seed(divisor)
    return cfg, build_model(cfg)


def _save(model, directory, name="model_final"):
    GradAugCheckpointer(model, str(directory)).save(name)
    return os.path.join(str(directory), name + ".pth")


@pytest.fixture
def trained_with_divisor_8(tmp_path, make_rcnn_cfg):
    """A model trained with CHANNEL_DIVISOR 8 and SLIM_FPN False, and its checkpoint."""
    cfg, model = _model(make_rcnn_cfg, divisor=8, slim_fpn=False)
    path = _save(model, tmp_path / "ckpt")
    return cfg, model, path


def test_checkpoint_records_the_settings(trained_with_divisor_8, make_rcnn_cfg):
    cfg, model, path = trained_with_divisor_8
    data = torch.load(path, weights_only=True)
    expected = {"channel_rule": "round", "channel_divisor": 8, "slim_fpn": False}
    assert data[RECORD_KEY] == expected
    assert slimmable_settings(cfg) == expected == model_slimmable_settings(model)
    # a reference-rule model with a slimmed FPN
    cfg2, model2 = _model(make_rcnn_cfg, rule="reference")
    assert model_slimmable_settings(model2) == {"channel_rule": "reference", "channel_divisor": 1, "slim_fpn": True}
    assert slimmable_settings(cfg2) == model_slimmable_settings(model2)


def test_training_load_warns_and_loads(trained_with_divisor_8, make_rcnn_cfg, caplog):
    _, saved_model, path = trained_with_divisor_8
    _, model = _model(make_rcnn_cfg, divisor=1, slim_fpn=False)
    with caplog.at_level(logging.WARNING, logger="gradaug_det.slim.settings"):
        GradAugCheckpointer(model).load(path)
    text = " ".join(r.getMessage() for r in caplog.records if r.pathname.endswith(os.path.join("slim", "settings.py")))
    assert "MODEL.SLIMMABLE.CHANNEL_DIVISOR 8 in the file, 1 here" in text
    assert "SLIM_FPN" not in text  # matching settings are not listed
    key = "backbone.bottom_up.stem.conv1.weight"
    assert torch.equal(model.state_dict()[key], saved_model.state_dict()[key])


def test_strict_load_refuses(trained_with_divisor_8, make_rcnn_cfg):
    _, _, path = trained_with_divisor_8
    _, model = _model(make_rcnn_cfg, divisor=1, slim_fpn=True)
    with pytest.raises(SlimmableSettingsMismatch) as info, strict_slimmable_settings("a test"):
        GradAugCheckpointer(model).load(path)
    msg = str(info.value)
    assert "Set MODEL.SLIMMABLE.CHANNEL_DIVISOR 8 MODEL.SLIMMABLE.SLIM_FPN False" in msg
    assert "(refused: a test)" in msg
    # matching settings load in strict mode; so does a file without a record (model zoo, older files)
    _, same = _model(make_rcnn_cfg, divisor=8, slim_fpn=False)
    with strict_slimmable_settings():
        GradAugCheckpointer(same).load(path)
    legacy = path.replace(".pth", "_legacy.pth")
    torch.save({"model": same.state_dict()}, legacy)
    with strict_slimmable_settings():
        GradAugCheckpointer(model).load(legacy)


def test_check_compares_only_known_settings(make_rcnn_cfg):
    saved = {"channel_rule": "reference", "channel_divisor": 1, "slim_fpn": None}  # a classifier's record
    cfg = make_rcnn_cfg()
    assert check_slimmable_settings(saved, {"channel_rule": "reference", "channel_divisor": 1, "slim_fpn": True},
                                    strict=True)
    with pytest.raises(SlimmableSettingsMismatch, match="CHANNEL_RULE 'reference' in the file, 'round' here"):
        check_slimmable_settings(saved, slimmable_settings(cfg), strict=True, source="x.pth")
    assert check_slimmable_settings(None, slimmable_settings(cfg), strict=True)
    assert check_slimmable_settings(saved, torch.nn.Linear(2, 2), strict=True)  # a stock model: nothing to compare
    with pytest.raises(SlimmableSettingsMismatch, match="damaged"):
        check_slimmable_settings("round", cfg, strict=False)
    # layers built with different divisors are recorded as such (saving never fails)
    from gradaug_det.slim import SlimConv2d

    mixed = torch.nn.Sequential(SlimConv2d(3, 8, 1, slim_in=False, divisor=8), SlimConv2d(8, 8, 1))
    assert model_slimmable_settings(mixed) == {"channel_rule": "round", "channel_divisor": [1, 8], "slim_fpn": None}


def test_prune_tool_refuses_mismatch_and_records(tmp_path, trained_with_divisor_8, make_rcnn_cfg):
    cfg, _, path = trained_with_divisor_8
    tool = runpy.run_path(os.path.join(REPO, "tools", "prune.py"))
    other = cfg.clone()
    other.MODEL.SLIMMABLE.CHANNEL_DIVISOR = 1
    (tmp_path / "other.yaml").write_text(other.dump())
    args = tool["get_parser"]().parse_args([
        "--config-file", str(tmp_path / "other.yaml"), "--weights", path, "--width", "0.75",
        "--output", str(tmp_path / "pruned"), "--no-flops"])
    with pytest.raises(SlimmableSettingsMismatch, match="CHANNEL_DIVISOR 8 in the file, 1 here"):
        tool["main"](args)
    assert not (tmp_path / "pruned").exists() or not os.listdir(tmp_path / "pruned")  # nothing written
    # with the checkpoint's own settings it prunes, and the pruned file says how
    (tmp_path / "same.yaml").write_text(cfg.dump())
    args.config_file = str(tmp_path / "same.yaml")
    stats = tool["main"](args)
    info = torch.load(stats["checkpoint"], weights_only=True)["gradaug_prune"]
    assert info["slimmable"] == {"channel_rule": "round", "channel_divisor": 8, "slim_fpn": False}


def test_eval_only_at_subwidths_refuses(tmp_path, trained_with_divisor_8):
    cfg, _, path = trained_with_divisor_8
    other = cfg.clone()
    other.MODEL.SLIMMABLE.CHANNEL_DIVISOR = 1
    (tmp_path / "other.yaml").write_text(other.dump())
    tool = runpy.run_path(os.path.join(REPO, "tools", "train_net.py"))
    from detectron2.engine import default_argument_parser

    args = default_argument_parser().parse_args([
        "--config-file", str(tmp_path / "other.yaml"), "--eval-only", "MODEL.WEIGHTS", path,
        "TEST.SLIM_WIDTHS", "[0.5]", "OUTPUT_DIR", str(tmp_path / "out")])
    with pytest.raises(SlimmableSettingsMismatch, match="--eval-only at TEST.SLIM_WIDTHS"):
        tool["main"](args)


def test_converted_classifier_carries_its_settings(tmp_path, make_rcnn_cfg, caplog):
    """A GradAug classifier trained with the reference rule, converted for detection: the
    converted file records the rule; a detector fine-tuned from it with another rule is warned."""
    from detectron2.config import get_cfg

    import gradaug_det
    from gradaug_det.checkpoint.convert import convert_classifier

    cfg = gradaug_det.add_gradaug_config(get_cfg())
    cfg.MODEL.META_ARCHITECTURE = "SlimmableClassifier"
    cfg.MODEL.BACKBONE.NAME = "build_slimmable_resnet_backbone"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.CLASSIFIER.NUM_CLASSES = 4
    cfg.MODEL.SLIMMABLE.CHANNEL_RULE = "reference"
    cfg.MODEL.DEVICE = "cpu"
    classifier = build_model(cfg)
    path = _save(classifier, tmp_path)
    assert torch.load(path, weights_only=True)[RECORD_KEY] == {
        "channel_rule": "reference", "channel_divisor": 1, "slim_fpn": None}
    out = str(tmp_path / "converted.pkl")
    ckpt = convert_classifier(path, out, cfg=cfg)
    assert ckpt[RECORD_KEY] == {"channel_rule": "reference", "channel_divisor": 1, "slim_fpn": None}

    _, detector = _model(make_rcnn_cfg, rule="round")
    with caplog.at_level(logging.WARNING, logger="gradaug_det.slim.settings"):
        GradAugCheckpointer(detector).load(out)
    assert "MODEL.SLIMMABLE.CHANNEL_RULE 'reference' in the file, 'round' here" in caplog.text
    _, same = _model(make_rcnn_cfg, rule="reference")
    with strict_slimmable_settings():
        GradAugCheckpointer(same).load(out)  # slim_fpn is not compared: the classifier had no FPN


def test_tool_prints_the_refusal_without_traceback(capsys):
    from gradaug_det.utils.cli import run_tool

    def load():
        check_slimmable_settings({"channel_divisor": 8}, {"channel_divisor": 1}, strict=True, source="m.pth")

    with pytest.raises(SystemExit) as e:
        run_tool(load)
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error: m.pth was trained with other slimmable settings")
