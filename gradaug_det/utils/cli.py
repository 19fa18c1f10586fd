"""One short message for a user's mistake, in every tool.

A mistake in what the user gave a tool (a command-line flag, a config file, key or value,
a weights file or URL, a dataset name) raises :class:`UserError` (or a subclass) with one
message naming the flag / key / file, the value, what is allowed and what to change, before
any work starts and before anything is written. Every tool's ``__main__`` block runs through
:func:`run_tool`, which prints that message as ``error: <message>`` on stderr and exits with
status 2 (as argparse does for a bad flag), without a traceback.

Debugging: set the environment variable ``GRADAUG_DET_DEBUG=1`` (:data:`DEBUG_ENV`) and the
full traceback is printed before the message.
"""
import difflib
import os
import sys
import traceback
from typing import Callable, Iterable, List

__all__ = ["UserError", "ConfigError", "MissingFileError", "DEBUG_ENV", "EXIT_USER_ERROR", "run_tool",
           "debug_enabled", "did_you_mean", "check_stage_flags"]

#: Environment variable: when set to anything but "" / "0", :func:`run_tool` prints the traceback too.
DEBUG_ENV = "GRADAUG_DET_DEBUG"
#: Exit status of a tool refusing the user's input (argparse's status for a bad flag).
EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in the user's input; its message says what is wrong and how to fix it.

    Tools print it as one ``error: ...`` line and exit with status 2 (:func:`run_tool`).
    Subclasses also derive from the built-in exception a library caller would expect
    (:class:`ConfigError` is a ``ValueError``, :class:`MissingFileError` a ``FileNotFoundError``).
    """


class ConfigError(UserError, ValueError):
    """A config file, key or value that cannot be used (unknown key, bad value, unregistered
    dataset ...)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file the user named does not exist or cannot be fetched."""


def debug_enabled() -> bool:
    """Whether :data:`DEBUG_ENV` asks for full tracebacks."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def did_you_mean(word: str, candidates: Iterable[str], *, cutoff: float = 0.6) -> str:
    """``"; did you mean 'X'?"`` for the closest of ``candidates`` (``difflib``), or ``""``.

    Args:
        word: what the user wrote.
        candidates: the valid spellings.
        cutoff: ``difflib.get_close_matches``' similarity threshold in [0, 1].
    """
    candidates = list(candidates)
    close: List[str] = difflib.get_close_matches(word, candidates, n=1, cutoff=cutoff)
    if not close:  # case slips (num_subnets vs NUM_SUBNETS)
        lower = {c.lower(): c for c in candidates}
        close = [lower[m] for m in difflib.get_close_matches(word.lower(), list(lower), n=1, cutoff=cutoff)]
    return f"; did you mean {close[0]!r}?" if close else ""


def _fail(message: str) -> None:
    """Print ``error: <message>`` (after the traceback with :data:`DEBUG_ENV`) and exit 2; call
    it inside the ``except`` block."""
    if debug_enabled():
        traceback.print_exc()
    message = message.strip()
    if not message.startswith("error:"):
        message = f"error: {message}"
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def run_tool(fn: Callable, *args, **kwargs):
    """Call a tool's ``fn(*args, **kwargs)``; a user's mistake ends the process with one message.

    :class:`UserError`, and a ``SystemExit`` whose code is a message (a tool's own refusal of
    its arguments: ``raise SystemExit("--width must be in (0, 1]")``), print
    ``error: <message>`` on stderr and exit with status :data:`EXIT_USER_ERROR` (2). Any other
    exception propagates with its traceback (a bug, not a mistake). With
    ``GRADAUG_DET_DEBUG=1`` the traceback of a refusal is printed before its message.

    Returns:
        What ``fn`` returns.
    """
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        _fail(str(e))
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        _fail(e.code)


def check_stage_flags(args, files: Iterable[str] = (), counts: Iterable[str] = (),
                      pairs: Iterable[str] = ()) -> None:
    """The argument checks every multi-stage tool (``tools/quickstart.py``,
    ``tools/mmdet_quickstart.py``) makes before its first stage.

    Args:
        args: the parsed arguments.
        files: attribute names that must name an existing file (``--pretrain-config`` ...).
        counts: attribute names that must be None or an integer >= 1 (``--iters`` ...).
        pairs: attribute names of ``KEY VALUE ...`` lists, which need an even length.

    Raises:
        SystemExit: with a one-line message naming the flag (``run_tool`` prints it as
            ``error: ...``, exit status 2).
    """
    def flag(name):
        return "--" + name.replace("_", "-")

    for name in files:
        if not os.path.isfile(getattr(args, name)):
            raise SystemExit(f"{flag(name)} {getattr(args, name)!r}: no such file")
    for name in counts:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"{flag(name)} must be >= 1, got {value}")
    for name in pairs:
        if len(getattr(args, name)) % 2:
            raise SystemExit(f"{flag(name)} needs KEY VALUE pairs, got an odd count: {getattr(args, name)}")
