"""Every entry point that loads weights refuses a file whose unpickling would create a file,
before it creates it, and bad output paths fail before any work (issue 11 §1, §4). No tool
has a way to fully unpickle a file: the removed opt-in flag is an argparse error."""
import os
import runpy
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from gradaug_det.checkpoint.io import UntrustedPickleError

from .test_loading import assert_refusal

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tool(name):
    return runpy.run_path(os.path.join(REPO, "tools", f"{name}.py"), run_name=name)


@pytest.fixture
def tiny_yaml(tmp_path, make_rcnn_cfg):
    cfg = make_rcnn_cfg()
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 96
    cfg.DATASETS.TRAIN = ("gradaug_quickstart_train",)
    cfg.DATASETS.TEST = ()
    path = tmp_path / "tiny.yaml"
    path.write_text(cfg.dump())
    return str(path)


@pytest.mark.parametrize("fmt", ["pkl", "pth"])
def test_train_net(tmp_path, tiny_yaml, malicious, fmt):
    """MODEL.WEIGHTS through tools/train_net.py: the setup step's metadata read (.pkl) and the
    trainer's checkpointer; --eval-only too."""
    from detectron2.engine import default_argument_parser

    path, target = malicious(fmt)
    tool = _tool("train_net")
    for extra in ([], ["--eval-only"]):
        args = default_argument_parser().parse_args(
            ["--config-file", tiny_yaml, *extra, "MODEL.WEIGHTS", path, "OUTPUT_DIR", str(tmp_path / "out"),
             "DATALOADER.NUM_WORKERS", "0"])
        with pytest.raises(UntrustedPickleError) as e:
            tool["main"](args)
        assert_refusal(str(e.value), path)
        assert not target.exists()


@pytest.mark.parametrize("source", ["torchvision", "classifier"])
@pytest.mark.parametrize("fmt", ["pth", "pkl"])
def test_convert_pretrained(tmp_path, malicious, source, fmt):
    path, target = malicious(fmt)
    out = tmp_path / "out.pkl"
    cfg = ["--config-file", os.path.join(REPO, "configs", "imagenet", "resnet50_gradaug.yaml")]
    with pytest.raises(UntrustedPickleError) as e:
        _tool("convert_pretrained")["main"]([path, str(out), "--source", source, *cfg])
    assert_refusal(str(e.value), path)
    assert not target.exists() and not out.exists()


def test_prune(tmp_path, tiny_yaml, malicious):
    path, target = malicious("pkl")
    tool = _tool("prune")
    args = tool["get_parser"]().parse_args(["--config-file", tiny_yaml, "--weights", path, "--width", "0.5",
                                            "--output", str(tmp_path / "pruned"), "--no-flops"])
    with pytest.raises(UntrustedPickleError) as e:
        tool["main"](args)
    assert_refusal(str(e.value), path)
    assert not target.exists()


def test_demo(tmp_path, tiny_yaml, malicious):
    path, target = malicious("pkl")
    cv2.imwrite(str(tmp_path / "img.png"), np.zeros((64, 80, 3), np.uint8))
    tool = _tool("demo")
    args = tool["get_parser"]().parse_args(["--config-file", tiny_yaml, "--input", str(tmp_path / "img.png"),
                                            "--output", str(tmp_path / "drawn"), "--opts", "MODEL.WEIGHTS", path])
    with pytest.raises(UntrustedPickleError) as e:
        tool["main"](args)
    assert_refusal(str(e.value), path)
    assert not target.exists() and not (tmp_path / "drawn").exists()


def _lazy_eval_args(path, out):
    return ["--config-file", os.path.join(REPO, "configs", "lazy", "mask_rcnn_gradaug_R_50_FPN_1x.py"),
            "--eval-only", "train.device=cpu", f"train.init_checkpoint={path}", f"train.output_dir={out}",
            "model.backbone.bottom_up.stages.depth=18", "model.backbone.out_channels=32",
            "model.proposal_generator.head.in_channels=32", "model.roi_heads.box_head.input_shape.channels=32",
            "model.roi_heads.mask_head.input_shape.channels=32"]


def test_lazyconfig_eval_only(tmp_path, malicious):
    path, target = malicious("pkl")
    tool = _tool("lazyconfig_train_net")
    args = tool["get_parser"]().parse_args(_lazy_eval_args(path, tmp_path / "out"))
    with pytest.raises(UntrustedPickleError) as e:
        tool["main"](args)
    assert_refusal(str(e.value), path)
    assert not target.exists()


