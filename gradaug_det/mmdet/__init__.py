"""GradAug for MMDetection 3.x: slimmable ResNet and FPN, GradAug detectors, the DDP wrapper.

Import it from an mmdet config (``custom_imports = dict(imports=['gradaug_det.mmdet'])``)
to register ``SlimmableResNet``, ``SlimmableFPN`` and ``GradAugMaskRCNN`` /
``GradAugFasterRCNN`` in mmdet's ``MODELS``, ``GradAugDistributedDataParallel`` in
mmengine's ``MODEL_WRAPPERS``, ``GradAugSamplerStateHook`` in ``HOOKS`` and
``PerParameterClipOptimWrapper`` (detectron2's per-parameter gradient clipping) in ``OPTIM_WRAPPERS``. It shares
the width machinery (:mod:`gradaug_det.slim`) and the GradAug iteration
(:func:`gradaug_det.gradaug.gradaug_step`) with the detectron2 side and does not need
detectron2. Install the stack with ``make install-mmdet``
(``tools/install_mmdet.py``: mmengine 0.10, mmcv 2.1.0 built with ops, mmdet 3.3.0).
"""
import importlib.util

if importlib.util.find_spec("mmdet") is None:
    raise ImportError(
        "gradaug_det.mmdet needs MMDetection 3.x (mmdet 3.3.0, mmcv 2.1.0, mmengine 0.10); "
        "install them with `make install-mmdet` or `python tools/install_mmdet.py`"
    )

from .resnet import SlimBasicBlock, SlimBottleneck, SlimmableResNet  # noqa: E402
from .fpn import SlimConvModule, SlimmableFPN  # noqa: E402
from .detector import (  # noqa: E402
    GradAugCascadeRCNN,
    GradAugDetectorMixin,
    GradAugFasterRCNN,
    GradAugMaskRCNN,
    GradAugRetinaNet,
    MMDetTask,
    gradaug_train_step,
)
from .hooks import GradAugSamplerStateHook  # noqa: E402
from .optim import PerParameterClipOptimWrapper  # noqa: E402
from .transforms import BatchGeometry, rescale_batch, rotate_batch, transform_batch  # noqa: E402
from .wrapper import GradAugDistributedDataParallel  # noqa: E402

__all__ = [k for k in globals() if not k.startswith("_") and k != "importlib"]
