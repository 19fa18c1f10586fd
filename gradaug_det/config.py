"""``add_gradaug_config(cfg)``: every config key gradaug-det adds, with a comment each;
:func:`merge_user_config`: a user's config file and overrides merged, a mistake refused in one line."""
import functools
import os
import re
from typing import Any, Dict, Iterator, Optional, Sequence

from detectron2.config import CfgNode as CN

from .gradaug.options import GradAugOptions
from .utils.cli import ConfigError, did_you_mean
from .utils.io import check_input_file

__all__ = ["add_gradaug_config", "add_pruned_config", "slimmable_config", "slimmable_settings", "merge_user_config",
           "is_mmdet_config", "config_keys"]

#: The config files a yacs tool reads.
CONFIG_EXTENSIONS = (".yaml", ".yml")


def add_gradaug_config(cfg: CN) -> CN:
    """Add gradaug-det's keys (``MODEL.SLIMMABLE``, ``GRADAUG``, ...) to a detectron2 config.

    Idempotent: calling it twice leaves the config unchanged.

    Args:
        cfg: a detectron2 ``CfgNode`` (e.g. from ``get_cfg()``).

    Returns:
        ``cfg``, for chaining.
    """
    if "GRADAUG" in cfg:
        return cfg
    _c = cfg

    # ---- Slimmable backbone --------------------------------------------------------------
    _c.MODEL.SLIMMABLE = CN()
    # Align every sliced channel count to a multiple of this (1 = no alignment; > 1 needs
    # CHANNEL_RULE "round"). 8 suits GPU tensor cores; see README "Channel divisor".
    _c.MODEL.SLIMMABLE.CHANNEL_DIVISOR = 1
    # How a layer of c channels keeps channels at width w (gradaug_det.slim.channels):
    # "round": max(1, int(c * w + 0.5)) in every layer, aligned by CHANNEL_DIVISOR;
    # "reference": the GradAug code's int(make_divisible(c * w / r) * r), r = 0.25 for the
    # stem and bottleneck inner layers, 1 elsewhere (needs CHANNEL_DIVISOR 1). The shipped
    # ImageNet reproduction configs use "reference". See README "Width semantics".
    _c.MODEL.SLIMMABLE.CHANNEL_RULE = "round"
    # Slim the FPN's lateral and output convolutions with the bottom-up ResNet.
    _c.MODEL.SLIMMABLE.SLIM_FPN = True

    # ---- Weights loading -----------------------------------------------------------------
    # Load MODEL.WEIGHTS although some backbone tensors differ in shape from the model's
    # (they keep their initialisation). False: such a file is refused, naming the
    # MODEL.RESNETS keys that would match it (e.g. R50 weights into an R18 model).
    _c.MODEL.BACKBONE.ALLOW_SHAPE_MISMATCH = False
    # Resumable training data order (gradaug_det.data.resumable): the position in the
    # sampler's stream and the images waiting in the aspect-ratio buckets are saved in every
    # checkpoint, and each image's augmentation is seeded by its stream position, so
    # --resume continues the same run step for step. False: detectron2's own train loader.
    _c.DATALOADER.RESUMABLE = True

    # ---- GradAug training ----------------------------------------------------------------
    # The defaults are GradAugOptions' (gradaug_det.gradaug.options, where they are defined
    # and validated once; LazyConfig's `gradaug` and mmdet's `model.gradaug` read the same).
    _d = GradAugOptions()
    _c.GRADAUG = CN()
    # Run GradAug's sub-network passes in every iteration (False = stock detectron2 step).
    _c.GRADAUG.ENABLED = _d.enabled
    # Sub-networks per iteration, after the full network (reference: 3).
    _c.GRADAUG.NUM_SUBNETS = _d.num_subnets
    # Width range of the sampled sub-networks (reference ImageNet: [0.9, 1.0]).
    _c.GRADAUG.MIN_WIDTH = _d.min_width
    _c.GRADAUG.MAX_WIDTH = _d.max_width
    # Always include the smallest sub-network (MIN_WIDTH) among the NUM_SUBNETS.
    _c.GRADAUG.SMALLEST_SUBNET = _d.smallest_subnet
    # How sub-networks are formed: "width" (leading channels) or "depth" (residual blocks
    # dropped, stochastic depth).
    _c.GRADAUG.SAMPLING = _d.sampling
    # Depth sampling: keep probability of the last residual block; it falls linearly
    # from 1.0 at the first block (reference: 0.8).
    _c.GRADAUG.DEPTH_MIN_KEEP = _d.depth_min_keep
    # Depth sampling: at evaluation scale each residual branch by its keep probability
    # (the stochastic-depth rule of the reference CIFAR code). Off for detection
    # fine-tuning, where the full network is never trained with dropped blocks.
    _c.GRADAUG.DEPTH_EVAL_SCALE = _d.depth_eval_scale
    # Input transform of the sub-networks: "scale", "rotate" or "scale_rotate".
    _c.GRADAUG.TRANSFORM = _d.transform
    # Relative input scales, one drawn per sub-network (reference 224/192/160/128).
    _c.GRADAUG.SCALES = _d.scales
    # Rotation range in degrees, (min, max), an angle drawn uniformly per sub-network.
    _c.GRADAUG.ROTATION = _d.rotation
    # Sub-network loss: "soft" (KL to the full network's detached predictions, the
    # reference), "gt" (standard losses on the transformed annotations) or "gt+soft".
    _c.GRADAUG.SUBNET_LOSS = _d.subnet_loss
    # Weight of the soft-label (KL) loss of a sub-network.
    _c.GRADAUG.SOFT_WEIGHT = _d.soft_weight
    # Weight of the ground-truth losses of a sub-network ("gt", "gt+soft").
    _c.GRADAUG.GT_WEIGHT = _d.gt_weight
    # Seed of the sub-network sampler; identical on every worker. -1 = derive from SEED.
    _c.GRADAUG.SEED = _d.seed

    # ---- Evaluation ------------------------------------------------------------------------
    # Widths evaluated by --eval-only and at every TEST.EVAL_PERIOD, in addition to 1.0.
    _c.TEST.SLIM_WIDTHS = []
    # Post-hoc BN calibration (slimmable networks' practice; not in the GradAug reference):
    # evaluate every width of TEST.SLIM_WIDTHS a second time with BN/SyncBN running
    # statistics recomputed at that width from this many training batches ("+bncal"
    # results beside the plain ones); tools/prune.py writes the calibrated statistics.
    # 0 = off. FrozenBN/GN models need none. See README "Width semantics".
    _c.TEST.BN_CALIBRATION_BATCHES = 0

    _add_classification_config(_c)

    # ---- Pruned checkpoints (tools/prune.py) -------------------------------------------------
    add_pruned_config(_c)  # MODEL.PRUNED_RESNET.*: explicit per-stage channels of a pruned model
    return cfg


