"""Convert ImageNet-pretrained ResNets into detectron2 checkpoints for detection models.

Two sources:

* a :class:`~gradaug_det.modeling.SlimmableClassifier` checkpoint (a detectron2
  ``Checkpointer`` ``.pth`` whose ``"model"`` holds ``backbone.*`` and ``head.*``),
  GradAug-trained or not;
* a torchvision ResNet / ResNeXt state dict (``conv1``, ``bn1``, ``layer1.0.conv1``,
  ``layer1.0.downsample.0``, ..., ``fc``).

A classifier can also go the other way, to torchvision's names
(:func:`convert_classifier_to_torchvision`): the layout mmdet's ``ResNet`` and
``gradaug_det.mmdet.SlimmableResNet`` load (``init_cfg=dict(type='Pretrained', ...)``).

Otherwise both become a detectron2 ``.pkl`` (``{"model": {name: ndarray}, "__author__":
"gradaug-det", "matching_heuristics": False, "gradaug_det": {...}}``) whose weights are
named **exactly** as the target detection model names them, so detectron2's
``DetectionCheckpointer`` loads them by plain name matching, without heuristics. The
``target`` layout says where the ResNet lives in that model:

==============  ================================================================
``"fpn"``       ``backbone.bottom_up.{stem,res2..res5}.*`` (R-CNN FPN, RetinaNet)
``"c4"``        ``backbone.{stem,res2..res4}.*`` and ``roi_heads.res5.*`` (R-CNN C4)
``"classifier"`` ``backbone.*`` and ``head.*`` (a ``SlimmableClassifier``)
``"heuristic"`` bare ``stem.*`` / ``res2.*`` names with ``matching_heuristics: True``,
                detectron2's own convention for ImageNet models (suffix matching)
==============  ================================================================

The ``"gradaug_det"`` entry records the input convention the weights were trained
with (``PIXEL_MEAN``, ``PIXEL_STD``, ``FORMAT``) and the ResNet shape (``DEPTH``,
``STRIDE_IN_1X1``, ...). :func:`check_pretrained_config` compares it with a detection
config and warns about every difference; :func:`pretrained_config_opts` gives the
config overrides that match it.

The three namings (classifier, detectron2, torchvision) are related in one place,
:data:`NAME_TABLE`, read in whichever direction a conversion needs (:func:`rename`).

Nothing is dropped silently: every source tensor that is not converted is logged
with the reason, and unknown names are an error. detectron2's ``DetectionCheckpointer``
(:class:`~gradaug_det.checkpoint.GradAugCheckpointer`) logs what did not load into a model.
"""
import functools
import logging
import re
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..config import slimmable_settings
from ..slim.settings import RECORD_KEY
from ..utils.io import atomic_pickle_dump, atomic_torch_save
from .io import load_weights_file

__all__ = [
    "TARGETS",
    "TORCHVISION_PIXEL_MEAN",
    "TORCHVISION_PIXEL_STD",
    "TORCHVISION_FORMAT",
    "NAME_TABLE",
    "NAMINGS",
    "rename",
    "torchvision_to_d2",
    "classifier_to_d2",
    "d2_to_torchvision",
    "convert_classifier_to_torchvision",
    "resnet_arch",
    "make_d2_checkpoint",
    "convert_torchvision",
    "convert_classifier",
    "save_d2_checkpoint",
    "read_pretrained_meta",
    "pretrained_config_opts",
    "check_pretrained_config",
]

logger = logging.getLogger(__name__)

TARGETS = ("fpn", "c4", "classifier", "heuristic")
#: torchvision's normalisation, in detectron2's 0-255 scale (RGB).
TORCHVISION_PIXEL_MEAN = (123.675, 116.280, 103.530)
TORCHVISION_PIXEL_STD = (58.395, 57.120, 57.375)
TORCHVISION_FORMAT = "RGB"

_BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var")
_STAGE_BLOCKS = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 34, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}

