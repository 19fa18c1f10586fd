"""GradAug's options: defined, defaulted and validated once, read by every front end.

:class:`GradAugOptions` is the one definition of GradAug's settings and their defaults
(the paper's ImageNet setting). Each front end spells the same fields its own way:

* detectron2 yacs configs: ``GRADAUG.<FIELD>`` in upper case (``GRADAUG.SUBNET_LOSS``);
  :func:`gradaug_det.config.add_gradaug_config` takes its defaults from here, and
  :meth:`GradAugOptions.from_yacs` reads them back;
* LazyConfigs: the ``gradaug`` node (``gradaug.subnet_loss``, :data:`LAZY_KEYS`);
* MMDetection configs: the detector's ``model.gradaug`` dict (``model.gradaug.subnet_loss``,
  :data:`MMDET_KEYS`).

An instance is validated when it is made (:meth:`GradAugOptions.validate`, the one check of
every option), so the sampler and the tasks that receive one never check again. Plain
torch: no detectron2 or mmdet import.
"""
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Tuple

from ..slim import check_width
from ..utils.cli import ConfigError, did_you_mean

__all__ = ["GradAugOptions", "SAMPLINGS", "TRANSFORMS", "SUBNET_LOSSES", "SAMPLER_KEYS", "LAZY_KEYS",
           "MMDET_KEYS"]

SAMPLINGS = ("width", "depth")
TRANSFORMS = ("scale", "rotate", "scale_rotate")
SUBNET_LOSSES = ("soft", "gt", "gt+soft")


