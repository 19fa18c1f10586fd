"""The quickstarts' picture of predictions: drawn images side by side in one PNG grid.

``tools/quickstart.py`` (``make demo``: ground truth | width 1.0 | width W, drawn by
detectron2's ``Visualizer``) and ``tools/mmdet_quickstart.py`` (``make demo-mmdet``: the same
columns drawn by mmdet's ``DetLocalVisualizer``) assemble their drawn images with it.
"""
import os
from typing import Sequence

__all__ = ["picture_grid"]


def picture_grid(columns: Sequence[Sequence[str]], titles: Sequence[str], path: str, max_side: int = 256) -> str:
    """Writes a PNG of drawn images: one row per image, one column per variant.

    Args:
        columns: one list of image files per column, all of equal length (row i = image i).
        titles: one title per column, written above it.
        path: output PNG.
        max_side: each tile is resized (aspect kept) so that its longer side is this.

    Returns:
        ``path``.
    """
    import cv2
    import numpy as np

    rows = []
    for files in zip(*columns):
        tiles = []
        for f in files:
            img = cv2.imread(f)
            if img is None:
                raise SystemExit(f"cannot read the drawn image {f}")
            s = max_side / max(img.shape[:2])
            img = cv2.resize(img, (int(round(img.shape[1] * s)), int(round(img.shape[0] * s))),
                             interpolation=cv2.INTER_NEAREST if s >= 1 else cv2.INTER_AREA)
            tile = np.full((max_side, max_side, 3), 255, np.uint8)
            tile[:img.shape[0], :img.shape[1]] = img
            tiles.append(np.pad(tile, ((2, 2), (2, 2), (0, 0)), constant_values=255))
        rows.append(np.concatenate(tiles, 1))
    grid = np.concatenate(rows, 0)
    header = np.full((28, grid.shape[1], 3), 255, np.uint8)
    for i, title in enumerate(titles):
        cv2.putText(header, title, (i * (max_side + 4) + 6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55,
                    (0, 0, 0), 1, cv2.LINE_AA)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not cv2.imwrite(path, np.concatenate([header, grid], 0)):
        raise SystemExit(f"cannot write {path}")
    return path
