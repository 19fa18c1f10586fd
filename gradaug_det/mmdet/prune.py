"""Prune an mmdet GradAug detector to one width: a narrow model of stock mmdet types.

The mmdet counterpart of :mod:`gradaug_det.checkpoint.prune` (the detectron2 surgery) and
of :mod:`gradaug_det.deploy.prune` (its workflow), for ``tools/mmdet_prune.py``. The width-``w``
sub-network of a ``SlimmableResNet`` (+ ``SlimmableFPN`` or stock ``FPN``) detector becomes a
detector of stock mmdet types: ``ResNet`` with narrower ``stem_channels`` /
``base_channels``, ``FPN`` with the narrow ``in_channels`` / ``out_channels``, the heads
reading the FPN with ``in_channels`` (RoI extractors ``out_channels``) set to the FPN's
width; the detector type is the GradAug detector's stock base (``GradAugMaskRCNN`` ->
``MaskRCNN``). Its config and checkpoint load in plain mmdet: no ``custom_imports``.

Which channels are kept is not decided here: a probe forward of the slimmable backbone and
neck at width ``w`` records the weight every convolution actually convolves with (the
channel rule, :func:`gradaug_det.slim.channels.slim_channels`, is applied by the slimmable
layers themselves), and each norm layer keeps the channels of the convolution before it.

A stock ``ResNet`` has ``base_channels * 2**i`` channels in stage ``i`` (times the block's
expansion at its output). Where the rounded counts of the sub-network do not double from
stage to stage (e.g. R18 at width 0.9: 58, 115, 230, 461), the smallest ``base_channels``
that holds every stage is used and the extra channels are zero: zero weights, and BN with
weight 0, bias 0, running mean 0 and variance 1, so they output exactly 0 and the model
computes the same function (also in training mode: their gradients are 0). The tool prints
how many such channels were added; at widths whose counts double (R18 / R50 at 0.5 and
0.75 with ``channel_divisor`` 1) there are none.

The heads keep their layers; the first layer of each head behind a slimmable FPN loses the
inputs of the FPN's dropped channels (:func:`gradaug_det.slim.sliced_input_weight`), which
the slimmable model fed with zeros. So in eval mode the pruned detector's outputs equal the
slimmable one's at width ``w`` up to float32 rounding (sums over fewer zero terms).

Supported: ``FasterRCNN``, ``MaskRCNN``, ``CascadeRCNN`` (also Cascade Mask R-CNN) and
``RetinaNet`` and their GradAug detectors, a ``SlimmableResNet`` backbone with BN / SyncBN
and an ``FPN`` / ``SlimmableFPN`` neck without GroupNorm (a pruned GN would need per-layer
group counts); other models are refused by :func:`check_prunable_config` before any work.
"""
import contextlib
import copy
import logging
import math
import os
from collections import OrderedDict
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from mmengine.config import Config, ConfigDict
from mmengine.registry import HOOKS, MODEL_WRAPPERS, DefaultScope
from mmdet.models.detectors import CascadeRCNN, FasterRCNN, MaskRCNN, RetinaNet
from mmdet.models.necks import FPN
from mmdet.registry import MODELS

from ..slim import check_width, sliced_input_weight, width
from ..slim.calibration import batch_norm_layers, calibrated_bn, check_calibration_batches
from ..slim.settings import RECORD_KEY, check_record, strict_slimmable_settings
from ..utils.analysis import count_parameters
from ..utils.io import atomic_torch_save, atomic_write, check_input_file, check_output_path
from ..utils.parallel import unwrap_model
from .calibration import calibration_forward, train_batches
from .checkpoint import load_mmengine_checkpoint
from .config import load_runner_config
from .fpn import SlimmableFPN
from .resnet import SlimmableResNet

logger = logging.getLogger(__name__)

__all__ = [
    "SUPPORTED_DETECTORS",
    "check_prunable_config",
    "stock_type",
    "PrunedDetector",
    "prune_detector",
    "pruned_file_config",
    "prune_mmdet_checkpoint",
    "feature_difference",
]

