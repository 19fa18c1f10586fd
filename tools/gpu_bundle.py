#!/usr/bin/env python
"""Build and check the wheel bundle for a lent GPU machine that cannot reach a package index.

The lent machine (docs/gpu.md) has Python 3.12 with torch 2.11 (CUDA 13.0), torchvision
0.26, numpy, OpenCV, matplotlib, tensorboard, tabulate, portalocker, ... but no detectron2
and none of detectron2's own needs (fvcore, iopath, yacs, omegaconf, hydra-core, antlr4,
pycocotools, termcolor). ``build`` writes ``dist/gpu-bundle/``: those packages as wheels for
CPython 3.12 on manylinux x86_64 (:data:`BUNDLE`), detectron2 as
``tools/install_detectron2.py`` repackages it (pure Python), gradaug-det itself, and
``gpu_run.sh`` (a copy of ``tools/gpu_run.sh``), which installs them with
``pip --no-index --no-deps --target`` on top of the machine's own torch and runs the GPU
work within a time budget. The bundle must stay within ``--max-mib`` (60 MiB: 64 MiB travel
with the working tree).

``check`` proves the bundle here: a Python 3.12 virtual environment with the lent machine's
torch / torchvision / numpy from PyPI and the other packages it has (:data:`MACHINE_BASE`;
cached under ``$GRADAUG_DET_CACHE``, default ``~/.cache/gradaug-det``), then
``gpu_run.sh --smoke``: the same no-index install, ``tools/gpu_check.py --tiny`` and a few
iterations of ``tools/train_net.py`` on the tiny generated data.

    python tools/gpu_bundle.py build                  # dist/gpu-bundle (make gpu-bundle)
    python tools/gpu_bundle.py check                  # make gpu-bundle-check
    python tools/gpu_bundle.py build --dry-run        # the plan, nothing downloaded
"""
import argparse
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
RUN_SCRIPT = os.path.join(TOOLS, "gpu_run.sh")
DEFAULT_OUT = os.path.join("dist", "gpu-bundle")
MAX_MIB = 60.0

#: pip's cross-platform selection: wheels for CPython 3.12 on manylinux x86_64 (the lent machine)
PLATFORM_ARGS = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                 "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                 "--platform", "manylinux2014_x86_64"]

#: What the bundle holds, as (requirement, how): "binary" = a wheel from PyPI for the
#: platform above; "sdist" = a pure-Python wheel built here from the source release (none
#: on PyPI); "detectron2" = tools/install_detectron2.py's repackaged sal-detectron2. Exact
#: versions, so the bundle is the one `make gpu-bundle-check` proved. The ranges are
#: detectron2's (tools/install_detectron2.py's EXTRA_REQUIREMENTS) and gradaug-det's (setup.py).
BUNDLE = [
    ("sal-detectron2==0.7.2", "detectron2"),
    ("fvcore==0.1.5.post20221221", "sdist"),
    ("iopath==0.1.10", "sdist"),
    ("antlr4-python3-runtime==4.9.3", "sdist"),  # omegaconf 2.3 requires 4.9.*: sdist only
    ("yacs==0.1.8", "binary"),
    ("omegaconf==2.3.1", "binary"),
    ("hydra-core==1.3.8", "binary"),
    ("pycocotools==2.0.11", "binary"),
    ("termcolor==3.3.0", "binary"),
    ("tabulate==0.10.0", "binary"),  # the machine has one too: this one is the tested version
    ("portalocker==4.4.2", "binary"),  # likewise
]

#: What the lent machine already has and the project uses (docs: /work/.library/device/KINDS.md,
#: "Python packages already there"); never bundled, never replaced. ``check`` installs these
#: into its virtual environment, with torch / torchvision / numpy at the machine's versions.
MACHINE_BASE = ["torch==2.11.0", "torchvision==0.26.0", "numpy==2.5.2", "opencv-python-headless", "matplotlib",
                "pillow", "pyyaml", "tqdm", "scipy", "tensorboard", "cloudpickle", "packaging", "setuptools",
                "typing-extensions", "tabulate", "portalocker"]

#: Requirements of gradaug-det / detectron2 / the bundled packages deliberately left out.
NOT_NEEDED = {
    "black": "detectron2 imports it only inside LazyConfig.to_py (formatting a config as Python source)",
    "submitit": "tools/submit.py's Slurm launcher (the 'slurm' / 'test' extras)",
    "dataclasses": "a backport for Python < 3.7",
    "importlib-resources": "a backport for Python < 3.9 (hydra-core)",
    "pywin32": "Windows only (portalocker)",
}


def normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    """The normalized project name of a requirement string such as ``fvcore>=0.1.5; python_version<'3'``."""
    return normalize(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1))


def bundled_names():
    """Normalized names of :data:`BUNDLE` plus gradaug-det and detectron2 (the import name)."""
    return {requirement_name(r) for r, _ in BUNDLE} | {"gradaug-det", "detectron2"}


