"""``GradAugCheckpointer``: detectron2's ``DetectionCheckpointer``, safe to load and to kill.

What it adds to ``DetectionCheckpointer`` (same constructor, same file formats):

* **Loading never runs code**: every file goes through
  :func:`gradaug_det.checkpoint.io.load_weights_file` (``.pth`` with
  ``weights_only=True``, ``.pkl`` through a restricted unpickler); a file holding any
  other object is refused, never fully unpickled. Unreadable files raise an error
  naming the file and what was expected.
* **Backbone shapes must match**: when a backbone tensor of the file cannot load because
  its shape differs from the model's (e.g. R50 weights into an R18 model), loading
  raises, listing the first mismatches and the ``MODEL.RESNETS`` keys that would match
  the file, unless ``allow_backbone_mismatch`` (``MODEL.BACKBONE.ALLOW_SHAPE_MISMATCH``).
  Heads absent from a backbone-only file stay a normal, quiet case.
* **Nothing half-written**: checkpoints and ``last_checkpoint`` are written to a
  temporary file and renamed; a checkpoint whose weights are not finite is refused.
  ``--resume`` falls back to the newest complete checkpoint in the directory when
  ``last_checkpoint`` is missing, empty, or names a missing / incomplete file (logged).
* **Every rank's data stream**: a file whose data stream state lacks a rank of the
  resuming run (written by another number of processes) is refused, naming the file
  (:func:`gradaug_det.data.resumable.check_rank_states`).
* **Records**: :meth:`GradAugCheckpointer.register_record` adds a named entry that is
  computed from the model at every save and checked against the model at every load
  (e.g. the slimmable settings).
"""
import logging
import os
import re
from typing import Any, Callable, Dict, List, NamedTuple, Tuple

import torch

from detectron2.checkpoint import DetectionCheckpointer

from ..data.resumable import DataStreamStateError, upgrade_legacy_data_order
from ..utils.cli import UserError
from ..utils.io import NonFiniteWeightsError, atomic_write, nonfinite_tensors
from .io import CheckpointFileError, is_complete_torch_file, load_weights_file

__all__ = ["GradAugCheckpointer", "BackboneShapeMismatchError", "CheckpointRecord", "backbone_mismatch_message"]

logger = logging.getLogger(__name__)

#: How many mismatching tensors a refusal lists.
_SHOWN = 5
_BACKBONE_PREFIXES = ("backbone.", "roi_heads.res5.")


class BackboneShapeMismatchError(UserError, ValueError):
    """Backbone tensors of a weights file have other shapes than the model's (a
    :class:`~gradaug_det.utils.cli.UserError`: tools print it without a traceback)."""


class CheckpointRecord(NamedTuple):
    """A named entry saved with every checkpoint and checked on load.

    Attributes:
        save: ``model -> value`` (plain containers, numbers, strings), stored under the name.
        check: ``(model, value, path) -> None``; warns or raises when the file's value does
            not suit the model. Called only when the file has the entry.
    """

    save: Callable[[torch.nn.Module], Any]
    check: Callable[[torch.nn.Module, Any, str], None]


def _bare_resnet(state: Dict[str, Any]) -> Dict[str, Any]:
    """ResNet tensors by bare detectron2 name (``stem.*``, ``res2.*``..), from any layout."""
    out = {}
    for k, v in state.items():
        prefix = next((p for p in ("backbone.bottom_up.", "backbone.", "roi_heads.") if k.startswith(p)), "")
        bare = k[len(prefix):]
        if re.match(r"(stem|res[2-5])\.", bare):
            out[bare] = v
    return out


def backbone_mismatch_message(path: str, mismatches: List[Tuple[str, tuple, tuple]],
                              file_state: Dict[str, Any], model_state: Dict[str, Any]) -> str:
    """The refusal text: the first mismatches and the config keys that would match the file.

    Args:
        path: the weights file.
        mismatches: ``(name, shape in file, shape in model)``.
        file_state, model_state: the file's and the model's tensors, by model name.
    """
    from .convert import _META_KEYS, resnet_arch

    shown = "\n".join(f"  {k}: {tuple(a)} in the file, {tuple(b)} in the model" for k, a, b in mismatches[:_SHOWN])
    more = f"\n  ... ({len(mismatches)} in all)" if len(mismatches) > _SHOWN else ""
    fix = ""
    try:
        want, have = resnet_arch(_bare_resnet(file_state)), resnet_arch(_bare_resnet(model_state))
        keys = dict(_META_KEYS)
        diffs = [f"{keys[k]} {want[k]}" for k in want if k in keys and k in have and want[k] != have[k]]
        if diffs:
            fix = f" The file holds a ResNet-{want['DEPTH']}; to match it set " + " ".join(diffs) + "."
    except (ValueError, KeyError):
        fix = " The file was made for a different backbone."
    return (f"{path}: {len(mismatches)} backbone tensor(s) cannot load because their shapes differ from the "
            f"model's:\n{shown}{more}\n{fix.strip()} To load the other tensors anyway and train these from their "
            "initialisation, set MODEL.BACKBONE.ALLOW_SHAPE_MISMATCH True (GradAugCheckpointer("
            "allow_backbone_mismatch=True)).")


