"""A detectron2 config that never called ``add_gradaug_config`` builds every slimmable
backbone with the documented ``MODEL.SLIMMABLE`` defaults (issue 10 §4)."""
import pytest
import torch

from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

import gradaug_det
from gradaug_det.config import slimmable_config
from gradaug_det.slim import SlimConv2d, width


def test_slimmable_config_defaults_come_from_add_gradaug_config():
    plain = get_cfg()
    assert "SLIMMABLE" not in plain.MODEL
    full = gradaug_det.add_gradaug_config(get_cfg())
    assert slimmable_config(plain) == full.MODEL.SLIMMABLE  # every key, every default
    full.MODEL.SLIMMABLE.CHANNEL_DIVISOR = 8
    assert slimmable_config(full) is full.MODEL.SLIMMABLE  # the config's own node when present
    with pytest.raises(Exception):  # the shared defaults are read-only
        slimmable_config(plain).CHANNEL_DIVISOR = 8


@pytest.mark.parametrize("name", ["build_slimmable_resnet_backbone", "build_slimmable_resnet_fpn_backbone"])
def test_backbone_builds_without_add_gradaug_config(name):
    cfg = get_cfg()  # no add_gradaug_config
    cfg.MODEL.BACKBONE.NAME = name
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.OUT_FEATURES = cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    backbone = build_backbone(cfg, ShapeSpec(channels=3))
    defaults = gradaug_det.add_gradaug_config(get_cfg()).MODEL.SLIMMABLE
    convs = [m for m in backbone.modules() if isinstance(m, SlimConv2d)]
    assert convs and all(m.divisor == defaults.CHANNEL_DIVISOR for m in convs)
    if name.endswith("fpn_backbone"):  # SLIM_FPN default: the FPN's convs are slimmable
        assert isinstance(backbone.fpn_lateral2, SlimConv2d) == defaults.SLIM_FPN
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), width(backbone, 0.5):
        out = backbone(x)
    assert all(torch.isfinite(v).all() for v in out.values())
