"""Loading mmengine's own checkpoints with torch >= 2.6.

torch 2.6 made ``torch.load`` default to ``weights_only=True``; mmengine 0.10.7 calls it
without the argument, and its full checkpoints (``iter_*.pth``, ``epoch_*.pth``: message
hub buffers, numpy values, the sampler state) are refused, so ``--resume`` and
``load_from`` fail (open-mmlab/mmengine#1655). Plain state dicts (torchvision weights)
load either way.
"""
import logging
import os

import torch

__all__ = ["allow_full_checkpoints"]

_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def allow_full_checkpoints(reason: str) -> None:
    """Let ``torch.load`` calls without ``weights_only`` unpickle full checkpoints again.

    Only for checkpoints the user named and trusts (unpickling can run code). Sets
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` for this process unless the user already set
    it or its opposite; does nothing on torch < 2.6.

    Args:
        reason: what is loaded, for the log line.
    """
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    if (major, minor) < (2, 6) or _ENV in os.environ or "TORCH_FORCE_WEIGHTS_ONLY_LOAD" in os.environ:
        return
    os.environ[_ENV] = "1"
    logging.getLogger(__name__).warning(
        "%s: mmengine 0.10 checkpoints need torch.load(weights_only=False) with torch %s; set %s=1 "
        "for this run. Only load checkpoints you trust.", reason, torch.__version__, _ENV)
