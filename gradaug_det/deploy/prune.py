"""Prune a trained slimmable detector to one width: the workflow of ``tools/prune.py``.

From a config and a checkpoint to a pruned model (:func:`pruned_from_config`: build, load
with the slimmable settings checked, calibrate BN at the width through the trainer's training
loader when ``TEST.BN_CALIBRATION_BATCHES`` > 0, cut), and to the files ``tools/prune.py``
writes with their parameter and FLOP counts (:func:`prune_checkpoint`). The surgery itself
(a slimmable model to a stock detectron2 one) is :mod:`gradaug_det.checkpoint.prune`; the
export and the trade-off tools (:mod:`.export`, :mod:`.tradeoff`) start from the same
:func:`pruned_from_config`.
"""
import contextlib
import logging
import os
from typing import Dict, Iterator, NamedTuple, Optional

from torch import nn

from detectron2.config import CfgNode
from detectron2.modeling import build_model

from ..checkpoint.checkpointer import GradAugCheckpointer
from ..utils.io import atomic_torch_save, atomic_write, check_output_path
from ..checkpoint.prune import feature_difference, prune_model
from ..engine.trainer import GradAugTrainer
from ..evaluation.widths import bn_calibration_from_config
from ..slim import check_width, width
from ..slim.calibration import calibrated_bn
from ..slim.settings import model_slimmable_settings, strict_slimmable_settings
from ..utils.analysis import backbone_flops, count_parameters

__all__ = ["PrunedModel", "pruned_from_config", "prune_checkpoint"]

logger = logging.getLogger(__name__)


_CFG_HEADER = """\
# Pruned by gradaug_det.deploy.prune: the width-{width:g} sub-network of
#   {source}
# as a detectron2 model (backbone {backbone}).
{extra}"""


class PrunedModel(NamedTuple):
    """What :func:`pruned_from_config` yields.

    Attributes:
        model: the slimmable model, weights loaded, in eval mode (inside the context, its BN
            statistics are the calibrated ones when ``TEST.BN_CALIBRATION_BATCHES`` > 0).
        pruned_cfg: config of the pruned model (:func:`prune_config`; ``MODEL.WEIGHTS`` is
            the source checkpoint: set it to where the pruned weights are written).
        pruned_model: the pruned stock detectron2 model, in eval mode.
        info: ``width``, ``source`` (weights), ``backbone`` (builder name), ``slimmable``
            (the settings it was cut with) and ``bn_calibration_batches`` (0 = none).
    """

    model: nn.Module
    pruned_cfg: CfgNode
    pruned_model: nn.Module
    info: Dict


@contextlib.contextmanager
def pruned_from_config(cfg: CfgNode, w: float, weights: Optional[str] = None) -> Iterator[PrunedModel]:
    """Build ``cfg``'s slimmable model, load ``weights`` and prune it to width ``w``, in memory.

    The one path from a config and a checkpoint to a pruned model (``tools/prune.py``,
    ``tools/export_model.py``, ``tools/tradeoff.py``). With ``TEST.BN_CALIBRATION_BATCHES``
    N > 0 and a model with BN/SyncBN, the BN statistics at width ``w`` are first recomputed
    from N batches of ``DATASETS.TRAIN`` (:func:`gradaug_det.slim.calibration.calibrated_bn`);
    the slimmable model keeps them until the context exits, so that inside it the slimmable
    model at width ``w`` and the pruned model compute the same function.

    Args:
        cfg: config of the slimmable model (``add_gradaug_config`` applied).
        w: the width, in (0, 1].
        weights: checkpoint to load; default ``cfg.MODEL.WEIGHTS`` ("" = random init).

    Yields:
        :class:`PrunedModel`.

    Raises:
        ValueError: ``w`` outside (0, 1], a model that cannot be pruned (:func:`pruned_channels`),
            or slimmable settings that differ from the checkpoint's.
    """
    w = check_width(w)
    weights = cfg.MODEL.WEIGHTS if weights is None else weights
    model = build_model(cfg)
    with strict_slimmable_settings("the pruned model is cut out of the sub-network of these settings"):
        GradAugCheckpointer.from_config(cfg, model).load(weights)
    # TEST.BN_CALIBRATION_BATCHES: the pruned model gets BN statistics calibrated at width w
    calibration = bn_calibration_from_config(cfg, model, GradAugTrainer.build_train_loader)
    with contextlib.ExitStack() as stack:
        if calibration is not None:
            stack.enter_context(calibrated_bn(model, w, calibration.batches, calibration.num_batches))
        model.eval()
        pruned_cfg, pruned_model = prune_model(model, cfg, w, weights=weights)
        pruned_model.eval()
        # the settings the sub-network was cut with (the pruned model itself is a stock, fixed-width one)
        info = {"width": w, "source": str(weights), "backbone": pruned_cfg.MODEL.BACKBONE.NAME,
                "slimmable": model_slimmable_settings(model),
                "bn_calibration_batches": calibration.num_batches if calibration else 0}
        yield PrunedModel(model, pruned_cfg, pruned_model, info)


