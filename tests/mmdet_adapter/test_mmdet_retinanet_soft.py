"""subnet_loss='soft' for mmdet's RetinaNet: the dense soft label. Every anchor of a sub-network
learns the full network's per-class sigmoid probabilities of the anchor it corresponds to (same
source point, size divided by the rescale), by a Bernoulli KL per class normalised as the focal
loss is (the full network's number of positive anchors). Checked against a hand computation on
a small RetinaNet (mmdet's config, R18 and 32-channel heads: test_mmdet_zoo_matrix.py trains it
two iterations through train_step)."""
import copy
import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gradaug_det.gradaug import SubnetSpec
from gradaug_det.mmdet import transform_batch
from gradaug_det.slim import width

from .test_mmdet_zoo_matrix import zoo_gradaug_cfg

RETINANET = "retinanet/retinanet_r50_fpn_1x_coco.py"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join(ROOT, "configs/mmdet/quickstart/retinanet_r18_fpn_gradaug_shapes.py")


def _bernoulli_kl(p, logits):
    """sum of p log(p / q) + (1 - p) log((1 - p) / (1 - q)), q = sigmoid(logits), in float64."""
    return (torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p)
            - p * F.logsigmoid(logits) - (1 - p) * F.logsigmoid(-logits)).sum()


def _teaching_retinanet(detector, subnet_loss):
    """The small RetinaNet in training mode, its classifier branch re-drawn so that it has
    something to teach (at mmdet's initialisation every anchor predicts ~0.01 for every class)."""
    model = detector(zoo_gradaug_cfg(RETINANET, subnet_loss))
    model.train()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for conv in [c.conv for c in model.bbox_head.cls_convs] + [model.bbox_head.retina_cls]:
            conv.weight.normal_(0.0, 0.15, generator=g)
    return model


