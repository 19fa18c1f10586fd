"""The documentation is tested: what a user reads and copies must work.

For README.md, tools/README.md and every docs/*.md (a page added later is picked up by the glob):

* every shell command in a ```bash block is parsed and checked: ``make X`` names a Makefile
  target; ``python tools/X.py ...`` names a tool whose own argument parser accepts the flags;
  its ``--config-file`` exists and every ``KEY VALUE`` override (yacs) or ``key=value``
  (LazyConfig) is a key of that config, built as the tool builds it; ``python -m M`` names an
  importable module; ``pip install -e ".[x]"`` names an extra of setup.py;
* a path under ``output/`` that a command reads (``MODEL.WEIGHTS``, ``--weights``, an input) was
  written by an earlier command of the same page (its config's ``OUTPUT_DIR``, ``--output``,
  ...), so copying the commands in order works;
* every relative link and ``#anchor`` resolves (GitHub's anchor rule);
* every ```python block runs as written in a fresh process (in a temporary directory, with the
  generated data under ``DETECTRON2_DATASETS`` there), unless the line before it is an HTML
  comment ``<!-- fragment ... -->``: then it is only compiled;
* a page over 150 lines has a table of contents;
* the front page's smoke-run command trains and evaluates as written (on the CPU here).
"""
import argparse
import glob
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from typing import Dict, Iterator, List, NamedTuple, Optional, Set, Tuple

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAGES = sorted({os.path.relpath(p, REPO) for p in
                [os.path.join(REPO, "README.md"), os.path.join(REPO, "tools", "README.md"),
                 *glob.glob(os.path.join(REPO, "docs", "*.md"))]})
#: Where `make X` writes (read by later commands of a page).
MAKE_WRITES = {"demo": "output/quickstart", "demo-mmdet": "output/quickstart_mmdet", "compare": "output/compare"}
#: Flags whose value a tool writes.
WRITE_FLAGS = {"--output", "--output-dir", "--emit-config", "--json", "--markdown", "--job-dir", "--work-dir"}
SHELL_LANGS = {"bash", "sh", "shell"}
TOC_LINES = 150


class Block(NamedTuple):
    lang: str
    code: str
    line: int  # 1-based line of the opening fence
    fragment: bool


def read(page: str) -> str:
    with open(os.path.join(REPO, page), encoding="utf-8") as f:
        return f.read()


def code_blocks(text: str) -> List[Block]:
    """Fenced blocks with their language and whether an HTML ``<!-- fragment`` comment precedes them."""
    blocks, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if m:
            prev = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            start, i = i, i + 1
            body = []
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            blocks.append(Block(m.group(1).lower(), "\n".join(body), start + 1, prev.startswith("<!-- fragment")))
        i += 1
    return blocks


