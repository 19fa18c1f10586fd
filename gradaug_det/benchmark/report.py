"""Markdown tables and JSON files for the benchmark tools."""
import json
import os
import platform
from typing import Any, Optional, Sequence

import torch

__all__ = ["markdown_table", "device_name", "write_json", "write_text", "publish"]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; floats are printed as given (format them before).

    Args:
        headers: column titles.
        rows: one sequence of cells per row, as many as ``headers``.

    Raises:
        ValueError: if a row has a different number of cells than ``headers``.
    """
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        if len(r) != len(headers):
            raise ValueError(f"table row has {len(r)} cells, {len(headers)} headers: {list(r)}")
        lines.append("| " + " | ".join(map(str, r)) + " |")
    return "\n".join(lines)


def device_name(device) -> str:
    """What ran the benchmark: the GPU's name and memory, or the CPU and its threads; torch's version."""
    device = torch.device(device)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return (f"{p.name} ({p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, "
                f"cuDNN {torch.backends.cudnn.version()}, torch {torch.__version__}")
    return (f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (:func:`gradaug_det.utils.io.atomic_write`)."""
    from ..utils.io import atomic_write

    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, default=_default)


def write_text(path: str, text: str) -> None:
    """Write ``text`` (a Markdown report) atomically, ending with one newline."""
    from ..utils.io import atomic_write

    with atomic_write(path, "w") as f:
        f.write(text.rstrip("\n") + "\n")


def publish(text: str, doc: Any, json_path: Optional[str] = None, markdown_path: Optional[str] = None) -> None:
    """A benchmark's output: print the Markdown ``text``; write ``doc`` as JSON to ``json_path``
    and ``text`` to ``markdown_path`` where given (both atomically)."""
    print(text)
    if json_path:
        write_json(json_path, doc)
    if markdown_path:
        write_text(markdown_path, text)


def _default(o):
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