@pytest.mark.parametrize("subnet_loss", ["soft", "gt+soft"])
def test_retinanet_soft_loss_gradients_equal_hand_computation(subnet_loss, make_batch, detector):
    """At scale 0.5 (128 px images -> 64 px, no padding), the sub-network's anchor (level k,
    type a, cell (i, j)) is centred at (i, j) * stride_k of its image, i.e. at (i, j) * stride_(k+1)
    of the full network's, where an object is twice the size: the full network's same anchor
    type at cell (i, j) of level k + 1, exactly. The top level has no teacher (weight 0)."""
    spec = SubnetSpec(width=0.75, scale=0.5)
    model = _teaching_retinanet(detector, subnet_loss)
    ref = copy.deepcopy(model)
    data = model.data_preprocessor(copy.deepcopy(make_batch((0, 1))), True)
    assert data["inputs"].shape[-2:] == (128, 128)
    _, teacher = model.gradaug_task.full_pass(model, data)
    model.zero_grad()
    with width(model, spec.width):
        out = model.gradaug_task.subnet_pass(model, data, teacher, spec)
    if subnet_loss == "soft":
        assert set(out) == {"loss_soft_cls"}
    else:  # the rescaled annotations' focal and box losses too, weighted by gt_weight
        assert set(out) == {"loss_soft_cls", "loss_cls", "loss_bbox"}
    out["loss_soft_cls"].backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    # by hand: the teacher's logits and mmdet's own count of positive anchors, at width 1.0
    x_full = ref.extract_feat(data["inputs"])
    teacher_logits = ref.bbox_head(x_full)[0]
    for want, rec in zip(teacher_logits, teacher["scores"]):
        torch.testing.assert_close(rec, want.detach())
    head = ref.bbox_head
    samples = data["data_samples"]
    anchors, valid = head.get_anchors([t.shape[-2:] for t in teacher_logits], [s.metainfo for s in samples],
                                      device=data["inputs"].device)
    targets = head.get_targets(anchors, valid, [s.gt_instances for s in samples], [s.metainfo for s in samples])
    avg_factor = float(targets[-1])
    assert teacher["avg_factor"] == avg_factor and avg_factor > 2  # positives in the two images

    inputs = F.interpolate(data["inputs"], size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(inputs, transform_batch(data["inputs"], samples, spec.scale)[0])
    ref.zero_grad()
    with width(ref, spec.width):
        student = ref.bbox_head(ref.extract_feat(inputs))[0]
    levels = len(student)
    assert levels == 5 and [tuple(s.shape[-2:]) for s in student] == [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    total = 0.0
    for k in range(levels - 1):
        p = torch.sigmoid(teacher_logits[k + 1].detach().double())
        assert p.shape == student[k].shape
        total = total + _bernoulli_kl(p, student[k].double())
    total = total / avg_factor * ref.gradaug_options.soft_weight
    total.backward()
    want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    # the student's head outputs only through the soft term: its box branch gets no gradient; the
    # top level (P7) is in the graph with weight 0 only: zero gradient
    assert set(want) <= set(got) and not any("retina_reg" in n for n in got)
    assert {n for n in got if n not in want} == {"neck.fpn_convs.4.conv.weight", "neck.fpn_convs.4.conv.bias"}
    assert all(float(got[n].abs().max()) == 0.0 for n in got if n not in want)
    for n in want:  # float32 sums through BN and convolutions: close relative to each tensor's scale
        # (0 for the blocks' conv1 / conv2: mmdet zero-initialises each residual branch's last BN)
        scale = float(want[n].abs().max())
        torch.testing.assert_close(got[n], want[n].to(got[n].dtype), rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, n=n: f"{n}: {m}")
    torch.testing.assert_close(out["loss_soft_cls"].double(), total, rtol=1e-5, atol=1e-7)
    assert float(total.detach()) > 0.1  # not a comparison of zeros
    # the student's classifier conv learns from it, and so do the backbone and neck
    assert got["bbox_head.retina_cls.weight"].abs().sum() > 0
    assert any(n.startswith("backbone.") and g.abs().sum() > 0 for n, g in got.items())


def test_retinanet_soft_identity_pass_is_the_teachers_own_maps(make_batch, detector):
    """A sub-network at scale 1.0, unrotated, at width 1.0 is the full network: its soft term is 0
    (the same maps, every weight 1), the teacher's maps are used as they are; any other
    sub-network has something to learn."""
    model = _teaching_retinanet(detector, "soft")
    data = model.data_preprocessor(copy.deepcopy(make_batch((0, 1))), True)
    _, teacher = model.gradaug_task.full_pass(model, data)
    out = model.gradaug_task.subnet_pass(model, data, teacher, SubnetSpec(width=1.0, scale=1.0))
    assert float(out["loss_soft_cls"].detach()) == pytest.approx(0.0, abs=1e-7)  # float32 forward passes
    for spec in (SubnetSpec(width=0.9, scale=1.0), SubnetSpec(width=1.0, scale=0.857),
                 SubnetSpec(width=1.0, scale=1.0, angle=10.0)):
        with width(model, spec.width):
            out = model.gradaug_task.subnet_pass(model, data, teacher, spec)
        assert float(out["loss_soft_cls"].detach()) > 1e-3, spec


def test_dense_soft_label_refuses_a_head_without_anchors():
    """A one-stage detector whose head is anchor-free (FCOS) is refused when built, naming the key."""
    from mmdet.models.detectors import FCOS

    from gradaug_det.mmdet import GradAugDetectorMixin

    cls = type("GradAugFCOS", (GradAugDetectorMixin, FCOS), {})  # as the mixin's docstring tells users
    cfg = zoo_gradaug_cfg("fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py", "soft")
    with pytest.raises(ValueError, match=r"MlvlPointGenerator, not anchors.*model\.gradaug\.subnet_loss='gt'"):
        cls(**{k: v for k, v in cfg.items() if k != "type"})


def test_retinanet_quickstart_config_trains_through_the_tool(tmp_path, shapes_data_options, short_train_options):
    """The shipped RetinaNet config ('gt+soft') through tools/mmdet_train.py: two iterations,
    every sub-network logs its focal loss and its dense soft-label KL, then COCO evaluation."""
    work = tmp_path / "work"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "mmdet_train.py"), QUICKSTART,
           "--work-dir", str(work), "--cfg-options", *shapes_data_options, *short_train_options(2),
           "model.test_cfg.score_thr=0.0"]  # two iterations score every anchor ~0.01: keep them, for an AP
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for path in glob.glob(str(work / "*" / "vis_data" / "scalars.json"))
               for line in open(path)]
    train = [r for r in records if "loss" in r]
    assert [r["iter"] for r in train] == [1, 2]
    for r in train:
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        for i in range(3):
            assert r[f"gradaug/sub{i}/loss_soft_cls"] >= 0 and math.isfinite(r[f"gradaug/sub{i}/loss_soft_cls"])
            assert math.isfinite(r[f"gradaug/sub{i}/loss_cls"]) and r[f"gradaug/sub{i}/loss_cls"] > 0
    evals = [r for r in records if "coco/bbox_mAP" in r]
    assert len(evals) == 1 and 0.0 <= evals[0]["coco/bbox_mAP"] <= 1.0
