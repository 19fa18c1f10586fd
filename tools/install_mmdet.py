"""Install the optional MMDetection stack (mmengine 0.10, mmcv 2.1.0, mmdet 3.3.0).

``gradaug_det.mmdet`` needs MMDetection 3.x. mmdet 3.3.0 requires
``2.0.0rc4 <= mmcv < 2.2.0``, and mmcv 2.1.0 has no binary wheel on PyPI for this
torch, so its sdist is built with its C++ ops (``MMCV_WITH_OPS=1``; CPU ops on a
machine without CUDA, CUDA ops where ``torch.cuda`` is available or ``FORCE_CUDA=1``).
Two things make that build work with torch 2.14:

* torch 2.14's headers need C++20, and mmcv 2.1.0's ``setup.py`` asks for C++17:
  the script rewrites that one flag in an unpacked copy of the sdist;
* ``--no-build-isolation``, so the build compiles against the torch that is installed
  (setuptools<81 and ninja come first).

The build takes about 14 minutes on a 2-core CPU, so the wheel is cached under
``$GRADAUG_DET_CACHE`` (default ``~/.cache/gradaug-det``) in a folder named after the
torch build it was compiled against; a machine builds it once. An environment that
already has a working mmcv/mmdet in the supported ranges (a cluster's own install) is
used as is.

Usage: ``python tools/install_mmdet.py [--force] [--cache DIR] [--dry-run]``
(``--dry-run``: print what would be installed, built or reused, and change nothing).
"""
import argparse
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

MMCV_VERSION = "2.1.0"
MMDET_REQUIREMENT = "mmdet==3.3.0"
MMENGINE_REQUIREMENT = "mmengine>=0.10.0,<0.11"
# mmcv's runtime requirements (its sdist metadata) plus what its build needs.
BUILD_REQUIREMENTS = ["setuptools<81", "wheel", "ninja", "packaging", "addict", "yapf", "pyyaml", "Pillow"]
# The C++ standard that torch>=2.10 headers require.
CXX_STD = "c++20"


def installed_version(dist):
    """Return the installed version of distribution ``dist``, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def constraint_lines():
    """pip constraints that keep this environment's numpy (and a matching cv2).

    mmengine asks for ``opencv-python``; left alone, pip takes the newest one and numpy 2
    with it, which breaks detectron2 (built for numpy < 2) in the same environment.
    """
    lines = []
    numpy_version = installed_version("numpy")
    if numpy_version:
        lines.append(f"numpy=={numpy_version}")
        if int(numpy_version.split(".")[0]) < 2:
            lines.append("opencv-python<4.12")  # 4.12 and newer need numpy 2
    return lines


def keep_installed_constraints(path):
    """Write :func:`constraint_lines` to the pip constraints file ``path``; returns ``path``."""
    with open(path, "w") as f:
        f.write("\n".join(constraint_lines()) + "\n")
    return path


def stack_ready():
    """Return (ok, reason): whether mmengine, mmcv (with ops) and mmdet import and fit."""
    probe = (
        "import mmengine, mmcv, mmdet; from mmcv.ops import RoIAlign, nms; "
        "from mmdet.utils import register_all_modules; print(mmcv.__version__, mmdet.__version__)"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    if proc.returncode != 0:
        return False, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "import failed"
    return True, proc.stdout.strip()


def cache_dir(root):
    """Folder for wheels built against the installed torch (its version names the ABI)."""
    import torch  # noqa: F401  (imported here: torch must already be installed)

    tag = re.sub(r"[^A-Za-z0-9_.+-]", "_", torch.__version__)
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return os.path.join(root, "wheels", f"torch-{tag}-{py}")


def patch_cxx_standard(setup_py):
    """Rewrite mmcv's ``-std=c++17`` compile flag to ``-std=c++20``.

    Args:
        setup_py: path of the unpacked sdist's ``setup.py``.

    Returns:
        Number of flags rewritten (raises if none was found).
    """
    with open(setup_py) as f:
        text = f.read()
    new, count = re.subn(r"-std=c\+\+17", f"-std={CXX_STD}", text)
    if count == 0:
        raise RuntimeError(f"{setup_py}: no '-std=c++17' flag to patch; is this mmcv {MMCV_VERSION}?")
    with open(setup_py, "w") as f:
        f.write(new)
    return count


def build_mmcv_wheel(pip, out_dir):
    """Download mmcv's sdist, patch it, build a wheel with ops into ``out_dir``."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.check_call(
            pip + ["download", "--quiet", "--no-deps", "--no-binary=:all:", "--no-build-isolation",
                   "-d", tmp, f"mmcv=={MMCV_VERSION}"]
        )
        sdist = next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = os.path.join(tmp, f"mmcv-{MMCV_VERSION}")
        n = patch_cxx_standard(os.path.join(src, "setup.py"))
        print(f"patched {n} C++ standard flag(s) to {CXX_STD}; building mmcv {MMCV_VERSION} "
              f"with ops (about 14 min on 2 CPU cores) ...", flush=True)
        env = dict(os.environ, MMCV_WITH_OPS="1")
        env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
        start = time.time()
        os.makedirs(out_dir, exist_ok=True)
        build_out = os.path.join(tmp, "wheelhouse")
        subprocess.check_call(
            pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", build_out, src], env=env
        )
        wheel = next(f for f in os.listdir(build_out) if f.endswith(".whl"))
        # Copy then rename, so an interrupted copy never looks like a cached wheel.
        partial = os.path.join(out_dir, wheel + ".partial")
        shutil.copyfile(os.path.join(build_out, wheel), partial)
        os.replace(partial, os.path.join(out_dir, wheel))
        print(f"built {wheel} in {(time.time() - start) / 60:.1f} min", flush=True)
        return os.path.join(out_dir, wheel)


