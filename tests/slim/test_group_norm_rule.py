"""The GroupNorm rule (slim/channels.py: check_group_norm_slicing), one definition for detectron2 and mmdet."""
import pytest
from detectron2.layers import ShapeSpec

from gradaug_det.config import add_gradaug_config
from gradaug_det.modeling import build_slimmable_resnet_backbone
from gradaug_det.slim import slim_channels
from gradaug_det.slim.channels import GroupNormSlice, check_group_norm_slicing

KEYS = dict(divisor_key="X.DIVISOR", rule_key="X.RULE", bn_fix="BN")


def test_divisor_multiple_of_every_channels_per_group_keeps_whole_groups():
    layers = [GroupNormSlice("a", 32, 256, divisor=8), GroupNormSlice("b", 32, 512, divisor=8)]
    with pytest.raises(ValueError) as e:  # a suits 8, b needs 16
        check_group_norm_slicing(layers, **KEYS)
    assert str(e.value) == (
        "b is GroupNorm(32, 512) with 16 channels per group, which cannot be sliced at every width with "
        "X.DIVISOR=8; set it to a multiple of 16 (the least common multiple of every GN layer's channels per "
        "group in this model), or use BN.")
    layers = [layer._replace(divisor=16) for layer in layers]
    check_group_norm_slicing(layers, **KEYS)
    # what the rule promises: every count slim_channels keeps is a whole number of groups
    for layer in layers:
        per_group = layer.num_channels // layer.num_groups
        assert all(slim_channels(layer.num_channels, w / 20, 16) % per_group == 0 for w in range(1, 21))
    check_group_norm_slicing([], **KEYS)  # no GN: nothing to check


def test_reference_rule_and_grouped_convolutions_never_keep_whole_groups():
    with pytest.raises(ValueError, match=r"^r is GroupNorm\(8, 32\) .*: X\.RULE='reference' keeps channel counts "
                                         r"that are not whole GN groups\. Use X\.RULE='round' with X\.DIVISOR a "
                                         r"multiple of 4, or BN\.$"):
        check_group_norm_slicing([GroupNormSlice("r", 8, 32, 1, "reference")], **KEYS)
    with pytest.raises(ValueError, match=r"^g is GroupNorm\(8, 32\) .* grouped \(ResNeXt\) .* Use BN or GROUPS=1\.$"):
        check_group_norm_slicing([GroupNormSlice("g", 8, 32, 4, grouped=True)], **KEYS, groups_fix="GROUPS=1")


def test_detectron2_backbone_names_its_config_keys():
    from detectron2.config import get_cfg

    cfg = add_gradaug_config(get_cfg())
    cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.RESNETS.RES2_OUT_CHANNELS, cfg.MODEL.RESNETS.NORM = 18, 64, "GN"
    cfg.MODEL.SLIMMABLE.CHANNEL_RULE = "reference"
    with pytest.raises(ValueError, match=r"^backbone\.stem\.conv1\.norm is GroupNorm\(32, 64\) with 2 channels per "
                                         r"group: MODEL\.SLIMMABLE\.CHANNEL_RULE='reference' .* "
                                         r"MODEL\.SLIMMABLE\.CHANNEL_DIVISOR a multiple of 8"):  # res2..res4
        build_slimmable_resnet_backbone(cfg, ShapeSpec(channels=3))