class _AtomicWritePathManager:
    """A checkpointer's ``PathManager`` whose writes are atomic: ``open(path, "w" / "wb")``
    is :func:`atomic_write` on the local path (a temporary file renamed into place when the
    ``with`` block ends); everything else is the wrapped ``PathManager``'s."""

    def __init__(self, path_manager):
        self._path_manager = path_manager

    def __getattr__(self, name: str):
        return getattr(self._path_manager, name)

    def open(self, path: str, mode: str = "r", **kwargs):
        if mode in ("w", "wb"):
            return atomic_write(self._path_manager.get_local_path(path), mode)
        return self._path_manager.open(path, mode, **kwargs)


class GradAugCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with safe loading, atomic saving and a resume fallback.

    Args:
        model, save_dir, save_to_disk, **checkpointables: as for ``DetectionCheckpointer``.
        allow_backbone_mismatch: load a file whose backbone tensors differ in shape (they
            keep their initialisation) instead of raising.
    """

    _records: Dict[str, CheckpointRecord] = {}

    def __init__(self, model, save_dir: str = "", *, allow_backbone_mismatch: bool = False,
                 save_to_disk=None, **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        # fvcore's save and tag_last_checkpoint write through path_manager.open(..., "wb" / "w")
        self.path_manager = _AtomicWritePathManager(self.path_manager)
        self.allow_backbone_mismatch = allow_backbone_mismatch
        self._loading = ""

    @classmethod
    def from_config(cls, cfg, model, save_dir: str = "", **kwargs) -> "GradAugCheckpointer":
        """Build with the options of ``cfg`` (``MODEL.BACKBONE.ALLOW_SHAPE_MISMATCH``)."""
        allow = bool(cfg.MODEL.BACKBONE.get("ALLOW_SHAPE_MISMATCH", False))
        return cls(model, save_dir, allow_backbone_mismatch=allow, **kwargs)

    @classmethod
    def register_record(cls, name: str, save: Callable[[torch.nn.Module], Any],
                        check: Callable[[torch.nn.Module, Any, str], None]) -> None:
        """Save ``save(model)`` under ``name`` in every checkpoint and call
        ``check(model, value, path)`` when a file holding ``name`` is loaded.

        Raises:
            ValueError: if ``name`` collides with a checkpoint entry of detectron2.
        """
        if name in ("model", "trainer", "iteration", "__author__", "matching_heuristics"):
            raise ValueError(f"record name {name!r} is used by detectron2's checkpoints")
        cls._records[name] = CheckpointRecord(save, check)

    # ---- loading ------------------------------------------------------------------------

    def load(self, path, *args, **kwargs):
        """fvcore's ``Checkpointer.load``; a refused data stream state names the file.

        Raises:
            DataStreamStateError: ``"<path>: ..."``, the file's data stream state does not hold
                every rank of this run (:func:`~gradaug_det.data.resumable.check_rank_states`).
        """
        self._loading = path or ""
        try:
            return super().load(path, *args, **kwargs)
        except DataStreamStateError as e:
            raise DataStreamStateError(f"{path}: {e}") from None
        finally:
            self._loading = ""

    def _load_file(self, filename):
        """detectron2's formats (model zoo ``.pkl``, Caffe2 ``.pkl``, pycls ``.pyth``,
        ``.pth``), read by :func:`load_weights_file`."""
        if filename.endswith(".pkl") or filename.endswith(".pyth"):
            data = load_weights_file(filename)
            if not isinstance(data, dict):
                raise CheckpointFileError(f"{filename}: holds a {type(data).__name__}, not the dict of a "
                                          "detectron2 weights file")
            if filename.endswith(".pyth"):
                if "model_state" not in data:
                    raise CheckpointFileError(f"{filename}: a pycls .pyth checkpoint must contain 'model_state'")
                state = {k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")}
                return {"model": state, "__author__": "pycls", "matching_heuristics": True}
            if "model" in data and "__author__" in data:  # detectron2 model zoo / gradaug-det format
                self.logger.info("Reading a file from '{}'".format(data["__author__"]))
                return data
            if "blobs" in data:  # Caffe2 / Detectron1 detection models
                data = data["blobs"]
            data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
        return super()._load_file(filename)

    def _torch_load(self, f):
        data = load_weights_file(f)
        if not isinstance(data, dict):
            raise CheckpointFileError(f"{f}: holds a {type(data).__name__}; expected a checkpoint dict (with "
                                      "'model') or a state dict")
        return data

    def _load_model(self, checkpoint):
        upgrade_legacy_data_order(checkpoint)  # before the checkpointables ("trainer") load
        records = {k: checkpoint.pop(k) for k in list(self._records) if k in checkpoint}
        file_state = dict(checkpoint["model"])
        incompatible = super()._load_model(checkpoint)
        bad = [(k, a, b) for k, a, b in incompatible.incorrect_shapes if k.startswith(_BACKBONE_PREFIXES)]
        if bad:
            message = backbone_mismatch_message(self._loading, bad, file_state, self.model.state_dict())
            if not self.allow_backbone_mismatch:
                raise BackboneShapeMismatchError(message)
            logger.warning("MODEL.BACKBONE.ALLOW_SHAPE_MISMATCH: %s", message.split("\n")[0])
        for name, value in records.items():
            self._records[name].check(self.model, value, self._loading)
        return incompatible

    # ---- saving -------------------------------------------------------------------------

    def save(self, name: str, **kwargs: Any) -> None:
        """fvcore's ``Checkpointer.save`` (model, checkpointables, ``kwargs``) plus the
        registered records (:meth:`register_record`; ``kwargs`` of the same name win), refusing
        non-finite weights. The file and then ``last_checkpoint`` are written atomically (the
        checkpointer's :class:`_AtomicWritePathManager`).

        Raises:
            NonFiniteWeightsError: (a ``FloatingPointError``) a floating-point model tensor
                holds NaN or Inf (named).
        """
        if self.save_dir and self.save_to_disk:
            bad = nonfinite_tensors(self.model.state_dict())
            if bad:
                raise NonFiniteWeightsError(
                    f"refusing to save checkpoint {name!r}: {len(bad)} model tensor(s) are not finite "
                    f"({', '.join(bad[:_SHOWN])}{', ...' if len(bad) > _SHOWN else ''})")
            kwargs = {**{key: record.save(self.model) for key, record in self._records.items()}, **kwargs}
        super().save(name, **kwargs)

    # ---- resuming -----------------------------------------------------------------------

    def _complete_checkpoints(self) -> List[str]:
        """Complete ``.pth`` files of ``save_dir``, newest first (modification time)."""
        if not self.save_dir or not os.path.isdir(self.save_dir):
            return []
        files = [os.path.join(self.save_dir, f) for f in os.listdir(self.save_dir)
                 if f.endswith(".pth") and not f.startswith(".")]
        files = [f for f in files if os.path.isfile(f) and is_complete_torch_file(f)]
        return sorted(files, key=lambda f: (os.path.getmtime(f), f), reverse=True)

    def get_checkpoint_file(self) -> str:
        """The file ``last_checkpoint`` names; if that is missing, empty, unreadable or
        names a missing / incomplete file, the newest complete checkpoint (a warning says
        which and why), or "" when there is none."""
        save_file = os.path.join(self.save_dir, "last_checkpoint")
        reason = ""
        try:
            with self.path_manager.open(save_file, "r") as f:
                last = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            last, reason = "", f"{save_file} is missing or unreadable ({type(e).__name__})"
        if last:
            path = os.path.join(self.save_dir, last)
            if os.path.isfile(path) and (not path.endswith(".pth") or is_complete_torch_file(path)):
                return path
            reason = f"{save_file} names {last!r}, which is missing or incomplete"
        elif not reason:
            reason = f"{save_file} is empty"
        found = self._complete_checkpoints()
        if found:
            logger.warning("%s; resuming from the newest complete checkpoint, %s", reason, found[0])
            return found[0]
        return ""

    def has_checkpoint(self) -> bool:
        """Whether ``--resume`` has something to resume: a complete checkpoint in ``save_dir``
        (named by ``last_checkpoint`` or not)."""
        if not self.save_dir:
            return False
        try:
            with self.path_manager.open(os.path.join(self.save_dir, "last_checkpoint"), "r") as f:
                last = os.path.join(self.save_dir, f.read().strip())
            if os.path.isfile(last) and (not last.endswith(".pth") or is_complete_torch_file(last)):
                return True
        except (OSError, UnicodeDecodeError):
            pass
        return bool(self._complete_checkpoints())


# Every checkpoint records how its sub-networks are formed (channel rule, divisor, SLIM_FPN)
# and is checked against the model it loads into (issue 10 §6; gradaug_det.slim.settings).
from ..slim import settings as _slim_settings  # noqa: E402

GradAugCheckpointer.register_record(_slim_settings.RECORD_KEY, _slim_settings.model_slimmable_settings,
                                    _slim_settings.check_record)
