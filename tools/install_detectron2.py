"""Install detectron2 into the running Python environment when it has none.

On CUDA clusters detectron2 is installed from its official source and is used
untouched: this script then does nothing. On a fresh machine without it, the
script installs upstream detectron2's Python sources from the PyPI project
``sal-detectron2`` (0.7.2 = upstream commit a59f056 plus two small fixes). That
wheel is tagged cp310 with a linux platform tag and also ships a stray top-level
``tools`` package; we download it, rewrite it into a pure ``py3-none-any`` wheel
that contains only ``detectron2/`` (standard library only), and install that, so
``pip check`` stays clean and nothing shadows this project's ``tools/``.

Usage: ``python tools/install_detectron2.py [--force] [--dry-run]``
(``--dry-run``: print the pip commands instead of running them).
"""
import argparse
import base64
import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile

PACKAGE = "sal-detectron2"
VERSION = "0.7.2"
# detectron2's runtime needs that the sal wheel's metadata leaves out.
EXTRA_REQUIREMENTS = ["setuptools<81", "fvcore>=0.1.5,<0.1.6", "iopath>=0.1.7,<0.1.11", "opencv-python-headless<4.12"]


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def rewrite_wheel(src: str, dst_dir: str) -> str:
    """Rewrite the sal-detectron2 wheel into a pure-Python wheel holding only detectron2.

    Args:
        src: path of the downloaded ``sal_detectron2-*.whl``.
        dst_dir: folder to write the rewritten wheel to.

    Returns:
        The path of the rewritten ``*-py3-none-any.whl``.
    """
    name = os.path.basename(src).split("-")
    dst = os.path.join(dst_dir, f"{name[0]}-{name[1]}-py3-none-any.whl")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        dist_info = next(n.split("/")[0] for n in zin.namelist() if ".dist-info/" in n)
        record_name = f"{dist_info}/RECORD"
        records = []
        for info in zin.infolist():
            top = info.filename.split("/")[0]
            if top not in ("detectron2", dist_info) or info.filename == record_name:
                continue  # drops the stray top-level ``tools`` package
            data = zin.read(info.filename)
            if info.filename == f"{dist_info}/WHEEL":
                lines = []
                for line in data.decode().splitlines():
                    if line.startswith("Tag:"):
                        line = "Tag: py3-none-any"
                    elif line.startswith("Root-Is-Purelib:"):
                        line = "Root-Is-Purelib: true"
                    lines.append(line)
                data = ("\n".join(lines) + "\n").encode()
            elif info.filename == f"{dist_info}/top_level.txt":
                data = b"detectron2\n"
            zout.writestr(info.filename, data)
            records.append(f"{info.filename},{_record_hash(data)},{len(data)}")
        records.append(f"{record_name},,")
        zout.writestr(record_name, "\n".join(records) + "\n")
    return dst


def detectron2_origin():
    """Return the path of an importable detectron2 package, or None."""
    spec = importlib.util.find_spec("detectron2")
    return None if spec is None else os.path.dirname(spec.origin)


def download_command(pip, dest):
    """The pip command that downloads the sal-detectron2 wheel into ``dest``."""
    return pip + ["download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", "3.10",
                  "-d", dest, f"{PACKAGE}=={VERSION}"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="install even if detectron2 imports")
    parser.add_argument("--dry-run", action="store_true", help="print the pip commands instead of running them")
    args = parser.parse_args(argv)
    origin = detectron2_origin()
    if origin is not None and not args.force:
        print(f"detectron2 already installed at {origin}; using it as is.")
        return
    pip = [sys.executable, "-m", "pip"]
    if args.dry_run:
        print("would run:", " ".join(download_command(pip, "<tmp>")))
        print("would rewrite the wheel to py3-none-any (detectron2/ only) and run:",
              " ".join(pip + ["install", "--quiet", "<rewritten wheel>"] + EXTRA_REQUIREMENTS))
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.check_call(download_command(pip, tmp))
        wheel = next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl"))
        pure = rewrite_wheel(wheel, tempfile.mkdtemp(dir=tmp))
        subprocess.check_call(pip + ["install", "--quiet", pure] + EXTRA_REQUIREMENTS)
    print(f"detectron2 installed from {PACKAGE} {VERSION} at {detectron2_origin()}")


if __name__ == "__main__":
    main()