#: The stock detectors whose GradAug (or slimmable-backbone) versions can be pruned.
SUPPORTED_DETECTORS = (FasterRCNN, MaskRCNN, CascadeRCNN, RetinaNet)
_ROI_HEADS = ("StandardRoIHead", "CascadeRoIHead")
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
_INPUT_LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def _resolve(type_, key: str):
    """The class a config's ``type`` names (a class is returned as is)."""
    if not isinstance(type_, str):
        return type_
    cls = MODELS.get(type_)
    if cls is None:
        raise ValueError(f"{key}.type={type_!r} is not a registered mmdet model type")
    return cls


def stock_type(cls: type) -> str:
    """The registered name of the first class in ``cls``'s MRO that is not gradaug_det's
    (``GradAugMaskRCNN`` -> ``"MaskRCNN"``, ``SlimmableResNet`` -> ``"ResNet"``).

    Raises:
        ValueError: no base class of ``cls`` is a registered mmdet model.
    """
    for base in cls.__mro__:
        if base.__module__.startswith("gradaug_det"):
            continue
        if MODELS.get(base.__name__) is base:
            return base.__name__
    raise ValueError(f"{cls.__name__} has no stock mmdet base class")


def check_prunable_config(model_cfg: Dict, w: float) -> None:
    """Refuse, before any work, a model ``tools/mmdet_prune.py`` cannot prune to stock types.

    Args:
        model_cfg: the config's ``model`` dict.
        w: the width.

    Raises:
        ValueError: one line naming the config key, its value and what is allowed: ``w``
            outside (0, 1]; a backbone other than ``SlimmableResNet`` (not a GradAug model); a
            neck other than ``FPN`` / ``SlimmableFPN``; a detector other than
            :data:`SUPPORTED_DETECTORS`' (or an RoI head other than ``StandardRoIHead`` /
            ``CascadeRoIHead``); GroupNorm in the backbone or neck at ``w < 1``.
    """
    w = check_width(w)
    backbone = model_cfg.get("backbone") or {}
    backbone_cls = _resolve(backbone.get("type"), "model.backbone")
    if not (isinstance(backbone_cls, type) and issubclass(backbone_cls, SlimmableResNet)):
        raise ValueError(
            f"model.backbone.type={backbone.get('type')!r}: only GradAug models with a slimmable backbone "
            "(model.backbone.type='SlimmableResNet') can be pruned to a width")
    neck = model_cfg.get("neck")
    neck_cls = _resolve(neck.get("type"), "model.neck") if isinstance(neck, dict) else None
    if neck_cls not in (FPN, SlimmableFPN):
        shown = neck.get("type") if isinstance(neck, dict) else neck
        raise ValueError(f"model.neck.type={shown!r}: pruning supports an 'FPN' or 'SlimmableFPN' neck")
    detector = _resolve(model_cfg.get("type"), "model")
    if not (isinstance(detector, type) and issubclass(detector, SUPPORTED_DETECTORS)):
        allowed = ", ".join(c.__name__ for c in SUPPORTED_DETECTORS)
        raise ValueError(f"model.type={model_cfg.get('type')!r}: pruning supports {allowed} and their GradAug "
                         "detectors")
    roi = model_cfg.get("roi_head")
    roi_type = getattr(roi.get("type"), "__name__", roi.get("type")) if roi is not None else None
    if roi is not None and roi_type not in _ROI_HEADS:
        raise ValueError(f"model.roi_head.type={roi_type!r}: pruning supports {', '.join(_ROI_HEADS)}")
    if w < 1.0:
        for key, part in (("model.backbone", backbone), ("model.neck", neck)):
            norm = (part.get("norm_cfg") or {}).get("type")
            if norm == "GN":
                raise ValueError(
                    f"{key}.norm_cfg.type='GN': a pruned GroupNorm would need per-layer group counts that a "
                    "stock ResNet / FPN cannot build; prune models with BN or SyncBN")