StateDict = Dict[str, Union[torch.Tensor, np.ndarray]]


def _strip_module_prefix(state: StateDict) -> StateDict:
    if state and all(k.startswith("module.") for k in state):
        return OrderedDict((k[len("module."):], v) for k, v in state.items())
    return state


def _unwrap_state_dict(obj: Any, source: str) -> StateDict:
    """The state dict inside a loaded checkpoint (``model`` / ``state_dict`` or itself)."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state"):
            if key in obj and isinstance(obj[key], dict):
                return _strip_module_prefix(obj[key])
        if obj and all(isinstance(v, (torch.Tensor, np.ndarray)) for v in obj.values()):
            return _strip_module_prefix(obj)
    raise ValueError(f"{source}: expected a state dict, or a checkpoint with a 'model' or 'state_dict' "
                     "entry holding one")


def _load(path: str) -> Any:
    # never fully unpickles: a file holding other objects is refused (UntrustedPickleError)
    return load_weights_file(path)


def _log_dropped(dropped: Dict[str, str]) -> None:
    by_reason: Dict[str, List[str]] = {}
    for name, reason in dropped.items():
        by_reason.setdefault(reason, []).append(name)
    for reason, names in by_reason.items():
        shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
        logger.info("Not converted: %s -- %s", shown, reason)


# ---------------------------------------------------------------------------------------
# The name table: one row per kind of ResNet tensor, read in either direction
# ---------------------------------------------------------------------------------------
#: How one ResNet tensor is named by a ``SlimmableClassifier`` (``"classifier"``), by
#: detectron2's ``ResNet`` (``"detectron2"``, the bare names of :func:`make_d2_checkpoint`)
#: and by torchvision's ``ResNet`` / ``ResNeXt`` (``"torchvision"``). ``{field}``
#: placeholders carry the stage, block, conv index and parameter; ``{stage-1}`` writes the
#: stage minus one (detectron2's ``res2`` is torchvision's ``layer1``). ``None``: the naming
#: has no such tensor. Rows are tried in order; the first whose pattern matches renames.
NAME_TABLE: Tuple[Dict[str, Optional[str]], ...] = (
    {"classifier": "backbone.stem.conv1.weight",
     "detectron2": "stem.conv1.weight",
     "torchvision": "conv1.weight"},
    {"classifier": "backbone.stem.conv1.norm.{bn}",
     "detectron2": "stem.conv1.norm.{bn}",
     "torchvision": "bn1.{bn}"},
    {"classifier": "backbone.res{stage}.{block}.conv{conv}.weight",
     "detectron2": "res{stage}.{block}.conv{conv}.weight",
     "torchvision": "layer{stage-1}.{block}.conv{conv}.weight"},
    {"classifier": "backbone.res{stage}.{block}.conv{conv}.norm.{bn}",
     "detectron2": "res{stage}.{block}.conv{conv}.norm.{bn}",
     "torchvision": "layer{stage-1}.{block}.bn{conv}.{bn}"},
    {"classifier": "backbone.res{stage}.{block}.shortcut.weight",
     "detectron2": "res{stage}.{block}.shortcut.weight",
     "torchvision": "layer{stage-1}.{block}.downsample.0.weight"},
    {"classifier": "backbone.res{stage}.{block}.shortcut.norm.{bn}",
     "detectron2": "res{stage}.{block}.shortcut.norm.{bn}",
     "torchvision": "layer{stage-1}.{block}.downsample.1.{bn}"},
    # any other tensor of the classifier's ResNet keeps its detectron2 name (no torchvision one)
    {"classifier": "backbone.{other}",
     "detectron2": "{other}",
     "torchvision": None},
    # the ImageNet classifier layer: not part of detectron2's ResNet (kept apart as the "head")
    {"classifier": "head.{linear}",
     "detectron2": None,
     "torchvision": "fc.{linear}"},
)

#: What each placeholder of :data:`NAME_TABLE` may hold (its value before any offset).
_FIELDS = {
    "stage": "[2-5]",
    "block": r"\d+",
    "conv": r"\d",
    "bn": "|".join(_BN_SUFFIXES),
    "linear": "weight|bias",
    "other": ".+",
}
_PLACEHOLDER = re.compile(r"\{(\w+)(?:-(\d+))?\}")
NAMINGS = ("classifier", "detectron2", "torchvision")


@functools.lru_cache(maxsize=None)
def _name_regex(template: str) -> "re.Pattern":
    regex, pos = "", 0
    for m in _PLACEHOLDER.finditer(template):
        field = m.group(1)
        regex += re.escape(template[pos:m.start()])
        regex += rf"(?P<{field}>\d+)" if m.group(2) else f"(?P<{field}>{_FIELDS[field]})"
        pos = m.end()
    return re.compile(regex + re.escape(template[pos:]))


def _parse(template: str, name: str) -> Optional[Dict[str, str]]:
    m = _name_regex(template).fullmatch(name)
    if m is None:
        return None
    fields = m.groupdict()
    for p in _PLACEHOLDER.finditer(template):
        if p.group(2):  # "{stage-1}" holds stage - 1
            fields[p.group(1)] = str(int(fields[p.group(1)]) + int(p.group(2)))
            if not re.fullmatch(_FIELDS[p.group(1)], fields[p.group(1)]):
                return None
    return fields


def _format(template: str, fields: Dict[str, str]) -> str:
    def put(m):
        value = fields[m.group(1)]
        return str(int(value) - int(m.group(2))) if m.group(2) else value

    return _PLACEHOLDER.sub(put, template)


def rename(name: str, source: str, target: str) -> Tuple[Optional[str], bool]:
    """The ``target`` name of the ResNet tensor that ``source`` calls ``name``.

    Reads :data:`NAME_TABLE` (the one place the three namings are related) in the
    direction asked.

    Args:
        name: a tensor name in the ``source`` naming.
        source, target: two of :data:`NAMINGS` (``"classifier"``, ``"detectron2"``,
            ``"torchvision"``).

    Returns:
        ``(new_name, is_head)``. For the classifier layer (``head.*`` / ``fc.*``) towards
        ``"detectron2"``, ``new_name`` is the parameter (``"weight"`` / ``"bias"``) and
        ``is_head`` True: detectron2's ResNet has no such layer, it is kept apart.
        ``new_name`` is None when ``name`` is not in the table or ``target`` has no such
        tensor.

    Raises:
        ValueError: on a naming that is not one of :data:`NAMINGS`.
    """
    for n in (source, target):
        if n not in NAMINGS:
            raise ValueError(f"unknown naming {n!r}; use one of {list(NAMINGS)}")
    for row in NAME_TABLE:
        if row[source] is None:
            continue
        fields = _parse(row[source], name)
        if fields is None:
            continue
        if row["detectron2"] is None and target == "detectron2":
            return fields["linear"], True
        is_head = row["detectron2"] is None
        return (None if row[target] is None else _format(row[target], fields)), is_head
    return None, False


_NBT = "BN step counter; detectron2's FrozenBN/BN do not use it"


def _short(names: List[str]) -> str:
    return f"{names[:8]}" + (f" ({len(names)} names)" if len(names) > 8 else "")


def _split_to_d2(state_dict: StateDict, naming: str) -> Tuple["OrderedDict[str, torch.Tensor]",
                                                               Dict[str, torch.Tensor], Dict[str, str], List[str]]:
    """``state_dict`` (in ``naming``) as bare detectron2 ResNet tensors, the head, what was
    dropped and the names :data:`NAME_TABLE` does not know."""
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    head: Dict[str, torch.Tensor] = {}
    dropped: Dict[str, str] = {}
    unknown = []
    for name, value in _strip_module_prefix(state_dict).items():
        value = torch.as_tensor(value)
        if name.endswith("num_batches_tracked"):
            dropped[name] = _NBT
            continue
        new, is_head = rename(name, naming, "detectron2")
        if new is None:
            unknown.append(name)
        elif is_head:
            head[new] = value
        else:
            out[new] = value
    return out, head, dropped, unknown


def torchvision_to_d2(state_dict: StateDict) -> Tuple["OrderedDict[str, torch.Tensor]", Dict[str, torch.Tensor],
                                                      Dict[str, str]]:
    """Rename a torchvision ResNet state dict to detectron2's bare ResNet names.

    ``conv1`` / ``bn1`` -> ``stem.conv1`` / ``stem.conv1.norm``; ``layer{i}.{b}.conv{j}`` /
    ``bn{j}`` -> ``res{i+1}.{b}.conv{j}`` / ``conv{j}.norm``; ``downsample.0`` / ``.1`` ->
    ``shortcut`` / ``shortcut.norm``; ``fc`` -> the classifier head (:data:`NAME_TABLE`).

    Returns:
        ``(backbone, head, dropped)``: backbone tensors by bare detectron2 name, the
        ``{"weight", "bias"}`` of ``fc`` (may be empty), and ``{source name: reason}``
        of what was not converted.

    Raises:
        ValueError: on a name that is not part of a torchvision ResNet.
    """
    out, head, dropped, unknown = _split_to_d2(state_dict, "torchvision")
    if unknown:
        raise ValueError(f"not a torchvision ResNet state dict: cannot convert {_short(unknown)}")
    if not out:
        raise ValueError("no ResNet weights found in the torchvision state dict")
    return out, head, dropped


def classifier_to_d2(state_dict: StateDict) -> Tuple["OrderedDict[str, torch.Tensor]", Dict[str, torch.Tensor],
                                                      Dict[str, str]]:
    """Split a ``SlimmableClassifier`` state dict into bare ResNet names and the head.

    Returns:
        ``(backbone, head, dropped)`` as :func:`torchvision_to_d2`.

    Raises:
        ValueError: on a name outside ``backbone.*`` / ``head.*``.
    """
    out, head, dropped, unknown = _split_to_d2(state_dict, "classifier")
    if unknown:
        raise ValueError(f"not a SlimmableClassifier checkpoint: unexpected {_short(unknown)}")
    if not out:
        raise ValueError("no 'backbone.*' weights in the classifier checkpoint")
    return out, head, dropped


def d2_to_torchvision(backbone: StateDict, head: Optional[Dict[str, torch.Tensor]] = None
                      ) -> "OrderedDict[str, torch.Tensor]":
    """Rename bare detectron2 ResNet weights to torchvision's names (the inverse of
    :func:`torchvision_to_d2`, the same :data:`NAME_TABLE`); ``head`` (``weight`` /
    ``bias``) becomes ``fc``.

    Raises:
        ValueError: on a name that is not part of a detectron2 ResNet.
    """
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    unknown = []
    for name, value in backbone.items():
        new, _ = rename(name, "detectron2", "torchvision")
        if new is None:
            unknown.append(name)
        else:
            out[new] = torch.as_tensor(value)
    if unknown:
        raise ValueError(f"not detectron2 ResNet weights: cannot convert {_short(unknown)}")
    for key, value in (head or {}).items():
        out[rename(f"head.{key}", "classifier", "torchvision")[0]] = torch.as_tensor(value)
    return out


def resnet_arch(backbone: StateDict) -> Dict[str, int]:
    """Infer ``MODEL.RESNETS`` values from bare detectron2 ResNet weights.

    Returns:
        ``{"DEPTH", "RES2_OUT_CHANNELS", "NUM_GROUPS", "WIDTH_PER_GROUP",
        "STEM_OUT_CHANNELS"}`` (the last three only for what applies).

    Raises:
        ValueError: if the stage layout is not a standard ResNet.
    """
    blocks = []
    for stage in range(2, 6):
        ids = {int(m.group(1)) for k in backbone for m in [re.match(rf"res{stage}\.(\d+)\.", k)] if m}
        blocks.append(len(ids))
    bottleneck = "res2.0.conv3.weight" in backbone
    key = tuple(blocks)
    if key not in _STAGE_BLOCKS:
        raise ValueError(f"blocks per stage {blocks} are not those of ResNet-18/34/50/101/152")
    depth = _STAGE_BLOCKS[key]
    if depth == 34 and bottleneck:
        depth = 50
    elif depth in (101, 152) and not bottleneck:
        raise ValueError(f"blocks per stage {blocks} with basic blocks is not a standard ResNet")
    arch = {"DEPTH": depth, "STEM_OUT_CHANNELS": int(backbone["stem.conv1.weight"].shape[0])}
    if bottleneck:
        conv2 = backbone["res2.0.conv2.weight"]
        groups = int(backbone["res2.0.conv1.weight"].shape[0]) // int(conv2.shape[1])
        arch.update(RES2_OUT_CHANNELS=int(backbone["res2.0.conv3.weight"].shape[0]),
                    NUM_GROUPS=groups, WIDTH_PER_GROUP=int(conv2.shape[0]) // groups)
    else:
        arch["RES2_OUT_CHANNELS"] = int(backbone["res2.0.conv2.weight"].shape[0])
    return arch


def make_d2_checkpoint(backbone: StateDict, head: Optional[Dict[str, torch.Tensor]] = None, *,
                       target: str = "fpn", pixel_mean: Sequence[float], pixel_std: Sequence[float],
                       input_format: str, stride_in_1x1: bool, source: str = "") -> Dict[str, Any]:
    """Lay out bare ResNet weights for ``target`` and record their conventions.

    Args:
        backbone: tensors by bare detectron2 ResNet name (``stem.conv1.weight``, ...).
        head: the classifier head (``weight``, ``bias``); used by ``target="classifier"``.
        target: one of :data:`TARGETS` (see the module docstring).
        pixel_mean, pixel_std, input_format: the input convention of the weights, in
            detectron2's terms (0-255 scale).
        stride_in_1x1: ``MODEL.RESNETS.STRIDE_IN_1X1`` the weights were trained with.
        source: a description recorded in the metadata.

    Returns:
        The detectron2 checkpoint dict (numpy arrays), ready for
        :func:`save_d2_checkpoint`.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target layout {target!r}; use one of {list(TARGETS)}")
    head = head or {}
    dropped: Dict[str, str] = {}
    model: "OrderedDict[str, np.ndarray]" = OrderedDict()
    for name, value in backbone.items():
        if target == "fpn":
            new = "backbone.bottom_up." + name
        elif target == "c4":
            new = ("roi_heads." if name.startswith("res5.") else "backbone.") + name
        elif target == "classifier":
            new = "backbone." + name
        else:
            new = name
        model[new] = torch.as_tensor(value).detach().cpu().numpy()
    if target == "classifier":
        if not head:
            raise ValueError("target 'classifier' needs the classifier head, but the source has none")
        for k, v in head.items():
            model[f"head.{k}"] = torch.as_tensor(v).detach().cpu().numpy()
    else:
        for k in head:
            dropped[f"head.{k}"] = f"the ImageNet classifier layer has no place in the '{target}' layout"
    _log_dropped(dropped)
    meta = {
        "source": source,
        "target": target,
        "PIXEL_MEAN": [float(v) for v in pixel_mean],
        "PIXEL_STD": [float(v) for v in pixel_std],
        "FORMAT": input_format,
        "STRIDE_IN_1X1": bool(stride_in_1x1),
        **resnet_arch(backbone),
    }
    if head:
        meta["NUM_CLASSES"] = int(head["weight"].shape[0])
    return {"model": model, "__author__": "gradaug-det", "matching_heuristics": target == "heuristic",
            "gradaug_det": meta}


