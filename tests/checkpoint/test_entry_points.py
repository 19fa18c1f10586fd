"""Every entry point that loads weights refuses a file whose unpickling would create a file,
before it creates it, and bad output paths fail before any work (issue 11 §1, §4)."""
import os
import runpy

import cv2
import numpy as np
import pytest
import torch

from gradaug_det.checkpoint.io import TRUST_PICKLE_ENV, UntrustedPickleError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tool(name):
    return runpy.run_path(os.path.join(REPO, "tools", f"{name}.py"), run_name=name)


@pytest.fixture(autouse=True)
def _untrusted(monkeypatch):
    monkeypatch.delenv(TRUST_PICKLE_ENV, raising=False)


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
        with pytest.raises(UntrustedPickleError, match="--trust-pickle"):
            tool["main"](args)
        assert not target.exists()


@pytest.mark.parametrize("source", ["torchvision", "classifier"])
@pytest.mark.parametrize("fmt", ["pth", "pkl"])
def test_convert_pretrained(tmp_path, malicious, source, fmt):
    path, target = malicious(fmt)
    out = tmp_path / "out.pkl"
    cfg = ["--config-file", os.path.join(REPO, "configs", "imagenet", "resnet50_gradaug.yaml")]
    with pytest.raises(UntrustedPickleError, match="--trust-pickle"):
        _tool("convert_pretrained")["main"]([path, str(out), "--source", source, *cfg])
    assert not target.exists() and not out.exists()


def test_prune(tmp_path, tiny_yaml, malicious):
    path, target = malicious("pkl")
    tool = _tool("prune")
    args = tool["get_parser"]().parse_args(["--config-file", tiny_yaml, "--weights", path, "--width", "0.5",
                                            "--output", str(tmp_path / "pruned"), "--no-flops"])
    with pytest.raises(UntrustedPickleError):
        tool["main"](args)
    assert not target.exists()


def test_demo(tmp_path, tiny_yaml, malicious):
    path, target = malicious("pkl")
    cv2.imwrite(str(tmp_path / "img.png"), np.zeros((64, 80, 3), np.uint8))
    tool = _tool("demo")
    args = tool["get_parser"]().parse_args(["--config-file", tiny_yaml, "--input", str(tmp_path / "img.png"),
                                            "--output", str(tmp_path / "drawn"), "--opts", "MODEL.WEIGHTS", path])
    with pytest.raises(UntrustedPickleError):
        tool["main"](args)
    assert not target.exists() and not (tmp_path / "drawn").exists()


def test_lazyconfig_eval_only(tmp_path, malicious):
    path, target = malicious("pkl")
    tool = _tool("lazyconfig_train_net")
    args = tool["get_parser"]().parse_args([
        "--config-file", os.path.join(REPO, "configs", "lazy", "mask_rcnn_gradaug_R_50_FPN_1x.py"), "--eval-only",
        "train.device=cpu", f"train.init_checkpoint={path}", f"train.output_dir={tmp_path / 'out'}",
        "model.backbone.bottom_up.stages.depth=18", "model.backbone.out_channels=32",
        "model.proposal_generator.head.in_channels=32", "model.roi_heads.box_head.input_shape.channels=32",
        "model.roi_heads.mask_head.input_shape.channels=32"])
    with pytest.raises(UntrustedPickleError):
        tool["main"](args)
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


def test_train_net_command_line_prints_the_error_without_traceback(tmp_path, malicious):
    """As a user runs it: exit status 1, one line naming the file and the opt-in, nothing created."""
    import subprocess
    import sys

    path, target = malicious("pkl")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file",
                           os.path.join(REPO, "configs", "quickstart", "mask_rcnn_gradaug.yaml"), "MODEL.WEIGHTS", path,
                           "OUTPUT_DIR", str(tmp_path / "out"), "MODEL.DEVICE", "cpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != TRUST_PICKLE_ENV})
    assert proc.returncode == 1
    assert f"error: {path}: refused to load the object" in proc.stderr and "--trust-pickle" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not target.exists()
