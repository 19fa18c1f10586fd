"""Drop-in identity: at width 1.0 the slimmable backbones are stock detectron2's."""
import pytest
import torch

from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from gradaug_det.modeling import build_slimmable_resnet_backbone

CONFIGS = {
    "R18-FrozenBN": dict(depth=18),
    "R18-BN": dict(depth=18, MODEL__RESNETS__NORM="BN"),
    "R50-FrozenBN": dict(depth=50),
    "R50-BN-freeze0": dict(depth=50, MODEL__RESNETS__NORM="BN", MODEL__BACKBONE__FREEZE_AT=0),
    "R50-BN-freeze2": dict(depth=50, MODEL__RESNETS__NORM="BN", MODEL__BACKBONE__FREEZE_AT=2),
    "R50-dilation2": dict(depth=50, MODEL__RESNETS__RES5_DILATION=2),
    "R50-stride3x3": dict(depth=50, MODEL__RESNETS__STRIDE_IN_1X1=False),
    "R50-res2out64": dict(depth=50, MODEL__RESNETS__RES2_OUT_CHANNELS=64),
    "R50-res2out128": dict(depth=50, MODEL__RESNETS__RES2_OUT_CHANNELS=128, MODEL__RESNETS__NORM="BN"),
    "X50-32x4d": dict(depth=50, MODEL__RESNETS__NUM_GROUPS=32, MODEL__RESNETS__WIDTH_PER_GROUP=4,
                      MODEL__RESNETS__STRIDE_IN_1X1=False),
    "R18-GN-div16": dict(depth=18, MODEL__RESNETS__NORM="GN", MODEL__SLIMMABLE__CHANNEL_DIVISOR=16),
    "R50-GN-div64": dict(depth=50, MODEL__RESNETS__NORM="GN", MODEL__SLIMMABLE__CHANNEL_DIVISOR=64),
    "R50-C4": dict(depth=50, MODEL__RESNETS__OUT_FEATURES=["res4"]),
    "R50-C4-BN": dict(depth=50, MODEL__RESNETS__OUT_FEATURES=["res4"], MODEL__RESNETS__NORM="BN"),
    "R101-C4": dict(depth=101, MODEL__RESNETS__OUT_FEATURES=["res4"]),
}


def _check_identity(bb, stock, slim, size, modes=("eval", "train")):
    sd_stock, sd_slim = stock.state_dict(), slim.state_dict()
    assert list(sd_stock) == list(sd_slim)
    assert all(sd_stock[k].shape == sd_slim[k].shape for k in sd_stock)
    assert stock.output_shape() == slim.output_shape()
    assert [p.requires_grad for p in stock.parameters()] == [p.requires_grad for p in slim.parameters()]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    for mode in modes:
        stock.train(mode == "train"), slim.train(mode == "train")
        a, b = stock(x), slim(x)
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)  # the same code runs: bit-identical
    if "train" in modes:  # BN running statistics moved identically
        for k, v in stock.state_dict().items():
            assert torch.equal(slim.state_dict()[k], v), k


@pytest.mark.parametrize("name", list(CONFIGS))
def test_resnet_is_stock_at_full_width(bb, name):
    cfg = bb.make_cfg(**CONFIGS[name])
    stock, slim = bb.stock_and_slim(cfg)
    modes = ("eval", "train") if cfg.MODEL.RESNETS.NORM in ("BN", "GN") else ("eval",)
    _check_identity(bb, stock, slim, 64, modes)


@pytest.mark.parametrize("name", ["R18-FrozenBN", "R50-BN-freeze0", "X50-32x4d"])
def test_fpn_is_stock_at_full_width(bb, name):
    cfg = bb.make_cfg(**CONFIGS[name])
    stock, slim = bb.stock_and_slim(cfg, fpn=True)
    modes = ("eval", "train") if cfg.MODEL.RESNETS.NORM == "BN" else ("eval",)
    _check_identity(bb, stock, slim, 64, modes)


