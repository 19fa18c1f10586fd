"""A non-finite loss in any GradAug pass stops the iteration before the optimizer step; no
non-finite weight is saved; loss weights must be finite and >= 0."""
import math
import os
import sys

import pytest
import torch

from detectron2.utils.events import EventStorage

from gradaug_det.checkpoint.checkpointer import GradAugCheckpointer
from gradaug_det.engine import GradAugSimpleTrainer
from gradaug_det.gradaug import ClassificationTask, GradAugOptions, SubnetSampler

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "engine"))
from toy_model import ToyClassifier, toy_batch  # noqa: E402


class PoisonedTask(ClassificationTask):
    """Multiplies pass ``bad`` (0 = full network, i = sub-network i) by ``value``."""

    def __init__(self, model, bad, value):
        super().__init__(model)
        self.bad, self.value, self.calls = bad, value, 0

    def _poison(self, losses):
        self.calls += 1
        if self.calls - 1 == self.bad:
            losses = {k: v * self.value for k, v in losses.items()}
        return losses

    def full_pass(self, model, batch):
        losses, teacher = super().full_pass(model, batch)
        return self._poison(losses), teacher

    def subnet_pass(self, model, batch, teacher, spec):
        return self._poison(super().subnet_pass(model, batch, teacher, spec))


class _Loader:
    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


@pytest.mark.parametrize("bad, value, sampling", [
    (1, float("nan"), "width"), (2, float("inf"), "width"), (0, float("nan"), "width"), (1, float("nan"), "depth")])
def test_nonfinite_pass_stops_before_the_optimizer_step(bad, value, sampling):
    torch.manual_seed(0)
    model = ToyClassifier().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler = SubnetSampler(num_subnets=2, min_width=0.5, max_width=1.0, sampling=sampling, seed=3)
    specs = SubnetSampler(num_subnets=2, min_width=0.5, max_width=1.0, sampling=sampling, seed=3).sample(8)
    trainer = GradAugSimpleTrainer(model, _Loader(toy_batch(4)), opt, sampler=sampler,
                                   task=PoisonedTask(model, bad, value))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.iter = 7
    with EventStorage(7), pytest.raises(FloatingPointError) as e:
        trainer.run_step()
    msg = str(e.value)
    assert "iteration 7" in msg and "No optimizer step" in msg
    if bad == 0:
        assert "the full network" in msg
    else:
        spec = specs[bad - 1]
        arch = (f"width {spec.width:g}" if sampling == "width"
                else f"kept blocks {[i for i, k in enumerate(spec.keep) if k]} of 8")
        assert f"sub-network {bad} ({arch}, scale {spec.scale:g}, angle {spec.angle:g} degrees)" in msg
        assert "loss_soft_cls=" + ("nan" if math.isnan(value) else "inf") in msg
    for k, v in model.state_dict().items():  # no step was taken
        assert torch.equal(v, before[k]), k


def test_finite_losses_step_normally():
    torch.manual_seed(0)
    model = ToyClassifier().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = GradAugSimpleTrainer(model, _Loader(toy_batch(4)), opt, sampler=SubnetSampler(num_subnets=2, seed=3),
                                   task=PoisonedTask(model, bad=-1, value=float("nan")))
    before = model.head.weight.clone()
    with EventStorage(0):
        trainer.run_step()
    assert not torch.equal(model.head.weight, before)


def test_checkpointer_refuses_nonfinite_weights(tmp_path):
    model = ToyClassifier()
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="head.weight"):
        GradAugCheckpointer(model, str(tmp_path)).save("model_0000000")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("key, value", [
    ("SOFT_WEIGHT", float("inf")), ("GT_WEIGHT", float("nan")), ("SOFT_WEIGHT", -0.5), ("GT_WEIGHT", "1")])
def test_loss_weights_must_be_finite_and_nonnegative(key, value):
    kwargs = dict(subnet_loss="gt+soft", soft_weight=1.0, gt_weight=1.0)
    kwargs[key.lower()] = value
    with pytest.raises(ValueError, match=f"GRADAUG.{key}=.*finite number >= 0"):
        GradAugOptions(**kwargs)
    with pytest.raises(ValueError, match=f"model.gradaug.{key.lower()}="):  # mmdet's spelling
        GradAugOptions(**kwargs, key_prefix="model.gradaug.")
    GradAugOptions(subnet_loss="gt", soft_weight=0.0, gt_weight=2.5)


def test_infinite_soft_weight_in_config_is_refused(tmp_path):
    """GRADAUG.SOFT_WEIGHT 1e400 parses to inf: refused by setup, before any work."""
    from detectron2.engine.defaults import default_argument_parser

    from gradaug_det.engine import setup

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = default_argument_parser().parse_args(
        ["--config-file", os.path.join(root, "configs", "quickstart", "mask_rcnn_gradaug.yaml"),
         "OUTPUT_DIR", str(tmp_path / "out"), "GRADAUG.SOFT_WEIGHT", "1e400"])
    with pytest.raises(ValueError, match="GRADAUG.SOFT_WEIGHT=inf"):
        setup(args)
    assert not (tmp_path / "out").exists()