def add_pruned_config(cfg: CN) -> CN:
    """Add the ``MODEL.PRUNED_RESNET`` keys read by ``build_pruned_resnet_fpn_backbone``.

    ``tools/prune.py`` writes them into the config of a pruned model whose per-stage channel
    counts the stock ``MODEL.RESNETS`` keys cannot express
    (:mod:`gradaug_det.checkpoint.prune`). Idempotent; :func:`add_gradaug_config` calls it.
    Call it on ``get_cfg()`` before ``merge_from_file`` of such a config.

    Args:
        cfg: a detectron2 ``CfgNode``.

    Returns:
        ``cfg``, for chaining.
    """
    if "PRUNED_RESNET" in cfg.MODEL:
        return cfg
    cfg.MODEL.PRUNED_RESNET = CN()
    # Output channels of the stem convolution.
    cfg.MODEL.PRUNED_RESNET.STEM_OUT_CHANNELS = 64
    # Output channels of every residual block of res2, res3, res4, res5 (R50 defaults).
    cfg.MODEL.PRUNED_RESNET.OUT_CHANNELS = [256, 512, 1024, 2048]
    # Bottleneck (conv1 / conv2) channels of res2..res5, MODEL.RESNETS.NUM_GROUPS groups;
    # unused by R18/R34, whose blocks have no bottleneck.
    cfg.MODEL.PRUNED_RESNET.BOTTLENECK_CHANNELS = [64, 128, 256, 512]
    return cfg


