"""GradAugTrainer: stock step when disabled, config checks, resume, AMP, train_net runs."""
import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from detectron2.engine import DefaultTrainer
from detectron2.engine.defaults import default_argument_parser
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage

import gradaug_det
from gradaug_det.engine import GradAugAMPTrainer, GradAugTrainer, setup
from gradaug_det.gradaug import ClassificationTask, SubnetSampler, gradaug_step

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from toy_model import ToyClassifier, grads, toy_batch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart", "mask_rcnn_gradaug.yaml")


# lighter heads than the quickstart, so a few dozen iterations take seconds on 2 cores
CHEAP = ("MODEL.RPN.POST_NMS_TOPK_TRAIN", "100", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
         "MODEL.ROI_MASK_HEAD.NUM_CONV", "1", "MODEL.ROI_MASK_HEAD.CONV_DIM", "16", "MODEL.FPN.OUT_CHANNELS", "32",
         "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "GRADAUG.NUM_SUBNETS", "2")


def quick_cfg(tmp_path, *opts):
    args = default_argument_parser().parse_args(
        ["--config-file", QUICKSTART, "OUTPUT_DIR", str(tmp_path / "out"), "DATALOADER.NUM_WORKERS", "0",
         "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "160", "DATASETS.TEST", "()",
         "SOLVER.WARMUP_ITERS", "0", "TEST.SLIM_WIDTHS", "[]", *CHEAP, *opts])
    return args


@pytest.fixture(scope="module", autouse=True)
def small_data(tmp_path_factory):
    """Quickstart data in a temporary root (a subset keeps generation instant)."""
    root = tmp_path_factory.mktemp("datasets")
    from detectron2.data import DatasetCatalog, MetadataCatalog

    for name in ("gradaug_quickstart_train", "gradaug_quickstart_val"):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)
    gradaug_det.register_quickstart(root=str(root / "gradaug_quickstart"))
    yield str(root)


def test_disabled_is_detectron2_step_for_step(tmp_path):
    # DATALOADER.RESUMABLE False: detectron2's own loader (the resumable one seeds each image's
    # augmentation by its stream position, so its draws differ from detectron2's)
    args = quick_cfg(tmp_path, "GRADAUG.ENABLED", "False", "SOLVER.MAX_ITER", "3", "DATALOADER.RESUMABLE", "False")
    cfg = setup(args)
    finals = []
    for cls in (DefaultTrainer, GradAugTrainer):
        seed_all_rng(0)
        trainer = cls(cfg)
        assert type(trainer._trainer).__name__ == "SimpleTrainer"
        trainer.train()
        finals.append(copy.deepcopy(trainer.model.state_dict()))
    assert finals[0].keys() == finals[1].keys()
    for k in finals[0]:
        assert torch.equal(finals[0][k], finals[1][k]), k


@pytest.mark.parametrize("opts, message", [
    (["GRADAUG.MIN_WIDTH", "1.2"], "GRADAUG.MIN_WIDTH=1.2"),
    (["GRADAUG.MIN_WIDTH", "0.95", "GRADAUG.MAX_WIDTH", "0.9"], "GRADAUG.MIN_WIDTH=0.95"),
    (["GRADAUG.NUM_SUBNETS", "0"], "GRADAUG.NUM_SUBNETS=0"),
    (["GRADAUG.SCALES", "()"], "GRADAUG.SCALES=()"),
    (["GRADAUG.SUBNET_LOSS", "'kl'"], "GRADAUG.SUBNET_LOSS='kl'"),
    (["GRADAUG.TRANSFORM", "'flip'"], "GRADAUG.TRANSFORM='flip'"),
    (["TEST.SLIM_WIDTHS", "[0.5, 0.0]"], "TEST.SLIM_WIDTHS"),
])
def test_bad_config_fails_before_any_work(tmp_path, opts, message):
    args = quick_cfg(tmp_path, *opts)
    with pytest.raises(ValueError) as e:
        setup(args)
    assert message in str(e.value)
    assert not (tmp_path / "out").exists()  # nothing written


def test_width_sampling_needs_a_slimmable_backbone(tmp_path):
    cfg = setup(quick_cfg(tmp_path, "MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone"))
    with pytest.raises(ValueError, match="build_slimmable_resnet_fpn_backbone"):
        GradAugTrainer(cfg)


def test_resume_continues_the_sampler(tmp_path):
    opts = ["SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "1", "GRADAUG.SUBNET_LOSS", "gt",
            "GRADAUG.NUM_SUBNETS", "1"]
    cfg = setup(quick_cfg(tmp_path, *opts))
    trainer = GradAugTrainer(cfg)
    trainer.train()
    state = copy.deepcopy(trainer._trainer.sampler.state_dict())
    expected_next = copy.deepcopy(trainer._trainer.sampler).sample()
    cfg2 = setup(quick_cfg(tmp_path, *opts, "GRADAUG.SEED", "123"))
    resumed = GradAugTrainer(cfg2)
    assert resumed._trainer.sampler.sample() != expected_next  # a different seed differs...
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    assert resumed._trainer.sampler.state_dict() == state  # ...until the checkpoint restores it
    assert resumed._trainer.sampler.sample() == expected_next


