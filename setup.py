"""gradaug-det: GradAug for detectron2 (slimmable backbones, GradAug training engine)."""
import os
import re

from setuptools import find_packages, setup


def read_version():
    """``__version__`` of gradaug_det/__init__.py, read without importing the package (the
    version's one home)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gradaug_det", "__init__.py")
    with open(path) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


setup(
    name="gradaug-det",
    version=read_version(),
    description="GradAug (NeurIPS 2020) sub-network regularization for detectron2",
    # supported: Python 3.10-3.12, torch >= 2.5 (gradaug_det/env.py: check_supported_versions)
    python_requires=">=3.10",
    packages=find_packages(include=["gradaug_det", "gradaug_det.*"]),
    # detectron2 itself is not on PyPI: install it from its official source (clusters) or
    # with tools/install_detectron2.py (what `make` does on a fresh machine).
    install_requires=[
        "torch>=2.5",  # torch.serialization.safe_globals (weights loaded without running code)
        "torchvision",
        "fvcore>=0.1.5",
        "iopath>=0.1.7",
        "pycocotools>=2.0.2",
        "opencv-python-headless",
        "matplotlib",
        "tabulate",
        "tqdm",
        "numpy",
    ],
    extras_require={
        # submitit: tests/tools/test_submit.py runs Slurm jobs with submitit's local executor;
        # pytest-xdist: `make test` runs the suite in 2 processes
        "test": ["pytest>=7", "pytest-xdist>=3", "submitit>=1.5", "onnx>=1.14", "onnxruntime>=1.16", "numpy<2"],
        # tools/export_model.py --format onnx: write (onnx) and check (onnxruntime) ONNX files.
        # numpy<2: detectron2 needs numpy 1.x; onnx's ml_dtypes would otherwise pull numpy 2.
        "export": ["onnx>=1.14", "onnxruntime>=1.16", "numpy<2"],
        # tools/submit.py: launch training on a Slurm cluster (multi-node, preemption, requeue)
        "slurm": ["submitit>=1.5"],
        # gradaug_det.mmdet. mmcv 2.1.0 has no wheel for recent torch: build it first with
        # tools/install_mmdet.py (`make install-mmdet` does both steps).
        "mmdet": ["mmengine>=0.10.0,<0.11", "mmcv==2.1.0", "mmdet==3.3.0"],
    },
)