def save_d2_checkpoint(checkpoint: Dict[str, Any], path: str) -> None:
    """Write a checkpoint from :func:`make_d2_checkpoint` as a detectron2 ``.pkl``."""
    if not path.endswith(".pkl"):
        raise ValueError(f"output {path!r} must end in .pkl (detectron2 reads .pkl files as converted weights)")
    atomic_pickle_dump(checkpoint, path)
    meta = checkpoint.get("gradaug_det", {})
    logger.info("Saved %d tensors (%s layout) to %s", len(checkpoint["model"]), meta.get("target"), path)


def convert_torchvision(source: Union[str, StateDict], output: Optional[str] = None, *,
                        target: str = "fpn") -> Dict[str, Any]:
    """Convert a torchvision ResNet into a detectron2 checkpoint.

    The result records torchvision's input convention: ``INPUT.FORMAT "RGB"``,
    ``MODEL.PIXEL_MEAN`` [123.675, 116.280, 103.530], ``MODEL.PIXEL_STD`` [58.395,
    57.120, 57.375], ``MODEL.RESNETS.STRIDE_IN_1X1 False``.

    Args:
        source: a state dict, or the path of a file holding one (``.pth``; also
            ``{"state_dict": ...}`` / ``{"model": ...}`` checkpoints, ``module.``
            prefixes are removed).
        output: if given, the ``.pkl`` to write.
        target: layout, one of :data:`TARGETS`.

    Returns:
        The checkpoint dict.
    """
    name = source if isinstance(source, str) else "torchvision state dict"
    state = _unwrap_state_dict(_load(source) if isinstance(source, str) else source, name)
    backbone, head, dropped = torchvision_to_d2(state)
    _log_dropped(dropped)
    ckpt = make_d2_checkpoint(backbone, head, target=target, pixel_mean=TORCHVISION_PIXEL_MEAN,
                              pixel_std=TORCHVISION_PIXEL_STD, input_format=TORCHVISION_FORMAT,
                              stride_in_1x1=False, source=f"torchvision: {name}")
    if output:
        save_d2_checkpoint(ckpt, output)
    return ckpt


