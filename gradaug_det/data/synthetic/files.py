"""The files of a generated dataset: atomic writes, the ``DONE`` marker, stale files.

Both generators (:mod:`.coco_shapes`, :mod:`.imagefolder`) follow one protocol: every file
is written atomically (:func:`gradaug_det.utils.io.atomic_write`); the ``DONE`` marker (a JSON file of
the generation parameters) is removed before and written after all others, so an
interrupted run is redone by the next call; only files of the generator's own naming
scheme that the current parameters do not produce are deleted.
"""
import json
import os
import re
from typing import Any, Dict, Optional, Sequence

import cv2
import numpy as np

from ...utils.io import atomic_write

__all__ = ["MARKER_NAME", "atomic_write_bytes", "atomic_write_image", "read_marker", "write_marker",
           "remove_marker", "remove_stale_files"]

MARKER_NAME = "DONE"


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (:func:`gradaug_det.utils.io.atomic_write`).

    Args:
        path: destination file.
        data: file content.
    """
    with atomic_write(path, "wb") as f:
        f.write(data)


def atomic_write_image(path: str, image: np.ndarray, params: Sequence[int] = ()) -> None:
    """Encodes an image with OpenCV (format from the extension) and writes it atomically.

    Args:
        path: destination file; its extension selects the encoder.
        image: HxWx3 uint8 image in BGR order.
        params: OpenCV ``imencode`` parameters.
    """
    ext = os.path.splitext(path)[1]
    ok, buf = cv2.imencode(ext, image, list(params))
    if not ok:
        raise RuntimeError("OpenCV failed to encode an image for {!r}".format(path))
    atomic_write_bytes(path, buf.tobytes())


def read_marker(root: str) -> Optional[Dict[str, Any]]:
    """Reads the ``DONE`` marker of a generated dataset.

    Args:
        root: dataset root.

    Returns:
        The parameters stored in the marker, or None if it is missing or unreadable.
    """
    path = os.path.join(root, MARKER_NAME)
    try:
        with open(path, "r", encoding="utf-8") as f:
            content = json.load(f)
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def write_marker(root: str, params: Dict[str, Any]) -> None:
    """Atomically writes the ``DONE`` marker containing ``params``."""
    data = json.dumps(params, sort_keys=True, indent=1).encode("utf-8") + b"\n"
    atomic_write_bytes(os.path.join(root, MARKER_NAME), data)


def remove_marker(root: str) -> None:
    """Removes the ``DONE`` marker if present."""
    try:
        os.remove(os.path.join(root, MARKER_NAME))
    except FileNotFoundError:
        pass


def remove_stale_files(directory: str, pattern: "re.Pattern", keep: set) -> None:
    """Deletes files in ``directory`` whose name matches ``pattern`` and is not in ``keep``.

    Only files following the generator's own naming scheme are ever deleted.
    """
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if pattern.match(name) and name not in keep:
            os.remove(os.path.join(directory, name))
