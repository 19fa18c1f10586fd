"""The package's layering (docs/architecture.md, "Layers"): no module of gradaug_det imports a
module of a higher layer, at the top of a module or inside a function (issue 22).

Every module is read with ``ast`` (nothing is imported); its ``gradaug_det`` imports,
absolute and relative, are resolved to the room (the sub-package, or top-level module) they
reach. Rooms of one layer are peers: they do not import each other either.
"""
import ast
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "gradaug_det")
ROOT = "gradaug_det"  # the package's __init__.py: the facade, importing every room it registers

#: Room -> layer, lowest first; a module may import its own room and rooms of lower layers.
LAYERS = {
    "utils": 0, "env": 0,
    "slim": 1,
    "data": 2,
    "gradaug": 3,
    "config": 4,
    "modeling": 5,
    "checkpoint": 6,
    "evaluation": 7,
    "engine": 8,
    "benchmark": 9,
    "mmdet": 10, "deploy": 10, "launch": 10,
    ROOT: 11,
}

#: (importing module, imported room) -> why it may reach up.
EXCEPTIONS = {
    ("gradaug_det.env", ROOT): "python -m gradaug_det.env reports the package's __version__ and location",
}


def _modules():
    for dirpath, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                parts = os.path.relpath(path, REPO)[:-3].split(os.sep)
                is_package = parts[-1] == "__init__"
                if is_package:
                    parts = parts[:-1]
                yield ".".join(parts), is_package, path


def _imports(module, is_package, path):
    """(line, absolute name) of every gradaug_det module or name that ``path`` imports."""
    package = module if is_package else module.rsplit(".", 1)[0]
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            if node.module is None:  # from . import x: x is a module (or a name of the package)
                for alias in node.names:
                    yield node.lineno, f"{target}.{alias.name}"
            else:
                yield node.lineno, target


def _room(name):
    parts = name.split(".")
    return ROOT if len(parts) == 1 else parts[1]


def test_every_import_goes_down():
    rooms, upward = set(), []
    for module, is_package, path in _modules():
        here = _room(module) if module != ROOT else ROOT
        rooms.add(here)
        for line, target in _imports(module, is_package, path):
            if target != ROOT and not target.startswith(ROOT + "."):
                continue
            there = _room(target)
            # "from .. import slim" in a room resolves to gradaug_det.slim; a name of the root
            # package itself (from gradaug_det import width) is the root
            if there not in LAYERS and target.count(".") == 1:
                there = ROOT
            if there == here or (module, there) in EXCEPTIONS:
                continue
            if there not in LAYERS or LAYERS[there] >= LAYERS[here]:
                upward.append(f"{os.path.relpath(path, REPO)}:{line} ({here}, layer {LAYERS.get(here)}) imports "
                              f"{target} ({there}, layer {LAYERS.get(there)})")
    assert rooms - set(LAYERS) == set(), f"rooms without a layer (add them to LAYERS and docs/architecture.md): " \
                                         f"{sorted(rooms - set(LAYERS))}"
    assert not upward, "imports that do not go down a layer:\n" + "\n".join(upward)


def test_docs_state_the_same_layers():
    """docs/architecture.md's "Layers" line lists the rooms lowest first, peers joined by ``,``."""
    with open(os.path.join(REPO, "docs", "architecture.md"), encoding="utf-8") as f:
        text = f.read()
    match = re.search(r"^Layers, lowest first: (.+)$", text, re.M)
    assert match, "docs/architecture.md has no 'Layers, lowest first: ...' line"
    stated = {}
    for layer, group in enumerate(match.group(1).rstrip(".").split(" < ")):
        for room in re.findall(r"`([\w/.()_ ]+)`", group):
            stated[room.rstrip("/").replace(".py", "")] = layer
    expected = {room if room != ROOT else "__init__": layer for room, layer in LAYERS.items()}
    assert stated == expected


@pytest.mark.parametrize("source,expected", [
    ("from ..engine.trainer import GradAugTrainer\n", ["gradaug_det.engine.trainer"]),
    ("from . import functional\n", ["gradaug_det.slim.functional"]),
    ("def f():\n    import gradaug_det.config\n", ["gradaug_det.config"]),
])
def test_imports_are_resolved(tmp_path, source, expected):
    """The resolution the layering test relies on: relative, ``from . import`` and
    function-level imports of a module of ``gradaug_det/slim``."""
    path = tmp_path / "m.py"
    path.write_text(source)
    assert [t for _, t in _imports("gradaug_det.slim.m", False, str(path))] == expected