def convert_classifier(source: Union[str, StateDict], output: Optional[str] = None, *, target: str = "fpn",
                       cfg=None, pixel_mean: Optional[Sequence[float]] = None,
                       pixel_std: Optional[Sequence[float]] = None, input_format: Optional[str] = None,
                       stride_in_1x1: Optional[bool] = None) -> Dict[str, Any]:
    """Convert a ``SlimmableClassifier`` checkpoint into a detectron2 checkpoint.

    The input convention comes from ``cfg`` (the classifier's training config:
    ``MODEL.PIXEL_MEAN``, ``MODEL.PIXEL_STD``, ``INPUT.FORMAT``,
    ``MODEL.RESNETS.STRIDE_IN_1X1``); explicit arguments override it.

    Args:
        source: a detectron2 ``Checkpointer`` file (``model_final.pth``) or its state dict.
        output: if given, the ``.pkl`` to write.
        target: layout, one of :data:`TARGETS`.
        cfg: the classifier's config.
        pixel_mean, pixel_std, input_format, stride_in_1x1: override ``cfg``.

    Returns:
        The checkpoint dict.

    Raises:
        ValueError: if neither ``cfg`` nor the explicit arguments give the convention.
    """
    conv = {"pixel_mean": pixel_mean, "pixel_std": pixel_std, "input_format": input_format,
            "stride_in_1x1": stride_in_1x1}
    if cfg is not None:
        from_cfg = {"pixel_mean": cfg.MODEL.PIXEL_MEAN, "pixel_std": cfg.MODEL.PIXEL_STD,
                    "input_format": cfg.INPUT.FORMAT, "stride_in_1x1": cfg.MODEL.RESNETS.STRIDE_IN_1X1}
        conv = {k: from_cfg[k] if v is None else v for k, v in conv.items()}
    missing = [k for k, v in conv.items() if v is None]
    if missing:
        raise ValueError(f"convert_classifier needs the classifier's training config (cfg=...) or {missing}; "
                         "they are recorded so detection configs can be checked against them")
    name = source if isinstance(source, str) else "classifier state dict"
    loaded = _load(source) if isinstance(source, str) else source
    state = _unwrap_state_dict(loaded, name)
    backbone, head, dropped = classifier_to_d2(state)
    _log_dropped(dropped)
    ckpt = make_d2_checkpoint(backbone, head, target=target, source=f"SlimmableClassifier: {name}", **conv)
    # how the classifier's sub-networks were formed (checked, as a warning, when a detector loads it)
    record = loaded.get(RECORD_KEY) if isinstance(loaded, dict) else None
    if record is None and cfg is not None:
        record = {**slimmable_settings(cfg), "slim_fpn": None}  # a classifier has no FPN
    if record is not None:
        ckpt[RECORD_KEY] = dict(record)
    if output:
        save_d2_checkpoint(ckpt, output)
    return ckpt


