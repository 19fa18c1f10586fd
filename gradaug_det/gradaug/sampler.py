"""Per-iteration draws of GradAug: which sub-networks run, on which input transform.

The sampler owns its random number generator (independent of torch's global RNG, so the
data pipeline and model init are unaffected) and exposes ``state_dict`` so a resumed run
continues the same sequence. Every worker of a distributed run seeds it identically, so
all workers run the same sub-networks in the same order (required for one all-reduce per
iteration and for equal per-worker time).
"""
import math
import random
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from ..slim import check_width, linear_keep_probs

__all__ = ["SubnetSpec", "SubnetSampler", "SAMPLINGS", "TRANSFORMS", "SUBNET_LOSSES"]

SAMPLINGS = ("width", "depth")
TRANSFORMS = ("scale", "rotate", "scale_rotate")
SUBNET_LOSSES = ("soft", "gt", "gt+soft")


@dataclass(frozen=True)
class SubnetSpec:
    """One sub-network of one iteration.

    Attributes:
        width: network width (1.0 for depth sub-networks).
        keep: per residual block keep (True) / drop (False), or None for width sampling.
        scale: relative input scale (1.0 = unchanged).
        angle: rotation in degrees (0.0 = none).
    """

    width: float = 1.0
    keep: Optional[Tuple[bool, ...]] = None
    scale: float = 1.0
    angle: float = 0.0

    def describe(self) -> dict:
        """Scalars worth logging: width, scale, angle, fraction of blocks kept."""
        out = {"width": self.width, "scale": self.scale, "angle": self.angle}
        if self.keep is not None:
            out["depth_keep"] = sum(self.keep) / len(self.keep)
        return out