@dataclass(frozen=True)
class GradAugOptions:
    """GradAug's settings (the meaning of each: the comment of its key in
    ``gradaug_det/config.py``, ``GRADAUG.<FIELD>``).

    Attributes:
        enabled: run the sub-network passes (yacs ``GRADAUG.ENABLED``, lazy ``gradaug.enabled``;
            an mmdet GradAug detector always runs them).
        num_subnets: sub-networks per iteration after the full network, >= 1 (reference: 3).
        min_width, max_width: width range of the sub-networks, 0 < min <= max <= 1.
        smallest_subnet: always include a sub-network at ``min_width``.
        sampling: "width" (leading channels) or "depth" (residual blocks dropped).
        depth_min_keep: depth sampling's keep probability of the last block, in (0, 1].
        depth_eval_scale: depth sampling: scale residual branches by their keep probability at
            evaluation (yacs only).
        transform: the sub-networks' input transform: "scale", "rotate" or "scale_rotate".
        scales: relative input scales in (0, 4], one drawn per sub-network.
        rotation: (min, max) rotation in degrees, min <= max.
        subnet_loss: "soft" (KL to the full network's predictions), "gt" or "gt+soft".
        soft_weight, gt_weight: weights of the two kinds of sub-network loss, finite and >= 0.
        seed: seed of the sub-network sampler; -1 derives it from the run's seed
            (:meth:`sampler_seed`).
        key_prefix: how the caller spells the keys in error messages: an upper-case prefix
            names them in upper case (``"GRADAUG."`` -> ``GRADAUG.SUBNET_LOSS``), any other in
            lower case (``"model.gradaug."`` -> ``model.gradaug.subnet_loss``). Not an option:
            excluded from comparison and :meth:`to_dict`.

    Raises:
        ValueError: when made with a bad value (:meth:`validate`).
    """

    enabled: bool = False
    num_subnets: int = 3
    min_width: float = 0.9
    max_width: float = 1.0
    smallest_subnet: bool = True
    sampling: str = "width"
    depth_min_keep: float = 0.8
    depth_eval_scale: bool = False
    transform: str = "scale"
    scales: Tuple[float, ...] = (1.0, 0.857, 0.714, 0.571)
    rotation: Tuple[float, float] = (-20.0, 20.0)
    subnet_loss: str = "soft"
    soft_weight: float = 1.0
    gt_weight: float = 1.0
    seed: int = -1
    key_prefix: str = field(default="GRADAUG.", compare=False, repr=False)

    def __post_init__(self):
        self.validate()
        # normalised after the check: yacs and LazyConfigs may hold lists
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        object.__setattr__(self, "rotation", (float(self.rotation[0]), float(self.rotation[1])))

    def key(self, name: str) -> str:
        """The caller's spelling of option ``name`` (``"subnet_loss"`` -> ``GRADAUG.SUBNET_LOSS``)."""
        p = self.key_prefix
        return p + (name.upper() if p.isupper() else name)

    def validate(self) -> None:
        """Check every option; the one validation of GradAug's settings.

        Raises:
            ValueError: naming the key in the caller's spelling (:meth:`key`), the value and
                what is allowed.
        """

        def bad(name, allowed):
            raise ValueError(f"{self.key(name)}={getattr(self, name)!r} is invalid: {allowed}")

        for name in ("enabled", "smallest_subnet", "depth_eval_scale"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be True or False")
        if isinstance(self.num_subnets, bool) or not isinstance(self.num_subnets, int) or self.num_subnets < 1:
            bad("num_subnets", "must be an integer >= 1")
        for name in ("min_width", "max_width"):
            try:
                check_width(getattr(self, name) if _is_number(getattr(self, name)) else None)
            except ValueError:
                bad(name, "widths must be in (0, 1]")
        if self.min_width > self.max_width:
            bad("min_width", f"must be <= {self.key('max_width')} ({self.max_width})")
        if self.sampling not in SAMPLINGS:
            bad("sampling", f"allowed: {', '.join(SAMPLINGS)}")
        if not _is_number(self.depth_min_keep) or not 0.0 < self.depth_min_keep <= 1.0:
            bad("depth_min_keep", "a keep probability must be in (0, 1]")
        if self.transform not in TRANSFORMS:
            bad("transform", f"allowed: {', '.join(TRANSFORMS)}")
        if len(self.scales) == 0:
            bad("scales", "give at least one relative scale, e.g. (1.0, 0.857, 0.714, 0.571)")
        if any(not (_is_number(s) and 0.0 < s <= 4.0 and math.isfinite(s)) for s in self.scales):
            bad("scales", "relative scales must be numbers in (0, 4]")
        if len(self.rotation) != 2 or not all(map(_is_number, self.rotation)) or self.rotation[0] > self.rotation[1]:
            bad("rotation", "give (min_degrees, max_degrees) with min <= max")
        if self.subnet_loss not in SUBNET_LOSSES:
            bad("subnet_loss", f"allowed {', '.join(SUBNET_LOSSES)}")
        for name in ("soft_weight", "gt_weight"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                bad(name, "a loss weight must be a finite number >= 0")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < -1:
            bad("seed", "must be an integer >= 0, or -1 to derive it from the run's seed")

    @classmethod
    def from_yacs(cls, cfg) -> "GradAugOptions":
        """The options of a detectron2 config's ``GRADAUG`` node (errors name ``GRADAUG.<KEY>``).

        Args:
            cfg: a ``CfgNode`` with :func:`gradaug_det.config.add_gradaug_config`'s keys.

        Raises:
            ValueError: naming the bad ``GRADAUG.<KEY>`` (:meth:`validate`).
        """
        g = cfg.GRADAUG
        return cls(**{name: g[name.upper()] for name in _OPTION_NAMES}, key_prefix="GRADAUG.")

    @classmethod
    def from_dict(cls, options: Optional[Mapping[str, Any]], key_prefix: str,
                  allowed: Iterable[str]) -> "GradAugOptions":
        """The options of a LazyConfig's ``gradaug`` node or an mmdet ``model.gradaug`` dict:
        the given keys over the defaults.

        Args:
            options: key -> value (None: all defaults).
            key_prefix: the keys' spelling in messages (``"gradaug."``, ``"model.gradaug."``).
            allowed: the keys this front end reads (:data:`LAZY_KEYS`, :data:`MMDET_KEYS`).

        Raises:
            ValueError: for a key outside ``allowed`` (listing them), or a bad value
                (:meth:`validate`).
        """
        options = dict(options or {})
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            hint = did_you_mean(key_prefix + unknown[0], [key_prefix + k for k in allowed])
            raise ConfigError(f"{key_prefix.rstrip('.')} has unknown keys {unknown}; allowed: {sorted(allowed)}{hint}")
        return cls(**options, key_prefix=key_prefix)

    def to_dict(self, keys: Optional[Iterable[str]] = None) -> dict:
        """The options as a dict (``keys``: only these; default every option)."""
        return {name: getattr(self, name) for name in (keys or _OPTION_NAMES)}

    def sampler_seed(self, run_seed: Optional[int] = None) -> int:
        """The sub-network sampler's seed: ``seed``, else (-1) the run's seed if >= 0, else 0.

        Args:
            run_seed: yacs ``SEED``, a LazyConfig's ``train.seed``; None where there is none.
        """
        if self.seed >= 0:
            return self.seed
        return run_seed if run_seed is not None and run_seed >= 0 else 0

    def unused_parameters_reason(self) -> Optional[str]:
        """Why GradAug needs DDP's ``find_unused_parameters=True``, or None if it does not;
        the one rule used by the detectron2 trainer, the LazyConfig tool and mmdet's
        ``GradAugDistributedDataParallel``.

        Under DistributedDataParallel every GradAug pass but the last runs under ``no_sync``
        (:func:`gradaug_det.gradaug.gradaug_step`), so gradients are reduced in the last
        (sub-network) pass only. Depth sub-networks skip residual blocks, and sub-network
        losses without "gt" (only the soft classification loss) leave the RPN and the
        box-regression / mask heads without gradient in that pass: DDP must then search for
        unused parameters, or it waits for gradients that never come.

        Returns:
            A sentence naming the setting that needs it, or None.
        """
        if self.sampling == "depth":
            return "depth sub-networks (sampling='depth') skip residual blocks in the synchronised pass"
        if "gt" not in self.subnet_loss:
            return (f"sub-network loss {self.subnet_loss!r} leaves the RPN and box/mask regression heads "
                    "without gradient in the synchronised pass")
        return None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


#: Every option, in order (``key_prefix`` is not one).
_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(GradAugOptions) if f.name != "key_prefix")

#: The options :class:`~gradaug_det.gradaug.SubnetSampler` reads.
SAMPLER_KEYS = ("num_subnets", "min_width", "max_width", "smallest_subnet", "sampling", "depth_min_keep",
                "transform", "scales", "rotation", "seed")

#: A LazyConfig's ``gradaug`` node (the yacs keys but ``depth_eval_scale``).
LAZY_KEYS = tuple(k for k in _OPTION_NAMES if k != "depth_eval_scale")

#: An mmdet GradAug detector's ``model.gradaug`` (the detector type enables GradAug;
#: no ``depth_eval_scale``).
MMDET_KEYS = tuple(k for k in _OPTION_NAMES if k not in ("enabled", "depth_eval_scale"))