def test_convert_checks_outputs_before_work(tmp_path):
    """--emit-config into a missing directory used to fail after writing the .pkl."""
    import torchvision

    src = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), src)
    out = tmp_path / "r18.pkl"
    convert = _tool("convert_pretrained")["main"]
    for argv, message in [
        (["--emit-config", str(tmp_path / "missing" / "x.yaml")], "--emit-config .*does not exist"),
        (["--target", "fpn", "--emit-config", str(tmp_path)], "is a directory"),
    ]:
        with pytest.raises(SystemExit, match=message):
            convert([str(src), str(out), "--source", "torchvision", *argv])
        assert not out.exists()
    with pytest.raises(SystemExit, match="must end in .pkl"):
        convert([str(src), str(tmp_path / "r18.pth2"), "--source", "torchvision"])
    with pytest.raises(SystemExit, match="does not exist"):
        convert([str(src), str(tmp_path / "nodir" / "r18.pkl"), "--source", "torchvision"])
    # and a good run leaves only complete files, no temporaries
    convert([str(src), str(out), "--source", "torchvision", "--emit-config", str(tmp_path / "r18.yaml")])
    assert sorted(os.listdir(tmp_path)) == ["r18.pkl", "r18.pth", "r18.yaml"]


def _command_line(tool, tmp_path, tiny_yaml, weights):
    """The arguments a user gives ``tools/<tool>.py`` to load ``weights``."""
    out = str(tmp_path / "out")
    if tool == "train_net":
        return ["--config-file", os.path.join(REPO, "configs", "quickstart", "mask_rcnn_gradaug.yaml"),
                "MODEL.WEIGHTS", weights, "OUTPUT_DIR", out, "MODEL.DEVICE", "cpu"]
    if tool == "lazyconfig_train_net":
        return _lazy_eval_args(weights, out)
    if tool == "prune":
        return ["--config-file", tiny_yaml, "--weights", weights, "--width", "0.5", "--output", out, "--no-flops"]
    if tool == "demo":
        cv2.imwrite(str(tmp_path / "img.png"), np.zeros((64, 80, 3), np.uint8))
        return ["--config-file", tiny_yaml, "--input", str(tmp_path / "img.png"), "--output", out,
                "--opts", "MODEL.WEIGHTS", weights]
    assert tool == "convert_pretrained"
    return [weights, str(tmp_path / "out.pkl"), "--source", "torchvision", "--config-file",
            os.path.join(REPO, "configs", "imagenet", "resnet50_gradaug.yaml")]


def _run_tool(tool, argv):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", f"{tool}.py"), *argv],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("tool,fmt", [("train_net", "pkl"), ("lazyconfig_train_net", "pth"), ("prune", "pkl"),
                                      ("demo", "pth"), ("convert_pretrained", "pkl")])
def test_command_line_prints_the_refusal_without_traceback(tmp_path, tiny_yaml, malicious, tool, fmt):
    """As a user runs each tool: exit status 2 (gradaug_det.utils.cli.run_tool), one message naming the file, the object and
    how to re-save the weights (no opt-in), no traceback, and the file's code not run."""
    path, target = malicious(fmt)
    proc = _run_tool(tool, _command_line(tool, tmp_path, tiny_yaml, path))
    assert proc.returncode == 2, proc.stderr
    refused = "the object" if fmt == "pkl" else "an object that is not a tensor"
    assert f"error: {path}: refused to load {refused}" in proc.stderr, proc.stderr
    message = next(line for line in proc.stderr.splitlines() if line.startswith("error: "))
    assert_refusal(message[len("error: "):], path)
    assert "Traceback" not in proc.stderr
    assert not target.exists()


def test_removed_opt_in_flag_is_an_argparse_error(tmp_path):
    """The removed opt-in: a script that still passes it stops at argument parsing, before any
    file is read or written."""
    argv = _command_line("train_net", tmp_path, None, str(tmp_path / "model.pth"))
    proc = _run_tool("train_net", argv[:2] + ["--trust-pickle"] + argv[2:])
    assert proc.returncode == 2, proc.stderr
    assert "error: unrecognized arguments: --trust-pickle" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
