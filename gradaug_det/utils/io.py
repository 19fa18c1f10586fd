"""Writing files without leaving them half-written, readable as the user's umask says.

Every file gradaug-det writes itself (checkpoints and ``last_checkpoint`` through
:class:`~gradaug_det.checkpoint.checkpointer.GradAugCheckpointer`, pruned and converted
weights, configs, drawings, result and benchmark files, generated data) goes through this
module:

* :func:`atomic_write` / :func:`atomic_path` write to a temporary file in the destination's
  directory and rename it over the destination (``os.replace``, atomic on POSIX), so a killed
  process leaves either the old file or the complete new one, never a partial file.
* The finished file has the mode a plain ``open(path, "w")`` would give it,
  ``0o666 & ~umask`` (0644 under umask 022, 0664 under 002), not the temporary file's 0600:
  on a shared cluster, teammates read a run's weights as they read its logs.
* :func:`atomic_files` does the same for a directory of files written by someone else's code.
* :func:`atomic_torch_save` and :func:`atomic_pickle_dump` (every weights file the project
  writes) refuse an object holding a NaN or Inf tensor or array (:func:`check_finite_weights`)
  before anything is written.
* :func:`check_output_path` checks an output path before any work starts.
"""
import contextlib
import os
import pickle
import shutil
import tempfile
from typing import Any, Iterator, List, Sequence

from .cli import UserError

__all__ = ["atomic_write", "atomic_path", "atomic_files", "atomic_torch_save", "atomic_pickle_dump",
           "check_output_path", "check_input_file", "file_mode", "NonFiniteWeightsError", "nonfinite_tensors",
           "check_finite_weights"]


class NonFiniteWeightsError(UserError, FloatingPointError):
    """Weights to be written hold NaN or Inf; nothing was written (a
    :class:`~gradaug_det.utils.cli.UserError`: tools print it without a traceback)."""


def file_mode() -> int:
    """The permission bits of a new file under the process's umask: ``0o666 & ~umask``.

    Read from ``/proc/self/status`` where available (no change of the process's umask),
    else by setting and restoring it.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _sync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):  # make a rename durable
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _temp_file(path: str, make_dirs: bool, suffix: str = ""):
    """``(fd, temporary path, directory)`` beside ``path``, with :func:`file_mode`'s bits."""
    directory = os.path.dirname(os.path.abspath(path))
    if make_dirs:
        os.makedirs(directory, exist_ok=True)
    base = os.path.basename(path)
    if suffix:
        base = base[: -len(suffix)]
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.tmp-", suffix=suffix, dir=directory)
    try:
        os.fchmod(fd, file_mode())  # mkstemp's 0600 would survive the rename
    except BaseException:
        os.close(fd)
        os.remove(tmp)
        raise
    return fd, tmp, directory


def check_output_path(path: str, what: str = "output", *, make_dirs: bool = False) -> str:
    """Check before any work that ``path`` can be written.

    Args:
        path: the file to be written.
        what: how to name it in errors (e.g. ``"--emit-config"``).
        make_dirs: the writer creates missing directories; else the directory must exist.

    Returns:
        ``path``.

    Raises:
        ValueError: naming ``what``, the path and the problem (a directory, a missing or
            unwritable directory).
    """
    if os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a directory; give a file name")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory) and not make_dirs:
        raise ValueError(f"{what} {path!r}: directory {directory!r} does not exist; create it or choose "
                         "another path")
    parent = directory
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{what} {path!r}: {parent!r} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path!r}: directory {parent!r} is not writable")
    return path


@contextlib.contextmanager
def _renamed_on_success(tmp: str, path: str, directory: str) -> Iterator[None]:
    """Rename ``tmp`` to ``path`` (and sync ``directory``) when the block succeeds; remove
    ``tmp`` and re-raise when it fails, leaving ``path`` untouched."""
    try:
        yield
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _sync_dir(directory)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", *, make_dirs: bool = True) -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success rename it to ``path``.

    The temporary file (``.<name>.tmp-XXXX`` in the same directory, mode :func:`file_mode`)
    is flushed and fsync'ed, then renamed with ``os.replace``; on an exception it is removed
    and ``path`` is untouched. A killed process may leave a hidden ``.tmp-`` file, never a
    partial ``path``.

    Args:
        path: the destination (a local path).
        mode: ``"wb"`` or ``"w"``.
        make_dirs: create the destination's directory if missing.

    Raises:
        ValueError: for another ``mode``.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    fd, tmp, directory = _temp_file(path, make_dirs)
    with _renamed_on_success(tmp, path, directory):
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str, *, make_dirs: bool = True) -> Iterator[str]:
    """A temporary path beside ``path`` (same extension, mode :func:`file_mode`) for writers
    that take a file name (``savefig``, ``cv2.imwrite``); renamed to ``path`` when the block
    succeeds, removed otherwise.

    Example::

        with atomic_path("plot.png") as tmp:
            fig.savefig(tmp)
    """
    fd, tmp, directory = _temp_file(path, make_dirs, suffix=os.path.splitext(path)[1])
    os.close(fd)
    with _renamed_on_success(tmp, path, directory):
        yield tmp


