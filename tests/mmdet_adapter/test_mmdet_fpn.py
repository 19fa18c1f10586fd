"""SlimmableFPN for mmdet: mmdet's FPN at width 1.0; a physically narrow FPN below it."""
import pytest
import torch
from torch import nn

from mmdet.models.necks import FPN

from gradaug_det.mmdet import SlimmableFPN, SlimmableResNet
from gradaug_det.slim import set_width, slim_channels

IN_CHANNELS = [16, 32, 64, 128]
# Mask R-CNN's neck; RetinaNet's (extra convs on the backbone output, ReLU between them);
# a GN neck with extra convs on the FPN outputs.
VARIANTS = {
    "mask_rcnn": dict(num_outs=5),
    "retina": dict(num_outs=5, start_level=1, add_extra_convs="on_input", relu_before_extra_convs=True),
    "gn": dict(num_outs=6, add_extra_convs="on_output", norm_cfg=dict(type="GN", num_groups=8),
               act_cfg=dict(type="ReLU")),
}


def _pair(variant, out_channels=32, seed=0, divisor=None):
    args = dict(in_channels=IN_CHANNELS, out_channels=out_channels, **VARIANTS[variant])
    torch.manual_seed(seed)
    ref = FPN(**args)
    ref.init_weights()
    for m in ref.modules():  # non-zero biases and affine parameters
        if isinstance(m, (nn.Conv2d, nn.GroupNorm)) and m.bias is not None:
            nn.init.uniform_(m.bias, -0.3, 0.3)
        if isinstance(m, nn.GroupNorm):
            nn.init.uniform_(m.weight, 0.5, 1.5)
    if divisor is None:
        divisor = 4 if "norm_cfg" in args else 1  # GN(8, 32): 4 channels per group
    slim = SlimmableFPN(channel_divisor=divisor, **args)
    slim.load_state_dict(ref.state_dict(), strict=True)
    return ref, slim, args


def _inputs(channels, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, c, 32 // 2**i, 40 // 2**i, generator=g) for i, c in enumerate(channels)]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_state_dict_and_width_one_are_mmdet_fpn(variant):
    ref, slim, _ = _pair(variant)
    assert [(k, v.shape) for k, v in slim.state_dict().items()] == [(k, v.shape) for k, v in ref.state_dict().items()]
    x = _inputs(IN_CHANNELS)
    out_ref, out_slim = ref(x), slim(x)
    assert len(out_ref) == len(out_slim) == ref.num_outs
    for a, b in zip(out_ref, out_slim):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("w", [0.5, 0.75])
def test_subnetwork_equals_narrow_fpn(variant, w):
    ref, slim, args = _pair(variant)
    divisor = slim.divisor
    narrow_in = [slim_channels(c, w, divisor) for c in IN_CHANNELS]
    narrow_out = slim_channels(args["out_channels"], w, divisor)
    narrow_args = dict(args, in_channels=narrow_in, out_channels=narrow_out)
    if "norm_cfg" in args:  # the same channels per group, fewer groups
        narrow_args["norm_cfg"] = dict(args["norm_cfg"], num_groups=narrow_out // 4)
    narrow = FPN(**narrow_args)
    full = ref.state_dict()
    narrow.load_state_dict({k: full[k][tuple(slice(0, n) for n in v.shape)] for k, v in narrow.state_dict().items()})
    # the slimmable backbone's outputs: the sub-network's channels, then zeros
    x = _inputs(narrow_in)
    padded = [torch.cat([t, t.new_zeros(t.shape[0], c - t.shape[1], *t.shape[2:])], 1) for t, c in zip(x, IN_CHANNELS)]
    set_width(slim, w)
    out_slim, out_narrow = slim(padded), narrow(x)
    for a, b in zip(out_slim, out_narrow):
        assert a.shape[1] == args["out_channels"]
        torch.testing.assert_close(a[:, :narrow_out], b, rtol=1e-5, atol=1e-5)
        assert a[:, narrow_out:].abs().sum() == 0
    # gradients reach the kept weights only
    sum(o.square().sum() for o in out_slim).backward()
    conv = slim.fpn_convs[0].conv
    assert conv.weight.grad[:narrow_out].abs().sum() > 0
    assert conv.weight.grad[narrow_out:].abs().sum() == 0
    assert conv.weight.grad[:, narrow_out:].abs().sum() == 0


def test_slimmable_backbone_and_neck_follow_one_width():
    torch.manual_seed(0)
    backbone = SlimmableResNet(depth=18, norm_eval=False, init_cfg=None)
    neck = SlimmableFPN(in_channels=[64, 128, 256, 512], out_channels=32, num_outs=5)
    model = nn.Sequential(backbone, neck)
    x = torch.randn(1, 3, 64, 64)
    full = [o.clone() for o in model(x)]
    set_width(model, 0.5)
    half = model(x)
    for a, b in zip(full, half):
        assert a.shape == b.shape and a[:, 16:].abs().sum() > 0
        assert b[:, 16:].abs().sum() == 0 and b[:, :16].abs().sum() > 0
    set_width(model, 1.0)
    for a, b in zip(full, model(x)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(conv_cfg=dict(type="DCNv2")), "model.neck.conv_cfg="),
    (dict(norm_cfg=dict(type="LN")), "model.neck.norm_cfg.type='LN'"),
    (dict(channel_divisor=0), "model.neck.channel_divisor=0"),
    (dict(norm_cfg=dict(type="GN", num_groups=8)), "model.neck.channel_divisor=1; set it to a multiple of 4"),
])
def test_unsliceable_arguments_are_refused_with_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace("[", r"\[")):
        SlimmableFPN(in_channels=IN_CHANNELS, out_channels=32, num_outs=5, **kwargs)
