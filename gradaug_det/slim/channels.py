"""The one channel rule: how many channels a layer keeps at a given width.

Two rules (``MODEL.SLIMMABLE.CHANNEL_RULE``), one function (:func:`slim_channels`) that
every slimmable layer calls (detectron2 ``SlimConv2d`` / ``SlimLinear``,
:func:`~gradaug_det.slim.functional.slim_conv2d` of the MMDetection adapter, pruning and
the benchmark's channel counts):

* ``"round"``: ``max(1, int(c * w + 0.5))`` for every layer (round half up); with
  ``MODEL.SLIMMABLE.CHANNEL_DIVISOR = d > 1`` the count is aligned to a multiple of ``d``
  (``max(d, int(c * w / d + 0.5) * d)``).
* ``"reference"``: the public GradAug code's rule (``models/randwidth_ops.py``,
  ``RWConv2d``/``RWBatchNorm2d``/``RWLinear``): ``int(make_divisible(c * w / r) * r)``
  where ``r`` is the layer's *channel ratio*: 0.25 for the outputs of the ResNet-50 stem
  and of the bottleneck's inner (1x1-reduce and 3x3) convolutions, 1 for block outputs,
  shortcuts, the FPN and the classifier's input. For ``r = 0.25`` that is
  ``floor(round(4 c w) / 4)``: at w = 0.9 the stem keeps 57 channels (``"round"``: 58).

The ratio of a layer is structural (which role it plays in the network, see
:func:`resnet_channel_ratios`); only ``"reference"`` reads it.

Which GroupNorm layers can be sliced at every width follows from the rule too
(:func:`check_group_norm_slicing`, used by the detectron2 and the MMDetection backbones).
"""
import math
from typing import Dict, List, NamedTuple, Optional, Sequence

__all__ = [
    "CHANNEL_RULES",
    "INNER_RATIO",
    "make_divisible",
    "slim_channels",
    "check_width",
    "check_channel_rule",
    "preferred_channel_divisor",
    "resnet_channel_ratios",
    "resnet_channel_counts",
    "GroupNormSlice",
    "check_group_norm_slicing",
]

#: The channel rules :func:`slim_channels` implements (``MODEL.SLIMMABLE.CHANNEL_RULE``).
CHANNEL_RULES = ("round", "reference")

#: Channel ratio of the reference code's stem output and bottleneck inner layers.
INNER_RATIO = 0.25


def check_width(width: float) -> float:
    """Validate a network width.

    Args:
        width: fraction of every layer's channels a sub-network keeps.

    Returns:
        ``width`` as a float.

    Raises:
        ValueError: if ``width`` is not in (0, 1].
    """
    try:
        w = float(width)
    except (TypeError, ValueError):
        raise ValueError(f"width must be a number in (0, 1], got {width!r}") from None
    if not 0.0 < w <= 1.0:
        raise ValueError(f"width must be in (0, 1], got {width!r}")
    return w


def check_channel_rule(rule: str, divisor: int, *, rule_key: str = "MODEL.SLIMMABLE.CHANNEL_RULE",
                       divisor_key: str = "MODEL.SLIMMABLE.CHANNEL_DIVISOR") -> None:
    """Validate a channel rule and divisor before a model is built.

    Args:
        rule: one of :data:`CHANNEL_RULES`.
        divisor: channel alignment, an int >= 1; must be 1 with ``"reference"``.
        rule_key, divisor_key: names of the settings, for the error message (config keys,
            or an mmdet config's ``model.backbone.channel_rule`` ...).

    Raises:
        ValueError: naming the setting, the bad value and what is allowed.
    """
    if rule not in CHANNEL_RULES:
        raise ValueError(f"{rule_key}={rule!r} is invalid; allowed: {', '.join(map(repr, CHANNEL_RULES))}")
    if isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1:
        raise ValueError(f"{divisor_key}={divisor!r} is invalid; it must be an int >= 1")
    if rule == "reference" and divisor != 1:
        raise ValueError(
            f"{rule_key}='reference' (the GradAug code's rule) has no channel alignment, but "
            f"{divisor_key}={divisor}; set {divisor_key} to 1, or use {rule_key}='round' for "
            "aligned channel counts"
        )


def preferred_channel_divisor(device="cpu") -> int:
    """The channel alignment (``MODEL.SLIMMABLE.CHANNEL_DIVISOR``) a device's kernels run fastest at.

    * CUDA: 8. Tensor cores take fp16 / bf16 (and TF32) channel counts in multiples of 8.
    * CPU with AVX-512 (``torch.backends.cpu.get_cpu_capability()`` starts with
      ``"AVX512"``): 16. oneDNN blocks the channels of its convolutions in 16 fp32 lanes,
      and other counts take a slower path (README, "Channel divisor": on this project's
      AVX-512 CPU an R50-FPN at width 0.9 gains almost nothing from divisor 8, whose 56 /
      232 channels are not multiples of 16, over divisor 1; divisor 16 runs 1.08x its
      FLOP ratio against 1.12-1.15x).
    * Any other CPU (AVX2: 8 fp32 lanes; ARM; no vector unit): 8.

    Args:
        device: a ``torch.device`` or its name ("cpu", "cuda", "cuda:1").

    Returns:
        The divisor, 8 or 16.
    """
    import torch  # here, not at module level: the channel rule itself is plain Python

    if torch.device(device).type == "cuda":
        return 8
    return 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8