def prune_checkpoint(cfg: CfgNode, w: float, output_dir: str, weights: Optional[str] = None,
                     flops_size: Optional[int] = None) -> Dict:
    """Build ``cfg``'s slimmable model, load ``weights`` and write it pruned to width ``w``.

    Writes ``model_pruned_w<w>.pth`` (``{"model": state_dict, "gradaug_prune": info}``,
    loadable with ``DetectionCheckpointer``) and ``config_pruned_w<w>.yaml`` (whose
    ``MODEL.WEIGHTS`` points at the checkpoint) under ``output_dir``.

    Args:
        cfg: config of the slimmable model (``add_gradaug_config`` applied).
        w: the width, in (0, 1].
        output_dir: where to write; created if missing.
        weights: checkpoint to prune; default ``cfg.MODEL.WEIGHTS``.
        flops_size: if given, also count backbone forward FLOPs on a ``flops_size`` square image
            (:func:`gradaug_det.utils.analysis.backbone_flops`: 2 per multiply-add).

    Returns:
        dict with ``checkpoint`` and ``config`` (paths), ``builder`` (backbone name),
        ``params`` / ``params_pruned`` and, with ``flops_size``, ``flops`` (full network),
        ``flops_slim`` (full network at width ``w``) and ``flops_pruned``, and
        ``feature_diff`` (:func:`feature_difference` on a ``flops_size`` or 256 px image),
        ``bn_calibration_batches`` (``TEST.BN_CALIBRATION_BATCHES`` used: the BN statistics of
        the pruned model were recomputed at width ``w`` on that many training batches; 0 =
        the full network's sliced statistics).
    """
    w = check_width(w)
    weights = cfg.MODEL.WEIGHTS if weights is None else weights
    ckpt_path = os.path.abspath(os.path.join(output_dir, f"model_pruned_w{w:g}.pth"))
    cfg_path = os.path.join(output_dir, f"config_pruned_w{w:g}.yaml")
    check_output_path(ckpt_path, "--output", make_dirs=True)  # before any work
    with pruned_from_config(cfg, w, weights) as pruned:
        model, pruned_model, info = pruned.model, pruned.pruned_model, pruned.info
        pruned_cfg = pruned.pruned_cfg
        pruned_cfg.MODEL.WEIGHTS = ckpt_path
        atomic_torch_save({"model": pruned_model.state_dict(), "gradaug_prune": info}, ckpt_path)
        custom = pruned_cfg.MODEL.BACKBONE.NAME == "build_pruned_resnet_fpn_backbone"
        extra = (
            "# Load with: cfg = get_cfg(); gradaug_det.config.add_pruned_config(cfg);\n"
            "#            cfg.merge_from_file(<this file>)  (importing gradaug_det registers the backbone)\n"
            if custom else "# Stock keys only: detectron2's get_cfg().merge_from_file(<this file>) reads it.\n"
        )
        with atomic_write(cfg_path, "w") as f:
            f.write(_CFG_HEADER.format(width=w, source=weights or "(random init)",
                                       backbone=pruned_cfg.MODEL.BACKBONE.NAME, extra=extra))
            f.write(pruned_cfg.dump())
        logger.info(f"Wrote the width-{w:g} model to {ckpt_path} and its config to {cfg_path}")
        stats = {"checkpoint": ckpt_path, "config": cfg_path, "builder": pruned_cfg.MODEL.BACKBONE.NAME,
                 "params": count_parameters(model), "params_pruned": count_parameters(pruned_model),
                 "bn_calibration_batches": info["bn_calibration_batches"]}
        check = flops_size or 256
        stats["feature_diff"] = feature_difference(model, pruned_model, w, check, check)
        if flops_size:
            stats["flops"] = backbone_flops(model, flops_size, flops_size)
            with width(model, w):
                stats["flops_slim"] = backbone_flops(model, flops_size, flops_size)
            stats["flops_pruned"] = backbone_flops(pruned_model, flops_size, flops_size)
    return stats