class SubnetSampler:
    """Draw the sub-networks of each GradAug iteration (reference semantics).

    Width sampling: the minimum width (if ``smallest``) plus ``num_subnets - 1`` (or
    ``num_subnets``) widths uniform in [min_width, max_width], run widest first. Depth
    sampling: each sub-network keeps residual block ``l`` with probability falling
    linearly from 1.0 (first block) to ``min_keep`` (last). Each sub-network draws one
    scale from ``scales`` and/or one angle from ``rotation``.

    Args:
        num_subnets: sub-networks per iteration, >= 1 (``GRADAUG.NUM_SUBNETS``).
        min_width, max_width: width range, 0 < min <= max <= 1.
        smallest: always include ``min_width`` (``GRADAUG.SMALLEST_SUBNET``).
        sampling: "width" or "depth".
        min_keep: depth sampling's keep probability of the last block.
        transform: "scale", "rotate" or "scale_rotate".
        scales: relative input scales, one drawn per sub-network.
        rotation: (min, max) angle in degrees.
        seed: seed of the private RNG.
    """

    def __init__(self, *, num_subnets: int = 3, min_width: float = 0.9, max_width: float = 1.0,
                 smallest: bool = True, sampling: str = "width", min_keep: float = 0.8,
                 transform: str = "scale", scales: Sequence[float] = (1.0, 0.857, 0.714, 0.571),
                 rotation: Sequence[float] = (-20.0, 20.0), seed: int = 0):
        validate_sampler_args(num_subnets=num_subnets, min_width=min_width, max_width=max_width,
                              sampling=sampling, min_keep=min_keep, transform=transform,
                              scales=scales, rotation=rotation)
        self.num_subnets = num_subnets
        self.min_width, self.max_width = float(min_width), float(max_width)
        self.smallest = smallest
        self.sampling = sampling
        self.min_keep = float(min_keep)
        self.transform = transform
        self.scales = tuple(float(s) for s in scales)
        self.rotation = (float(rotation[0]), float(rotation[1]))
        self.rng = random.Random(seed)

    @classmethod
    def from_config(cls, cfg) -> "SubnetSampler":
        """Build from ``cfg.GRADAUG`` (seed: ``GRADAUG.SEED``, else ``SEED``, else 0)."""
        g = cfg.GRADAUG
        seed = g.SEED if g.SEED >= 0 else (cfg.SEED if cfg.SEED >= 0 else 0)
        return cls(num_subnets=g.NUM_SUBNETS, min_width=g.MIN_WIDTH, max_width=g.MAX_WIDTH,
                   smallest=g.SMALLEST_SUBNET, sampling=g.SAMPLING, min_keep=g.DEPTH_MIN_KEEP,
                   transform=g.TRANSFORM, scales=g.SCALES, rotation=g.ROTATION, seed=seed)

    def sample(self, num_blocks: int = 0) -> List[SubnetSpec]:
        """Draw this iteration's sub-networks, in the order they run (widest first).

        Args:
            num_blocks: residual blocks of the model (depth sampling only).
        """
        rng = self.rng
        if self.sampling == "width":
            widths = [self.min_width] if self.smallest else []
            while len(widths) < self.num_subnets:
                widths.append(rng.uniform(self.min_width, self.max_width))
            widths.sort(reverse=True)
            masks = [None] * len(widths)
        else:
            if num_blocks < 1:
                raise ValueError("GRADAUG.SAMPLING='depth' needs a model with droppable residual blocks")
            probs = linear_keep_probs(num_blocks, self.min_keep)
            masks = [tuple(rng.random() < p for p in probs) for _ in range(self.num_subnets)]
            masks.sort(key=sum, reverse=True)  # deepest first, like widest first
            widths = [1.0] * self.num_subnets
        specs = []
        for w, keep in zip(widths, masks):
            scale = rng.choice(self.scales) if self.transform in ("scale", "scale_rotate") else 1.0
            angle = rng.uniform(*self.rotation) if self.transform in ("rotate", "scale_rotate") else 0.0
            specs.append(SubnetSpec(width=w, keep=keep, scale=scale, angle=angle))
        return specs

    def state_dict(self) -> dict:
        """The RNG state, so that ``--resume`` continues the same draws."""
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the RNG state saved by :meth:`state_dict`."""
        rng_state = state["rng"]
        # checkpoints may turn the inner tuple into a list
        self.rng.setstate((rng_state[0], tuple(rng_state[1]), rng_state[2]))


def validate_loss_args(*, subnet_loss, soft_weight, gt_weight, prefix="GRADAUG.", lowercase=False) -> None:
    """Check the sub-network loss and its weights (finite and >= 0); the one check used by
    the detectron2 config and MMDetection's ``model.gradaug``.

    Raises:
        ValueError: naming the key (``prefix`` + name, lower case with ``lowercase``), the
            value and what is allowed.
    """

    def name(key):
        return prefix + (key.lower() if lowercase else key)

    if subnet_loss not in SUBNET_LOSSES:
        raise ValueError(f"{name('SUBNET_LOSS')}={subnet_loss!r} is invalid: allowed {', '.join(SUBNET_LOSSES)}")
    for key, value in (("SOFT_WEIGHT", soft_weight), ("GT_WEIGHT", gt_weight)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name(key)}={value!r} is invalid: a loss weight must be a finite number >= 0")


def validate_sampler_args(*, num_subnets, min_width, max_width, sampling, min_keep, transform,
                          scales, rotation, prefix="GRADAUG.", lowercase=False) -> None:
    """Raise ValueError naming the config key, the value and what is allowed.

    Args:
        prefix: what the keys are under (``"GRADAUG."`` in detectron2 configs,
            ``"model.gradaug."`` in MMDetection configs).
        lowercase: name the keys in lower case (MMDetection style).
    """

    def name(key):
        return prefix + (key.lower() if lowercase else key)

    def bad(key, value, allowed):
        raise ValueError(f"{name(key)}={value!r} is invalid: {allowed}")

    if not isinstance(num_subnets, int) or num_subnets < 1:
        bad("NUM_SUBNETS", num_subnets, "must be an integer >= 1")
    for key, value in (("MIN_WIDTH", min_width), ("MAX_WIDTH", max_width)):
        try:
            check_width(value)
        except ValueError:
            bad(key, value, "widths must be in (0, 1]")
    if min_width > max_width:
        bad("MIN_WIDTH", min_width, f"must be <= {name('MAX_WIDTH')} ({max_width})")
    if sampling not in SAMPLINGS:
        bad("SAMPLING", sampling, f"allowed: {', '.join(SAMPLINGS)}")
    if not 0.0 < min_keep <= 1.0:
        bad("DEPTH_MIN_KEEP", min_keep, "a keep probability must be in (0, 1]")
    if transform not in TRANSFORMS:
        bad("TRANSFORM", transform, f"allowed: {', '.join(TRANSFORMS)}")
    if len(scales) == 0:
        bad("SCALES", scales, "give at least one relative scale, e.g. (1.0, 0.857, 0.714, 0.571)")
    if any(not (isinstance(s, (int, float)) and 0.0 < s <= 4.0 and math.isfinite(s)) for s in scales):
        bad("SCALES", scales, "relative scales must be numbers in (0, 4]")
    if len(rotation) != 2 or rotation[0] > rotation[1]:
        bad("ROTATION", rotation, "give (min_degrees, max_degrees) with min <= max")