# ---------------------------------------------------------------------------------------
# Which channels the sub-network uses
# ---------------------------------------------------------------------------------------
def _kept_channels(model: nn.Module, w: float, size: int = 64) -> Dict[nn.Conv2d, Tuple[int, int]]:
    """``{conv: (input channels, output channels)}`` that every convolution of the backbone and
    the neck convolves with at width ``w``: recorded from one eval-mode forward on a random
    image (the weight each convolution is given), so the slimmable layers' own channel rule
    decides."""
    convs = [m for part in (model.backbone, model.neck) for m in part.modules() if isinstance(m, nn.Conv2d)]
    seen: Dict[nn.Conv2d, Tuple[int, int]] = {}

    def recorder(conv):
        forward = conv._conv_forward

        def record(x, weight, bias):
            seen[conv] = (weight.shape[1] * conv.groups, weight.shape[0])
            return forward(x, weight, bias)
        return record

    param = next(model.backbone.parameters())
    image = torch.randn(1, model.backbone.conv1.in_channels if not model.backbone.deep_stem
                        else model.backbone.stem[0].in_channels, size, size,
                        generator=torch.Generator().manual_seed(0)).to(param.device, param.dtype)
    training = model.training
    model.eval()
    try:
        for conv in convs:
            conv._conv_forward = recorder(conv)
        with torch.no_grad(), width(model, w):
            model.neck(model.backbone(image))
    finally:
        for conv in convs:
            del conv._conv_forward  # the class's method again
        model.train(training)
    missing = [n for n, m in model.named_modules() if m in convs and m not in seen]
    if missing:
        raise RuntimeError(f"the probe forward did not run {', '.join(missing)}")
    return seen


def _norm_channels(part: nn.Module, kept: Dict[nn.Conv2d, Tuple[int, int]]) -> Dict[nn.Module, int]:
    """Channels every norm layer of ``part`` keeps: those of the convolution registered just
    before it (mmdet's ResNet blocks, stems, shortcuts and mmcv's ``ConvModule`` all register
    a convolution, then its norm)."""
    out, last = {}, None
    for name, m in part.named_modules():
        if isinstance(m, nn.Conv2d):
            last = m
        elif isinstance(m, _NORMS):
            full = getattr(m, "num_features", None) or getattr(m, "num_channels", None)
            if last is None or last.out_channels != full:
                raise RuntimeError(f"cannot tell which convolution {name} normalises")
            out[m] = kept[last][1]
    return out


class _ResNetLayout(NamedTuple):
    stem_channels: int
    base_channels: int
    stage_out: List[int]  # the stock ResNet's output channels per stage
    active_out: List[int]  # channels of the sub-network per stage (the others are zero)


def _resnet_layout(backbone: SlimmableResNet, kept: Dict[nn.Conv2d, Tuple[int, int]]) -> _ResNetLayout:
    """The smallest stock ``ResNet`` (``stem_channels``, ``base_channels``) that holds the
    sub-network's channels in every layer, with the same blocks and shortcuts."""
    exp = backbone.block.expansion
    stem_convs = [m for m in backbone.stem if isinstance(m, nn.Conv2d)] if backbone.deep_stem else [backbone.conv1]
    stem = kept[stem_convs[-1]][1]
    if backbone.deep_stem:  # mmdet's deep stem: stem // 2, stem // 2, stem channels
        stem = max(stem, 2 * max(kept[c][1] for c in stem_convs[:-1]))
    base, active = 1, []
    for i, name in enumerate(backbone.res_layers):
        for block in getattr(backbone, name):
            convs = [block.conv1, block.conv2] + ([block.conv3] if hasattr(block, "conv3") else [])
            for c in convs[:-1]:
                base = max(base, math.ceil(kept[c][1] / 2 ** i))
            base = max(base, math.ceil(kept[convs[-1]][1] / (exp * 2 ** i)))
        active.append(kept[convs[-1]][1])
    # stock ResNet adds a shortcut convolution to res2's first block iff its stride is not 1
    # or the stem's channels differ from the block's output: keep the slimmable model's choice
    first = getattr(backbone, backbone.res_layers[0])[0]
    if first.downsample is None:
        base = max(base, math.ceil(stem / exp))
        stem = base * exp
    elif backbone.strides[0] == 1 and stem == base * exp:
        stem += 1  # one zero channel keeps the shortcut convolution
    return _ResNetLayout(stem, base, [base * exp * 2 ** i for i in range(len(backbone.res_layers))], active)