def test_fpn_gn_is_stock_at_full_width(bb):
    cfg = bb.make_cfg(18, MODEL__RESNETS__NORM="GN", MODEL__FPN__NORM="GN", MODEL__SLIMMABLE__CHANNEL_DIVISOR=16)
    stock, slim = bb.stock_and_slim(cfg, fpn=True)
    _check_identity(bb, stock, slim, 64)


def test_stock_weights_round_trip(bb):
    """Weights trained in the slimmable model load back strictly into stock detectron2."""
    cfg = bb.make_cfg(18, MODEL__RESNETS__NORM="BN")
    _, slim = bb.stock_and_slim(cfg)
    bb.randomize_(slim, seed=5)
    torch.manual_seed(3)
    stock = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    stock.load_state_dict(slim.state_dict(), strict=True)
    _check_identity(bb, stock, slim, 64, ("eval",))


def test_gn_with_default_divisor_raises(bb):
    cfg = bb.make_cfg(50, MODEL__RESNETS__NORM="GN")
    with pytest.raises(ValueError) as info:
        build_slimmable_resnet_backbone(cfg, ShapeSpec(channels=3))
    msg = str(info.value)
    assert "backbone.stem.conv1.norm" in msg
    assert "MODEL.SLIMMABLE.CHANNEL_DIVISOR" in msg
    # the divisor that works for every GN layer: res5's GroupNorm(32, 2048) has 64 channels per group
    assert "multiple of 64" in msg


def test_gn_with_divisor_too_small_for_a_deep_layer_raises(bb):
    """Divisor 16 suits R18's layers but not R50's (res4.0.shortcut: GroupNorm(32, 1024), 32 per group)."""
    cfg = bb.make_cfg(50, MODEL__RESNETS__NORM="GN", MODEL__SLIMMABLE__CHANNEL_DIVISOR=16)
    with pytest.raises(ValueError, match=r"backbone\.res4\.0\.shortcut\.norm.*CHANNEL_DIVISOR=16.*multiple of 64"):
        build_slimmable_resnet_backbone(cfg, ShapeSpec(channels=3))


def test_gn_fpn_with_default_divisor_raises(bb):
    from gradaug_det.modeling import build_slimmable_resnet_fpn_backbone

    cfg = bb.make_cfg(18, MODEL__FPN__NORM="GN")  # ResNet FrozenBN, FPN GN(32, 256)
    with pytest.raises(ValueError, match=r"backbone\.fpn_lateral2\.norm.*MODEL\.SLIMMABLE\.CHANNEL_DIVISOR"):
        build_slimmable_resnet_fpn_backbone(cfg, ShapeSpec(channels=3))
    cfg.MODEL.SLIMMABLE.SLIM_FPN = False  # a full-width FPN need not slice its GN
    build_slimmable_resnet_fpn_backbone(cfg, ShapeSpec(channels=3))


def test_grouped_gn_raises(bb):
    cfg = bb.make_cfg(50, MODEL__RESNETS__NORM="GN", MODEL__RESNETS__NUM_GROUPS=32,
                      MODEL__RESNETS__WIDTH_PER_GROUP=4, MODEL__SLIMMABLE__CHANNEL_DIVISOR=64)
    with pytest.raises(ValueError, match=r"backbone\.res2\.0\.conv1\.norm .* grouped .*NUM_GROUPS=1"):
        build_slimmable_resnet_backbone(cfg, ShapeSpec(channels=3))


def test_unsliceable_norm_raises_at_build(bb):
    cfg = bb.make_cfg(18, MODEL__RESNETS__NORM="LN")
    build_resnet_backbone(cfg, ShapeSpec(channels=3))  # stock detectron2 accepts it
    with pytest.raises(ValueError, match=r"backbone\.stem\.conv1\.norm is LayerNorm.*MODEL\.RESNETS\.NORM"):
        build_slimmable_resnet_backbone(cfg, ShapeSpec(channels=3))
