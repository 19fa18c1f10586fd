"""What a width means: a sub-width forward is the forward of a physically sliced stock network."""
import pytest
import torch
import torch.nn.functional as F
from fvcore.nn import FlopCountAnalysis

from detectron2.layers import Conv2d

import gradaug_det
from gradaug_det.slim import SlimConv2d, slim_channels

CONFIGS = {
    "R18": dict(depth=18),
    "R50": dict(depth=50),
    "R50-BN": dict(depth=50, MODEL__RESNETS__NORM="BN", MODEL__BACKBONE__FREEZE_AT=0),
    "R18-BN-freeze2": dict(depth=18, MODEL__RESNETS__NORM="BN", MODEL__BACKBONE__FREEZE_AT=2),
    "X50-32x4d": dict(depth=50, MODEL__RESNETS__NUM_GROUPS=32, MODEL__RESNETS__WIDTH_PER_GROUP=4,
                      MODEL__RESNETS__STRIDE_IN_1X1=False),
    "X50-4x16d-BN": dict(depth=50, MODEL__RESNETS__NUM_GROUPS=4, MODEL__RESNETS__WIDTH_PER_GROUP=16,
                         MODEL__RESNETS__NORM="BN"),
    "R50-dilation2": dict(depth=50, MODEL__RESNETS__RES5_DILATION=2),
    "R50-stride3x3": dict(depth=50, MODEL__RESNETS__STRIDE_IN_1X1=False),
    "R50-res2out64": dict(depth=50, MODEL__RESNETS__RES2_OUT_CHANNELS=64),
    "R18-GN-div16": dict(depth=18, MODEL__RESNETS__NORM="GN", MODEL__SLIMMABLE__CHANNEL_DIVISOR=16),
    "R50-GN-div64": dict(depth=50, MODEL__RESNETS__NORM="GN", MODEL__SLIMMABLE__CHANNEL_DIVISOR=64),
    "R50-C4": dict(depth=50, MODEL__RESNETS__OUT_FEATURES=["res4"]),
}

CASES = (
    [("R50", w, d) for w in (0.9, 0.75, 0.5) for d in (1, 8)]
    + [("R18", 0.9, 1), ("R18", 0.75, 8), ("R18", 0.5, 1)]
    + [("R50-BN", 0.9, 8), ("R50-BN", 0.5, 1)]
    + [("R18-BN-freeze2", 0.75, 1)]
    + [("X50-32x4d", 0.9, 1), ("X50-32x4d", 0.75, 1), ("X50-32x4d", 0.5, 8)]
    + [("X50-4x16d-BN", 0.75, 1), ("X50-4x16d-BN", 0.5, 8)]
    + [("R50-dilation2", 0.75, 1), ("R50-stride3x3", 0.5, 8), ("R50-res2out64", 0.9, 1)]
    + [("R18-GN-div16", 0.5, 16), ("R18-GN-div16", 0.6, 32), ("R50-GN-div64", 0.5, 64), ("R50-C4", 0.9, 8)]
)


def _input(size=64, seed=1):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name, w, divisor", CASES)
def test_sub_width_equals_sliced_stock_resnet(bb, name, w, divisor):
    cfg = bb.make_cfg(**CONFIGS[name])
    cfg.MODEL.SLIMMABLE.CHANNEL_DIVISOR = divisor
    _, slim = bb.stock_and_slim(cfg)
    x = _input()
    channels = {k: s.channels for k, s in slim.output_shape().items()}
    modes = (False, True) if cfg.MODEL.RESNETS.NORM in ("BN", "GN") else (False,)
    for train in modes:
        # batch statistics over a 2x2 res5 map amplify float32 rounding (~1e-4); compare
        # training mode in float64, where a real mismatch cannot hide
        dtype = torch.float64 if train else torch.float32
        slim.train(train).to(dtype)
        ref = bb.sliced_reference(cfg, slim, w)
        with gradaug_det.width(slim, w):
            out = slim(x.to(dtype))
        bb.assert_sub_width(out, ref(x.to(dtype)), channels, rel=1e-10 if train else 2e-5)
    assert {k: s.channels for k, s in slim.output_shape().items()} == channels


def test_reference_kept_channel_counts(bb):
    """The sliced reference has the channel counts of the channel rule (e.g. R50 at 0.9)."""
    cfg = bb.make_cfg(50)
    _, slim = bb.stock_and_slim(cfg)
    ref = bb.sliced_reference(cfg, slim, 0.9)
    assert ref.stem.conv1.weight.shape[0] == 58
    assert [ref.res2[0].conv1.weight.shape[0], ref.res3[0].conv1.weight.shape[0],
            ref.res4[0].conv1.weight.shape[0], ref.res5[0].conv1.weight.shape[0]] == [58, 115, 230, 461]
    assert ref.res5[0].conv3.weight.shape[0] == 1843
    cfg.MODEL.SLIMMABLE.CHANNEL_DIVISOR = 8
    _, slim = bb.stock_and_slim(cfg)
    ref = bb.sliced_reference(cfg, slim, 0.9)
    assert [ref.stem.conv1.weight.shape[0], ref.res2[0].conv1.weight.shape[0],
            ref.res3[0].conv1.weight.shape[0], ref.res5[0].conv3.weight.shape[0]] == [56, 56, 112, 1840]


