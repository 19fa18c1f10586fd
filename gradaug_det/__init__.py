"""gradaug-det: GradAug (Yang, Zhu, Chen, NeurIPS 2020) for detectron2 and MMDetection.

Importing this package where detectron2 is installed registers the slimmable backbones
(and the other components it provides) in detectron2's registries. The width machinery
(:mod:`gradaug_det.slim`) and the GradAug iteration (:mod:`gradaug_det.gradaug`) need
torch only; :mod:`gradaug_det.mmdet` adapts them to MMDetection 3.x and imports without
detectron2.
"""
import warnings

from .env import check_supported_versions

check_supported_versions()  # one line for a Python or torch older than supported, before any import of them

from .slim import depth, get_width, set_depth_mask, set_width, slim_channels, width  # noqa: E402

__version__ = "0.1.0"
__all__ = ["set_width", "get_width", "width", "depth", "set_depth_mask", "slim_channels"]

try:
    import detectron2  # noqa: F401
    HAS_DETECTRON2 = True
except ModuleNotFoundError as e:  # only a missing detectron2; any other import error propagates
    if e.name != "detectron2":
        raise
    HAS_DETECTRON2 = False

if HAS_DETECTRON2:
    with warnings.catch_warnings():
        # detectron2's import scripts a few ops with torch.jit, which torch>=2.10 flags as
        # deprecated on every import; the notice is about detectron2, not about your code.
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        import detectron2.modeling  # noqa: F401

    from .config import add_gradaug_config
    from . import modeling  # noqa: F401  (registers backbones, the pruned one too, and meta-architectures)
    from .data import register_imagenet, register_quickstart

    # Dataset names (lazy: nothing is read or generated until a dataset is first used).
    register_quickstart()
    register_imagenet()
    __all__ += ["add_gradaug_config"]