def slimmable_config(cfg: CN) -> CN:
    """The ``MODEL.SLIMMABLE`` node of ``cfg``, or its documented defaults when absent.

    Lets the slimmable backbones drop into a detectron2 config that never called
    :func:`add_gradaug_config` (e.g. another project's config with only
    ``MODEL.BACKBONE.NAME`` changed). The defaults are those of
    :func:`add_gradaug_config`, the one place they are defined.

    Args:
        cfg: a detectron2 ``CfgNode``.

    Returns:
        ``cfg.MODEL.SLIMMABLE`` if present, else a frozen copy of the defaults (read-only:
        change them in the config after ``add_gradaug_config(cfg)``).
    """
    if "SLIMMABLE" in cfg.MODEL:
        return cfg.MODEL.SLIMMABLE
    return _default_slimmable()


def slimmable_settings(cfg: CN) -> Dict[str, Any]:
    """The slimmable settings of a detectron2 config (``MODEL.SLIMMABLE`` or its defaults).

    Args:
        cfg: a detectron2 ``CfgNode``.

    Returns:
        ``{"channel_rule": str, "channel_divisor": int, "slim_fpn": bool}``: the settings
        recorded in checkpoints (:data:`gradaug_det.slim.settings.RECORD_KEY`) and checked on
        load (:func:`gradaug_det.slim.settings.check_slimmable_settings`).
    """
    s = slimmable_config(cfg)
    return {"channel_rule": str(s.get("CHANNEL_RULE", "round")), "channel_divisor": int(s.CHANNEL_DIVISOR),
            "slim_fpn": bool(s.SLIM_FPN)}


@functools.lru_cache(maxsize=None)
def _default_slimmable() -> CN:
    from detectron2.config import get_cfg

    node = add_gradaug_config(get_cfg()).MODEL.SLIMMABLE
    node.freeze()
    return node


def _add_classification_config(_c: CN) -> None:
    """Keys of ImageNet pretraining (the classifier meta-architecture and its data)."""
    # ---- Classifier (MODEL.META_ARCHITECTURE = "SlimmableClassifier") --------------------
    _c.MODEL.CLASSIFIER = CN()
    # Number of classes of the linear head (ImageNet: 1000).
    _c.MODEL.CLASSIFIER.NUM_CLASSES = 1000
    # Label smoothing of the hard-label cross-entropy (0.0 = none, the GradAug reference).
    # Unused when the batch carries soft labels (CutMix).
    _c.MODEL.CLASSIFIER.LABEL_SMOOTHING = 0.0

    # ---- Classification data (gradaug_det.data.classification) ------------------------------
    _c.INPUT.CLASSIFICATION = CN()
    # Side of the square crop fed to the network, in training (RandomResizedCrop) and test
    # (center crop). Reference: 224.
    _c.INPUT.CLASSIFICATION.CROP_SIZE = 224
    # Test: the shorter image side is resized to this before the center crop (reference 256).
    _c.INPUT.CLASSIFICATION.RESIZE_SIZE = 256
    # Training: smallest fraction of the image area a RandomResizedCrop may cover.
    _c.INPUT.CLASSIFICATION.MIN_SCALE = 0.08
    # Training: ColorJitter strength for brightness, contrast and saturation (0 = off).
    _c.INPUT.CLASSIFICATION.COLOR_JITTER = 0.4
    # Training: std of AlexNet-style PCA lighting noise, with the standard ImageNet
    # eigenvalues/eigenvectors, on the [0, 1] RGB image (0 = off).
    _c.INPUT.CLASSIFICATION.LIGHTING = 0.1
    # Images per batch and worker of the classification test loader.
    _c.INPUT.CLASSIFICATION.TEST_IMS_PER_BATCH = 32

    # ---- CutMix ("GradAug+": CutMix on the full network's batch) ----------------------------
    _c.INPUT.CUTMIX = CN()
    # Mix the training batch with CutMix before the full-network pass; the batch then
    # carries soft labels and the classifier uses the soft-label (KL) loss.
    _c.INPUT.CUTMIX.ENABLED = False
    # Beta(ALPHA, ALPHA) distribution of the mixing ratio (CutMix paper: 1.0).
    _c.INPUT.CUTMIX.ALPHA = 1.0
    # Probability that a batch is mixed (CutMix ImageNet recipe: 1.0).
    _c.INPUT.CUTMIX.PROB = 1.0

    # ---- Classification evaluation ----------------------------------------------------------
    # FGSM perturbation sizes evaluated in addition to clean top-1, in the [0, 1] pixel
    # scale: eps = 8/255 ~ 0.0314 moves every 0-255 pixel by 8 levels. Empty = no FGSM.
    _c.TEST.FGSM_EPSILONS = []
    # Top-k accuracies reported by the classification evaluator.
    _c.TEST.TOPK = (1, 5)


