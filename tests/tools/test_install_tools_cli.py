"""tools/install_detectron2.py and tools/install_mmdet.py through their main: the
already-installed path, --dry-run (nothing changed), and the file rewrites they make."""
import base64
import hashlib
import os
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_install_detectron2_keeps_the_installed_one_and_dry_run(load_tool, capsys):
    import detectron2

    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "install_detectron2.py")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"detectron2 already installed at {os.path.dirname(detectron2.__file__)}" in proc.stdout

    tool = load_tool("install_detectron2")
    tool.main(["--force", "--dry-run"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("would run: ") and "download" in out[0] and out[0].endswith("sal-detectron2==0.7.2")
    assert "install --quiet <rewritten wheel> setuptools<81" in out[1]


def test_install_detectron2_rewrites_the_wheel(load_tool, tmp_path):
    tool = load_tool("install_detectron2")
    src = tmp_path / "sal_detectron2-0.7.2-cp310-cp310-linux_x86_64.whl"
    info = "sal_detectron2-0.7.2.dist-info"
    with zipfile.ZipFile(src, "w") as z:
        z.writestr("detectron2/__init__.py", "x = 1\n")
        z.writestr("tools/train_net.py", "stray\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: cp310-cp310-linux_x86_64\n")
        z.writestr(f"{info}/top_level.txt", "detectron2\ntools\n")
        z.writestr(f"{info}/RECORD", "stale\n")
    dst = tool.rewrite_wheel(str(src), str(tmp_path))
    assert os.path.basename(dst) == "sal_detectron2-0.7.2-py3-none-any.whl"
    with zipfile.ZipFile(dst) as z:
        names = set(z.namelist())
        assert names == {"detectron2/__init__.py", f"{info}/WHEEL", f"{info}/top_level.txt", f"{info}/RECORD"}
        assert "Tag: py3-none-any" in z.read(f"{info}/WHEEL").decode()
        assert "Root-Is-Purelib: true" in z.read(f"{info}/WHEEL").decode()
        assert z.read(f"{info}/top_level.txt") == b"detectron2\n"
        records = dict(line.split(",", 1) for line in z.read(f"{info}/RECORD").decode().splitlines())
        data = z.read("detectron2/__init__.py")
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        assert records["detectron2/__init__.py"] == f"sha256={digest},{len(data)}"
        assert records[f"{info}/RECORD"] == ","


def test_install_mmdet_dry_run_changes_nothing(load_tool, tmp_path, capsys):
    tool = load_tool("install_mmdet")
    cache = tmp_path / "cache"
    tool.main(["--dry-run", "--cache", str(cache)])
    out = capsys.readouterr().out
    if tool.stack_ready()[0]:
        assert "already installed" in out and "using them as is" in out
    else:
        lines = out.splitlines()
        assert lines[0].startswith("would pin (pip constraints): numpy==")
        assert lines[-1] == "would pip install: mmdet==3.3.0 mmcv==2.1.0"
        if tool.installed_version("mmcv") != tool.MMCV_VERSION:
            assert "would build mmcv 2.1.0 with ops from its sdist (c++20" in out
    assert not cache.exists()  # nothing written


def test_install_mmdet_patches_the_cxx_standard(load_tool, tmp_path):
    tool = load_tool("install_mmdet")
    setup_py = tmp_path / "setup.py"
    setup_py.write_text("extra = ['-std=c++17']\nnvcc = ['-std=c++17', '-O3']\n")
    assert tool.patch_cxx_standard(str(setup_py)) == 2
    assert setup_py.read_text() == "extra = ['-std=c++20']\nnvcc = ['-std=c++20', '-O3']\n"
    with pytest.raises(RuntimeError, match="no '-std=c\\+\\+17' flag"):
        tool.patch_cxx_standard(str(setup_py))