def test_nan_in_first_subnetwork_stops_training_before_a_bad_checkpoint(tmp_path, monkeypatch):
    """The reported case: NaN in sub-network 1's loss at iteration 1 with SOLVER.CHECKPOINT_PERIOD 1.
    Training stops there; the only checkpoint is iteration 0's, finite, named in last_checkpoint."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    import gradaug_det

    def unregister():
        for name in ("gradaug_quickstart_train", "gradaug_quickstart_val"):
            if name in DatasetCatalog.list():
                DatasetCatalog.remove(name)
                MetadataCatalog.remove(name)

    unregister()
    gradaug_det.register_quickstart(root=str(tmp_path / "data"), num_train=8, num_val=2, progress=False)
    try:
        _train_until_nan(tmp_path, monkeypatch)
    finally:  # the default (lazy) registration again, for the tests after this one
        unregister()
        gradaug_det.register_quickstart(progress=False)


def _train_until_nan(tmp_path, monkeypatch):
    from detectron2.engine.defaults import default_argument_parser

    from gradaug_det.engine import GradAugTrainer, setup
    from gradaug_det.gradaug.tasks import DetectionTask

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "out"
    cfg = setup(default_argument_parser().parse_args([
        "--config-file", os.path.join(root, "configs", "quickstart", "mask_rcnn_gradaug.yaml"),
        "OUTPUT_DIR", str(out), "DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TRAIN", "(96,)",
        "INPUT.MAX_SIZE_TRAIN", "128", "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "1",
        "SOLVER.IMS_PER_BATCH", "2", "GRADAUG.NUM_SUBNETS", "2", "GRADAUG.SUBNET_LOSS", "gt", "TEST.SLIM_WIDTHS", "[]",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.FPN.OUT_CHANNELS", "32"]))
    calls = []
    subnet_pass = DetectionTask.subnet_pass

    def nan_in_iteration_1_subnet_1(self, model, batch, teacher, spec):
        losses = subnet_pass(self, model, batch, teacher, spec)
        calls.append(spec)
        if len(calls) == 3:  # iteration 1 (2 sub-networks per iteration), sub-network 1
            losses = {k: v * float("nan") if k == "loss_cls" else v for k, v in losses.items()}
        return losses

    monkeypatch.setattr(DetectionTask, "subnet_pass", nan_in_iteration_1_subnet_1)
    trainer = GradAugTrainer(cfg)
    with pytest.raises(FloatingPointError, match=r"iteration 1 in sub-network 1 \(width .*loss_cls=nan"):
        trainer.train()
    assert sorted(f for f in os.listdir(out) if f.endswith(".pth")) == ["model_0000000.pth"]
    assert (out / "last_checkpoint").read_text() == "model_0000000.pth"
    saved = torch.load(out / "model_0000000.pth", weights_only=True)["model"]
    assert all(bool(torch.isfinite(v).all()) for v in saved.values() if v.is_floating_point())
    for k, v in trainer.model.state_dict().items():  # and no step was taken in iteration 1
        assert torch.equal(v, saved[k]), k


@pytest.mark.parametrize("writer", ["torch", "pickle"])
@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_weights_writers_refuse_nonfinite_and_write_nothing(tmp_path, writer, value):
    """atomic_torch_save / atomic_pickle_dump (every weights file the project writes: pruned,
    converted checkpoints) refuse a NaN/Inf tensor or array, name it, and leave no file; an
    existing file at the path is untouched."""
    import numpy as np

    from gradaug_det.utils.io import NonFiniteWeightsError, atomic_pickle_dump, atomic_torch_save

    bad = torch.ones(3)
    bad[1] = value
    if writer == "torch":
        obj, save = {"model": {"ok.weight": torch.ones(2), "head.norm.running_var": bad}}, atomic_torch_save
    else:
        obj, save = {"model": {"ok.weight": np.ones(2), "head.norm.running_var": bad.numpy()}}, atomic_pickle_dump
    fresh, existing = tmp_path / "new" / "w.pth", tmp_path / "old.pth"
    existing.write_bytes(b"previous")
    for path in (fresh, existing):
        with pytest.raises(NonFiniteWeightsError) as e:
            save(obj, str(path))
        msg = str(e.value)
        assert msg == (f"{path}: refused to write weights holding NaN or Inf: model.head.norm.running_var; "
                       "nothing was written")
    assert os.listdir(tmp_path) == ["old.pth"] and existing.read_bytes() == b"previous"
    obj["model"]["head.norm.running_var"][1] = 1.0  # finite: written
    save(obj, str(fresh))
    assert fresh.exists()