def convert_classifier_to_torchvision(source: Union[str, StateDict], output: Optional[str] = None, *,
                                      cfg=None) -> "OrderedDict[str, torch.Tensor]":
    """Convert a ``SlimmableClassifier`` checkpoint to a torchvision-named ResNet state dict.

    That is what mmdet's ``ResNet`` / ``SlimmableResNet`` load
    (``init_cfg=dict(type='Pretrained', checkpoint=output)``), with mmdet's standard
    ``style='pytorch'`` and data preprocessor (RGB, torchvision's mean / std). The
    classifier must have been trained with those conventions (this project's ImageNet
    configs are); ``cfg`` (its training config) is checked against them.

    Args:
        source: a detectron2 ``Checkpointer`` file (``model_final.pth``) or its state dict.
        output: if given, the ``.pth`` to write (``torch.save`` of the state dict).
        cfg: the classifier's config; None skips the convention check.

    Raises:
        ValueError: naming the config key whose value mmdet's ResNet would not match.
    """
    if cfg is not None:
        expected = {"INPUT.FORMAT": (cfg.INPUT.FORMAT, TORCHVISION_FORMAT),
                    "MODEL.PIXEL_MEAN": (tuple(cfg.MODEL.PIXEL_MEAN), TORCHVISION_PIXEL_MEAN),
                    "MODEL.PIXEL_STD": (tuple(cfg.MODEL.PIXEL_STD), TORCHVISION_PIXEL_STD),
                    "MODEL.RESNETS.STRIDE_IN_1X1": (cfg.MODEL.RESNETS.STRIDE_IN_1X1, False)}
        for key, (got, want) in expected.items():
            same = np.allclose(got, want) if isinstance(want, tuple) else got == want
            if not same:
                raise ValueError(
                    f"the classifier was trained with {key}={got!r}, but a torchvision-layout ResNet "
                    f"(mmdet style='pytorch', its standard data preprocessor) assumes {want!r}; "
                    "convert to a detectron2 layout instead (--target fpn) or set the model's "
                    "preprocessing to match"
                )
    name = source if isinstance(source, str) else "classifier state dict"
    state = _unwrap_state_dict(_load(source) if isinstance(source, str) else source, name)
    backbone, head, dropped = classifier_to_d2(state)
    _log_dropped(dropped)
    out = d2_to_torchvision(backbone, head)
    if output:
        atomic_torch_save(out, output)
        logger.info("Wrote %d torchvision-named tensors to %s", len(out), output)
    return out


