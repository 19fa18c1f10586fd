"""The mmdet backbone and neck follow channel_rule (the reference's ratios: stem and bottleneck
inner convolutions 0.25); GradAugSamplerStateHook records and checks the slimmable settings."""
import logging
import types

import pytest
import torch
from torch import nn

from gradaug_det.mmdet import GradAugSamplerStateHook, SlimmableFPN, SlimmableResNet
from gradaug_det.slim import set_width
from gradaug_det.slim.settings import RECORD_KEY, SlimmableSettingsMismatch, strict_slimmable_settings


def reference_count(c, w, ratio):
    """The reference code's ``int(make_divisible(c * w / ratio) * ratio)``, written out."""
    v = c * w / ratio
    new_v = max(1, int(v + 0.5))
    if new_v < 0.9 * v:
        new_v += 1
    return int(new_v * ratio)


def _conv_outputs(model, x):
    """Output channels every convolution of ``model`` computes on ``x``, by module name."""
    seen = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            def record(weight_input, *, _name=name, _m=m, _orig=m._conv_forward):
                def run(inp, weight, bias):
                    seen[_name] = weight.shape[0]
                    return _orig(inp, weight, bias)
                return run
            m._conv_forward = record(None)
    with torch.no_grad():
        model(x)
    return seen


@pytest.mark.parametrize("w", [0.9, 0.93, 0.6])
def test_resnet50_reference_rule(w):
    torch.manual_seed(0)
    model = SlimmableResNet(depth=50, channel_rule="reference", norm_eval=False, init_cfg=None).eval()
    set_width(model, w)
    got = _conv_outputs(model, torch.rand(1, 3, 64, 64))
    assert got["conv1"] == reference_count(64, w, 0.25)
    for s, n in enumerate([3, 4, 6, 3]):
        for b in range(n):
            name = f"layer{s + 1}.{b}"
            assert got[f"{name}.conv1"] == got[f"{name}.conv2"] == reference_count(64 * 2 ** s, w, 0.25), name
            assert got[f"{name}.conv3"] == reference_count(256 * 2 ** s, w, 1.0), name
        assert got[f"layer{s + 1}.0.downsample.0"] == reference_count(256 * 2 ** s, w, 1.0)


def test_fpn_rule_and_refusals():
    neck = SlimmableFPN(in_channels=[16, 32], out_channels=40, num_outs=2, channel_rule="reference")
    set_width(neck, 0.93)
    got = _conv_outputs(neck, [torch.rand(1, 16, 8, 8), torch.rand(1, 32, 4, 4)])
    assert set(got.values()) == {reference_count(40, 0.93, 1.0)} == {37}
    with pytest.raises(ValueError, match="model.backbone.channel_divisor to 1"):
        SlimmableResNet(depth=18, channel_rule="reference", channel_divisor=8, init_cfg=None)
    with pytest.raises(ValueError, match="model.neck.channel_rule='nearest' is invalid"):
        SlimmableFPN(in_channels=[16, 32], out_channels=40, num_outs=2, channel_rule="nearest")


def test_hook_records_and_checks_settings(caplog):
    model = nn.Module()
    model.backbone = SlimmableResNet(depth=18, channel_divisor=8, init_cfg=None)
    model.neck = SlimmableFPN(in_channels=[64, 128, 256, 512], out_channels=32, num_outs=5, channel_divisor=8)
    runner = types.SimpleNamespace(model=model, _load_from="epoch_1.pth")
    hook = GradAugSamplerStateHook()
    checkpoint = {}
    hook.before_save_checkpoint(runner, checkpoint)
    assert checkpoint[RECORD_KEY] == {"channel_rule": "round", "channel_divisor": 8, "slim_fpn": True}

    other = nn.Module()
    other.backbone = SlimmableResNet(depth=18, init_cfg=None)
    other.neck = SlimmableFPN(in_channels=[64, 128, 256, 512], out_channels=32, num_outs=5)
    runner.model = other
    with caplog.at_level(logging.WARNING, logger="gradaug_det.slim.settings"):
        hook.after_load_checkpoint(runner, checkpoint)
    assert "epoch_1.pth was trained with other slimmable settings" in caplog.text
    with pytest.raises(SlimmableSettingsMismatch, match="CHANNEL_DIVISOR 8 in the file, 1 here"), \
            strict_slimmable_settings("mmdet test"):
        hook.after_load_checkpoint(runner, checkpoint)
