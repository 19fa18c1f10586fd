"""Width machinery in plain torch: the channel rule, slimmable layers, width/depth control."""
from .channels import check_width, slim_channels
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
from .layers import SlimConv2d, slim_norm
from .linear import SlimLinear

__all__ = [k for k in globals() if not k.startswith("_")]