def make_divisible(v: float) -> int:
    """The reference code's ``make_divisible(v)`` (divisor 1, min_value 1).

    ``max(1, int(v + 0.5))``, plus the reference's guard against rounding down by more
    than 10 %: if that count is below ``0.9 * v`` it grows by one (matters only for
    ``v < 4.5``, e.g. 1.2 -> 2, 2.4 -> 3).

    Source: ``models/randwidth_ops.py`` of github.com/taoyang1122/GradAug (itself from
    JiahuiYu/slimmable_networks).
    """
    new_v = max(1, int(v + 0.5))
    if new_v < 0.9 * v:
        new_v += 1
    return new_v


def slim_channels(channels: int, width: float, divisor: int = 1, rule: str = "round",
                  ratio: float = 1.0) -> int:
    """Number of leading channels a layer of ``channels`` keeps at ``width``.

    * ``rule="round"``, ``divisor == 1``: ``max(1, int(channels * width + 0.5))``.
    * ``rule="round"``, ``divisor = d > 1``: aligned to a multiple of ``d``:
      ``max(d, int(channels * width / d + 0.5) * d)``.
    * ``rule="reference"``: ``int(make_divisible(channels * width / ratio) * ratio)``
      (:func:`make_divisible`; the GradAug code's rule, see the module docstring).

    The result never exceeds ``channels``; at width 1.0 it is ``channels``.

    Args:
        channels: the layer's full channel count.
        width: the network width, in (0, 1].
        divisor: channel alignment (``MODEL.SLIMMABLE.CHANNEL_DIVISOR``), >= 1; 1 with
            ``"reference"``.
        rule: ``MODEL.SLIMMABLE.CHANNEL_RULE``, one of :data:`CHANNEL_RULES`.
        ratio: the layer's channel ratio (:data:`INNER_RATIO` or 1.0); read by
            ``"reference"`` only.

    Returns:
        The number of channels kept.

    Raises:
        ValueError: for an unknown rule, a divisor < 1, or ``"reference"`` with a divisor.
    """
    if width == 1.0:
        return channels
    if rule == "round" and divisor == 1:  # the hot path: no further checks
        return min(channels, max(1, int(channels * width + 0.5)))
    check_channel_rule(rule, divisor, rule_key="channel rule", divisor_key="channel divisor")
    if rule == "reference":
        count = int(make_divisible(channels * width / ratio) * ratio)
    else:
        count = max(divisor, int(channels * width / divisor + 0.5) * divisor)
    return min(channels, count)


def resnet_channel_ratios(bottleneck: bool, stem_feeds_identity: bool = False) -> Dict[str, float]:
    """Channel ratios of a ResNet's layers for the ``"reference"`` rule.

    Bottleneck ResNets (R50/R101/R152) follow the reference ``resnet_randwidth.py``: the
    stem's output and the bottleneck's conv1 / conv2 outputs have ratio 0.25; block outputs
    (conv3), shortcuts and the classifier's input 1.

    Basic-block ResNets (R18/R34) have no reference ResNet model; the reference's only
    width-slimmed basic block (``wideresnet_randwidth.py``) uses ratio 1 for all its
    convolutions, so the inner conv1 has ratio 1. Their stem has ratio 1 too: detectron2's
    res2 starts with an identity shortcut (64 -> 64 channels) that adds the stem's output
    to the block's output, so both must keep the same count.

    Args:
        bottleneck: whether the blocks are bottlenecks.
        stem_feeds_identity: the stem's output is added to res2's output by an identity
            shortcut (a bottleneck net with ``STEM_OUT_CHANNELS == RES2_OUT_CHANNELS``); the
            stem then takes the block outputs' ratio, 1.

    Returns:
        dict with ``stem``, ``inner`` (bottleneck conv1/conv2, or basic conv1) and ``out``
        (block outputs, shortcuts, classifier input).
    """
    if not bottleneck:
        return {"stem": 1.0, "inner": 1.0, "out": 1.0}
    return {"stem": 1.0 if stem_feeds_identity else INNER_RATIO, "inner": INNER_RATIO, "out": 1.0}


