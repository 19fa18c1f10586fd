"""Config setup shared by the tools."""
import os

from detectron2.config import get_cfg
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import add_gradaug_config

__all__ = ["setup", "get_gradaug_cfg"]


def get_gradaug_cfg():
    """detectron2's default config plus every gradaug-det key."""
    return add_gradaug_config(get_cfg())


def setup(args):
    """Build the frozen config from ``--config-file`` and ``opts`` and run detectron2's
    ``default_setup`` (logging, output dir, seed, config dump)."""
    from .trainer import validate_config

    cfg = get_gradaug_cfg()
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    validate_config(cfg)  # fail on bad keys before any work (or log file) is made
    cfg.freeze()
    default_setup(cfg, args)
    # gradaug-det's own messages (per-width result tables, conversions) go to the same log
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="gradaug_det", abbrev_name="ga")
    if os.path.isfile(cfg.MODEL.WEIGHTS):
        from ..checkpoint.convert import check_pretrained_config

        check_pretrained_config(cfg)  # warns where converted weights expect other pixel conventions
    return cfg
