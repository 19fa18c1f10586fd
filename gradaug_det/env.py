"""Short environment report: ``python -m gradaug_det.env``.

Prints torch / CUDA, where detectron2 comes from and which of its compiled ops are
present, once and plainly (no wall of warnings).
"""
import importlib.metadata
import importlib.util
import os
import platform
import sys
import warnings

__all__ = ["collect_env", "main"]


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
