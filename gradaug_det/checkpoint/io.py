"""Reading weights without running code.

``.pth`` (and every other non-``.pkl`` file) loads with ``torch.load(weights_only=True)``
only: tensors, plain containers, numbers, strings and numpy arrays. ``.pkl`` files
(detectron2's model-zoo format and this project's converted weights) load through
:class:`RestrictedUnpickler`, which admits exactly what those files hold: ``dict`` /
``list`` / ``tuple`` / ``OrderedDict``, strings, bytes, numbers and numpy arrays,
dtypes and scalars. Any other object in a file is refused with
:class:`UntrustedPickleError`, naming the file and the refused object. No file is
ever fully unpickled: a file that holds other objects must be re-saved as a plain
state dict by the code that wrote it.

Writing files (atomically, with the user's umask) lives in :mod:`gradaug_det.utils.io`.
"""
import contextlib
import functools
import io
import os
import pickle
import threading
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from typing import Any, Iterator, Optional, Sequence

import torch

from ..utils.cli import MissingFileError, UserError
from ..utils.io import check_input_file

__all__ = [
    "CheckpointFileError",
    "UntrustedPickleError",
    "RestrictedUnpickler",
    "load_weights_file",
    "restricted_pickle_load",
    "is_complete_torch_file",
    "check_weights_available",
    "weights_url",
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


class CheckpointFileError(UserError, ValueError):
    """A weights file that cannot be read: empty, truncated, or not a checkpoint at all."""


class UntrustedPickleError(UserError, pickle.UnpicklingError):
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


#: Weights files a tool may be given (for the suggestion of a misspelt one).
WEIGHTS_EXTENSIONS = (".pth", ".pkl", ".pyth", ".pt")
#: Seconds :func:`check_weights_available` waits for a weights URL's server before calling it unreachable.
URL_TIMEOUT_S = 5.0
_DETECTRON2_PREFIX = "detectron2://"
_DETECTRON2_URL = "https://dl.fbaipublicfiles.com/detectron2/"


def weights_url(path: str) -> Optional[str]:
    """The ``http(s)://`` address of a ``detectron2://`` or ``http(s)://`` weights path, else None."""
    if path.startswith(_DETECTRON2_PREFIX):
        return _DETECTRON2_URL + path[len(_DETECTRON2_PREFIX):]
    if path.startswith(("https://", "http://")):
        return path
    return None


def _cached_copy(url: str) -> str:
    """Where iopath's ``HTTPURLHandler`` caches ``url`` (``$FVCORE_CACHE``, default
    ``~/.torch/iopath_cache``, then the path of the URL); nothing is created."""
    cache = os.path.expanduser(os.getenv("FVCORE_CACHE", "~/.torch/iopath_cache"))
    return os.path.join(cache, urllib.parse.urlparse(url).path.lstrip("/"))


@functools.lru_cache(maxsize=None)
def _probe(url: str, timeout: float) -> str:
    """Why ``url`` cannot be fetched ("" if its server answers): a HEAD request, in a thread
    so a hanging name lookup cannot hold the tool longer than ``timeout``."""
    result = ["no answer within {:g} s".format(timeout)]

    def head():
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            result[0] = ""
        except urllib.error.HTTPError as e:
            result[0] = f"the server answers HTTP {e.code} {e.reason}"
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            result[0] = f"cannot reach {urllib.parse.urlparse(url).netloc} ({reason})"

    thread = threading.Thread(target=head, daemon=True)
    thread.start()
    thread.join(timeout + 1)
    return result[0]


def check_weights_available(path: str, key: str = "MODEL.WEIGHTS") -> None:
    """Refuse, before any work, weights that cannot be read: a local file that does not
    exist (with the closest existing weights file), or a ``detectron2://`` / ``http(s)://``
    address neither in iopath's download cache nor reachable (e.g. on an offline compute
    node; a HEAD request of at most :data:`URL_TIMEOUT_S` seconds). Other URL schemes are
    left to the checkpointer.

    Args:
        path: the weights path or URL ("" = random initialisation: nothing to check).
        key: how the user gave it (``"MODEL.WEIGHTS"``, ``"train.init_checkpoint"``, ``"--weights"``).

    Raises:
        MissingFileError: naming ``key``, the path and what to do (for a URL: fetch it where
            there is internet, then set ``key`` to the local file, or place it in the cache).
    """
    if not path:
        return
    url = weights_url(path)
    if url is None:
        if "://" not in path:
            check_input_file(path, key, extensions=WEIGHTS_EXTENSIONS,
                             fix=f"set {key} to an existing .pth/.pkl file, or to \"\" for random initialisation")
        return
    cached = _cached_copy(url)
    if os.path.isfile(cached):
        return
    why = _probe(url, URL_TIMEOUT_S)
    if why:
        raise MissingFileError(
            f"{key} {path!r}: cannot download it: {why}. On an offline node, fetch it elsewhere "
            f"(wget {url}), copy it here and set {key} to the local file (or place it at {cached})")
