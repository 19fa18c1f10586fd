"""Model analysis: FLOP and parameter counts (torch only).

The counter is :class:`torch.utils.flop_counter.FlopCounterMode` (2 FLOPs per multiply-add,
convolutions and matrix products only), the unit of the cost model's pass records
(:mod:`gradaug_det.benchmark.cost`); shared by pruning (``tools/prune.py``), the benchmarks
and the accuracy / cost trade-off (:mod:`gradaug_det.deploy.tradeoff`).
"""
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .parallel import unwrap_model

__all__ = ["backbone_flops", "count_parameters"]


def backbone_flops(model: nn.Module, height: int, width: int) -> int:
    """Forward FLOPs of ``model.backbone`` on one ``height`` x ``width`` image, in eval mode.

    Counted by the cost model's counter (:class:`~torch.utils.flop_counter.FlopCounterMode`:
    2 FLOPs per multiply-add, convolutions and matrix products only), the unit of a pass's
    ``backbone_fwd_flops`` (on the same input). Under
    :func:`gradaug_det.width` this is the sub-network's real compute, since a slimmed layer
    convolves with its sliced weights; a pruned model gives the same count.

    Args:
        model: a detector with a ``backbone`` (a ``DistributedDataParallel`` wrapper is
            looked through).
        height, width: input size in pixels.

    Returns:
        The FLOP count (an int).
    """
    backbone = unwrap_model(model).backbone
    param = next(backbone.parameters())
    image = torch.zeros(1, 3, height, width, device=param.device, dtype=param.dtype)
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            backbone(image)
    finally:
        backbone.train(was_training)
    return int(counter.get_total_flops())


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of ``model`` (every parameter, trainable or frozen)."""
    return sum(p.numel() for p in model.parameters())
