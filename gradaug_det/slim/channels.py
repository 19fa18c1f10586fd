"""The one channel rule: how many channels a layer keeps at a given width."""

__all__ = ["slim_channels", "check_width"]


def check_width(width: float) -> float:
    """Validate a network width.

    Args:
        width: fraction of every layer's channels a sub-network keeps.

    Returns:
        ``width`` as a float.

    Raises:
        ValueError: if ``width`` is not in (0, 1].
    """
    try:
        w = float(width)
    except (TypeError, ValueError):
        raise ValueError(f"width must be a number in (0, 1], got {width!r}") from None
    if not 0.0 < w <= 1.0:
        raise ValueError(f"width must be in (0, 1], got {width!r}")
    return w


def slim_channels(channels: int, width: float, divisor: int = 1) -> int:
    """Number of leading channels a layer of ``channels`` keeps at ``width``.

    With ``divisor == 1`` this is the GradAug reference rule, round half up:
    ``max(1, int(channels * width + 0.5))``. With ``divisor = d > 1`` the count is
    aligned to a multiple of ``d`` (hardware-friendly widths):
    ``max(d, int(channels * width / d + 0.5) * d)``. The result never exceeds
    ``channels``.

    Args:
        channels: the layer's full channel count.
        width: the network width, in (0, 1].
        divisor: channel alignment (``MODEL.SLIMMABLE.CHANNEL_DIVISOR``), >= 1.

    Returns:
        The number of channels kept.
    """
    if width == 1.0:
        return channels
    if divisor < 1:
        raise ValueError(f"channel divisor must be >= 1, got {divisor}")
    if divisor == 1:
        count = max(1, int(channels * width + 0.5))
    else:
        count = max(divisor, int(channels * width / divisor + 0.5) * divisor)
    return min(channels, count)