class _Loader:
    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


def _clipping_sgd(model, clip):
    from detectron2.config import get_cfg

    c = get_cfg()
    c.SOLVER.CLIP_GRADIENTS.ENABLED = True
    c.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "norm"
    c.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = clip
    return maybe_add_gradient_clipping(c, torch.optim.SGD)(model.parameters(), lr=0.1)


def test_amp_scales_every_backward_and_clips_the_unscaled_sum():
    batch = toy_batch(4)
    torch.manual_seed(0)
    ref_model = ToyClassifier()
    amp_model = copy.deepcopy(ref_model)
    # reference: fp32 GradAug gradients, clipped as a sum, one SGD step
    ref_model.train()
    gradaug_step(ref_model, batch, SubnetSampler(seed=0, min_width=0.5), ClassificationTask(ref_model))
    # detectron2's CLIP_TYPE "norm" clips every parameter's gradient norm separately
    norms = [torch.nn.utils.clip_grad_norm_(p, 0.5) for p in ref_model.parameters()]
    assert max(norms) > 0.5  # clipping is active
    clipped = grads(ref_model)

    def amp_iteration(init_scale):
        model = copy.deepcopy(amp_model)
        seen = {}
        opt = _clipping_sgd(model, 0.5)
        orig_step = opt.step

        def spy_step(*a, **k):
            # detectron2's clipping optimizer clips inside step(): capture what it produced
            out = orig_step(*a, **k)
            seen.update(grads(model))
            return out

        opt.step = spy_step
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        trainer = GradAugAMPTrainer(model, _Loader(batch), opt, grad_scaler=scaler, precision=torch.bfloat16,
                                    sampler=SubnetSampler(seed=0, min_width=0.5), task=ClassificationTask(model))
        with EventStorage(0) as storage:
            trainer.iter = 0
            trainer.run_step()
        assert scaler._growth_tracker.item() == 1  # one scaler update for the whole iteration
        return seen, storage

    seen, storage = amp_iteration(2.0 ** 10)
    unscaled, _ = amp_iteration(1.0)
    # clipping saw unscaled gradients: a loss scale of 1024 changes nothing (powers of two are exact)
    for n in seen:
        assert torch.allclose(seen[n], unscaled[n], rtol=1e-3, atol=1e-7), n
    # and they are GradAug's summed gradients (bf16 autocast: compare as a whole, loosely)
    diff = torch.cat([(seen[n] - clipped[n]).flatten() for n in clipped]).norm()
    ref = torch.cat([g.flatten() for g in clipped.values()]).norm()
    assert diff / ref < 0.25, float(diff / ref)
    assert "gradaug/sub2/loss_soft_cls" in storage.latest()
    assert "total_loss" in storage.latest()


def _run_train_net(tmp_path, data_root, *opts):
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", QUICKSTART,
           "OUTPUT_DIR", str(out), "DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TRAIN", "(128,)",
           "INPUT.MAX_SIZE_TRAIN", "160", "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "40",
           "SOLVER.WARMUP_ITERS", "0", "SOLVER.BASE_LR", "0.01", *CHEAP, *opts]
    env = dict(os.environ, DETECTRON2_DATASETS=data_root)
    subprocess.run(cmd, check=True, env=env, timeout=900, cwd=ROOT, stdout=subprocess.DEVNULL)
    with open(out / "metrics.json") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("opts", [
    ("GRADAUG.SUBNET_LOSS", "gt"),
    ("GRADAUG.SUBNET_LOSS", "soft"),
    ("GRADAUG.SAMPLING", "depth", "GRADAUG.SUBNET_LOSS", "gt+soft", "GRADAUG.TRANSFORM", "scale_rotate"),
], ids=["gt", "soft", "depth"])
def test_train_net_mask_rcnn_gradaug_losses_finite_and_falling(tmp_path, small_data, opts):
    rows = [r for r in _run_train_net(tmp_path, small_data, *opts) if "total_loss" in r]
    assert len(rows) >= 2
    for r in rows:
        assert math.isfinite(r["total_loss"]) and math.isfinite(r["gradaug/all_passes_loss"])
        assert {"gradaug/sub0/width", "gradaug/sub1/scale", "gradaug/sub0/total_loss"} <= r.keys()
    assert rows[-1]["total_loss"] < rows[0]["total_loss"]
    if "gt" in opts:  # ground-truth sub-network losses fall too (a KL to a learning teacher need not)
        assert rows[-1]["gradaug/sub1/total_loss"] < rows[0]["gradaug/sub1/total_loss"]
