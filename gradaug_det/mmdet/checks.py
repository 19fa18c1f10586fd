"""Build-time checks shared by the slimmable mmdet modules: errors name the config key."""
import math

from torch import nn

from ..slim import check_channel_rule

__all__ = ["check_slimmable_args", "check_group_norms"]

_SLICEABLE_NORMS = ("BN", "BN2d", "SyncBN", "GN")


def check_slimmable_args(owner: str, key: str, kwargs: dict, channel_divisor, unsupported=("conv_cfg",),
                         channel_rule: str = "round") -> None:
    """Refuse constructor arguments whose layers cannot run at a sub-network width.

    Args:
        owner: class name for the message (``"SlimmableResNet"``).
        key: the config path of the module (``"model.backbone"``).
        kwargs: the constructor's keyword arguments.
        channel_divisor: the ``channel_divisor`` argument (an int >= 1).
        channel_rule: the ``channel_rule`` argument (:data:`gradaug_det.slim.CHANNEL_RULES`).
        unsupported: arguments that must be None.

    Raises:
        ValueError: naming ``key``'s argument, its value and what is allowed.
    """
    for arg in unsupported:
        if kwargs.get(arg) is not None:
            raise ValueError(f"{owner}: {key}.{arg}={kwargs[arg]!r} is not slimmable; set it to None")
    try:
        check_channel_rule(channel_rule, channel_divisor, rule_key=f"{key}.channel_rule",
                           divisor_key=f"{key}.channel_divisor")
    except ValueError as e:
        raise ValueError(f"{owner}: {e}") from None
    norm_type = (kwargs.get("norm_cfg") or {}).get("type", "BN")
    if norm_type not in _SLICEABLE_NORMS:
        raise ValueError(
            f"{owner}: {key}.norm_cfg.type={norm_type!r} cannot be sliced to a sub-network width; "
            "use BN, SyncBN or GN"
        )


def check_group_norms(module: nn.Module, channel_divisor: int, owner: str, key: str) -> None:
    """Every GroupNorm of ``module`` must keep whole groups at every width.

    Raises:
        ValueError: naming the layer and the ``channel_divisor`` that would work.
    """
    group_norms = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.GroupNorm)]
    required = math.lcm(1, *(m.num_channels // m.num_groups for _, m in group_norms))
    for name, m in group_norms:
        per_group = m.num_channels // m.num_groups
        if channel_divisor % per_group != 0:
            raise ValueError(
                f"{owner}: {name} is GroupNorm({m.num_groups}, {m.num_channels}) with {per_group} "
                f"channels per group, which cannot be sliced at every width with "
                f"{key}.channel_divisor={channel_divisor}; set it to a multiple of {required} "
                "(the least common multiple of every GN layer's channels per group), or use BN"
            )