def prose(text: str) -> str:
    """The page without fenced blocks and inline code spans."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup dropped, lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> Set[str]:
    seen: Dict[str, int] = {}
    out = set()
    for line in re.sub(r"^```.*?^```", "", text, flags=re.M | re.S).split("\n"):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        s = slug(m.group(1))
        n = seen.get(s, 0)
        out.add(s if n == 0 else f"{s}-{n}")
        seen[s] = n + 1
    return out


# ---------------------------------------------------------------------------------------------
# Links and anchors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("page", PAGES)
def test_links_and_anchors_resolve(page):
    text = read(page)
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(text)):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(os.path.join(REPO, dest)):
            bad.append(f"{target}: no file {dest}")
            continue
        if anchor and dest.endswith(".md") and anchor not in anchors(read(dest)):
            bad.append(f"{target}: no heading with anchor #{anchor} in {dest}")
    assert not bad, f"{page}: " + "; ".join(bad)


def test_anchor_rule_is_githubs():
    assert slug("GPU (`tools/gpu_check.py`)") == "gpu-toolsgpu_checkpy"
    assert slug("Does GradAug help here? (`make compare`)") == "does-gradaug-help-here-make-compare"
    assert slug("The quickstart's result") == "the-quickstarts-result"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


@pytest.mark.parametrize("page", PAGES)
def test_long_pages_have_a_table_of_contents(page):
    text = read(page)
    if text.count("\n") <= TOC_LINES:
        return
    toc = [line for line in text.split("\n")[:40] if "contents" in line.lower()]
    assert toc, f"{page} has {text.count(chr(10))} lines and no 'Contents' line near its top"
    block = text[text.lower().index("contents"):][:1500]
    assert len(re.findall(r"\]\(#[^)]+\)", block)) >= 3, f"{page}: its contents line links fewer than 3 sections"


def test_the_quickstart_picture_stays_linked():
    assert "](docs/quickstart_predictions.jpg)" in read("README.md")
    assert os.path.isfile(os.path.join(REPO, "docs", "quickstart_predictions.jpg"))


# ---------------------------------------------------------------------------------------------
# Shell commands
# ---------------------------------------------------------------------------------------------
def shell_commands(code: str) -> Iterator[List[str]]:
    """The commands of a shell block as token lists (continuations joined, comments and leading
    ``VAR=value`` assignments dropped, ``&&`` / ``;`` split)."""
    for line in re.sub(r"\\\n", " ", code).split("\n"):
        parts: List[List[str]] = [[]]
        for tok in shlex.split(line, comments=True):
            if tok in ("&&", ";"):
                parts.append([])
            elif tok.endswith(";"):
                parts[-1].append(tok[:-1])
                parts.append([])
            else:
                parts[-1].append(tok)
        for tokens in parts:
            while tokens and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]):
                tokens.pop(0)
            if tokens:
                yield tokens


def makefile_targets() -> Set[str]:
    return set(re.findall(r"^([\w.-]+)\s*:(?!=)", read("Makefile"), flags=re.M))


def setup_extras() -> Set[str]:
    text = read("setup.py")
    extras = text[text.index("extras_require"):]
    return set(re.findall(r'^\s+"([\w-]+)":\s*\[', extras, flags=re.M))


class _Parsed(Exception):
    pass


def parse_tool_args(module, argv: List[str], monkeypatch) -> argparse.Namespace:
    """The namespace the tool's own parser makes of ``argv`` (SystemExit with argparse's message
    if it refuses them). Tools whose ``main(argv)`` builds its parser are stopped right after it."""
    if hasattr(module, "get_parser"):
        return module.get_parser().parse_args(argv)
    if hasattr(module, "parse_args"):
        return module.parse_args(argv)
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        try:
            module.main(argv)
        except _Parsed as parsed:
            return parsed.args[0]
    raise AssertionError(f"{module.__name__}.main did not parse its arguments")


def yacs_cfg(config_file: str, opts: List[str]):
    """The config as tools/train_net.py builds it (gradaug_det.engine.setup); KeyError / ValueError
    for an override that is not a key of it."""
    from detectron2.config import get_cfg

    from gradaug_det import add_gradaug_config

    cfg = add_gradaug_config(get_cfg())
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    return cfg


def lazy_cfg(config_file: str, overrides: List[str]):
    """The LazyConfig with ``key=value`` overrides, each key checked to exist."""
    from detectron2.config import LazyConfig

    cfg = LazyConfig.load(config_file)
    for item in overrides:
        key = item.split("=", 1)[0]
        node = cfg
        for part in key.split("."):
            assert part in node, f"{key}: not a key of {os.path.relpath(config_file, REPO)}"
            node = node[part]
    return LazyConfig.apply_overrides(cfg, overrides)


class PathLog:
    """Paths under output/ that the page's commands wrote so far."""

    def __init__(self):
        self.dirs: Set[str] = set()
        self.files: Set[str] = set()

    def write_dir(self, path: Optional[str]):
        if path:
            self.dirs.add(os.path.normpath(path))

    def write_file(self, path: Optional[str]):
        if path:
            self.files.add(os.path.normpath(path))

    def check_read(self, path: str, where: str):
        path = os.path.normpath(path)
        if not path.startswith("output" + os.sep):
            return
        ok = path in self.files or path in self.dirs or any(path.startswith(d + os.sep) for d in self.dirs)
        assert ok, (f"{where}: reads {path}, which no earlier command of the page writes "
                    f"(written: {sorted(self.dirs | self.files)})")


def _values(tokens: List[str]) -> List[Tuple[Optional[str], str]]:
    """(preceding flag or None, value) for every token, ``key=value`` values split off."""
    out, flag = [], None
    for tok in tokens:
        if tok.startswith("--"):
            flag = tok
            continue
        out.append((flag, tok.split("=", 1)[1] if re.match(r"^[\w.]+=", tok) else tok))
        flag = None
    return out