def _neck_inputs(neck: FPN, active_in: List[int]) -> Dict[nn.Conv2d, int]:
    """Input channels the sub-network uses in the FPN convolutions that read backbone features
    (the laterals, and an ``add_extra_convs='on_input'`` convolution), given the sub-network's
    channels of each backbone output (``active_in``, in ``out_indices`` order). The slimmable
    backbone pads its outputs with zeros, so the probe sees these convolutions read all of them."""
    out = {}
    for i, lateral in enumerate(neck.lateral_convs):
        out[lateral.conv] = active_in[i + neck.start_level]
    if neck.add_extra_convs == "on_input" and len(neck.fpn_convs) > len(neck.lateral_convs):
        out[neck.fpn_convs[len(neck.lateral_convs)].conv] = active_in[neck.backbone_end_level - 1]
    return out


# ---------------------------------------------------------------------------------------
# The pruned model's config
# ---------------------------------------------------------------------------------------
def _each(node) -> List[Dict]:
    """A head config, or every one of a list of them (Cascade R-CNN's stages)."""
    if node is None:
        return []
    return list(node) if isinstance(node, (list, tuple)) else [node]


def _pruned_model_config(model: nn.Module, model_cfg: Dict, layout: _ResNetLayout, fpn_channels: int) -> Dict:
    cfg = copy.deepcopy(dict(model_cfg))
    cfg["type"] = stock_type(type(model))
    cfg.pop("gradaug", None)
    backbone = dict(cfg["backbone"])
    for key in ("channel_divisor", "channel_rule", "pretrained"):
        backbone.pop(key, None)
    backbone.update(type=stock_type(type(model.backbone)), stem_channels=layout.stem_channels,
                    base_channels=layout.base_channels, init_cfg=None)  # the weights are the checkpoint's
    cfg["backbone"] = backbone
    neck = dict(cfg["neck"])
    for key in ("channel_divisor", "channel_rule"):
        neck.pop(key, None)
    neck.update(type=stock_type(type(model.neck)),
                in_channels=[layout.stage_out[i] for i in model.backbone.out_indices], out_channels=fpn_channels)
    cfg["neck"] = neck
    if fpn_channels != model.neck.out_channels:  # the heads read the narrow FPN
        for head in _each(cfg.get("rpn_head")) + _each(cfg.get("bbox_head")):
            head["in_channels"] = fpn_channels
        roi = cfg.get("roi_head") or {}
        for key in ("bbox_roi_extractor", "mask_roi_extractor"):
            for extractor in _each(roi.get(key)):
                extractor["out_channels"] = fpn_channels
        for key in ("bbox_head", "mask_head"):
            for head in _each(roi.get(key)):
                head["in_channels"] = fpn_channels
    return cfg


# ---------------------------------------------------------------------------------------
# The pruned model's weights
# ---------------------------------------------------------------------------------------
def _own_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    """The module's own parameters and persistent buffers (not its children's)."""
    return {k: v for k, v in module.state_dict().items() if "." not in k}


def _fill_conv(target: nn.Conv2d, source: nn.Conv2d, cin: int, cout: int) -> Dict[str, torch.Tensor]:
    weight = source.weight.new_zeros(target.weight.shape)
    weight[:cout, :cin] = source.weight[:cout, :cin]
    out = {"weight": weight}
    if target.bias is not None:
        bias = source.bias.new_zeros(target.bias.shape)
        bias[:cout] = source.bias[:cout]
        out["bias"] = bias
    return out


