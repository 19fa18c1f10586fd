"""Shared helpers of the backbone tests, exposed as the ``bb`` fixture.

The central helper is :func:`sliced_reference`: a *stock* detectron2 ResNet (or
ResNet-FPN) built by hand with the channel counts a sub-network keeps, holding the
slimmable model's weights physically sliced to those channels. A sub-width forward
of the slimmable model must equal its forward on the kept channels.
"""
import types

import pytest
import torch
from torch import nn

from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.fpn import (
    FPN,
    LastLevelMaxPool,
    LastLevelP6P7,
    build_resnet_fpn_backbone,
    build_retinanet_resnet_fpn_backbone,
)
from detectron2.modeling.backbone.resnet import (
    BasicBlock,
    BasicStem,
    BottleneckBlock,
    ResNet,
    build_resnet_backbone,
)

import gradaug_det
from gradaug_det.modeling import (
    build_slimmable_resnet_backbone,
    build_slimmable_resnet_fpn_backbone,
    build_slimmable_retinanet_resnet_fpn_backbone,
)
from gradaug_det.slim import slim_channels

ALL_RES = ["res2", "res3", "res4", "res5"]
BLOCKS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}


def make_cfg(depth=50, **overrides):
    """``get_cfg()`` + gradaug keys, all four ResNet stages out, dotted-key overrides.

    Args:
        depth: ``MODEL.RESNETS.DEPTH``.
        **overrides: ``{"MODEL__RESNETS__NORM": "BN"}``-style keys (``__`` for dots).
    """
    cfg = get_cfg()
    gradaug_det.add_gradaug_config(cfg)
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.OUT_FEATURES = list(ALL_RES)
    cfg.MODEL.FPN.IN_FEATURES = list(ALL_RES)
    if depth in (18, 34):
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    for key, value in overrides.items():
        node, *path, leaf = key.split("__")
        node = getattr(cfg, node)
        for part in path:
            node = getattr(node, part)
        assert hasattr(node, leaf), key
        setattr(node, leaf, value)
    return cfg