def read_pretrained_meta(path: str) -> Optional[Dict[str, Any]]:
    """The ``"gradaug_det"`` metadata of a converted ``.pkl``, or None for other files.

    Read with the restricted unpickler (:func:`~gradaug_det.checkpoint.io.load_weights_file`).

    Raises:
        UntrustedPickleError, CheckpointFileError: the file is refused or unreadable (before
            any model is built).
    """
    if not path or not path.endswith(".pkl"):
        return None
    try:
        data = load_weights_file(path)
    except FileNotFoundError as e:
        logger.warning("Could not read %s to check its conventions: %s", path, e)
        return None
    return data.get("gradaug_det") if isinstance(data, dict) else None


_META_KEYS = (
    ("PIXEL_MEAN", "MODEL.PIXEL_MEAN"),
    ("PIXEL_STD", "MODEL.PIXEL_STD"),
    ("FORMAT", "INPUT.FORMAT"),
    ("STRIDE_IN_1X1", "MODEL.RESNETS.STRIDE_IN_1X1"),
    ("DEPTH", "MODEL.RESNETS.DEPTH"),
    ("RES2_OUT_CHANNELS", "MODEL.RESNETS.RES2_OUT_CHANNELS"),
    ("STEM_OUT_CHANNELS", "MODEL.RESNETS.STEM_OUT_CHANNELS"),
    ("NUM_GROUPS", "MODEL.RESNETS.NUM_GROUPS"),
    ("WIDTH_PER_GROUP", "MODEL.RESNETS.WIDTH_PER_GROUP"),
)