@pytest.mark.parametrize("name, w, slim_fpn", [("R18", 0.75, True), ("R50-BN", 0.5, True), ("R18", 0.5, False),
                                               ("X50-32x4d", 0.9, True)])
def test_fpn_sub_width_equals_sliced_stock_fpn(bb, name, w, slim_fpn):
    cfg = bb.make_cfg(**CONFIGS[name])
    cfg.MODEL.SLIMMABLE.SLIM_FPN = slim_fpn
    _, slim = bb.stock_and_slim(cfg, fpn=True)
    x = _input()
    channels = {k: s.channels for k, s in slim.output_shape().items()}
    for train in ((False, True) if cfg.MODEL.RESNETS.NORM == "BN" else (False,)):
        dtype = torch.float64 if train else torch.float32
        slim.train(train).to(dtype)
        ref = bb.sliced_reference(cfg, slim, w, fpn=True)
        with gradaug_det.width(slim, w):
            out = slim(x.to(dtype))
        expected = ref(x.to(dtype))
        rel = 1e-10 if train else 2e-5
        if slim_fpn:
            bb.assert_sub_width(out, expected, channels, rel=rel)
        else:  # full-width FPN on a slimmed bottom-up network
            bb.assert_same(out, expected, rel=rel)
    assert {k: s.channels for k, s in slim.output_shape().items()} == channels


def test_fpn_gn_sub_width(bb):
    cfg = bb.make_cfg(18, MODEL__RESNETS__NORM="GN", MODEL__FPN__NORM="GN", MODEL__SLIMMABLE__CHANNEL_DIVISOR=16)
    _, slim = bb.stock_and_slim(cfg, fpn=True)
    x = _input()
    for train in (False, True):
        dtype = torch.float64 if train else torch.float32
        slim.train(train).to(dtype)
        ref = bb.sliced_reference(cfg, slim, 0.5, fpn=True)
        with gradaug_det.width(slim, 0.5):
            out = slim(x.to(dtype))
        bb.assert_sub_width(out, ref(x.to(dtype)), {k: 256 for k in out}, rel=1e-10 if train else 2e-5)


@pytest.mark.parametrize("w", [0.9, 0.5])
def test_padded_feature_equals_slicing_consumer_input_weights(bb, w):
    """A stock consumer on the zero-padded feature == that consumer with its input
    weights sliced, on the narrow feature (so RPN / RoI heads / res5 heads run as is)."""
    cfg = bb.make_cfg(50, MODEL__RESNETS__OUT_FEATURES=["res4"])
    _, slim = bb.stock_and_slim(cfg)
    with gradaug_det.width(slim, w):
        feat = slim(_input())["res4"]
    kept = slim_channels(1024, w)
    narrow = feat[:, :kept]
    consumer = Conv2d(1024, 32, 3, padding=1)
    padded_out = consumer(feat)
    sliced_out = F.conv2d(narrow, consumer.weight[:, :kept], consumer.bias, padding=1)
    torch.testing.assert_close(padded_out, sliced_out, rtol=1e-4, atol=1e-4)
    assert torch.count_nonzero(feat[:, kept:]) == 0 and torch.count_nonzero(narrow) > 0
    # ... and differs from the full-width feature: the width did something
    full = slim(_input())["res4"]
    assert (full - feat).abs().max() > 1e-2


def _flops(model, x):
    counter = FlopCountAnalysis(model, x)
    counter.unsupported_ops_warnings(False)
    counter.uncalled_modules_warnings(False)
    return counter.total()


@pytest.mark.parametrize("depth", [18, 50])
def test_compute_really_shrinks(bb, depth, monkeypatch):
    cfg = bb.make_cfg(depth)
    _, slim = bb.stock_and_slim(cfg)
    slim.eval()
    x = _input()
    full = _flops(slim, x)
    with gradaug_det.width(slim, 0.5):
        half = _flops(slim, x)
    # every layer but the stem's input shrinks by 2, so FLOPs fall to ~1/4
    assert 0.25 <= half / full <= 0.3, half / full

    shapes = []
    real = F.conv2d

    def spy(inp, weight, *args, **kwargs):
        shapes.append(tuple(weight.shape))
        return real(inp, weight, *args, **kwargs)

    monkeypatch.setattr(F, "conv2d", spy)
    with gradaug_det.width(slim, 0.5):
        slim(x)
    full_shapes = [tuple(m.weight.shape) for m in slim.modules() if isinstance(m, SlimConv2d)]
    assert len(shapes) == len(full_shapes)
    assert shapes[0] == (32, 3, 7, 7)  # stem: output halved, image input kept
    for got, whole in zip(shapes[1:], full_shapes[1:]):
        assert got == (whole[0] // 2, whole[1] // 2) + whole[2:]


def test_output_shape_and_channels_at_every_width(bb):
    cfg = bb.make_cfg(18)
    _, slim = bb.stock_and_slim(cfg, fpn=True)
    shapes = slim.output_shape()
    for w in (1.0, 0.9, 0.75, 0.5, 0.1):
        with gradaug_det.width(slim, w):
            out = slim(_input())
            assert slim.output_shape() == shapes
        assert {k: v.shape[1] for k, v in out.items()} == {k: s.channels for k, s in shapes.items()}
        kept = slim_channels(256, w)
        for v in out.values():
            assert torch.count_nonzero(v[:, kept:]) == 0
            assert torch.count_nonzero(v[:, :kept].abs().sum((0, 2, 3))) >= kept // 2
