"""tools/gpu_bundle.py's plan (no download): the bundle covers what gradaug-det, detectron2 and
the bundled packages require, its pins satisfy their ranges, gpu_run.sh parses and refuses a bad
call, and a bundle over the size limit is refused. `make gpu-bundle-check` is the end-to-end proof."""
import ast
import importlib.metadata
import os
import subprocess

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "tools", "gpu_run.sh")
#: the lent machine: CPython 3.12 on Linux x86_64
MACHINE_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
               "platform_system": "Linux", "os_name": "posix", "platform_machine": "x86_64",
               "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


@pytest.fixture(scope="module")
def tool(load_tool):
    return load_tool("gpu_bundle")


def _setup_py_requires():
    tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return ast.literal_eval(next(k.value for k in call.keywords if k.arg == "install_requires"))


def _installed_requires(dist):
    """Requirements of an installed distribution that apply on the lent machine (no extras)."""
    reqs = [Requirement(r) for r in importlib.metadata.requires(dist) or []]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(MACHINE_ENV)]


def _detectron2_dist():
    for dist in ("sal-detectron2", "detectron2"):
        try:
            importlib.metadata.version(dist)
            return dist
        except importlib.metadata.PackageNotFoundError:
            continue
    pytest.fail("detectron2 is not installed with metadata (neither sal-detectron2 nor detectron2)")


def test_bundle_covers_every_requirement_and_pins_fit(tool):
    from_setup = [Requirement(r) for r in _setup_py_requires()]
    d2 = _detectron2_dist()
    from_d2 = _installed_requires(d2)
    from_d2_extra = [Requirement(r) for r in tool._install_detectron2_tool().EXTRA_REQUIREMENTS]
    # the bundled packages' own requirements (their installed versions here)
    bundled = [Requirement(r) for r, _ in tool.BUNDLE]
    from_bundled = [r for b in bundled if b.name != "sal-detectron2" for r in _installed_requires(b.name)]
    assert len(from_d2) >= 10 and len(from_bundled) >= 10  # the metadata was found
    known = tool.bundled_names() | tool.machine_names() | set(tool.NOT_NEEDED)
    missing = sorted({tool.normalize(r.name) for r in from_setup + from_d2 + from_d2_extra + from_bundled} - known)
    assert not missing, f"required but neither bundled nor on the lent machine nor listed as not needed: {missing}"
    # the machine's torch stack is never bundled (it would shadow the CUDA build)
    assert not tool.bundled_names() & {"torch", "torchvision", "numpy"}
    # every pin satisfies every range that names it (setuptools / numpy / opencv are the machine's)
    pins = {tool.normalize(b.name): next(iter(b.specifier)).version for b in bundled}
    pins["detectron2"] = pins["sal-detectron2"]
    checked = 0
    for r in from_setup + from_d2 + from_d2_extra + from_bundled:
        name = tool.normalize(r.name)
        if name in pins:
            assert r.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} does not satisfy {r}"
            checked += 1
    assert checked >= 10
    # the two ways of getting a wheel that the lent machine can install
    assert {how for _, how in tool.BUNDLE} == {"detectron2", "sdist", "binary"}
    assert "--python-version" in tool.PLATFORM_ARGS and "manylinux2014_x86_64" in tool.PLATFORM_ARGS


def test_build_dry_run_prints_the_plan(tool, tmp_path, capsys):
    out = tmp_path / "bundle"
    tool.main(["build", "--dry-run", "--out", str(out)])
    lines = capsys.readouterr().out.splitlines()
    runs = [ln for ln in lines if ln.startswith("would run: ")]
    assert len(runs) == len(tool.BUNDLE) + 1  # one per package, then gradaug-det's wheel
    for (req, how), line in zip(tool.BUNDLE, runs):
        assert line.endswith(req) or how == "detectron2" and line.endswith("sal-detectron2==0.7.2")
        assert ("--platform manylinux_2_28_x86_64" in line) == (how == "binary")
        assert ("--no-binary=:all:" in line) == (how == "sdist")
    assert " wheel " in runs[-1] and "--no-deps" in runs[-1]
    assert not out.exists() and os.listdir(tmp_path) == []  # nothing written, nothing left behind


def test_size_limit_refused_in_one_line(tool, tmp_path, capsys):
    big = tmp_path / "wheels" / "big.whl"
    big.parent.mkdir()
    with open(big, "wb") as f:
        f.truncate(61 * 2**20)  # sparse: no disk used
    with pytest.raises(SystemExit) as e:
        tool.enforce_size(str(tmp_path), 60)
    msg = str(e.value)
    assert "61.0 MiB, over the 60 MiB limit" in msg and "\n" not in msg
    with open(big, "r+b") as f:
        f.truncate(59 * 2**20)
    assert tool.enforce_size(str(tmp_path), 60) == pytest.approx(59.0)
    assert "59.0 MiB (limit 60 MiB)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        tool.main(["build", "--max-mib", "0"])


def test_gpu_run_script_parses_and_refuses_bad_calls(tmp_path):
    assert subprocess.run(["bash", "-n", SCRIPT], capture_output=True).returncode == 0
    usage = subprocess.run(["bash", SCRIPT], capture_output=True, text=True)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: bash gpu_run.sh [--smoke] OUTDIR")
    # not inside a bundle (no wheels/ beside it): refused before anything is written
    bare = subprocess.run(["bash", SCRIPT, str(tmp_path / "out")], capture_output=True, text=True)
    assert bare.returncode == 2 and "run 'make gpu-bundle'" in bare.stderr
    assert not (tmp_path / "out").exists()