def _fill_norm(target: nn.Module, source: nn.Module, keep: int) -> Dict[str, torch.Tensor]:
    out = {}
    for key, t in _own_state(source).items():
        shape = target.state_dict()[key].shape
        if t.dim() == 0:
            out[key] = t.clone()
            continue
        filled = t.new_ones(shape) if key == "running_var" else t.new_zeros(shape)
        filled[:keep] = t[:keep]
        out[key] = filled
    return out


def _fill_head_layer(name: str, target: nn.Module, source: nn.Module, full: int, keep: int) -> Dict[str, torch.Tensor]:
    out = {}
    for key, t in _own_state(source).items():
        shape = target.state_dict()[key].shape
        if t.shape == shape:
            out[key] = t.clone()
        elif key == "weight" and isinstance(source, _INPUT_LAYERS):
            out[key] = sliced_input_weight(source, full, keep).clone()
        else:
            out[key] = t  # refused below
        if out[key].shape != shape:
            raise RuntimeError(f"cannot prune {name}.{key} from {tuple(t.shape)} to {tuple(shape)}: only the "
                               f"inputs of the layers that read the FPN ({full} -> {keep} channels) change")
    return out


def _pruned_state(model: nn.Module, pruned: nn.Module, kept, layout: _ResNetLayout, fpn_full: int,
                  fpn_channels: int) -> "OrderedDict[str, torch.Tensor]":
    source = dict(model.named_modules())
    norms = {**_norm_channels(model.backbone, kept), **_norm_channels(model.neck, kept)}
    neck_in = _neck_inputs(model.neck, [layout.active_out[i] for i in model.backbone.out_indices])
    state: Dict[str, torch.Tensor] = {}
    for name, target in pruned.named_modules():
        if not name or not (list(target.parameters(recurse=False)) or list(target.buffers(recurse=False))):
            continue
        src = source[name]
        if name.startswith(("backbone.", "neck.")):
            if isinstance(src, nn.Conv2d):
                cin, cout = kept[src]
                tensors = _fill_conv(target, src, neck_in.get(src, cin), cout)
            elif src in norms:
                tensors = _fill_norm(target, src, norms[src])
            else:
                raise RuntimeError(f"cannot prune {name} ({type(src).__name__})")
        else:
            tensors = _fill_head_layer(name, target, src, fpn_full, fpn_channels)
        for key, t in tensors.items():
            state[f"{name}.{key}"] = t.detach().contiguous()
    return OrderedDict((k, state[k]) for k in pruned.state_dict() if k in state)


class PrunedDetector(NamedTuple):
    """What :func:`prune_detector` returns.

    Attributes:
        model_cfg: the pruned model's ``model`` config (stock types only).
        model: the stock mmdet detector built from it, pruned weights loaded, in eval mode.
        info: ``width``; ``stem_channels``, ``base_channels``, ``stage_channels`` (output
            channels per stage) and ``fpn_channels`` of the pruned model;
            ``active_stage_channels`` (the sub-network's output channels per stage) and
            ``zero_channels`` (how many stage output channels were added to make a stock ResNet,
            all zero; see the module docstring; the stem and the blocks' inner layers may get
            zero channels too).
    """

    model_cfg: Dict
    model: nn.Module
    info: Dict[str, Any]