def randomize_(model, seed=0):
    """Non-trivial norm parameters / running statistics and biases (stock init is 1/0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.dim() != 1:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75)
            elif name.endswith("norm.weight"):
                t.copy_(torch.rand(t.shape, generator=g) * 0.4 + 0.6)
            else:  # biases, running means
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model


#: (stock builder, slimmable twin) by the ``fpn`` argument of the helpers below.
BUILDERS = {
    False: (build_resnet_backbone, build_slimmable_resnet_backbone),
    True: (build_resnet_fpn_backbone, build_slimmable_resnet_fpn_backbone),
    "retinanet": (build_retinanet_resnet_fpn_backbone, build_slimmable_retinanet_resnet_fpn_backbone),
}


def stock_and_slim(cfg, fpn=False, seed=0):
    """Build stock detectron2 and the slimmable backbone from ``cfg``; slim loads stock's weights.

    Args:
        fpn: False (ResNet), True (ResNet-FPN) or ``"retinanet"`` (ResNet-FPN with P6/P7 from C5).
    """
    torch.manual_seed(seed)
    shape = ShapeSpec(channels=3)
    stock_builder, slim_builder = BUILDERS[fpn]
    stock = stock_builder(cfg, shape)
    slim = slim_builder(cfg, shape)
    randomize_(stock, seed)
    slim.load_state_dict(stock.state_dict(), strict=True)
    return stock, slim


def _group_index(channels, groups, keep_per_group):
    per = channels // groups
    return torch.tensor([g * per + i for g in range(groups) for i in range(keep_per_group)])


def _grouped_dim(name, dim):
    """Whether dim ``dim`` of state-dict entry ``name`` uses the per-group (ResNeXt) layout."""
    if "stem." in name or ".shortcut." in name:
        return False
    if ".conv1." in name or ".conv2." in name:
        return dim == 0 and not name.endswith("num_batches_tracked")
    if ".conv3.weight" in name:
        return dim == 1
    return False


def copy_sliced_(narrow, full_state, groups=1):
    """Load into ``narrow`` the leading-channel slices of ``full_state``.

    Dims that differ in size are cut to the narrow size: leading channels, or, for the
    per-group dims of grouped bottlenecks, the leading channels of every group.
    """
    state = {}
    for name, t in narrow.state_dict().items():
        full = full_state[name]
        for dim, size in enumerate(t.shape):
            if full.shape[dim] == size:
                continue
            if groups > 1 and _grouped_dim(name, dim):
                full = full.index_select(dim, _group_index(full.shape[dim], groups, size // groups))
            else:
                full = full.narrow(dim, 0, size)
        state[name] = full.clone()
    narrow.load_state_dict(state, strict=True)
    return narrow


def sliced_reference(cfg, slim_model, w, fpn=False):
    """Stock detectron2 backbone with the channels ``slim_model`` keeps at width ``w``.

    Built by hand from detectron2's ``BasicStem``, ``BasicBlock`` / ``BottleneckBlock``
    (``ResNet.make_stage``), ``ResNet`` and ``FPN``, with ``slim_model``'s weights sliced
    in. GroupNorm layers get the full layer's channels per group (whole groups kept).
    ``fpn``: as in :func:`stock_and_slim` (``"retinanet"``: P6/P7 from the kept C5).
    """
    r = cfg.MODEL.RESNETS
    d = cfg.MODEL.SLIMMABLE.CHANNEL_DIVISOR
    groups = r.NUM_GROUPS

    def keep(c):
        return slim_channels(c, w, d)

    def keep_grouped(c):
        return keep(c) if groups == 1 else groups * slim_channels(c // groups, w, 1)

    stem = BasicStem(3, keep(r.STEM_OUT_CHANNELS), r.NORM)
    in_c, out_c, bottleneck = r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS, groups * r.WIDTH_PER_GROUP
    stages = []
    for idx, n in enumerate(BLOCKS[r.DEPTH]):
        dilation = r.RES5_DILATION if idx == 3 else 1
        stride = 1 if idx == 0 or dilation == 2 else 2
        kwargs = dict(num_blocks=n, stride_per_block=[stride] + [1] * (n - 1), in_channels=keep(in_c),
                      out_channels=keep(out_c), norm=r.NORM)
        if r.DEPTH < 50:
            kwargs["block_class"] = BasicBlock
        else:
            kwargs.update(block_class=BottleneckBlock, bottleneck_channels=keep_grouped(bottleneck),
                          num_groups=groups, stride_in_1x1=r.STRIDE_IN_1X1, dilation=dilation)
        stages.append(ResNet.make_stage(**kwargs))
        in_c, out_c, bottleneck = out_c, out_c * 2, bottleneck * 2
    net = ResNet(stem, stages, out_features=list(r.OUT_FEATURES), freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)
    if fpn:
        fpn_channels = cfg.MODEL.FPN.OUT_CHANNELS
        fpn_channels = keep(fpn_channels) if cfg.MODEL.SLIMMABLE.SLIM_FPN else fpn_channels
        if fpn == "retinanet":
            top_block = LastLevelP6P7(net.output_shape()["res5"].channels, fpn_channels)
        else:
            top_block = LastLevelMaxPool()
        net = FPN(bottom_up=net, in_features=cfg.MODEL.FPN.IN_FEATURES, out_channels=fpn_channels,
                  norm=cfg.MODEL.FPN.NORM, top_block=top_block, fuse_type=cfg.MODEL.FPN.FUSE_TYPE)
    for name, m in list(net.named_modules()):
        if isinstance(m, nn.GroupNorm):
            full = slim_model.get_submodule(name)
            per_group = full.num_channels // full.num_groups
            parent, _, leaf = name.rpartition(".")
            setattr(net.get_submodule(parent), leaf, nn.GroupNorm(m.num_channels // per_group, m.num_channels))
    net.to(next(slim_model.parameters()).dtype)
    copy_sliced_(net, slim_model.state_dict(), groups)
    return net.train(slim_model.training)


def scale(t):
    """Tolerance scale of a feature map."""
    return max(1.0, t.abs().max().item())


def assert_same(a, b, rel=1e-6):
    """Same keys and shapes; values equal up to ``rel`` times the feature's magnitude."""
    assert list(a) == list(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        diff = (a[k] - b[k]).abs().max().item()
        assert diff <= rel * scale(a[k]), f"{k}: max abs diff {diff}"


def assert_sub_width(out, ref, channels, rel=2e-5):
    """``out`` (slimmable, padded) holds ``ref`` (narrow stock) in its leading channels, zeros after."""
    assert list(out) == list(ref)
    for k in out:
        c = ref[k].shape[1]
        assert out[k].shape[1] == channels[k], k
        assert out[k].shape[2:] == ref[k].shape[2:], k
        assert c < channels[k], f"{k}: width did not shrink the feature"
        diff = (out[k][:, :c] - ref[k]).abs().max().item()
        assert diff <= rel * scale(ref[k]), f"{k}: max abs diff {diff} (scale {scale(ref[k])})"
        assert torch.count_nonzero(out[k][:, c:]) == 0, f"{k}: channels after the kept ones are not zero"
        assert torch.count_nonzero(ref[k]) > 0


@pytest.fixture(autouse=True)
def _one_thread():
    """Run each test single-threaded: on a small shared CPU, intra-op threads that wait
    for a busy core make these tiny forwards ~10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def bb():
    """The helpers of this module, as a namespace."""
    return types.SimpleNamespace(
        make_cfg=make_cfg, randomize_=randomize_, stock_and_slim=stock_and_slim,
        sliced_reference=sliced_reference, copy_sliced_=copy_sliced_, assert_same=assert_same,
        assert_sub_width=assert_sub_width, group_index=_group_index, ALL_RES=ALL_RES,
    )
