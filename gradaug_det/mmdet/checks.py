"""Build-time checks shared by the slimmable mmdet modules: errors name the config key."""
from torch import nn

from ..slim import check_channel_rule
from ..slim.channels import GroupNormSlice, check_group_norm_slicing

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


def check_group_norms(module: nn.Module, channel_divisor: int, owner: str, key: str,
                      channel_rule: str = "round") -> None:
    """Every GroupNorm of ``module`` must keep whole groups at every width (the rule of
    :func:`gradaug_det.slim.channels.check_group_norm_slicing`).

    Args:
        module: the slimmable backbone or neck (every convolution is sliced).
        channel_divisor, channel_rule: its ``channel_divisor`` / ``channel_rule`` arguments.
        owner: class name for the message (``"SlimmableResNet"``).
        key: the config path of the module (``"model.backbone"``).

    Raises:
        ValueError: naming the layer and ``key``'s ``channel_divisor`` (a multiple that would
            work) or ``channel_rule``.
    """
    layers = [GroupNormSlice(name, m.num_groups, m.num_channels, channel_divisor, channel_rule)
              for name, m in module.named_modules() if isinstance(m, nn.GroupNorm)]
    try:
        check_group_norm_slicing(layers, divisor_key=f"{key}.channel_divisor", rule_key=f"{key}.channel_rule",
                                 bn_fix=f"a BN-type norm ({key}.norm_cfg.type: BN, SyncBN)")
    except ValueError as e:
        raise ValueError(f"{owner}: {e}") from None