def cached_mmcv_wheels(cache):
    """File names of mmcv wheels built earlier for the installed torch under ``cache``."""
    wheels = cache_dir(cache)
    if not os.path.isdir(wheels):
        return []
    return [f for f in os.listdir(wheels) if f.startswith(f"mmcv-{MMCV_VERSION}-") and f.endswith(".whl")]


def print_plan(args):
    """``--dry-run``: the steps :func:`main` would take, in order."""
    print(f"would pin (pip constraints): {', '.join(constraint_lines()) or 'nothing'}")
    print(f"would pip install: {MMENGINE_REQUIREMENT} {' '.join(BUILD_REQUIREMENTS)}")
    have = installed_version("mmcv")
    if have != MMCV_VERSION or args.force:
        cached = cached_mmcv_wheels(args.cache)
        if cached:
            print(f"would install the cached wheel {os.path.join(cache_dir(args.cache), cached[0])}")
        else:
            print(f"would build mmcv {MMCV_VERSION} with ops from its sdist ({CXX_STD}; about 14 min on 2 CPU "
                  f"cores) into {cache_dir(args.cache)}")
    else:
        print(f"would keep the installed mmcv {have}")
    print(f"would pip install: {MMDET_REQUIREMENT} mmcv=={MMCV_VERSION}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="install even if mmdet already works")
    parser.add_argument(
        "--cache",
        default=os.environ.get("GRADAUG_DET_CACHE", os.path.expanduser("~/.cache/gradaug-det")),
        help="where built mmcv wheels are kept (env GRADAUG_DET_CACHE)",
    )
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would be installed, built or reused; change nothing")
    args = parser.parse_args(argv)
    ok, detail = stack_ready()
    if ok and not args.force:
        print(f"mmcv/mmdet already installed ({detail}); using them as is.")
        return
    if args.dry_run:
        print_plan(args)
        return
    os.makedirs(args.cache, exist_ok=True)
    constraints = keep_installed_constraints(os.path.join(args.cache, "constraints.txt"))
    pip = [sys.executable, "-m", "pip"]
    pip_install = pip + ["install", "--quiet", "-c", constraints]
    subprocess.check_call(pip_install + [MMENGINE_REQUIREMENT] + BUILD_REQUIREMENTS)
    have = installed_version("mmcv")
    if have != MMCV_VERSION or args.force:
        wheels = cache_dir(args.cache)
        cached = cached_mmcv_wheels(args.cache)
        if cached:
            wheel = os.path.join(wheels, cached[0])
            print(f"using cached {wheel}")
        else:
            wheel = build_mmcv_wheel(pip, wheels)
        subprocess.check_call(pip_install + ["--no-deps", "--force-reinstall", wheel])
    subprocess.check_call(pip_install + [MMDET_REQUIREMENT, f"mmcv=={MMCV_VERSION}"])
    ok, detail = stack_ready()
    if not ok:
        raise SystemExit(f"mmdet stack installed but does not import: {detail}")
    print(f"mmcv {detail.split()[0]} / mmdet {detail.split()[1]} ready")


if __name__ == "__main__":
    main()