def check_tool(path: str, argv: List[str], log: PathLog, where: str, load_tool, monkeypatch):
    assert path.startswith("tools/") and os.path.isfile(os.path.join(REPO, path)), f"{where}: no tool {path}"
    name = os.path.splitext(os.path.basename(path))[0]
    if name.startswith("mmdet_") and importlib.util.find_spec("mmengine") is None:
        return  # its module imports mmengine: `make test-mmdet` environments check the flags
    if "--help" in argv or "-h" in argv:
        with pytest.raises(SystemExit) as e:
            parse_tool_args(load_tool(name), argv, monkeypatch)
        assert e.value.code == 0, f"{where}: {path} --help failed"
        return
    module = load_tool(name)
    if "cuda" in argv and not _cuda_available():
        # the tool refuses --device cuda where torch sees no GPU: check the flags as on a GPU machine
        monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    try:
        args = parse_tool_args(module, argv, monkeypatch)
    except SystemExit as e:
        raise AssertionError(f"{where}: {path} refuses the arguments {argv} (exit {e.code})") from None
    finally:
        monkeypatch.undo()
    if name == "submit":
        log.write_dir(args.job_dir)
        return check_tool(args.tool, args.tool_args, log, where, load_tool, monkeypatch)

    # what this command writes
    writes = {os.path.normpath(v) for f, v in _values(argv) if f in WRITE_FLAGS}
    if name == "convert_pretrained":
        writes.add(os.path.normpath(args.output))
        if args.base_config:
            assert os.path.isfile(os.path.join(REPO, args.base_config)), f"{where}: no {args.base_config}"
    opts = list(getattr(args, "opts", None) or [])
    config = getattr(args, "config_file", None)
    out_dir = None
    if config:
        abs_config = config if os.path.isabs(config) else os.path.join(REPO, config)
        if os.path.isfile(abs_config):
            if config.endswith(".py") and name == "lazyconfig_train_net":
                cfg = lazy_cfg(abs_config, opts)
                out_dir = cfg.train.output_dir
                log.check_read(str(cfg.train.init_checkpoint or ""), where)
            elif config.endswith(".yaml"):
                try:
                    cfg = yacs_cfg(abs_config, opts)
                except (KeyError, ValueError, AssertionError) as e:
                    raise AssertionError(f"{where}: an override is not a key of {config}: {e!r}") from None
                out_dir = cfg.OUTPUT_DIR
                log.check_read(cfg.MODEL.WEIGHTS, where)
        else:
            log.check_read(config, where)  # a config an earlier command wrote (pruned, emitted)
            overrides = dict(zip(opts[::2], opts[1::2]))
            out_dir = overrides.get("OUTPUT_DIR")
            if "MODEL.WEIGHTS" in overrides:
                log.check_read(overrides["MODEL.WEIGHTS"], where)
    # every other path under output/ on the command line is read
    for flag, value in _values(argv):
        norm = os.path.normpath(value)
        if flag in WRITE_FLAGS or norm in writes or value == out_dir:
            continue
        log.check_read(value, where)
    if name in ("train_net", "lazyconfig_train_net"):
        log.write_dir(out_dir)
    for w in writes:
        (log.write_file if os.path.splitext(w)[1] else log.write_dir)(w)
        if name == "prune":
            log.write_dir(w)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_command(tokens: List[str], log: PathLog, where: str, load_tool, monkeypatch):
    cmd = tokens[0]
    if cmd == "make":
        targets = makefile_targets()
        for target in (t for t in tokens[1:] if "=" not in t and not t.startswith("-")):
            assert target in targets, f"{where}: make {target}: no such Makefile target"
            log.write_dir(MAKE_WRITES.get(target))
    elif cmd == "pip":
        for extra in re.findall(r"\[([\w,-]+)\]", " ".join(tokens)):
            for e in extra.split(","):
                assert e in setup_extras(), f"{where}: setup.py has no extra {e!r}"
    elif cmd == "python":
        if tokens[1] == "-m":
            module = tokens[2]
            if module == "torch.distributed.run":
                i = next(i for i, t in enumerate(tokens) if t.endswith(".py"))
                return check_tool(tokens[i], tokens[i + 1:], log, where, load_tool, monkeypatch)
            assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
        else:
            check_tool(tokens[1], tokens[2:], log, where, load_tool, monkeypatch)
    elif cmd == "bash":
        # a script of the repository, or one `make gpu-bundle` copies into dist/gpu-bundle/ from tools/
        script = tokens[1]
        source = os.path.join("tools", os.path.basename(script)) if script.startswith("dist/gpu-bundle/") else script
        assert os.path.isfile(os.path.join(REPO, source)), f"{where}: no script {source}"
        check = subprocess.run(["bash", "-n", os.path.join(REPO, source)], capture_output=True, text=True)
        assert check.returncode == 0, f"{where}: {source} does not parse: {check.stderr}"
    else:
        raise AssertionError(f"{where}: unexpected command {cmd!r} (teach tests/docs/test_docs.py to check it)")


@pytest.mark.parametrize("page", PAGES)
def test_shell_commands(page, load_tool, monkeypatch):
    log = PathLog()
    for block in code_blocks(read(page)):
        if block.lang not in SHELL_LANGS:
            continue
        for tokens in shell_commands(block.code):
            check_command(tokens, log, f"{page}:{block.line}: {' '.join(tokens)[:80]}", load_tool, monkeypatch)


