"""Training-time behaviour: BN statistics, frozen stages, gradients, depth sub-networks, build errors."""
import pytest
import torch
import torch.nn.functional as F

from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock

import gradaug_det
from gradaug_det.modeling import (
    SlimBasicBlock,
    SlimBottleneckBlock,
    build_slimmable_resnet_backbone,
    build_slimmable_resnet_fpn_backbone,
)
from gradaug_det.slim import residual_blocks, set_depth_mask, slim_channels


def _input(size=64, seed=1):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("fpn", [False, True])
def test_bn_running_stats_frozen_below_full_width(bb, fpn):
    cfg = bb.make_cfg(18, MODEL__RESNETS__NORM="BN", MODEL__BACKBONE__FREEZE_AT=0)
    _, slim = bb.stock_and_slim(cfg, fpn=fpn)
    slim.train()
    before = _bn_state(slim)
    assert len(before) == 3 * 20  # 20 BN layers in R18 (stem, 16 block convs, 3 shortcuts)
    for w in (0.9, 0.5):
        with gradaug_det.width(slim, w):
            sum(v.sum() for v in slim(_input()).values()).backward()
    after = _bn_state(slim)
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed below full width"
    sum(v.sum() for v in slim(_input()).values()).backward()
    after = _bn_state(slim)
    for k in before:
        if k.endswith("num_batches_tracked"):
            assert after[k].item() == before[k].item() + 1, k
        else:
            assert not torch.equal(before[k], after[k]), f"{k} not updated at width 1.0"


@pytest.mark.parametrize("w", [1.0, 0.75, 0.5])
def test_frozen_stages_get_no_gradient(bb, w):
    cfg = bb.make_cfg(18, MODEL__RESNETS__NORM="BN", MODEL__BACKBONE__FREEZE_AT=2)
    _, slim = bb.stock_and_slim(cfg)
    slim.train()
    assert isinstance(slim.stem.conv1.norm, FrozenBatchNorm2d)
    assert isinstance(slim.res2[1].conv2.norm, FrozenBatchNorm2d)
    assert not isinstance(slim.res3[0].conv1.norm, FrozenBatchNorm2d)
    frozen_state = {k: v.clone() for k, v in slim.state_dict().items() if k.startswith(("stem.", "res2."))}
    with gradaug_det.width(slim, w):
        sum(v.square().sum() for v in slim(_input()).values()).backward()
    for name, p in slim.named_parameters():
        if name.startswith(("stem.", "res2.")):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None, name
    for k, v in slim.state_dict().items():
        if k in frozen_state:
            assert torch.equal(v, frozen_state[k]), k
    weight = slim.res4[0].conv1.weight
    kept_out, kept_in = slim_channels(256, w), slim_channels(128, w)
    assert weight.grad[:kept_out, :kept_in].abs().sum() > 0
    assert weight.grad[kept_out:].abs().sum() == 0 and weight.grad[:, kept_in:].abs().sum() == 0


def _stock_copy(slim_block):
    """detectron2's own block class holding ``slim_block``'s weights."""
    if isinstance(slim_block, SlimBottleneckBlock):
        block = BottleneckBlock(slim_block.in_channels, slim_block.out_channels,
                                bottleneck_channels=slim_block.conv1.out_channels,
                                stride=slim_block.stride, norm="FrozenBN",
                                stride_in_1x1=slim_block.conv1.stride != (1, 1))
    else:
        block = BasicBlock(slim_block.in_channels, slim_block.out_channels, stride=slim_block.stride,
                           norm="FrozenBN")
    block.load_state_dict(slim_block.state_dict(), strict=True)
    return block


def _stock_residual(block, x):
    if isinstance(block, BottleneckBlock):
        return block.conv3(F.relu(block.conv2(F.relu(block.conv1(x)))))
    return block.conv2(F.relu(block.conv1(x)))


def _stock_shortcut(block, x):
    return x if block.shortcut is None else block.shortcut(x)