def _cfg_get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def pretrained_config_opts(meta: Dict[str, Any]) -> List[str]:
    """Config overrides (``KEY VALUE`` list, for ``cfg.merge_from_list``) matching ``meta``."""
    opts = []
    for meta_key, cfg_key in _META_KEYS:
        if meta_key in meta:
            v = meta[meta_key]
            opts += [cfg_key, str(list(v)) if isinstance(v, (list, tuple)) else str(v)]
    return opts


def check_pretrained_config(cfg, path: Optional[str] = None) -> List[str]:
    """Warn where a detection config disagrees with converted weights' conventions.

    Compares ``MODEL.PIXEL_MEAN``, ``MODEL.PIXEL_STD``, ``INPUT.FORMAT`` and the
    ``MODEL.RESNETS`` shape keys with what :func:`make_d2_checkpoint` recorded, and the
    recorded layout with the model (FPN backbone or C4 ``Res5ROIHeads``). Files without
    gradaug-det metadata are not checked.

    Args:
        cfg: the detection config.
        path: the weights; default ``cfg.MODEL.WEIGHTS``.

    Returns:
        The warning messages (also logged), empty when everything matches.
    """
    path = cfg.MODEL.WEIGHTS if path is None else path
    meta = read_pretrained_meta(path)
    if not meta:
        return []
    msgs = []
    for meta_key, cfg_key in _META_KEYS:
        if meta_key not in meta:
            continue
        want, have = meta[meta_key], _cfg_get(cfg, cfg_key)
        if isinstance(want, (list, tuple)):
            same = len(want) == len(have) and np.allclose(np.asarray(want, float), np.asarray(have, float))
            want, have = list(want), list(have)
        else:
            same = want == have
        if not same:
            msgs.append(f"{path} was trained with {cfg_key}={want!r} but the config has {have!r}; "
                        f"set {cfg_key} to {want!r}")
    target = meta.get("target")
    is_fpn = "fpn" in cfg.MODEL.BACKBONE.NAME.lower()
    is_c4 = cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeads"
    if target == "fpn" and not is_fpn or target == "c4" and not is_c4:
        msgs.append(f"{path} holds a ResNet in the '{target}' layout but the model has MODEL.BACKBONE.NAME="
                    f"{cfg.MODEL.BACKBONE.NAME!r}, MODEL.ROI_HEADS.NAME={cfg.MODEL.ROI_HEADS.NAME!r}; "
                    "convert again with the matching --target")
    for m in msgs:
        logger.warning(m)
    return msgs
