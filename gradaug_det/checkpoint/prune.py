"""Prune a slimmable detector to one width: a physically smaller detectron2 model.

A sub-network of width ``w`` uses only the leading channels of every slimmable layer
(:mod:`gradaug_det.slim`). :func:`prune_model` cuts those channels out for good:

* every :class:`~gradaug_det.slim.SlimConv2d` of the ResNet (and of the FPN when
  ``MODEL.SLIMMABLE.SLIM_FPN``) keeps the weight / bias rows and columns, and the norm
  parameters and buffers, of its active channels (grouped ``in_layout`` / ``out_layout``,
  ``slim_in`` / ``slim_out`` and ``MODEL.SLIMMABLE.CHANNEL_DIVISOR`` respected: the
  slicing asks each layer which channels it uses);
* the consumers of sliced features keep their outputs and lose the dead inputs: the FPN
  lateral convolutions when the FPN is not slimmed; with a slimmed FPN of ``k`` active
  channels, the RPN head's first convolution and the first layer of the box, mask and
  keypoint heads (their outputs, e.g. ``MODEL.RPN.CONV_DIMS``, keep the full size).

The result is described by a config for *stock* detectron2 modules: stock ``ResNet``
blocks, ``FPN``, ``StandardRPNHead`` and RoI heads, with ``MODEL.FPN.OUT_CHANNELS = k``.
Per-stage channel counts of a pruned ResNet generally break the stock ResNet rule
(``RES2_OUT_CHANNELS`` doubled per stage, 64 for R18/R34) after rounding, so:

* when the counts still follow the rule (e.g. R50 at width 0.5 or 0.75, or any model at
  width 1.0) the config uses ``build_resnet_fpn_backbone`` and stock keys only: plain
  ``detectron2.config.get_cfg()`` reads it;
* otherwise it uses :func:`gradaug_det.modeling.pruned.build_pruned_resnet_fpn_backbone`
  (registered in ``BACKBONE_REGISTRY`` when ``gradaug_det`` is imported), which reads
  explicit per-stage channel counts from ``MODEL.PRUNED_RESNET.*``
  (:func:`gradaug_det.config.add_pruned_config` adds the keys).

In eval mode a BN layer of a sub-network normalises with its sliced running statistics,
exactly what the pruned BN does, so the pruned model's outputs equal the slimmed model's
(:func:`gradaug_det.width`) up to float rounding, and so does its COCO AP.
"""
import copy
import logging
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model

from ..config import add_pruned_config
from ..modeling import SlimmableFPN, SlimmableResNet
from ..slim import DroppableBlock, SlimConv2d, check_width, sliced_conv_state, sliced_input_weight, width
from ..utils.parallel import unwrap_model

__all__ = [
    "pruned_channels",
    "prune_config",
    "prune_state_dict",
    "prune_model",
    "feature_difference",
]

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------
# Channels kept at a width
# ---------------------------------------------------------------------------------------
def _check_prunable(model: nn.Module, w: float) -> None:
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, SlimmableFPN) or not isinstance(backbone.bottom_up, SlimmableResNet):
        raise ValueError(
            f"Pruning needs a model whose backbone is built by MODEL.BACKBONE.NAME "
            f"'build_slimmable_resnet_fpn_backbone'; got {type(backbone).__name__}"
        )
    for name, block in model.named_modules():
        if isinstance(block, DroppableBlock) and (block.drop or block.eval_scale != 1.0):
            raise ValueError(
                f"{name} is dropped or scaled (depth sub-network / GRADAUG.DEPTH_EVAL_SCALE); "
                "pruning handles width only: set GRADAUG.DEPTH_EVAL_SCALE False"
            )
    if w == 1.0:
        return
    for name, m in model.named_modules():
        if isinstance(m, SlimConv2d) and m.slim_out and isinstance(m.norm, nn.GroupNorm):
            raise ValueError(
                f"{name}.norm is GroupNorm: a pruned GroupNorm would need per-layer group counts "
                "that stock detectron2 cannot build. Prune models with BN-type norms "
                "(MODEL.RESNETS.NORM / MODEL.FPN.NORM in FrozenBN, BN, SyncBN, '')."
            )