def config_keys(cfg: CN, prefix: str = "") -> Iterator[str]:
    """Every full key of ``cfg`` (``"GRADAUG.NUM_SUBNETS"`` ...), nodes included."""
    for k, v in cfg.items():
        yield prefix + k
        if isinstance(v, CN):
            yield from config_keys(v, f"{prefix}{k}.")


def _unknown_key(cfg: CN, key: str, where: str) -> ConfigError:
    return ConfigError(f"unknown config key {key} ({where}){did_you_mean(key, config_keys(cfg))}")


def merge_user_config(cfg: CN, config_file: Optional[str], opts: Sequence[str] = (),
                      flag: str = "--config-file") -> CN:
    """``cfg.merge_from_file(config_file)`` then ``cfg.merge_from_list(opts)``, with every
    mistake refused in one message before any work: a missing or misspelt file (with the
    closest existing config file), an unknown key (with the closest real key, ``difflib``),
    a value of the wrong type, an odd override list.

    Args:
        cfg: a config with every key the tool reads (e.g. ``get_gradaug_cfg()``).
        config_file: the user's config file, or None / "" for none.
        opts: ``KEY VALUE`` overrides (the tools' trailing arguments).
        flag: how the user gave the file, for messages.

    Returns:
        ``cfg``, for chaining.

    Raises:
        MissingFileError: no such config file.
        ConfigError: naming the key (and the closest real one) or the value.
    """
    if config_file:
        check_input_file(config_file, flag, extensions=CONFIG_EXTENSIONS,
                         fix="pass a .yaml config (the shipped ones are under configs/)")
        try:
            cfg.merge_from_file(config_file)
        except KeyError as e:
            m = re.search(r"Non-existent config key: ([^\s'\"]+)", str(e))
            if m is None:
                raise ConfigError(f"{flag} {config_file}: {str(e).strip(chr(34) + chr(39))}") from None
            raise _unknown_key(cfg, m.group(1), f"in {config_file}") from None
        except ValueError as e:
            raise ConfigError(f"{flag} {config_file}: {_type_mismatch(str(e))}") from None
    if len(opts) % 2:
        raise ConfigError(f"config overrides must be KEY VALUE pairs; got an odd count: {' '.join(map(str, opts))}")
    try:
        cfg.merge_from_list(list(opts))
    except (AssertionError, KeyError) as e:
        m = re.search(r"Non-existent key: ([^\s'\"]+)", str(e))
        if m is None:
            raise ConfigError(f"config override: {str(e).strip(chr(34) + chr(39))}") from None
        raise _unknown_key(cfg, m.group(1), "on the command line") from None
    except ValueError as e:
        raise ConfigError(f"config override: {_type_mismatch(str(e))}") from None
    return cfg


def is_mmdet_config(path: Optional[str]) -> bool:
    """Whether ``path`` is an MMDetection (mmengine) config rather than a detectron2 one.

    An mmengine config is a ``.py`` file that inherits (``_base_ = ...``) or sets
    ``model = dict(...)`` at the top level; detectron2's LazyConfig ``.py`` files build
    ``model`` with ``L(...)`` or take it from a base with ``from ... import``. The yacs tools use
    it to refuse an mmdet config in one line that names the mmdet tool to use instead.
    """
    if not path or not path.endswith(".py") or not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    return re.search(r"^(_base_\s*=|model\s*=\s*dict\()", text, flags=re.M) is not None


def _type_mismatch(message: str) -> str:
    """yacs' "Type mismatch (<class 'int'> vs. <class 'str'>) with values (3 vs. abc) for config
    key: K" as "K: got 'abc' (str), expected int (default 3)"; other messages unchanged."""
    m = re.match(r"Type mismatch \(<class '(\w+)'> vs\. <class '(\w+)'>\) with values \((.*) vs\. (.*)\) "
                 r"for config key: (\S+)", message)
    if m is None:
        return message
    want, got, default, value, key = m.groups()
    return f"{key}: got {value!r} ({got}), expected {want} (default {default})"
