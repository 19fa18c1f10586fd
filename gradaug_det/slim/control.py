"""Switching a network between sub-networks: width and depth (block drop).

Every slimmable layer carries its own ``width`` attribute; :func:`set_width` sets it
on every such layer under a module and :func:`width` does the same for the duration
of a ``with`` block. Residual blocks that can be dropped carry a ``drop`` flag, set
by :func:`set_depth_mask` / :func:`depth`.
"""
import contextlib
from typing import Iterator, List, Sequence

from torch import nn

from .channels import check_width

__all__ = [
    "SlimmableModule",
    "DroppableBlock",
    "set_width",
    "get_width",
    "width",
    "residual_blocks",
    "set_depth_mask",
    "depth",
    "linear_keep_probs",
]


class SlimmableModule:
    """Mixin marking a module whose channels follow a ``width`` attribute."""

    width: float = 1.0


class DroppableBlock:
    """Mixin marking a residual block whose residual branch can be dropped.

    Attributes:
        drop (bool): skip the residual branch (the block becomes its shortcut).
        eval_scale (float): at evaluation, the residual branch is multiplied by this
            (the stochastic-depth rule: its keep probability); 1.0 = unscaled.
    """

    drop: bool = False
    eval_scale: float = 1.0


def _slimmable(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if isinstance(m, SlimmableModule)]


def set_width(model: nn.Module, w: float) -> None:
    """Set the width of every slimmable layer under ``model``.

    Args:
        model: any module; layers that are not slimmable are left alone.
        w: the width, in (0, 1].

    Raises:
        ValueError: if ``w`` is outside (0, 1].
    """
    w = check_width(w)
    for m in _slimmable(model):
        m.width = w


def get_width(model: nn.Module) -> float:
    """Return the width of the slimmable layers under ``model`` (1.0 if there are none).

    Raises:
        RuntimeError: if the layers disagree (a width was set on part of the model).
    """
    widths = {m.width for m in _slimmable(model)}
    if len(widths) > 1:
        raise RuntimeError(f"slimmable layers have mixed widths {sorted(widths)}")
    return widths.pop() if widths else 1.0


@contextlib.contextmanager
def width(model: nn.Module, w: float) -> Iterator[nn.Module]:
    """Run the body with ``model`` at width ``w``, then restore every layer's width.

    The previous widths are restored also when the body raises.

    Example::

        with gradaug_det.width(model, 0.9):
            losses = model(batch)
    """
    w = check_width(w)
    layers = _slimmable(model)
    previous = [m.width for m in layers]
    try:
        for m in layers:
            m.width = w
        yield model
    finally:
        for m, p in zip(layers, previous):
            m.width = p


def residual_blocks(model: nn.Module) -> List[nn.Module]:
    """The droppable residual blocks under ``model``, in forward order."""
    return [m for m in model.modules() if isinstance(m, DroppableBlock)]


def linear_keep_probs(num_blocks: int, min_keep: float) -> List[float]:
    """Keep probabilities falling linearly from 1.0 (first block) to ``min_keep`` (last)."""
    if num_blocks == 1:
        return [1.0]
    return [1.0 - (1.0 - min_keep) * i / (num_blocks - 1) for i in range(num_blocks)]


def set_depth_mask(model: nn.Module, keep: Sequence[bool]) -> None:
    """Keep (True) or drop (False) each residual block of :func:`residual_blocks`.

    Raises:
        ValueError: if ``keep`` does not have one entry per block.
    """
    blocks = residual_blocks(model)
    if len(keep) != len(blocks):
        raise ValueError(f"depth mask has {len(keep)} entries but the model has {len(blocks)} residual blocks")
    for block, k in zip(blocks, keep):
        block.drop = not bool(k)


@contextlib.contextmanager
def depth(model: nn.Module, keep: Sequence[bool]) -> Iterator[nn.Module]:
    """Run the body with the blocks where ``keep`` is False dropped; restore afterwards."""
    blocks = residual_blocks(model)
    previous = [b.drop for b in blocks]
    try:
        set_depth_mask(model, keep)
        yield model
    finally:
        for b, p in zip(blocks, previous):
            b.drop = p