def pruned_channels(model: nn.Module, w: float) -> Dict:
    """Channel counts of ``model``'s sub-network of width ``w``.

    Asks each slimmable layer which channels it uses (``SlimConv2d.active_channels``),
    so the channel rule (``MODEL.SLIMMABLE.CHANNEL_DIVISOR``, grouped layouts) lives in
    one place.

    Args:
        model: a detector with a ``build_slimmable_resnet_fpn_backbone`` backbone.
        w: the width, in (0, 1].

    Returns:
        dict with ``stem`` (int), ``out`` and ``bottleneck`` (4 ints each, res2..res5),
        ``fpn`` (active FPN channels), ``fpn_full`` (FPN ``out_channels``).
    """
    model = unwrap_model(model)
    w = check_width(w)
    _check_prunable(model, w)
    bottom_up = model.backbone.bottom_up
    with width(model, w):
        stem = bottom_up.stem.conv1.active_channels()[1]
        out, bottleneck = [], []
        for stage in bottom_up.stages:
            block = stage[0]
            last = block.conv3 if hasattr(block, "conv3") else block.conv2
            out.append(last.active_channels()[1])
            bottleneck.append(block.conv1.active_channels()[1])
        fpn_full = model.backbone.output_shape()["p2"].channels
        first = model.backbone.output_convs[0]
        fpn = first.active_channels()[1] if isinstance(first, SlimConv2d) else fpn_full
    return {"stem": stem, "out": out, "bottleneck": bottleneck, "fpn": fpn, "fpn_full": fpn_full}


# ---------------------------------------------------------------------------------------
# Config of the pruned model
# ---------------------------------------------------------------------------------------
def _copy_common(dst: CfgNode, src: CfgNode) -> None:
    """Copy into ``dst`` the value of every key of ``dst`` that ``src`` also has."""
    for key, value in dst.items():
        if key not in src:
            continue
        if isinstance(value, CfgNode):
            _copy_common(value, src[key])
        else:
            dst[key] = copy.deepcopy(src[key])