@contextlib.contextmanager
def atomic_files(directory: str) -> Iterator[str]:
    """A temporary directory inside ``directory`` for code that writes several files by name
    (e.g. detectron2's ``COCOEvaluator``); when the block succeeds each file is renamed into
    ``directory``, complete; on an exception none is. The temporary directory is removed
    either way.

    Yields:
        The temporary directory's path.
    """
    os.makedirs(directory, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-files-", dir=directory)
    try:
        yield tmp
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(directory, name))
        _sync_dir(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def nonfinite_tensors(obj: Any, prefix: str = "") -> List[str]:
    """Names of the floating-point tensors and numpy arrays in ``obj`` that hold NaN or Inf.

    Args:
        obj: a tensor / array, or dicts, lists and tuples of them (any nesting; other
            values are ignored).
        prefix: name of ``obj`` itself.

    Returns:
        Dotted paths (dict keys, list positions), e.g. ``model.roi_heads.mask_head.mask_fcn1.norm.running_mean``,
        in the object's order.
    """
    import numpy as np
    import torch

    if torch.is_tensor(obj):
        bad = (obj.is_floating_point() or obj.is_complex()) and not bool(torch.isfinite(obj).all())
        return [prefix or "<tensor>"] if bad else []
    if isinstance(obj, np.ndarray):
        bad = np.issubdtype(obj.dtype, np.inexact) and not bool(np.isfinite(obj).all())
        return [prefix or "<array>"] if bad else []
    if isinstance(obj, dict):
        items = ((str(k), v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(obj))
    else:
        return []
    found = []
    for key, value in items:
        found += nonfinite_tensors(value, f"{prefix}.{key}" if prefix else key)
    return found


def check_finite_weights(obj: Any, path: str, shown: int = 5) -> None:
    """Refuse to write ``obj`` to ``path`` if a tensor / array in it holds NaN or Inf.

    Raises:
        NonFiniteWeightsError: (a ``FloatingPointError``) one line naming ``path`` and the
            non-finite tensors (the first ``shown`` of them and how many in all).
    """
    bad = nonfinite_tensors(obj)
    if bad:
        more = f", ... ({len(bad)} in all)" if len(bad) > shown else ""
        raise NonFiniteWeightsError(f"{path}: refused to write weights holding NaN or Inf: {', '.join(bad[:shown])}"
                                 f"{more}; nothing was written")


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_write`.

    Raises:
        NonFiniteWeightsError: a tensor in ``obj`` holds NaN or Inf (:func:`check_finite_weights`);
            nothing is written.
    """
    import torch

    check_finite_weights(obj, path)
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def atomic_pickle_dump(obj: Any, path: str) -> None:
    """``pickle.dump(obj, path)`` through :func:`atomic_write`.

    Raises:
        NonFiniteWeightsError: a tensor or array in ``obj`` holds NaN or Inf
            (:func:`check_finite_weights`); nothing is written.
    """
    check_finite_weights(obj, path)
    with atomic_write(path, "wb") as f:
        pickle.dump(obj, f)


def check_input_file(path: str, what: str, *, extensions: Sequence[str] = (), fix: str = "") -> str:
    """Refuse a missing input file with one message: ``what``, the path, the closest existing
    file of the same kind (``difflib``) and ``fix``.

    Args:
        path: the file the user named (a local path).
        what: how the user gave it (``"--config-file"``, ``"MODEL.WEIGHTS"``).
        extensions: the kinds of file to suggest (e.g. ``(".yaml", ".py")``); all if empty.
        fix: what to do instead, appended to the message.

    Returns:
        ``path``.

    Raises:
        MissingFileError: ``path`` is not a file.
    """
    if os.path.isfile(path):
        return path
    from .cli import MissingFileError, did_you_mean

    problem = "is a directory, not a file" if os.path.isdir(path) else "no such file"
    hint = did_you_mean(os.path.normpath(path), _files_near(path, extensions))
    raise MissingFileError(f"{what} {path!r}: {problem}{hint}{'; ' + fix if fix and not hint else ''}")


def _files_near(path: str, extensions: Sequence[str], *, depth: int = 3, limit: int = 5000) -> List[str]:
    """Files (with one of ``extensions``) under the nearest existing directory of ``path``,
    spelt as ``path`` is (relative or absolute), at most ``depth`` levels down."""
    parent = os.path.dirname(os.path.normpath(path))
    while parent and not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    top = parent or "."
    found: List[str] = []
    for root, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if root.count(os.sep) - top.count(os.sep) < depth \
            else []
        found += [os.path.normpath(os.path.join(root, f)) for f in sorted(files)
                  if not f.startswith(".") and (not extensions or f.endswith(tuple(extensions)))]
        if len(found) > limit:
            break
    return found
