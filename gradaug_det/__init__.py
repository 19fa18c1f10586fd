"""gradaug-det: GradAug (Yang, Zhu, Chen, NeurIPS 2020) for detectron2.

Importing this package registers the slimmable backbones (and the other components
it provides) in detectron2's registries.
"""
import warnings

with warnings.catch_warnings():
    # detectron2's import scripts a few ops with torch.jit, which torch>=2.10 flags as
    # deprecated on every import; the notice is about detectron2, not about your code.
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    import detectron2.modeling  # noqa: F401

from .config import add_gradaug_config
from .slim import depth, get_width, set_depth_mask, set_width, slim_channels, width
from . import modeling  # noqa: F401  (registers backbones and meta-architectures)
from .checkpoint import prune as _prune  # noqa: F401  (registers build_pruned_resnet_fpn_backbone)
from .data import register_imagenet, register_quickstart

# Dataset names (lazy: nothing is read or generated until a dataset is first used).
register_quickstart()
register_imagenet()

__version__ = "0.1.0"
__all__ = ["add_gradaug_config", "set_width", "get_width", "width", "depth", "set_depth_mask",
           "slim_channels"]