def _stock_resnet_keys(cfg: CfgNode, ch: Dict) -> Optional[Dict[str, int]]:
    """Stock ``MODEL.RESNETS`` keys that express ``ch``, or None if the stock rule can't."""
    r = cfg.MODEL.RESNETS
    out, bott = ch["out"], ch["bottleneck"]
    if r.DEPTH in (18, 34):
        ok = out[0] == 64 and ch["stem"] == 64  # detectron2 asserts RES2_OUT_CHANNELS == 64
    else:
        ok = bott[0] % r.NUM_GROUPS == 0
    ok = ok and all(out[i] == out[0] * 2 ** i and bott[i] == bott[0] * 2 ** i for i in range(4))
    if not ok:
        return None
    return {"STEM_OUT_CHANNELS": ch["stem"], "RES2_OUT_CHANNELS": out[0],
            "WIDTH_PER_GROUP": r.WIDTH_PER_GROUP if r.DEPTH in (18, 34) else bott[0] // r.NUM_GROUPS}


def _rpn_conv_dims(model: nn.Module) -> List[int]:
    conv = model.proposal_generator.rpn_head.conv
    convs = list(conv) if isinstance(conv, nn.Sequential) else [conv]
    return [c.out_channels for c in convs]


def prune_config(cfg: CfgNode, model: nn.Module, w: float, weights: str = "") -> CfgNode:
    """Config of ``model`` pruned to width ``w``, for stock detectron2 modules.

    Every stock detectron2 key is copied from ``cfg``; gradaug-det's keys
    (``GRADAUG.*``, ``MODEL.SLIMMABLE.*``, ``TEST.SLIM_WIDTHS``) are left out. See the
    module docstring for when ``MODEL.PRUNED_RESNET`` is needed.

    Args:
        cfg: config of the slimmable model.
        model: the slimmable model built from ``cfg``.
        w: the width, in (0, 1].
        weights: ``MODEL.WEIGHTS`` of the pruned config (the pruned checkpoint).

    Returns:
        A new, unfrozen ``CfgNode``.
    """
    model = unwrap_model(model)
    ch = pruned_channels(model, w)
    stock = _stock_resnet_keys(cfg, ch)
    out = get_cfg()
    if stock is None:
        add_pruned_config(out)
    _copy_common(out, cfg)
    if stock is not None:
        out.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
        for key, value in stock.items():
            out.MODEL.RESNETS[key] = value
    else:
        out.MODEL.BACKBONE.NAME = "build_pruned_resnet_fpn_backbone"
        out.MODEL.PRUNED_RESNET.STEM_OUT_CHANNELS = ch["stem"]
        out.MODEL.PRUNED_RESNET.OUT_CHANNELS = list(ch["out"])
        out.MODEL.PRUNED_RESNET.BOTTLENECK_CHANNELS = list(ch["bottleneck"])
    out.MODEL.FPN.OUT_CHANNELS = ch["fpn"]
    if getattr(model, "proposal_generator", None) is not None and hasattr(model.proposal_generator, "rpn_head"):
        # The RPN conv keeps its full output width; "-1" would now mean the pruned input width.
        out.MODEL.RPN.CONV_DIMS = _rpn_conv_dims(model)
    out.MODEL.WEIGHTS = weights
    return out


# ---------------------------------------------------------------------------------------
# State dict of the pruned model
# ---------------------------------------------------------------------------------------
def _slice_slim_conv(conv: SlimConv2d) -> Dict[str, torch.Tensor]:
    """The tensors of ``conv`` (and its norm) that its current width uses: exactly those
    its forward convolves and normalises with (:meth:`SlimConv2d.channel_slice`)."""
    return sliced_conv_state(conv, conv.channel_slice())


def _slice_input(layer: nn.Module, channels: int, keep: int) -> Dict[str, torch.Tensor]:
    """Weights of ``layer`` reading only the leading ``keep`` of its ``channels`` input channels."""
    return {"weight": sliced_input_weight(layer, channels, keep)}


def _first_layer(head: nn.Module) -> nn.Module:
    for m in head.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            return m
    raise ValueError(f"{type(head).__name__} has no convolution or linear layer to prune")


def _fpn_consumers(model: nn.Module) -> List[nn.Module]:
    """First layer of every head that reads the FPN features."""
    layers = []
    pg = getattr(model, "proposal_generator", None)
    if pg is not None:
        if not hasattr(pg, "rpn_head"):
            raise ValueError(f"cannot prune the inputs of proposal generator {type(pg).__name__}")
        layers.append(_first_layer(pg.rpn_head))
    roi = getattr(model, "roi_heads", None)
    if roi is not None:
        for name in ("box_head", "mask_head", "keypoint_head"):
            head = getattr(roi, name, None)
            if head is None:
                continue
            heads = list(head) if isinstance(head, nn.ModuleList) else [head]  # cascade
            layers.extend(_first_layer(h) for h in heads)
    if pg is None and roi is None:
        raise ValueError(
            f"cannot find the heads of {type(model).__name__}; pruning supports "
            "MODEL.META_ARCHITECTURE 'GeneralizedRCNN' and 'ProposalNetwork'"
        )
    return layers


def prune_state_dict(model: nn.Module, w: float) -> "OrderedDict[str, torch.Tensor]":
    """State dict of ``model`` pruned to width ``w`` (same keys, smaller tensors).

    Args:
        model: a detector with a ``build_slimmable_resnet_fpn_backbone`` backbone.
        w: the width, in (0, 1].

    Returns:
        OrderedDict of contiguous tensor copies, in the order of ``model.state_dict()``.
    """
    model = unwrap_model(model)
    w = check_width(w)
    ch = pruned_channels(model, w)
    full = model.state_dict()
    names = {id(m): n for n, m in model.named_modules()}
    pruned: Dict[str, torch.Tensor] = {}

    def put(module, tensors):
        prefix = names[id(module)]
        for key, t in tensors.items():
            pruned[f"{prefix}.{key}"] = t

    with width(model, w):
        for m in model.modules():
            if isinstance(m, SlimConv2d):
                put(m, _slice_slim_conv(m))
        fpn = model.backbone
        kept = dict(zip(fpn.bottom_up.stage_names, ch["out"]))
        for i, feature in enumerate(fpn.in_features):
            lateral = fpn.lateral_convs[len(fpn.in_features) - 1 - i]
            if not isinstance(lateral, SlimConv2d):  # MODEL.SLIMMABLE.SLIM_FPN False
                put(lateral, _slice_input(lateral, lateral.in_channels, kept[feature]))
        if ch["fpn"] < ch["fpn_full"]:
            for layer in _fpn_consumers(model):
                put(layer, _slice_input(layer, ch["fpn_full"], ch["fpn"]))
    return OrderedDict((k, pruned.get(k, v).detach().clone().contiguous()) for k, v in full.items())


# ---------------------------------------------------------------------------------------
# Whole model, checkpoints, statistics
# ---------------------------------------------------------------------------------------
def prune_model(model: nn.Module, cfg: CfgNode, w: float, weights: str = "") -> Tuple[CfgNode, nn.Module]:
    """Prune ``model`` to width ``w``: a detectron2 model with its sub-network's weights (stock
    modules, the ResNet too where :func:`prune_config` can express it with stock keys).

    Args:
        model: a slimmable detector built from ``cfg`` (weights loaded).
        cfg: its config.
        w: the width, in (0, 1].
        weights: ``MODEL.WEIGHTS`` written into the pruned config.

    Returns:
        ``(pruned_cfg, pruned_model)``; the pruned model is on ``cfg.MODEL.DEVICE``, in
        the training mode of ``model``.

    Raises:
        RuntimeError: if the pruned weights do not fit the model the pruned config builds
            (a bug, or a head this module does not know).
    """
    model = unwrap_model(model)
    pruned_cfg = prune_config(cfg, model, w, weights)
    state = prune_state_dict(model, w)
    pruned_model = build_model(pruned_cfg)
    try:
        pruned_model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise RuntimeError(
            f"The weights pruned to width {w} do not fit the pruned model "
            f"(MODEL.BACKBONE.NAME {pruned_cfg.MODEL.BACKBONE.NAME}): {e}"
        ) from None
    pruned_model.train(model.training)
    return pruned_cfg, pruned_model


def feature_difference(model: nn.Module, pruned_model: nn.Module, w: float, height: int = 256,
                       width_: int = 256, seed: int = 0) -> float:
    """Largest relative difference between the pruned and the slimmed backbone features.

    Both backbones run in eval mode on one random image; at width ``w`` the slimmable
    backbone's features hold the sub-network's channels first (zeros after), which must
    equal the pruned backbone's features. A value around 1e-6 is float rounding.

    Args:
        model: the slimmable detector.
        pruned_model: the output of :func:`prune_model` for ``w``.
        w: the width the model was pruned at.
        height, width_: input size in pixels.
        seed: seed of the random image.

    Returns:
        ``max |slim - pruned| / max(1, max |slim|)`` over all feature levels.
    """
    model, pruned_model = unwrap_model(model), unwrap_model(pruned_model)
    param = next(model.backbone.parameters())
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 3, height, width_, generator=g).to(param.device, param.dtype)
    modes = (model.training, pruned_model.training)
    model.eval()
    pruned_model.eval()
    try:
        with torch.no_grad(), width(model, w):
            slim = model.backbone(image)
            pruned = pruned_model.backbone(image)
    finally:
        model.train(modes[0])
        pruned_model.train(modes[1])
    worst = 0.0
    for key, p in pruned.items():
        s = slim[key][:, : p.shape[1]]
        if p.shape != s.shape:
            raise RuntimeError(f"pruned feature {key} has shape {tuple(p.shape)}, slimmed {tuple(s.shape)}")
        scale = max(1.0, s.abs().max().item())
        worst = max(worst, (s - p).abs().max().item() / scale)
    return worst