def _broken_chain_page():
    return ("```bash\npython tools/train_net.py --config-file configs/mask_rcnn_gradaug.yaml\n"
            "python tools/train_net.py --config-file configs/mask_rcnn_gradaug.yaml --eval-only \\\n"
            "    MODEL.WEIGHTS output/model_final.pth\n```\n")


@pytest.mark.parametrize("code, message", [
    # the README's old --eval-only line after training configs/mask_rcnn_gradaug.yaml
    (_broken_chain_page(), "reads output/model_final.pth"),
    # the old ImageNet chain: the config writes output/imagenet_r50_gradaug/
    ("```bash\npython tools/train_net.py --config-file configs/imagenet/resnet50_gradaug.yaml\n"
     "python tools/convert_pretrained.py output/imagenet_gradaug/model_final.pth output/x.pkl --source classifier\n```\n",
     "reads output/imagenet_gradaug/model_final.pth"),
    ("```bash\npython tools/train_net.py --config-file configs/mask_rcnn_gradaug.yaml SOLVER.NO_SUCH_KEY 1\n```\n",
     "not a key"),
    ("```bash\npython tools/prune.py --config-file configs/mask_rcnn_gradaug.yaml --widht 0.5 --output output/p\n```\n",
     "refuses the arguments"),
    ("```bash\nmake no-such-target\n```\n", "no such Makefile target"),
    ("```bash\npython tools/no_such_tool.py\n```\n", "no tool"),
])
def test_shell_checks_catch_broken_commands(code, message, load_tool, monkeypatch):
    """The checks fail on what the docs used to say (and on other broken commands)."""
    log = PathLog()
    with pytest.raises(AssertionError, match=re.escape(message)):
        for block in code_blocks(code):
            for tokens in shell_commands(block.code):
                check_command(tokens, log, "page", load_tool, monkeypatch)


# ---------------------------------------------------------------------------------------------
# Python blocks
# ---------------------------------------------------------------------------------------------
PYTHON_BLOCKS = [(page, i) for page in PAGES
                 for i, b in enumerate(code_blocks(read(page))) if b.lang == "python"]


def _run(argv: List[str], cwd: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DETECTRON2_DATASETS=os.path.join(cwd, "datasets"))
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _own_project_log_has_width_table(tmp_path):
    with open(tmp_path / "output" / "my_project" / "log.txt") as f:
        log = f.read()
    assert "Evaluation results per width" in log and re.search(r"^\|\s+0\.9\s+\|", log, re.M), log[-2000:]


#: Checks after a block ran: (page, index of the block among the page's blocks) -> check(tmp_path).
AFTER_RUN = {("docs/own_project.md", 0): _own_project_log_has_width_table}


@pytest.mark.parametrize("page, index", PYTHON_BLOCKS)
def test_python_blocks(page, index, tmp_path):
    blocks = code_blocks(read(page))
    block = blocks[index]
    compile(block.code, f"{page}:{block.line}", "exec")
    if block.fragment:
        return
    proc = _run([sys.executable, "-c", block.code], str(tmp_path))
    assert proc.returncode == 0, f"{page}:{block.line} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    python_index = [i for i, b in enumerate(blocks) if b.lang == "python"].index(index)
    check = AFTER_RUN.get((page, python_index))
    if check is not None:
        check(tmp_path)


def test_fragments_are_few():
    fragments = [(p, i) for p, i in PYTHON_BLOCKS if code_blocks(read(p))[i].fragment]
    assert len(fragments) <= 5, fragments


# ---------------------------------------------------------------------------------------------
# The front page's smoke run
# ---------------------------------------------------------------------------------------------
def front_page_smoke_command() -> List[str]:
    text = read("README.md")
    section = text[text.index("## A smoke run on your cluster"):]
    section = section[:section.index("\n## ", 1)]
    (block,) = [b for b in code_blocks(section) if b.lang in SHELL_LANGS]
    (tokens,) = list(shell_commands(block.code))
    return tokens


def test_front_page_smoke_run(tmp_path):
    """The smoke run trains and evaluates as written (here on the CPU, as the page says)."""
    import torch

    tokens = front_page_smoke_command()
    assert tokens[:2] == ["python", "tools/train_net.py"]
    for name in ("tools", "configs"):
        os.symlink(os.path.join(REPO, name), tmp_path / name)
    extra = [] if torch.cuda.is_available() else ["MODEL.DEVICE", "cpu"]
    proc = _run([sys.executable, *tokens[1:], *extra], str(tmp_path))
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    out = tmp_path / "output" / "smoke"
    assert (out / "model_final.pth").is_file()
    with open(out / "log.txt") as f:
        assert "Evaluation results per width" in f.read()
