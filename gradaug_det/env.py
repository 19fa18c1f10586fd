"""Short environment report: ``python -m gradaug_det.env``.

Prints torch / CUDA, where detectron2 comes from and which of its compiled ops are
present, once and plainly (no wall of warnings).
"""
import importlib.metadata
import importlib.util
import os
import platform
import re
import sys
import warnings
from typing import Optional, Sequence

__all__ = ["check_supported_versions", "collect_env", "main", "MIN_PYTHON", "MIN_TORCH"]

#: Oldest supported Python and torch (supported: Python 3.10-3.12, torch >= 2.5; setup.py says the same).
MIN_PYTHON = (3, 10)
MIN_TORCH = (2, 5)


def check_supported_versions(python: Optional[Sequence[int]] = None, torch_version: Optional[str] = None) -> None:
    """Refuse, in one line, a Python or torch older than gradaug-det supports.

    Run by ``import gradaug_det`` before anything else is imported. torch >= 2.5 because
    weights are loaded with ``torch.serialization.safe_globals`` (new in torch 2.5;
    :func:`gradaug_det.checkpoint.io.load_weights_file`).

    Args:
        python: (major, minor); default the running interpreter's.
        torch_version: e.g. ``"2.14.1+cu126"``; default ``torch.__version__``.

    Raises:
        ImportError: naming the version found, the one needed and what to install.
    """
    python = tuple(sys.version_info[:2]) if python is None else tuple(python)[:2]
    if python < MIN_PYTHON:
        raise ImportError(f"gradaug-det needs Python >= {MIN_PYTHON[0]}.{MIN_PYTHON[1]} (supported: 3.10-3.12); "
                          f"this is Python {python[0]}.{python[1]}: use a newer interpreter")
    if torch_version is None:
        import torch

        torch_version = torch.__version__
    m = re.match(r"(\d+)\.(\d+)", str(torch_version))
    if m is None or (int(m.group(1)), int(m.group(2))) < MIN_TORCH:
        raise ImportError(f"gradaug-det needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} (weights load through "
                          f"torch.serialization.safe_globals, new in 2.5); this is torch {torch_version}: "
                          f"pip install 'torch>={MIN_TORCH[0]}.{MIN_TORCH[1]}'")


def _detectron2_origin():
    spec = importlib.util.find_spec("detectron2")
    if spec is None:
        return None, None, "not installed (run tools/install_detectron2.py)"
    import detectron2

    path = os.path.dirname(spec.origin)
    for dist in ("detectron2", "sal-detectron2"):
        try:
            importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        if dist == "sal-detectron2":
            return path, detectron2.__version__, "PyPI sal-detectron2 (upstream detectron2 a59f056 Python sources)"
        return path, detectron2.__version__, "official detectron2"
    return path, detectron2.__version__, "source checkout on sys.path"


def collect_env():
    """Return the report as a list of ``(name, value)`` rows."""
    import torch

    rows = [("python", f"{sys.version.split()[0]} ({platform.machine()})"),
            ("torch", torch.__version__)]
    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        rows.append(("CUDA", f"{torch.version.cuda}, {torch.cuda.device_count()} GPU(s): {', '.join(names)}"))
    else:
        rows.append(("CUDA", f"not available (torch built with CUDA {torch.version.cuda}); CPU only"))
    path, version, origin = _detectron2_origin()
    rows.append(("detectron2", f"{version} — {origin}" + (f" at {path}" if path else "")))
    if path is not None:
        try:
            from detectron2 import _C  # noqa: F401

            ops = "present (deformable and rotated ops, fast COCO eval)"
        except ImportError:
            ops = ("MISSING: no deformable or rotated ops; COCOEvaluator uses pycocotools "
                   "(same numbers, slower). Everything else in gradaug-det works.")
        rows.append(("detectron2._C", ops))
    import gradaug_det

    rows.append(("gradaug_det", f"{gradaug_det.__version__} at {os.path.dirname(gradaug_det.__file__)}"))
    return rows


def main():
    """Print the environment report."""
    # detectron2 imports trigger torch.jit deprecation notices; the report says what matters.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
    rows = collect_env()
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