def resnet_channel_counts(depth: int, width: float, divisor: int = 1, rule: str = "round", *,
                          stem_out: int = 64, res2_out: Optional[int] = None,
                          bottleneck_channels: int = 64, num_groups: int = 1) -> Dict[str, object]:
    """Channel counts of a slimmable ResNet's sub-network at ``width``, without building it.

    The same numbers the slimmable layers compute (one rule, :func:`slim_channels`), for
    tables and cost models (``tools/benchmark_backbone.py``).

    Args:
        depth: 18, 34 (basic blocks) or 50, 101, 152 (bottlenecks).
        width: the width, in (0, 1].
        divisor, rule: ``MODEL.SLIMMABLE.CHANNEL_DIVISOR`` / ``CHANNEL_RULE``.
        stem_out: ``MODEL.RESNETS.STEM_OUT_CHANNELS``.
        res2_out: ``MODEL.RESNETS.RES2_OUT_CHANNELS`` (default 64 for R18/R34, 256 otherwise).
        bottleneck_channels: ``NUM_GROUPS * WIDTH_PER_GROUP`` of res2 (bottlenecks only).
        num_groups: ``MODEL.RESNETS.NUM_GROUPS``; grouped layers keep the same count in
            every group (no alignment inside groups).

    Returns:
        dict with ``stem`` (int), ``inner`` and ``out`` (4 ints each, res2..res5;
        ``inner`` is the bottleneck conv1/conv2 count, or a basic block's conv1), and
        ``classifier_in`` (int, the classifier's input features = res5 ``out``).
    """
    width = check_width(width)
    check_channel_rule(rule, divisor, rule_key="channel rule", divisor_key="channel divisor")
    bottleneck = depth >= 50
    res2_out = res2_out if res2_out is not None else (256 if bottleneck else 64)
    ratios = resnet_channel_ratios(bottleneck, bottleneck and stem_out == res2_out)
    stem = slim_channels(stem_out, width, divisor, rule, ratios["stem"])
    inner: List[int] = []
    out: List[int] = []
    for i in range(4):
        c_out = res2_out * 2 ** i
        out.append(slim_channels(c_out, width, divisor, rule, ratios["out"]))
        if bottleneck:
            per_group = bottleneck_channels * 2 ** i // num_groups
            g_div = divisor if num_groups == 1 else 1
            inner.append(num_groups * slim_channels(per_group, width, g_div, rule, ratios["inner"]))
        else:
            inner.append(slim_channels(c_out, width, divisor, rule, ratios["inner"]))
    return {"stem": stem, "inner": inner, "out": out, "classifier_in": out[-1]}


class GroupNormSlice(NamedTuple):
    """A GroupNorm layer that a slimmable network slices (:func:`check_group_norm_slicing`).

    Attributes:
        name: the layer's name in messages (``"backbone.res2.0.conv1.norm"``).
        num_groups, num_channels: the GroupNorm's.
        divisor, rule: the channel divisor and rule of the convolution it normalises.
        grouped: it follows a grouped (ResNeXt) convolution, whose sub-networks keep the
            leading channels of every convolution group.
    """

    name: str
    num_groups: int
    num_channels: int
    divisor: int = 1
    rule: str = "round"
    grouped: bool = False


def check_group_norm_slicing(layers: Sequence[GroupNormSlice], *, divisor_key: str, rule_key: str,
                             bn_fix: str, groups_fix: str = "") -> None:
    """The GroupNorm rule: a sliced GN keeps whole groups at every width.

    ``"round"`` keeps multiples of the divisor, so every count is a whole number of groups
    exactly when the divisor is a multiple of the layer's channels per group
    (``num_channels / num_groups``); the smallest divisor that suits every layer is the least
    common multiple of their channels per group. ``"reference"`` has no alignment, and a
    grouped convolution keeps the leading channels of each of its groups: neither keeps whole
    GN groups. The one definition of the rule, for detectron2's ``check_slimmable_norms``
    and the MMDetection backbone / FPN.

    Args:
        layers: every sliced GroupNorm of the model (the least common multiple is over all).
        divisor_key, rule_key: the caller's names of the channel divisor and rule
            (``MODEL.SLIMMABLE.CHANNEL_DIVISOR``, ``model.backbone.channel_divisor`` ...).
        bn_fix: how to choose a BN-type norm instead (``"a BN-type norm (FrozenBN, BN, SyncBN)"``).
        groups_fix: how to drop convolution groups (``"MODEL.RESNETS.NUM_GROUPS=1"``).

    Raises:
        ValueError: naming the first layer that cannot keep whole groups, the setting and what
            to set (for the divisor: a multiple of the least common multiple).
    """
    required = math.lcm(1, *(layer.num_channels // layer.num_groups for layer in layers))
    for layer in layers:
        per_group = layer.num_channels // layer.num_groups
        desc = (f"{layer.name} is GroupNorm({layer.num_groups}, {layer.num_channels}) with {per_group} "
                "channels per group")
        if layer.grouped:
            raise ValueError(
                f"{desc} inside a grouped (ResNeXt) convolution, whose sub-networks keep the leading channels "
                f"of every convolution group and so cannot keep whole GN groups. Use {bn_fix}"
                + (f" or {groups_fix}." if groups_fix else ".")
            )
        if layer.divisor % per_group == 0:
            continue
        if layer.rule == "reference":
            raise ValueError(
                f"{desc}: {rule_key}='reference' keeps channel counts that are not whole GN groups. Use "
                f"{rule_key}='round' with {divisor_key} a multiple of {required}, or {bn_fix}."
            )
        raise ValueError(
            f"{desc}, which cannot be sliced at every width with {divisor_key}={layer.divisor}; set it to a "
            f"multiple of {required} (the least common multiple of every GN layer's channels per group in "
            f"this model), or use {bn_fix}."
        )