def machine_names():
    """Normalized names of :data:`MACHINE_BASE` (plus its torch stack's own needs)."""
    return {requirement_name(r) for r in MACHINE_BASE}


def mib(path: str) -> float:
    """Size of a file or a folder tree in MiB (apparent sizes)."""
    if os.path.isfile(path):
        return os.path.getsize(path) / 2**20
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total / 2**20


def enforce_size(folder: str, max_mib: float = MAX_MIB, label: str = None) -> float:
    """Print the bundle's size; exit with one line if it exceeds ``max_mib``.

    Args:
        folder: the folder to measure.
        max_mib: the limit in MiB.
        label: the name printed for the folder (default: ``folder``).

    Returns:
        The size in MiB.

    Raises:
        SystemExit: (code 1, one line) when the folder is larger than ``max_mib`` MiB.
    """
    size = mib(folder)
    label = label or folder
    if size > max_mib:
        raise SystemExit(f"gpu_bundle: {label} is {size:.1f} MiB, over the {max_mib:g} MiB limit (64 MiB travel "
                         "with the working tree): drop a wheel from BUNDLE in tools/gpu_bundle.py or raise --max-mib")
    print(f"gpu_bundle: {label}: {size:.1f} MiB (limit {max_mib:g} MiB)")
    return size


