"""gradaug_det.env: the supported versions, checked at import."""
import os
import subprocess
import sys

import pytest

from gradaug_det.env import MIN_PYTHON, MIN_TORCH, check_supported_versions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("python, torch_version, message", [
    ((3, 9), "2.14.1", r"needs Python >= 3\.10 .*this is Python 3\.9"),
    ((3, 11), "2.4.1+cu121", r"needs torch >= 2\.5 .*this is torch 2\.4\.1\+cu121: pip install 'torch>=2\.5'"),
    ((3, 11), "1.13.0", r"needs torch >= 2\.5"),
])
def test_old_versions_are_refused_in_one_line(python, torch_version, message):
    with pytest.raises(ImportError, match=message) as e:
        check_supported_versions(python, torch_version)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("python, torch_version", [((3, 10), "2.5.0"), ((3, 12), "2.14.1+cpu"), ((3, 11), "2.10.0a0")])
def test_supported_versions_pass(python, torch_version):
    check_supported_versions(python, torch_version)


def test_defaults_read_the_running_versions(monkeypatch):
    import torch

    check_supported_versions()  # this environment is supported
    monkeypatch.setattr(torch, "__version__", "2.4.0")
    with pytest.raises(ImportError, match="this is torch 2.4.0"):
        check_supported_versions()
    assert MIN_PYTHON == (3, 10) and MIN_TORCH == (2, 5)


def test_import_refuses_an_old_torch():
    """`import gradaug_det` with torch reporting 2.4: one error line, before detectron2 is imported."""
    code = "import torch; torch.__version__ = '2.4.0'; import gradaug_det"
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("ImportError: gradaug-det needs torch >= 2.5")
    assert "detectron2" not in proc.stderr


def test_setup_reads_the_one_version():
    import gradaug_det

    proc = subprocess.run([sys.executable, "setup.py", "--version"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == gradaug_det.__version__
    with open(os.path.join(REPO, "setup.py")) as f:
        assert gradaug_det.__version__ not in f.read()  # not written a second time
