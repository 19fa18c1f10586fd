"""Loading an mmdet config the way this project's mmdet tools run it."""
import os.path as osp
from typing import Optional

__all__ = ["load_runner_config"]


def load_runner_config(path: str, cfg_options: Optional[dict] = None, launcher: str = "none",
                       work_dir: Optional[str] = None):
    """Read an mmdet config for mmengine's ``Runner``, as mmdet's own tools do.

    Registers mmdet's modules, merges ``--cfg-options`` overrides, sets the launcher and
    the work dir (the argument, else the config's ``work_dir``, else
    ``work_dirs/<config name>``).

    Raises:
        SystemExit: the config file does not exist.
    """
    from mmengine.config import Config
    from mmdet.utils import register_all_modules

    if not osp.isfile(path):
        raise SystemExit(f"config file not found: {path}")
    register_all_modules(init_default_scope=False)
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    cfg.launcher = launcher
    cfg.work_dir = work_dir or cfg.get("work_dir") or osp.join("work_dirs", osp.splitext(osp.basename(path))[0])
    return cfg
