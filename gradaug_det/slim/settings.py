"""How a model's sub-networks are formed, recorded in checkpoints and checked on load.

A checkpoint trained with one channel rule and evaluated with another silently runs other
sub-networks (e.g. ``MODEL.SLIMMABLE.CHANNEL_DIVISOR`` 8 vs 1: a 56- instead of a
58-channel stem at width 0.9). So every checkpoint gradaug-det writes holds, under
:data:`RECORD_KEY`, the *slimmable settings*:

* ``channel_rule``: ``MODEL.SLIMMABLE.CHANNEL_RULE`` (``"round"`` / ``"reference"``);
* ``channel_divisor``: ``MODEL.SLIMMABLE.CHANNEL_DIVISOR``;
* ``slim_fpn``: ``MODEL.SLIMMABLE.SLIM_FPN`` (None for models without an FPN).

:func:`check_slimmable_settings` compares a file's record with the model it is loaded into
(or a config's settings): a mismatch is refused where it would change results (``--eval-only`` at
sub-widths, ``tools/prune.py``; see :func:`strict_slimmable_settings`) and logged as a
warning otherwise (training, fine-tuning from another model's weights). Files without a
record (model-zoo weights, older checkpoints) load as before.

Plain torch: the settings of a detectron2 config are
:func:`gradaug_det.config.slimmable_settings`.
"""
import contextlib
import contextvars
import logging
from typing import Any, Dict, Iterator, Mapping, Optional, Union

from torch import nn

from ..utils.cli import UserError
from .control import SlimmableModule

__all__ = [
    "RECORD_KEY",
    "model_slimmable_settings",
    "check_slimmable_settings",
    "strict_slimmable_settings",
    "SlimmableSettingsMismatch",
]

logger = logging.getLogger(__name__)

#: Name of the record in a checkpoint dict (beside ``"model"``).
RECORD_KEY = "gradaug_slimmable"

#: Setting name -> its config key, in the order messages list them.
_KEYS = {
    "channel_rule": "MODEL.SLIMMABLE.CHANNEL_RULE",
    "channel_divisor": "MODEL.SLIMMABLE.CHANNEL_DIVISOR",
    "slim_fpn": "MODEL.SLIMMABLE.SLIM_FPN",
}

_STRICT: "contextvars.ContextVar[str]" = contextvars.ContextVar("gradaug_slimmable_strict", default="")


class SlimmableSettingsMismatch(UserError, ValueError):
    """A checkpoint's slimmable settings differ from the model's where that is refused (a
    :class:`~gradaug_det.utils.cli.UserError`: tools print it without a traceback)."""


def model_slimmable_settings(model: nn.Module) -> Optional[Dict[str, Any]]:
    """The slimmable settings a built model actually uses, read from its layers.

    Works for every model of the project (yacs, LazyConfig, MMDetection): the rule and
    divisor are those of its slimmable layers; ``slim_fpn`` says whether the lateral
    convolutions of its FPN (detectron2's or mmdet's, any module with ``lateral_convs``)
    are slimmable, None if it has no FPN.

    Args:
        model: any module (a DDP wrapper is looked through).

    Returns:
        The settings dict (as :func:`gradaug_det.config.slimmable_settings`), or None when
        the model has no slimmable layer (a stock model: its widths cannot change). Where layers disagree
        (e.g. an mmdet backbone and neck given different ``channel_divisor``), the value is
        the sorted list of what they use.
    """
    model = getattr(model, "module", model)
    rules, divisors, fpn = set(), set(), None
    for m in model.modules():
        if isinstance(m, SlimmableModule):
            if hasattr(m, "rule"):
                rules.add(m.rule)
            if hasattr(m, "divisor"):
                divisors.add(int(m.divisor))
        convs = getattr(m, "lateral_convs", None)
        if isinstance(convs, (nn.ModuleList, list, tuple)) and len(convs):
            fpn = bool(fpn) or any(isinstance(c, SlimmableModule) for c in convs)
    if not rules and not divisors:
        return None
    def one(values, default):
        return default if not values else values.pop() if len(values) == 1 else sorted(values)

    return {"channel_rule": one(rules, "round"), "channel_divisor": one(divisors, 1), "slim_fpn": fpn}


