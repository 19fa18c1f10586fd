"""Loading mmengine checkpoints without running code from them.

mmengine 0.10.7 reads local checkpoints (``load_from``, ``--resume``, ``init_cfg``'s
``Pretrained`` with a path) with a bare ``torch.load``. Its full checkpoints
(``iter_*.pth``, ``epoch_*.pth``) hold, besides tensors: the message hub's
``HistoryBuffer`` objects (numpy arrays, and their statistics methods pickled as
``getattr(HistoryBuffer, "min")`` etc.), a ``collections.Counter``, numpy arrays,
dtypes and scalars. torch >= 2.6's ``weights_only`` loading refuses those
(open-mmlab/mmengine#1655); fully unpickling them instead would run whatever a file
holds.

:func:`use_safe_checkpoint_loading` makes mmengine's local loader
:func:`gradaug_det.checkpoint.io.load_weights_file` with exactly these extra objects
admitted (:func:`mmengine_safe_globals`): anything else is refused with
:class:`~gradaug_det.checkpoint.io.UntrustedPickleError`, naming the file and the
refused object, the same rule as every other loader of the project (no file is ever
fully unpickled).
"""
import collections
import pickle
from typing import Any, List

from ..checkpoint.io import load_weights_file

__all__ = ["mmengine_safe_globals", "load_mmengine_checkpoint", "use_safe_checkpoint_loading"]

#: The ``HistoryBuffer`` methods mmengine's checkpoints reference (its default statistics).
_HISTORY_BUFFER_METHODS = ("min", "max", "current", "mean")


def _history_buffer_method(obj: Any, name: str):
    """The ``getattr`` a checkpoint may call: only ``HistoryBuffer.<statistics method>``."""
    from mmengine.logging.history_buffer import HistoryBuffer

    if obj is HistoryBuffer and name in _HISTORY_BUFFER_METHODS:
        return getattr(HistoryBuffer, name)
    # worded like torch's refusal, so load_weights_file reports it as an untrusted object
    raise pickle.UnpicklingError(f"GLOBAL getattr({obj!r}, {name!r}) was not an allowed global")


def mmengine_safe_globals() -> List[Any]:
    """What an mmengine checkpoint holds besides tensors, numpy values and containers, in
    ``torch.serialization.safe_globals`` form (numpy is admitted by ``load_weights_file``)."""
    from mmengine.logging.history_buffer import HistoryBuffer

    return [HistoryBuffer, collections.Counter,
            (_history_buffer_method, "__builtin__.getattr"), (_history_buffer_method, "builtins.getattr")]


def load_mmengine_checkpoint(filename: str, map_location=None) -> Any:
    """mmengine's local checkpoint loader, without running code from the file.

    Args:
        filename: a local ``.pth`` (or detectron2 ``.pkl``) file.
        map_location: ignored; tensors load onto the CPU (mmengine copies them into the
            model's parameters and the optimizer's state on their devices).

    Returns:
        The checkpoint (a dict).

    Raises:
        UntrustedPickleError: the file holds other objects (names the file and the object).
        CheckpointFileError: the file is empty, damaged or not a checkpoint.
        FileNotFoundError: no such file.
    """
    return load_weights_file(filename, safe_globals=mmengine_safe_globals())


def use_safe_checkpoint_loading() -> None:
    """Make mmengine load every local checkpoint with :func:`load_mmengine_checkpoint`
    (for this process; tools call it before building the ``Runner``)."""
    from mmengine.runner.checkpoint import CheckpointLoader

    CheckpointLoader.register_scheme(prefixes="", loader=load_mmengine_checkpoint, force=True)
