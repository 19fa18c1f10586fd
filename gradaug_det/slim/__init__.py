"""Width machinery in plain torch: the channel rule, channel slicing, width/depth control.

Everything here but :class:`SlimConv2d` (a detectron2 ``Conv2d``, imported on first
use) depends on torch only, so the MMDetection adapter shares it without detectron2.
"""
import importlib

from .channels import (
    CHANNEL_RULES,
    check_channel_rule,
    check_width,
    make_divisible,
    preferred_channel_divisor,
    resnet_channel_counts,
    resnet_channel_ratios,
    slim_channels,
)
from .control import (
    DroppableBlock,
    SlimmableModule,
    depth,
    get_width,
    linear_keep_probs,
    residual_blocks,
    set_depth_mask,
    set_width,
    width,
)
from .functional import (
    ConvSlice,
    conv2d_slice,
    conv_slice,
    norm_to_input,
    pad_channels,
    select_channels,
    slim_conv2d,
    slim_norm,
    sliced_conv_state,
    sliced_input_weight,
)
from .linear import SlimLinear

# detectron2 layers, imported when first accessed
_DETECTRON2_LAYERS = {"SlimConv2d": ".layers"}


def __getattr__(name):
    if name in _DETECTRON2_LAYERS:
        return getattr(importlib.import_module(_DETECTRON2_LAYERS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [k for k in globals() if not k.startswith("_") and k != "importlib"] + list(_DETECTRON2_LAYERS)
