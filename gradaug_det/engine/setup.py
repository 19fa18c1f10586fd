"""Config setup shared by the tools: every user mistake refused before any work."""
import os

from detectron2.config import get_cfg
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint.convert import check_pretrained_config
from ..checkpoint.io import check_weights_available
from ..config import add_gradaug_config, merge_user_config
from ..data.datasets import check_datasets_registered
from .trainer import validate_config

__all__ = ["setup", "build_config", "check_config_inputs", "get_gradaug_cfg"]


def get_gradaug_cfg():
    """detectron2's default config plus every gradaug-det key."""
    return add_gradaug_config(get_cfg())


def check_config_inputs(cfg, *, eval_only: bool = False, resume: bool = False) -> None:
    """What a yacs config names outside itself, checked before any work: its values
    (:func:`~gradaug_det.engine.trainer.validate_config`), its datasets (registered) and its
    weights (a file that exists, or a URL cached or reachable).

    Args:
        cfg: the merged config.
        eval_only: only ``DATASETS.TEST`` is read (and ``DATASETS.TRAIN`` for BN calibration).
        resume: ``MODEL.WEIGHTS`` is not read when ``OUTPUT_DIR`` holds a checkpoint.

    Raises:
        UserError: (``ConfigError``, ``MissingFileError``) naming the key, the value and the fix.
    """
    validate_config(cfg)
    if not eval_only or cfg.TEST.get("BN_CALIBRATION_BATCHES", 0):
        check_datasets_registered(cfg.DATASETS.TRAIN, "DATASETS.TRAIN")
    check_datasets_registered(cfg.DATASETS.TEST, "DATASETS.TEST")
    resumes = resume and not eval_only and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    if not resumes:
        check_weights_available(cfg.MODEL.WEIGHTS, "MODEL.WEIGHTS")


def build_config(args):
    """The config of ``--config-file`` and ``opts``, every user mistake refused before any
    work (nothing written): a missing config file, unknown keys, bad values, unregistered
    datasets, missing or unreachable weights (:func:`~gradaug_det.config.merge_user_config`,
    :func:`check_config_inputs`). Cheap: call it in the launching process before workers start.

    Args:
        args: detectron2's ``default_argument_parser`` arguments.

    Returns:
        The config (not frozen).

    Raises:
        UserError: naming the file / key / dataset and the fix.
    """
    cfg = merge_user_config(get_gradaug_cfg(), args.config_file, args.opts)
    check_config_inputs(cfg, eval_only=getattr(args, "eval_only", False), resume=getattr(args, "resume", False))
    return cfg


def setup(args):
    """Build the frozen config from ``--config-file`` and ``opts`` (:func:`build_config`) and
    run detectron2's ``default_setup`` (logging, output dir, seed, config dump)."""
    cfg = build_config(args)  # fail on bad keys, datasets, weights before any work (or log file) is made
    cfg.freeze()
    default_setup(cfg, args)
    # gradaug-det's own messages (per-width result tables, conversions) go to the same log
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="gradaug_det", abbrev_name="ga")
    if os.path.isfile(cfg.MODEL.WEIGHTS):
        check_pretrained_config(cfg)  # warns where converted weights expect other pixel conventions
    return cfg
