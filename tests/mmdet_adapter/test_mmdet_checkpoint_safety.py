"""Issue 11 §1 for the MMDetection tools: a checkpoint named by the user never runs code.

tools/mmdet_train.py (``load_from``, ``--resume``) and tools/mmdet_test.py load local
checkpoints with ``weights_only`` and mmengine's own objects admitted
(gradaug_det/mmdet/checkpoint.py); a file holding anything else is refused with the
project's error (file, refused object, how to re-save the weights) and nothing in it runs;
no flag loads it anyway. A real mmengine checkpoint still resumes:
tests/mmdet_adapter/test_mmdet_runner.py.
"""
import builtins
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join(ROOT, "configs", "mmdet", "quickstart", "mask-rcnn_r18_fpn_gradaug_shapes.py")


@pytest.fixture(scope="module")
def mmdet_train(load_tool):
    return load_tool("mmdet_train")


@pytest.fixture(scope="module")
def mmdet_test(load_tool):
    return load_tool("mmdet_test")


class _OpensFile:
    """Unpickling this calls ``open(path, "w")``: creates the file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return builtins.open, (self.path, "w")


@pytest.fixture
def malicious(tmp_path, monkeypatch):
    """(checkpoint, marker): a .pth whose unpickling would create ``marker``."""
    from mmengine.runner.checkpoint import CheckpointLoader

    monkeypatch.setitem(CheckpointLoader._schemes, "", CheckpointLoader._schemes[""])  # restored after
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "meta": _OpensFile(str(marker))}, path)
    return path, marker


def _options(root):
    opts = [f"data_root={root}/", f"train_dataloader.dataset.data_root={root}/",
            f"val_dataloader.dataset.data_root={root}/",
            f"val_evaluator.ann_file={root}/annotations/instances_val.json",
            "train_dataloader.num_workers=0", "train_dataloader.persistent_workers=False",
            "val_dataloader.num_workers=0", "val_dataloader.persistent_workers=False", "train_cfg.max_iters=1"]
    return opts + [o.replace("val_", "test_", 1) for o in opts if o.startswith("val_")]


def _assert_refused(exc, path, marker):
    msg = str(exc.value.code)
    assert str(path) in msg and "refused to load" in msg and "io.open" in msg, msg
    rest = msg.replace(str(path), "")
    assert "Weight files must hold only tensors, numpy arrays, numbers, strings and containers" in rest, msg
    assert 'torch.save({"model": model.state_dict()}, path)' in rest, msg
    for opt_in in ("trust", "weights_only", "unpickl"):  # no flag, variable or loader option offered
        assert opt_in not in rest.lower(), msg
    assert not marker.exists()


def test_train_load_from_and_resume_refuse_malicious_checkpoint(mmdet_train, malicious, shapes_root, tmp_path):
    path, marker = malicious
    work = tmp_path / "work"
    with pytest.raises(SystemExit) as e:
        mmdet_train.main([QUICKSTART, "--work-dir", str(work), "--cfg-options", *_options(shapes_root),
                          f"load_from={path}"])
    _assert_refused(e, path, marker)
    assert not list(work.glob("*.pth"))
    # --resume: the latest checkpoint named in the work dir
    (work / "last_checkpoint").write_text(str(path))
    with pytest.raises(SystemExit) as e:
        mmdet_train.main([QUICKSTART, "--work-dir", str(work), "--resume", "--cfg-options", *_options(shapes_root)])
    _assert_refused(e, path, marker)
    assert not list(work.glob("*.pth"))


def test_test_tool_refuses_malicious_checkpoint(mmdet_train, mmdet_test, malicious, shapes_root, tmp_path, capsys):
    path, marker = malicious
    argv = [QUICKSTART, str(path), "--widths", "1.0", "--work-dir", str(tmp_path / "test"),
            "--cfg-options", *_options(shapes_root)]
    with pytest.raises(SystemExit) as e:
        mmdet_test.main(argv)
    _assert_refused(e, path, marker)
    # the removed opt-in: a stale script that passes it stops at argument parsing
    for tool, args in ((mmdet_test, argv), (mmdet_train, [QUICKSTART, "--work-dir", str(tmp_path / "train")])):
        with pytest.raises(SystemExit) as e:
            tool.main(args + ["--trust-pickle"])
        assert e.value.code == 2
        assert "error: unrecognized arguments: --trust-pickle" in capsys.readouterr().err
        assert not marker.exists()