def _as_settings(current) -> Optional[Dict[str, Any]]:
    if current is None:
        return None
    if isinstance(current, nn.Module):
        return model_slimmable_settings(current)
    if isinstance(current, Mapping) and "MODEL" not in current:
        return dict(current)
    raise TypeError(f"check_slimmable_settings compares with a model or a settings dict, got a "
                    f"{type(current).__name__}; for a detectron2 config pass "
                    "gradaug_det.config.slimmable_settings(cfg)")


def check_slimmable_settings(saved: Optional[Mapping], current: Union[nn.Module, Mapping, Any], *,
                             strict: bool, source: str = "the checkpoint") -> bool:
    """Compare a checkpoint's slimmable settings with the model / config it is loaded into.

    A setting that one side does not have (None: no FPN, a file without a record, a
    model without slimmable layers) is not compared.

    Args:
        saved: the checkpoint's :data:`RECORD_KEY` entry, or None.
        current: the model (:func:`model_slimmable_settings`) or a settings dict (of a
            detectron2 config: :func:`gradaug_det.config.slimmable_settings`).
        strict: raise on a mismatch instead of logging a warning.
        source: the file (or what it is), named in the message.

    Returns:
        True if every compared setting matches (or nothing could be compared).

    Raises:
        TypeError: ``current`` is neither a module nor a settings dict (e.g. a config).
        SlimmableSettingsMismatch: with ``strict``, naming each key, the file's value and
            the model's, and what to set.
    """
    if saved is None:
        return True
    if not isinstance(saved, Mapping):
        raise SlimmableSettingsMismatch(f"{source}: its {RECORD_KEY!r} entry is a {type(saved).__name__}, "
                                        "not a dict of slimmable settings; the file is damaged")
    now = _as_settings(current)
    if now is None:
        return True
    diffs = [(name, saved[name], now[name]) for name in _KEYS
             if saved.get(name) is not None and now.get(name) is not None and saved[name] != now[name]]
    if not diffs:
        return True
    listed = ", ".join(f"{_KEYS[n]} {a!r} in the file, {b!r} here" for n, a, b in diffs)
    fix = " ".join(f"{_KEYS[n]} {a!r}" for n, a, _ in diffs)
    message = (f"{source} was trained with other slimmable settings ({listed}): its sub-networks keep "
               f"other channels here. Set {fix} to evaluate the sub-networks it was trained with (in an "
               "MMDetection config: channel_rule / channel_divisor of model.backbone and model.neck).")
    if strict:
        reason = _STRICT.get()
        raise SlimmableSettingsMismatch(message + (f" (refused: {reason})" if reason else ""))
    logger.warning(message + " Training continues with this config's settings.")
    return False


@contextlib.contextmanager
def strict_slimmable_settings(reason: str = "sub-network widths are evaluated", enabled: bool = True
                              ) -> Iterator[None]:
    """Refuse, instead of warn about, mismatching slimmable settings of files loaded in the body.

    The checkpoint record (registered with ``GradAugCheckpointer``) reads this; use it
    where sub-networks of the loaded weights are evaluated or cut out: ``--eval-only`` with
    ``TEST.SLIM_WIDTHS``, ``tools/prune.py``.

    Args:
        reason: why, appended to the error message.
        enabled: False makes this a no-op (e.g. no sub-widths are evaluated).
    """
    token = _STRICT.set(reason) if enabled else None
    try:
        yield
    finally:
        if token is not None:
            _STRICT.reset(token)


def is_strict() -> bool:
    """Whether the caller is inside :func:`strict_slimmable_settings`."""
    return bool(_STRICT.get())


def check_record(model: nn.Module, saved: Any, path: str) -> None:
    """The checkpoint record's load check: :func:`check_slimmable_settings` against ``model``,
    strict inside :func:`strict_slimmable_settings`."""
    check_slimmable_settings(saved, model, strict=is_strict(), source=path or "the checkpoint")
