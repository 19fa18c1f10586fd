"""Reading weights without running code, and writing files without leaving them half-written.

Loading
    ``.pth`` (and every other non-``.pkl`` file) loads with ``torch.load(weights_only=True)``
    only: tensors, plain containers, numbers, strings and numpy arrays. ``.pkl`` files
    (detectron2's model-zoo format and this project's converted weights) load through
    :class:`RestrictedUnpickler`, which admits exactly what those files hold: ``dict`` /
    ``list`` / ``tuple`` / ``OrderedDict``, strings, bytes, numbers and numpy arrays,
    dtypes and scalars. Any other object in a file is refused with
    :class:`UntrustedPickleError`, naming the file and the refused object. No file is
    ever fully unpickled: a file that holds other objects must be re-saved as a plain
    state dict by the code that wrote it.

Writing
    :func:`atomic_write` writes to a temporary file in the destination's directory and
    renames it over the destination (``os.replace``, atomic on POSIX), so a killed
    process leaves either the old file or the complete new one, never a partial file.
    :func:`atomic_torch_save` and :func:`atomic_pickle_dump` (every weights file the
    project writes) refuse an object holding a NaN or Inf tensor or array
    (:func:`check_finite_weights`) before anything is written.
    :func:`check_output_path` checks an output path before any work starts.
"""
import contextlib
import io
import os
import pickle
import tempfile
import zipfile
from typing import Any, Iterator, List, Sequence

import torch

__all__ = [
    "CheckpointFileError",
    "UntrustedPickleError",
    "RestrictedUnpickler",
    "load_weights_file",
    "restricted_pickle_load",
    "atomic_write",
    "atomic_path",
    "atomic_torch_save",
    "atomic_pickle_dump",
    "NonFiniteWeightsError",
    "nonfinite_tensors",
    "check_finite_weights",
    "check_output_path",
    "is_complete_torch_file",
]