def _install_detectron2_tool():
    spec = importlib.util.spec_from_file_location("install_detectron2_tool", os.path.join(TOOLS, "install_detectron2.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(cmd, dry_run):
    print(("would run: " if dry_run else "+ ") + " ".join(cmd), flush=True)
    if not dry_run:
        subprocess.check_call(cmd)


def _single_wheel(folder: str, expect_pure: bool = False) -> str:
    wheels = glob.glob(os.path.join(folder, "*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel in {folder}, found {[os.path.basename(w) for w in wheels]}")
    if expect_pure and not wheels[0].endswith("-py3-none-any.whl"):
        raise RuntimeError(f"{os.path.basename(wheels[0])} is not a pure-Python wheel: it would not install "
                           "on the lent machine's Python 3.12")
    return wheels[0]


def build(out: str, max_mib: float = MAX_MIB, dry_run: bool = False) -> str:
    """Write the bundle to ``out`` (replaced whole; written beside it first, then moved).

    Returns:
        ``out``.
    """
    pip = [sys.executable, "-m", "pip"]
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".gpu-bundle-", dir=parent)
    try:
        wheels = os.path.join(tmp, "wheels")
        os.makedirs(wheels)
        d2 = _install_detectron2_tool()
        for req, how in BUNDLE:
            scratch = tempfile.mkdtemp(dir=tmp)
            if how == "detectron2":
                assert req == f"{d2.PACKAGE}=={d2.VERSION}", (req, d2.PACKAGE, d2.VERSION)
                _run(d2.download_command(pip, scratch), dry_run)
                if not dry_run:
                    print(f"  rewriting to py3-none-any (detectron2/ only)")
                    d2.rewrite_wheel(_single_wheel(scratch), wheels)
            elif how == "binary":
                _run(pip + ["download", "--quiet", "--no-deps", *PLATFORM_ARGS, "-d", scratch, req], dry_run)
                if not dry_run:
                    shutil.move(_single_wheel(scratch), wheels)
            elif how == "sdist":
                _run(pip + ["wheel", "--quiet", "--no-deps", "--no-binary=:all:", "-w", scratch, req], dry_run)
                if not dry_run:
                    shutil.move(_single_wheel(scratch, expect_pure=True), wheels)
            else:
                raise ValueError(f"BUNDLE entry {req!r}: unknown kind {how!r}")
            shutil.rmtree(scratch, ignore_errors=True)
        # gradaug-det from a copy of its sources (no build/ or egg-info left in the checkout)
        src = os.path.join(tmp, "src")
        os.makedirs(src)
        shutil.copy(os.path.join(REPO, "setup.py"), src)
        shutil.copytree(os.path.join(REPO, "gradaug_det"), os.path.join(src, "gradaug_det"),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        scratch = tempfile.mkdtemp(dir=tmp)
        _run(pip + ["wheel", "--quiet", "--no-deps", "-w", scratch, src], dry_run)
        if not dry_run:
            shutil.move(_single_wheel(scratch, expect_pure=True), wheels)
        shutil.copy(RUN_SCRIPT, os.path.join(tmp, "gpu_run.sh"))
        shutil.rmtree(src)
        shutil.rmtree(scratch, ignore_errors=True)
        if dry_run:
            print(f"would write {out}: {len(BUNDLE) + 1} wheels and gpu_run.sh, at most {max_mib:g} MiB")
            return out
        enforce_size(tmp, max_mib, label=out)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    for w in sorted(os.listdir(os.path.join(out, "wheels"))):
        print(f"  {mib(os.path.join(out, 'wheels', w)):6.2f} MiB  {w}")
    print(f"gpu_bundle: wrote {out}; on the lent machine: bash {out}/gpu_run.sh OUTDIR")
    return out


def find_python312(explicit=None) -> str:
    """A Python 3.12 interpreter: ``explicit``, ``$GRADAUG_DET_PY312``, ``python3.12`` on the
    PATH, or pyenv's ``~/.pyenv/versions/3.12*``.

    Raises:
        SystemExit: (one line) when none is found.
    """
    candidates = [explicit, os.environ.get("GRADAUG_DET_PY312"), shutil.which("python3.12")]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")), reverse=True)
    for c in candidates:
        if c and os.path.exists(c):
            out = subprocess.run([c, "-c", "import sys, venv; print(sys.version_info[:2] == (3, 12))"],
                                 capture_output=True, text=True)
            if out.stdout.strip() == "True":
                return c
    raise SystemExit("gpu_bundle check: no Python 3.12 with venv found (tried --python, $GRADAUG_DET_PY312, "
                     "python3.12 on the PATH, ~/.pyenv/versions/3.12*): install one (e.g. `pyenv install 3.12`, "
                     "or Debian's python3.12-venv) and pass --python PATH")


def base_venv(cache: str, python: str) -> str:
    """The cached Python 3.12 environment holding :data:`MACHINE_BASE` (created on first use).

    Returns:
        Its ``bin/python``.
    """
    root = os.path.join(cache, "venvs", "torch-2.11.0-py312")
    py = os.path.join(root, "bin", "python")
    stamp = os.path.join(root, ".gradaug-det-machine-base")
    want = "\n".join(MACHINE_BASE) + "\n"
    if os.path.exists(stamp) and open(stamp).read() == want:
        print(f"gpu_bundle check: reusing {root}")
        return py
    if not os.path.exists(py):
        _run([python, "-m", "venv", root], False)
    # several GB (PyPI's torch is a CUDA build; the CPU runs it all the same): once per cache
    _run([py, "-m", "pip", "install", "--quiet", *MACHINE_BASE], False)
    with open(stamp, "w") as f:
        f.write(want)
    return py


def check(bundle: str, cache: str, python=None, out=None) -> str:
    """Run ``gpu_run.sh --smoke`` from ``bundle`` in the cached Python 3.12 environment.

    Returns:
        The output folder (gpu_run.log, gpu_check.json / .md, train_net.log, ...).

    Raises:
        SystemExit: when the bundle is missing or the run fails (its log's last lines are printed).
    """
    script = os.path.join(bundle, "gpu_run.sh")
    if not os.path.exists(script):
        raise SystemExit(f"gpu_bundle check: {script} does not exist: run `make gpu-bundle` first")
    py = base_venv(cache, find_python312(python))
    out = out or tempfile.mkdtemp(prefix="gpu-bundle-check-")
    work = tempfile.mkdtemp(prefix="gpu-bundle-check-work-")
    env = dict(os.environ, PYTHON=py, PYTHONPATH="", GRADAUG_SITE=os.path.join(work, "site"), GRADAUG_WORK=work)
    env.pop("PYTHONHOME", None)
    print(f"+ bash {script} --smoke {out}  (PYTHON={py})", flush=True)
    rc = subprocess.call(["bash", script, "--smoke", out], env=env, cwd=REPO)
    if rc != 0:
        raise SystemExit(f"gpu_bundle check: gpu_run.sh --smoke failed (exit {rc}); log: {out}/gpu_run.log")
    shutil.rmtree(work, ignore_errors=True)
    print(f"gpu_bundle check: green; outputs in {out}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write the bundle")
    b.add_argument("--out", default=DEFAULT_OUT, help=f"bundle folder (default {DEFAULT_OUT})")
    b.add_argument("--max-mib", type=float, default=MAX_MIB, help="refuse a bundle larger than this")
    b.add_argument("--dry-run", action="store_true", help="print the plan, download nothing")
    c = sub.add_parser("check", help="install the bundle into a Python 3.12 / torch 2.11 env and run gpu_run.sh --smoke")
    c.add_argument("--bundle", default=DEFAULT_OUT)
    c.add_argument("--cache", default=os.environ.get("GRADAUG_DET_CACHE", os.path.expanduser("~/.cache/gradaug-det")),
                   help="where the Python 3.12 environment is kept ($GRADAUG_DET_CACHE, default ~/.cache/gradaug-det)")
    c.add_argument("--python", default=None, help="a Python 3.12 interpreter (default: found)")
    c.add_argument("--output-dir", default=None, help="where gpu_run.sh writes (default: a new temporary folder)")
    args = p.parse_args(argv)
    if args.command == "build":
        if args.max_mib <= 0:
            p.error(f"--max-mib must be > 0, got {args.max_mib}")
        return build(args.out, args.max_mib, args.dry_run)
    return check(args.bundle, args.cache, args.python, args.output_dir)


if __name__ == "__main__":
    main()