def prune_detector(model: nn.Module, model_cfg: Dict, w: float) -> PrunedDetector:
    """Cut ``model``'s sub-network of width ``w`` out as a detector of stock mmdet types.

    Args:
        model: the slimmable detector built from ``model_cfg``, weights loaded (BN statistics
            as they should be pruned, e.g. inside :func:`gradaug_det.slim.calibration.calibrated_bn`).
        model_cfg: its ``model`` config (:func:`check_prunable_config` passed).
        w: the width, in (0, 1].

    Returns:
        :class:`PrunedDetector`; the pruned model is on ``model``'s device.

    Raises:
        RuntimeError: the pruned weights do not fit the model the pruned config builds (a
            layer this module does not know).
    """
    w = check_width(w)
    check_prunable_config(model_cfg, w)
    kept = _kept_channels(model, w)
    layout = _resnet_layout(model.backbone, kept)
    fpn_full = model.neck.out_channels
    fpn_channels = kept[model.neck.fpn_convs[0].conv][1]
    pruned_cfg = _pruned_model_config(model, model_cfg, layout, fpn_channels)
    param = next(model.parameters())
    pruned = MODELS.build(ConfigDict(copy.deepcopy(pruned_cfg))).to(param.device)  # mmdet reads train_cfg.rpn
    state = _pruned_state(model, pruned, kept, layout, fpn_full, fpn_channels)
    try:
        pruned.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"the weights pruned to width {w:g} do not fit the pruned model: {e}") from None
    pruned.eval()
    zero = sum(s - a for s, a in zip(layout.stage_out, layout.active_out))
    info = {"width": w, "stem_channels": layout.stem_channels, "base_channels": layout.base_channels,
            "fpn_channels": fpn_channels, "active_stage_channels": list(layout.active_out),
            "stage_channels": list(layout.stage_out), "zero_channels": zero}
    return PrunedDetector(pruned_cfg, pruned, info)


