"""The generators' argument checks: one line naming the argument, its value and what is allowed."""
from typing import Any, Tuple

import numpy as np

__all__ = ["check_int", "check_int_range"]


def check_int(name: str, value: Any, minimum: int) -> int:
    """Validates an integer argument and returns it.

    Raises:
        ValueError: if ``value`` is not an integer >= ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError("{} must be an integer >= {}, got {!r}".format(name, minimum, value))
    return int(value)


def check_int_range(name: str, value: Any, minimum: int) -> Tuple[int, int]:
    """Validates an inclusive ``(min, max)`` pair of integers and returns it.

    Args:
        name: the argument's name, used in the message (its items are ``name[0]``, ``name[1]``).
        value: the pair.
        minimum: the smallest value allowed for both items.

    Raises:
        ValueError: if ``value`` is not a pair, an item is not an integer >= ``minimum``, or
            ``min > max``.
    """
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise ValueError("{} must be a (min, max) pair of integers, got {!r}".format(name, value)) from None
    lo = check_int("{}[0]".format(name), lo, minimum)
    hi = check_int("{}[1]".format(name), hi, minimum)
    if lo > hi:
        raise ValueError("{} must satisfy min <= max, got {!r}".format(name, value))
    return lo, hi