@pytest.mark.parametrize("depth, stage, index", [(18, "res3", 0), (18, "res3", 1), (50, "res4", 0), (50, "res2", 2)])
def test_dropped_block_is_its_shortcut_and_eval_scale(bb, depth, stage, index):
    cfg = bb.make_cfg(depth)
    _, slim = bb.stock_and_slim(cfg)
    block = getattr(slim, stage)[index]
    assert isinstance(block, (SlimBasicBlock, SlimBottleneckBlock))
    stock = _stock_copy(block)
    x = F.relu(torch.randn(2, block.in_channels, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert (block.shortcut is None) == (index > 0)

    block.eval()
    torch.testing.assert_close(block(x), stock(x), rtol=1e-6, atol=1e-6)
    block.drop = True
    torch.testing.assert_close(block(x), F.relu(_stock_shortcut(stock, x)), rtol=1e-6, atol=1e-6)
    block.drop = False
    block.eval_scale = 0.25
    expected = F.relu(0.25 * _stock_residual(stock, x) + _stock_shortcut(stock, x))
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
    assert (block(x) - stock(x)).abs().max() > 1e-3  # the scale changed something
    block.train()  # eval_scale applies at evaluation only
    torch.testing.assert_close(block(x), stock(x), rtol=1e-6, atol=1e-6)


def test_depth_mask_on_whole_backbone(bb):
    cfg = bb.make_cfg(50)
    _, slim = bb.stock_and_slim(cfg)
    slim.eval()
    blocks = residual_blocks(slim)
    assert len(blocks) == 16
    keep = [True] * 16
    keep[1] = keep[4] = keep[9] = keep[14] = False
    x = _input()
    full = slim(x)
    with gradaug_det.depth(slim, keep):
        out = slim(x)
        assert [b.drop for b in blocks] == [not k for k in keep]
    assert not any(b.drop for b in blocks)
    # by hand, with detectron2's own blocks
    h = slim.stem(x)
    expected = {}
    i = 0
    for name in ("res2", "res3", "res4", "res5"):
        for block in getattr(slim, name):
            stock = _stock_copy(block).eval()
            h = stock(h) if keep[i] else F.relu(_stock_shortcut(stock, h))
            i += 1
        expected[name] = h
    bb.assert_same(out, expected, rel=1e-6)
    assert (full["res5"] - out["res5"]).abs().max() > 1e-2
    with gradaug_det.depth(slim, keep), gradaug_det.width(slim, 0.5):  # depth and width compose
        both = slim(x)
    assert torch.count_nonzero(both["res5"][:, 1024:]) == 0


def test_depth_context_restores_and_validates(bb):
    cfg = bb.make_cfg(18)
    _, slim = bb.stock_and_slim(cfg)
    blocks = residual_blocks(slim)
    assert len(blocks) == 8
    set_depth_mask(slim, [True] * 7 + [False])
    with pytest.raises(RuntimeError):
        with gradaug_det.depth(slim, [False] * 8):
            assert all(b.drop for b in blocks)
            raise RuntimeError("body failed")
    assert [b.drop for b in blocks] == [False] * 7 + [True]
    with pytest.raises(ValueError, match="7 entries but the model has 8"):
        set_depth_mask(slim, [True] * 7)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(MODEL__RESNETS__DEFORM_ON_PER_STAGE=[False, True, False, False]), "MODEL.RESNETS.DEFORM_ON_PER_STAGE"),
        (dict(MODEL__RESNETS__DEFORM_ON_PER_STAGE=[False, False, False, True]), "MODEL.RESNETS.DEFORM_ON_PER_STAGE"),
        (dict(MODEL__RESNETS__DEPTH=42), "MODEL.RESNETS.DEPTH=42"),
        (dict(MODEL__RESNETS__DEPTH=200), "MODEL.RESNETS.DEPTH=200"),
        (dict(MODEL__RESNETS__RES5_DILATION=3), "MODEL.RESNETS.RES5_DILATION"),
        (dict(MODEL__SLIMMABLE__CHANNEL_DIVISOR=0), "MODEL.SLIMMABLE.CHANNEL_DIVISOR"),
    ],
)
@pytest.mark.parametrize("fpn", [False, True])
def test_build_errors_name_the_key(bb, overrides, key, fpn):
    cfg = bb.make_cfg(50, **overrides)
    build = build_slimmable_resnet_fpn_backbone if fpn else build_slimmable_resnet_backbone
    with pytest.raises(ValueError) as info:
        build(cfg, ShapeSpec(channels=3))
    assert key in str(info.value)


@pytest.mark.parametrize("key, value", [("RES2_OUT_CHANNELS", 128), ("NUM_GROUPS", 2), ("RES5_DILATION", 2)])
def test_build_errors_basic_block_resnets(bb, key, value):
    cfg = bb.make_cfg(18)
    setattr(cfg.MODEL.RESNETS, key, value)
    with pytest.raises(ValueError, match=f"MODEL.RESNETS.{key}={value} is not supported for R18"):
        build_slimmable_resnet_backbone(cfg, ShapeSpec(channels=3))