# ---------------------------------------------------------------------------------------
# The config file, the check
# ---------------------------------------------------------------------------------------
def _gradaug_types(node, path: str = "") -> List[str]:
    """Config paths whose ``type`` names a class of gradaug_det (mmdet's models, mmengine's
    hooks and model wrappers)."""
    found = []
    if isinstance(node, dict):
        t = node.get("type")
        if isinstance(t, str):
            for registry in (MODELS, HOOKS, MODEL_WRAPPERS):
                cls = registry.get(t)
                if cls is not None and cls.__module__.startswith("gradaug_det"):
                    found.append(f"{path or 'the config'}.type={t!r}")
                    break
        elif isinstance(t, type) and t.__module__.startswith("gradaug_det"):
            found.append(f"{path or 'the config'}.type={t.__name__}")
        for k, v in node.items():
            found += _gradaug_types(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            found += _gradaug_types(v, f"{path}[{i}]")
    return found


def pruned_file_config(cfg_dict: Dict, pruned_model_cfg: Dict, checkpoint: str) -> Dict:
    """The whole config of the pruned model, to write as a ``.py`` mmdet config.

    ``cfg_dict`` (the slimmable model's config as a dict) with ``model`` replaced, its
    ``load_from`` set to ``checkpoint``, and gradaug_det's parts dropped: ``gradaug_det``
    from ``custom_imports``, its hooks from ``custom_hooks``, its ``model_wrapper_cfg``, and
    the keys the project's mmdet tools add (``launcher``, ``work_dir``).

    Raises:
        ValueError: another part of the config still names a gradaug_det type (it would not
            load without gradaug_det).
    """
    cfg = copy.deepcopy(dict(cfg_dict))
    cfg["model"] = copy.deepcopy(pruned_model_cfg)
    imports = cfg.get("custom_imports")
    if isinstance(imports, dict):
        names = imports.get("imports")
        names = [names] if isinstance(names, str) else list(names or [])
        names = [n for n in names if not n.split(".")[0] == "gradaug_det"]
        if names:
            cfg["custom_imports"] = dict(imports, imports=names)
        else:
            cfg.pop("custom_imports")

    def ours(entry, registry):
        t = entry.get("type") if isinstance(entry, dict) else None
        cls = registry.get(t) if isinstance(t, str) else t
        return isinstance(cls, type) and cls.__module__.startswith("gradaug_det")

    if cfg.get("custom_hooks"):
        cfg["custom_hooks"] = [h for h in cfg["custom_hooks"] if not ours(h, HOOKS)]
    if ours(cfg.get("model_wrapper_cfg"), MODEL_WRAPPERS):
        cfg.pop("model_wrapper_cfg")
    for key in ("launcher", "work_dir", "resume"):
        cfg.pop(key, None)
    cfg["load_from"] = checkpoint
    left = _gradaug_types(cfg)
    if left:
        raise ValueError(f"the pruned config would still need gradaug_det: {', '.join(left)}")
    return cfg


def feature_difference(model: nn.Module, pruned: nn.Module, w: float, size: int = 128, seed: int = 0) -> float:
    """Largest relative difference between the pruned and the slimmed FPN features.

    Both run in eval mode on one random ``size`` x ``size`` image; at width ``w`` the slimmable
    model's levels hold the sub-network's channels first (zeros after).

    Returns:
        ``max |slim - pruned| / max(1, max |slim|)`` over all levels (float32 rounding: ~1e-6).
    """
    param = next(model.parameters())
    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(param.device, param.dtype)
    modes = (model.training, pruned.training)
    model.eval()
    pruned.eval()
    try:
        with torch.no_grad(), width(model, w):
            slim = model.neck(model.backbone(image))
            cut = pruned.neck(pruned.backbone(image))
    finally:
        model.train(modes[0])
        pruned.train(modes[1])
    worst = 0.0
    for s, p in zip(slim, cut):
        s = s[:, : p.shape[1]]
        worst = max(worst, (s - p).abs().max().item() / max(1.0, s.abs().max().item()))
    return worst


# ---------------------------------------------------------------------------------------
# The workflow of tools/mmdet_prune.py
# ---------------------------------------------------------------------------------------
_CFG_HEADER = """\
# Written by tools/mmdet_prune.py: the width-{width:g} sub-network of
#   {config}
#   {source}
# as a detector of stock mmdet types ({types}); plain mmdet loads it without gradaug_det, e.g.
#   mmdet.apis.init_detector(<this file>, <load_from below>)
# ResNet stem_channels={stem}, base_channels={base}: stages of {stages} channels, of which the
# sub-network uses {active}{zero}; FPN out_channels={fpn}.{bncal}
"""


def prune_mmdet_checkpoint(config: str, checkpoint: str, w: float, output_dir: str, *,
                           cfg_options: Optional[Dict] = None, bn_calibration_batches: int = 0) -> Dict[str, Any]:
    """Prune an mmdet GradAug checkpoint to width ``w`` and write it as a stock mmdet model.

    Writes ``model_pruned_w<w>.pth`` (mmengine's ``{"meta", "state_dict"}``; ``meta`` holds
    the source's ``dataset_meta`` and ``gradaug_prune``: :attr:`PrunedDetector.info` and the
    source files) and ``config_pruned_w<w>.py`` (the whole config, its ``load_from`` the
    checkpoint) under ``output_dir``, each atomically. Every argument, the files and the model
    are checked before any work.

    Args:
        config: the slimmable model's mmdet config file.
        checkpoint: its checkpoint (loaded strictly, without running code from it; its slimmable
            settings must be the config's).
        w: the width, in (0, 1].
        output_dir: where to write; created if missing.
        cfg_options: config overrides (``--cfg-options``).
        bn_calibration_batches: N > 0: the BN statistics at width ``w`` are first recomputed from N
            batches of the config's ``train_dataloader`` (:mod:`gradaug_det.mmdet.calibration`,
            as ``tools/mmdet_test.py --bn-calibration-batches``); 0: the checkpoint's statistics.

    Returns:
        dict with ``checkpoint`` and ``config`` (paths), ``params`` / ``params_pruned``,
        ``feature_diff`` (:func:`feature_difference`), ``bn_calibration_batches`` (0 if none were
        used) and ``info`` (:attr:`PrunedDetector.info`).

    Raises:
        ValueError: a bad width, batch count, output path or model (one line).
        MissingFileError: no such config or checkpoint.
        SlimmableSettingsMismatch: the checkpoint was trained with other slimmable settings.
    """
    try:
        w = check_width(w)
    except ValueError as e:
        raise ValueError(f"--width: {e}") from None
    num_batches = check_calibration_batches(bn_calibration_batches, "--bn-calibration-batches")
    check_input_file(config, "CONFIG", extensions=(".py",))
    check_input_file(checkpoint, "CHECKPOINT", extensions=(".pth",))
    ckpt_path = os.path.abspath(os.path.join(output_dir, f"model_pruned_w{w:g}.pth"))
    cfg_path = os.path.join(output_dir, f"config_pruned_w{w:g}.py")
    check_output_path(ckpt_path, "--output", make_dirs=True)
    cfg = load_runner_config(config, cfg_options, work_dir=output_dir)
    model_cfg = cfg.to_dict()["model"]
    check_prunable_config(model_cfg, w)
    calibrate = num_batches > 0 and w < 1.0
    if calibrate and not cfg.get("train_dataloader"):
        raise ValueError(f"--bn-calibration-batches {num_batches}: {config} has no train_dataloader to calibrate "
                         "on; add one or drop the flag")

    source = load_mmengine_checkpoint(checkpoint)
    state = source.get("state_dict", source) if isinstance(source, dict) else source
    runner = None
    if calibrate:  # the training loader, built as training builds it (seeded by randomness.seed)
        from mmengine.runner import Runner

        runner = Runner.from_cfg(cfg)
        model = unwrap_model(runner.model)
    else:
        with DefaultScope.overwrite_default_scope(cfg.get("default_scope", "mmdet")):
            model = MODELS.build(copy.deepcopy(cfg.model))
    with strict_slimmable_settings("the pruned model is cut out of the sub-network of these settings"):
        check_record(model, source.get(RECORD_KEY) if isinstance(source, dict) else None, checkpoint)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)
        raise ValueError(f"CHECKPOINT {checkpoint} does not fit the model of {config}: {first.strip()}") from None
    if calibrate and not batch_norm_layers(model):
        logger.info("--bn-calibration-batches: the model has no BN layer with running statistics, nothing to "
                    "calibrate")
        calibrate = False

    with contextlib.ExitStack() as stack:
        if calibrate:
            stack.enter_context(calibrated_bn(model, w, train_batches(runner, cfg.train_dataloader), num_batches,
                                              calibration_forward))
        model.eval()
        with DefaultScope.overwrite_default_scope(cfg.get("default_scope", "mmdet")):
            pruned = prune_detector(model, model_cfg, w)
        diff = feature_difference(model, pruned.model, w)
    meta = dict(source.get("meta") or {}) if isinstance(source, dict) else {}
    info = dict(pruned.info, config=os.path.abspath(config), source=os.path.abspath(checkpoint),
                bn_calibration_batches=num_batches if calibrate else 0)
    out_meta = {"gradaug_prune": info}
    if meta.get("dataset_meta") is not None:
        out_meta["dataset_meta"] = meta["dataset_meta"]
    weights = OrderedDict((k, v.cpu()) for k, v in pruned.model.state_dict().items())
    file_cfg = pruned_file_config(cfg.to_dict(), pruned.model_cfg, ckpt_path)
    zero = info["zero_channels"]
    header = _CFG_HEADER.format(
        width=w, config=os.path.abspath(config), source=os.path.abspath(checkpoint),
        types=", ".join((file_cfg["model"]["type"], file_cfg["model"]["backbone"]["type"],
                         file_cfg["model"]["neck"]["type"])),
        stem=info["stem_channels"], base=info["base_channels"], stages=info["stage_channels"],
        active=info["active_stage_channels"],
        zero=f"\n# (the other {zero} are zero: a stock ResNet doubles its channels per stage)" if zero else "",
        fpn=info["fpn_channels"],
        bncal=(f"\n# BN statistics calibrated at width {w:g} on {info['bn_calibration_batches']} training batches."
               if info["bn_calibration_batches"] else ""))
    text = header + Config(file_cfg).pretty_text  # both files are ready before either is written
    atomic_torch_save({"meta": out_meta, "state_dict": weights}, ckpt_path)
    with atomic_write(cfg_path, "w") as f:
        f.write(text)
    logger.info(f"Wrote the width-{w:g} model to {ckpt_path} and its config to {cfg_path}")
    return {"checkpoint": ckpt_path, "config": cfg_path, "params": count_parameters(model),
            "params_pruned": count_parameters(pruned.model), "feature_diff": diff,
            "bn_calibration_batches": info["bn_calibration_batches"], "info": info}
