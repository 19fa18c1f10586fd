"""Loading weights never runs code; unreadable files and wrong backbones get errors naming the fix."""
import logging
import os
import pickle
import re

import numpy as np
import pytest
import torch

from detectron2.modeling import build_model

from gradaug_det.checkpoint import convert_torchvision, make_d2_checkpoint, save_d2_checkpoint
from gradaug_det.checkpoint.checkpointer import BackboneShapeMismatchError, GradAugCheckpointer
from gradaug_det.checkpoint.io import CheckpointFileError, UntrustedPickleError, load_weights_file

from .conftest import d2_pkl


def assert_refusal(msg, path):
    """The refusal of the malicious file at ``path`` (which would call ``open``): it names
    the file and the object, says what a weights file may hold and how to re-save one, and
    offers no way to load the file as it is."""
    assert f"{path}: refused to load " in msg, msg
    rest = msg.replace(path, "")
    assert "io.open" in rest, msg
    assert "Weight files must hold only tensors, numpy arrays, numbers, strings and containers" in rest, msg
    assert 'torch.save({"model": model.state_dict()}, path)' in rest, msg
    for opt_in in ("trust", "weights_only", "unpickl"):  # no flag, variable or loader option offered
        assert opt_in not in rest.lower(), msg


@pytest.mark.parametrize("fmt", ["pkl", "pth"])
def test_malicious_file_is_refused_and_creates_nothing(malicious, fmt):
    path, target = malicious(fmt)
    with pytest.raises(UntrustedPickleError) as e:
        load_weights_file(path)
    msg = str(e.value)
    assert path in msg and "open" in msg
    assert_refusal(msg, path)
    assert not target.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_detectron2_model_zoo_pkl_loads(tmp_path, protocol):
    """Model-zoo files: Python-2 era protocol-2 pickles of numpy arrays (``_codecs.encode``,
    ``_reconstruct``, scalars); newer protocols use ``_frombuffer``."""
    w = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
    path = d2_pkl(tmp_path / "zoo.pkl", {"stem.conv1.weight": w, "b": np.int64(3)}, protocol=protocol,
                  author="Detectron2 Model Zoo", matching_heuristics=True)
    data = load_weights_file(path)
    np.testing.assert_array_equal(data["model"]["stem.conv1.weight"], w)
    assert data["model"]["b"] == 3 and data["__author__"] == "Detectron2 Model Zoo"


def test_converted_pkl_and_numpy_pth_load(tmp_path):
    """This project's own .pkl (convert_torchvision) and a .pth holding numpy arrays."""
    import torchvision

    state = torchvision.models.resnet18().state_dict()
    out = str(tmp_path / "r18.pkl")
    ckpt = convert_torchvision(state, out)
    data = load_weights_file(out)
    assert data["gradaug_det"] == ckpt["gradaug_det"]
    for k, v in ckpt["model"].items():
        np.testing.assert_array_equal(data["model"][k], v)
    torch.save({"model": {"a": np.ones(3)}, "iteration": 4}, tmp_path / "np.pth")
    assert load_weights_file(str(tmp_path / "np.pth"))["iteration"] == 4


