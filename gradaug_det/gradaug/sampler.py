"""Per-iteration draws of GradAug: which sub-networks run, on which input transform.

The sampler owns its random number generator (independent of torch's global RNG, so the
data pipeline and model init are unaffected) and exposes ``state_dict`` so a resumed run
continues the same sequence. Every worker of a distributed run seeds it identically, so
all workers run the same sub-networks in the same order (required for one all-reduce per
iteration and for equal per-worker time).
"""
import random
from dataclasses import dataclass
from typing import List, Optional, Tuple

from ..slim import linear_keep_probs
from .options import SAMPLER_KEYS, GradAugOptions

__all__ = ["SubnetSpec", "SubnetSampler"]


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

    Width sampling: the minimum width (if ``smallest_subnet``) plus ``num_subnets - 1`` (or
    ``num_subnets``) widths uniform in [min_width, max_width], run widest first. Depth
    sampling: each sub-network keeps residual block ``l`` with probability falling
    linearly from 1.0 (first block) to ``depth_min_keep`` (last). Each sub-network draws one
    scale from ``scales`` and/or one angle from ``rotation``.

    Args:
        options: GradAug's options (:class:`~gradaug_det.gradaug.options.GradAugOptions`, already
            validated); default: their defaults.
        **overrides: sampler options (:data:`~gradaug_det.gradaug.options.SAMPLER_KEYS`:
            ``num_subnets``, ``min_width``, ``max_width``, ``smallest_subnet``, ``sampling``,
            ``depth_min_keep``, ``transform``, ``scales``, ``rotation``, ``seed``) over ``options``.
            The private RNG is seeded with ``seed`` (-1: 0; :meth:`from_config` derives it
            from ``SEED``).

    Raises:
        TypeError: for an override that is not a sampler option.
        ValueError: for a bad value, naming its ``GRADAUG.<KEY>`` (in ``options``' spelling).
    """

    def __init__(self, options: Optional[GradAugOptions] = None, **overrides):
        unknown = sorted(set(overrides) - set(SAMPLER_KEYS))
        if unknown:
            raise TypeError(f"SubnetSampler got unknown options {unknown}; allowed: {', '.join(SAMPLER_KEYS)}")
        o = options if options is not None else GradAugOptions()
        if overrides:
            o = GradAugOptions(**dict(o.to_dict(), **overrides), key_prefix=o.key_prefix)
        self.num_subnets = o.num_subnets
        self.min_width, self.max_width = float(o.min_width), float(o.max_width)
        self.smallest = o.smallest_subnet
        self.sampling = o.sampling
        self.min_keep = float(o.depth_min_keep)
        self.transform = o.transform
        self.scales = o.scales
        self.rotation = o.rotation
        self.rng = random.Random(o.sampler_seed())

    @classmethod
    def from_config(cls, cfg) -> "SubnetSampler":
        """Build from ``cfg.GRADAUG`` (seed: ``GRADAUG.SEED``, else ``SEED``, else 0)."""
        o = GradAugOptions.from_yacs(cfg)
        return cls(o, seed=o.sampler_seed(cfg.SEED))

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