# (module, name) pairs a detectron2 / gradaug-det .pkl may reference. numpy 1.x pickles
# name numpy.core.*, numpy 2.x numpy._core.*; protocol 2 files (the model zoo, written by
# Python 2) encode bytes through _codecs.encode.
_SAFE_PICKLE_GLOBALS = frozenset(
    [("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
     ("builtins", "complex"), ("builtins", "bytearray"), ("_codecs", "encode"),
     ("numpy", "ndarray"), ("numpy", "dtype")]
    + [(f"numpy.{core}.multiarray", n) for core in ("core", "_core") for n in ("_reconstruct", "scalar")]
    + [(f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")]
)


class CheckpointFileError(ValueError):
    """A weights file that cannot be read: empty, truncated, or not a checkpoint at all."""


class NonFiniteWeightsError(FloatingPointError):
    """Weights to be written hold NaN or Inf; nothing was written."""


class UntrustedPickleError(pickle.UnpicklingError):
    """A weights file holds an object whose loading could run code; it was not loaded."""


def _refusal(path: str, what: str) -> str:
    return (f"{path}: refused to load {what}: loading it could run code. Weight files must hold only "
            "tensors, numpy arrays, numbers, strings and containers (dict, list, tuple). Re-save the "
            "weights as a plain state dict from the code that wrote this file, e.g. "
            'torch.save({"model": model.state_dict()}, path) with a .pth path')


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only containers, numbers, strings and numpy arrays.

    Args:
        file: a binary file object.
        name: the file's name, for error messages.

    Raises:
        UntrustedPickleError: on any other global (class or function) in the stream, or
            a persistent id.
    """

    def __init__(self, file, name: str = "<pickle>"):
        super().__init__(file, encoding="latin1")
        self._name = name

    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise UntrustedPickleError(_refusal(self._name, f"the object {module}.{name}"))

    def persistent_load(self, pid):
        raise UntrustedPickleError(_refusal(self._name, f"a persistent object ({pid!r})"))


def restricted_pickle_load(path: str) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (see :func:`load_weights_file`)."""
    with _open(path) as f:
        return RestrictedUnpickler(f, name=path).load()


@contextlib.contextmanager
def _open(path: str) -> Iterator[io.BufferedReader]:
    from detectron2.utils.file_io import PathManager

    try:
        f = PathManager.open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such weights file") from None
    with f:
        yield f


def _numpy_safe_globals():
    import numpy as np

    found = []
    for core in ("core", "_core"):
        try:
            mod = __import__(f"numpy.{core}.multiarray", fromlist=["_reconstruct"])
            found += [mod._reconstruct, mod.scalar]  # arrays; numpy scalars (e.g. mmengine's logs)
        except (ImportError, AttributeError):
            pass
    return found + [np.ndarray, np.dtype] + [type(np.dtype(t)) for t in "?bBhHiIlLqQefdgFDG"]


def _expected(path: str) -> str:
    if path.endswith(".pkl"):
        return ("a detectron2 .pkl weights file (a pickled dict: {'model': {name: array}, ...}, as in "
                "detectron2's model zoo or written by tools/convert_pretrained.py)")
    return "a PyTorch checkpoint written by torch.save (e.g. model_final.pth) or a state dict"


def load_weights_file(path: str, *, safe_globals: Sequence[Any] = ()) -> Any:
    """Load a weights file without running code from it.

    ``.pkl``: :class:`RestrictedUnpickler` (detectron2 model-zoo and converted weights);
    anything else: ``torch.load(weights_only=True)`` onto the CPU (numpy arrays admitted).
    No file is ever fully unpickled.

    Args:
        path: a local path or a detectron2 ``PathManager`` URL.
        safe_globals: further classes/functions a ``.pth`` may reference, in
            ``torch.serialization.safe_globals`` form (e.g. mmengine's ``HistoryBuffer``,
            :mod:`gradaug_det.mmdet.checkpoint`).

    Returns:
        What the file holds (usually a dict).

    Raises:
        FileNotFoundError: no such file.
        UntrustedPickleError: the file holds other objects (names the file, the refused
            object and how to re-save the weights).
        CheckpointFileError: the file is empty, truncated or not a weights file (names the
            file and what was expected).
    """
    try:
        if path.endswith(".pkl"):
            return restricted_pickle_load(path)
        with _open(path) as f:
            with torch.serialization.safe_globals(_numpy_safe_globals() + list(safe_globals)):
                return torch.load(f, map_location="cpu", weights_only=True)
    except (FileNotFoundError, UntrustedPickleError):
        raise
    except pickle.UnpicklingError as e:
        msg = str(e)
        lines = [line.strip() for line in msg.splitlines() if line.strip()]
        glob = next((line for line in lines if "GLOBAL" in line), None)
        if glob is not None:
            glob = glob.split(" was not an allowed global")[0].replace("WeightsUnpickler error: ", "")
            raise UntrustedPickleError(_refusal(path, f"an object that is not a tensor ({glob})")) from None
        detail = next((line for line in lines if line.startswith("Unsupported")), lines[0] if lines else "")
        raise CheckpointFileError(f"{path}: not readable as {_expected(path)} ({detail}); the file is not a "
                                  "checkpoint or is damaged") from None
    except EOFError:
        raise CheckpointFileError(f"{path}: the file is empty or truncated; expected {_expected(path)}. "
                                  "If a run was killed while writing it, delete it") from None
    except (RuntimeError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            UnicodeDecodeError, zipfile.BadZipFile, OverflowError, MemoryError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointFileError(f"{path}: not readable as {_expected(path)} ({first})") from None


def is_complete_torch_file(path: str) -> bool:
    """Whether ``path`` is a complete ``torch.save`` zip file (its central directory is intact).

    A file cut off while being written lacks the zip's end record and fails this check;
    the tensors are not read.
    """
    try:
        if os.path.getsize(path) == 0:
            return False
        with zipfile.ZipFile(path) as z:
            return bool(z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


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
def atomic_write(path: str, mode: str = "wb", *, make_dirs: bool = True) -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success rename it to ``path``.

    The temporary file (``.<name>.tmp-XXXX`` in the same directory) is flushed and
    fsync'ed, then renamed with ``os.replace``; on an exception it is removed and
    ``path`` is untouched. A killed process may leave a hidden ``.tmp-`` file, never a
    partial ``path``.

    Args:
        path: the destination (a local path).
        mode: ``"wb"`` or ``"w"``.
        make_dirs: create the destination's directory if missing.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    directory = os.path.dirname(os.path.abspath(path))
    if make_dirs:
        os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@contextlib.contextmanager
def atomic_path(path: str, *, make_dirs: bool = True) -> Iterator[str]:
    """A temporary path beside ``path`` (same extension) for writers that take a file name
    (``savefig``, ``cv2.imwrite``); renamed to ``path`` when the block succeeds, removed
    otherwise.

    Example::

        with atomic_path("plot.png") as tmp:
            fig.savefig(tmp)
    """
    directory = os.path.dirname(os.path.abspath(path))
    if make_dirs:
        os.makedirs(directory, exist_ok=True)
    base, ext = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.tmp-", suffix=ext, dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


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