def _bad_files(tmp_path):
    full = tmp_path / "full.pth"
    torch.save({"model": {"a": torch.zeros(1000)}}, full)
    raw = full.read_bytes()
    files = {
        "empty.pth": b"", "empty.pkl": b"", "random.pth": os.urandom(4096), "random.pkl": os.urandom(4096),
        "truncated.pth": raw[: len(raw) // 2], "text.pth": b"not a checkpoint\n" * 20,
        "truncated.pkl": pickle.dumps({"model": {"a": np.zeros(100)}})[:50],
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return [str(tmp_path / n) for n in files]


def test_unreadable_files_name_themselves_and_what_was_expected(tmp_path):
    for path in _bad_files(tmp_path):
        with pytest.raises(CheckpointFileError) as e:
            load_weights_file(path)
        msg = str(e.value)
        assert msg.startswith(path + ":"), msg
        assert ("PyTorch checkpoint" in msg) if path.endswith(".pth") else ("detectron2 .pkl" in msg)
        assert "weights_only=False" not in msg


def test_missing_and_non_dict_files(tmp_path, rcnn_cfg):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_weights_file(str(tmp_path / "nope.pth"))
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointFileError, match="holds a list"):
        GradAugCheckpointer(build_model(rcnn_cfg)).load(str(tmp_path / "list.pth"))


@pytest.mark.parametrize("fmt", ["pkl", "pth"])
def test_checkpointer_refuses_malicious_file(malicious, rcnn_cfg, fmt):
    path, target = malicious(fmt)
    with pytest.raises(UntrustedPickleError) as e:
        GradAugCheckpointer(build_model(rcnn_cfg)).load(path)
    assert_refusal(str(e.value), path)
    assert not target.exists()


def _r50_cfg(make_rcnn_cfg):
    cfg = make_rcnn_cfg(depth=50)
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 16
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 16
    return cfg


def test_r50_detector_checkpoint_into_r18_is_refused_with_the_matching_key(tmp_path, make_rcnn_cfg, caplog):
    r50 = build_model(_r50_cfg(make_rcnn_cfg))
    GradAugCheckpointer(r50, str(tmp_path)).save("r50")
    r18_cfg = make_rcnn_cfg(depth=18)
    with pytest.raises(BackboneShapeMismatchError) as e:
        GradAugCheckpointer.from_config(r18_cfg, build_model(r18_cfg)).load(str(tmp_path / "r50.pth"))
    msg = str(e.value)
    assert "MODEL.RESNETS.DEPTH 50" in msg and "ResNet-50" in msg
    r18 = build_model(r18_cfg).state_dict()
    shown = re.findall(r"^  (\S+): (\(.*?\)) in the file, (\(.*?\)) in the model$", msg, re.M)
    assert len(shown) == 5
    for k, in_file, in_model in shown:  # the real shapes of both
        assert in_file == str(tuple(r50.state_dict()[k].shape)) and in_model == str(tuple(r18[k].shape)), k
    assert "MODEL.BACKBONE.ALLOW_SHAPE_MISMATCH True" in msg
    # the explicit opt-out loads what fits and leaves the rest initialised
    r18_cfg.MODEL.BACKBONE.ALLOW_SHAPE_MISMATCH = True
    model = build_model(r18_cfg)
    before = model.backbone.bottom_up.res2[0].conv1.weight.clone()
    with caplog.at_level(logging.WARNING):
        GradAugCheckpointer.from_config(r18_cfg, model).load(str(tmp_path / "r50.pth"))
    assert torch.equal(model.backbone.bottom_up.res2[0].conv1.weight, before)
    assert torch.equal(model.proposal_generator.rpn_head.conv.weight, r50.proposal_generator.rpn_head.conv.weight)
    assert "ALLOW_SHAPE_MISMATCH" in caplog.text


def _bare_backbone(model):
    prefix = "backbone.bottom_up."
    return {k[len(prefix):]: v for k, v in model.state_dict().items() if k.startswith(prefix)}


def test_converted_r50_pkl_into_r18_is_refused(tmp_path, make_rcnn_cfg):
    ckpt = make_d2_checkpoint(_bare_backbone(build_model(_r50_cfg(make_rcnn_cfg))), pixel_mean=(1, 2, 3),
                              pixel_std=(1, 1, 1), input_format="BGR", stride_in_1x1=True)
    save_d2_checkpoint(ckpt, str(tmp_path / "r50.pkl"))
    r18_cfg = make_rcnn_cfg(depth=18)
    with pytest.raises(BackboneShapeMismatchError, match="MODEL.RESNETS.DEPTH 50"):
        GradAugCheckpointer.from_config(r18_cfg, build_model(r18_cfg)).load(str(tmp_path / "r50.pkl"))


def test_backbone_only_file_loads_quietly(tmp_path, make_rcnn_cfg):
    """Heads missing from a backbone-only file are the normal case: no error."""
    cfg = make_rcnn_cfg(depth=18)
    src = build_model(cfg)
    ckpt = make_d2_checkpoint(_bare_backbone(src), pixel_mean=(1, 2, 3), pixel_std=(1, 1, 1),
                              input_format="BGR", stride_in_1x1=True)
    save_d2_checkpoint(ckpt, str(tmp_path / "r18.pkl"))
    model = build_model(cfg)
    GradAugCheckpointer.from_config(cfg, model).load(str(tmp_path / "r18.pkl"))
    for k, v in _bare_backbone(src).items():
        assert torch.equal(model.backbone.bottom_up.state_dict()[k], v), k
