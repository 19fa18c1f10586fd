"""GradAug's soft labels on Cascade R-CNN (issue 10 §4): every stage's box classifier learns
the full network's same stage on that stage's RoIs; the stage KLs are summed and the gradient
into the pooled features is scaled by 1/num_stages, as detectron2 does for its own stage losses.
The loss and gradient claims are checked in float64 (equalities of the same sums)."""
import copy
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from gradaug_det.gradaug.roi_soft_labels import RoIClassifierSoftLabels
from gradaug_det.gradaug.sampler import SubnetSpec
from gradaug_det.gradaug.transforms import transform_detection_batch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zoo_matrix  # noqa: E402


def _batch(n=2, h=64, w=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 76.0, 40.0]]))
        inst.gt_classes = torch.tensor([0, 2])
        out.append({"image": (torch.rand(3, h, w, generator=g) * 255).to(torch.uint8), "instances": inst,
                    "height": h, "width": w})
    return out


@pytest.fixture(autouse=True)
def _storage():
    with EventStorage():
        yield


@pytest.fixture(scope="module")
def cascade():
    cfg = zoo_matrix.matrix_cfg("Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml", "soft")
    cfg.MODEL.MASK_ON = False
    torch.manual_seed(0)
    return build_model(cfg).train()


def _features(model, batch):
    return model.backbone(model.preprocess_image(batch).tensor)


def test_records_every_stage(cascade):
    soft = RoIClassifierSoftLabels(cascade)
    assert soft.cascade and len(soft.predictors) == 3
    batch = _batch()
    torch.manual_seed(1)
    with soft.record() as teacher:
        cascade(batch)
    assert len(teacher) == len(batch)
    features = {k: v.detach() for k, v in _features(cascade, batch).items()}
    for t in teacher:
        assert len(t["stage_sizes"]) == 3 and sum(t["stage_sizes"]) == len(t["boxes"]) == len(t["logits"])
        assert all(s > 0 for s in t["stage_sizes"])
    # each stage's recorded logits are that stage's classifier on that stage's RoIs, image by
    # image: the same float32 computation again (rtol: a few float32 roundings of ~1e-7)
    for stage, stage_teacher in enumerate(soft._stages(teacher)):
        with torch.no_grad():
            student = soft.student_logits(features, [t["boxes"] for t in stage_teacher], stage)
        torch.testing.assert_close(student, torch.cat([t["logits"] for t in stage_teacher]), rtol=1e-5, atol=1e-5)


def test_loss_is_sum_of_stage_kls_with_scaled_feature_gradient(cascade):
    soft = RoIClassifierSoftLabels(cascade)
    batch = _batch(seed=2)
    torch.manual_seed(1)
    with soft.record() as teacher:
        cascade(batch)
    g = torch.Generator().manual_seed(3)
    for t in teacher:  # float64, and a teacher that differs from the student (else every KL is 0)
        t["logits"] = t["logits"].double() + torch.randn(t["logits"].shape, generator=g, dtype=torch.float64)
        t["boxes"] = t["boxes"].double()
    roi = copy.deepcopy(cascade.roi_heads).double()
    soft = RoIClassifierSoftLabels(types.SimpleNamespace(roi_heads=roi))
    spec = SubnetSpec(width=1.0, scale=0.75, angle=0.0)
    batch_t, teacher_t = transform_detection_batch(batch, spec, teacher)
    assert [t["stage_sizes"] for t in teacher_t] == [t["stage_sizes"] for t in teacher]  # carried through
    torch.testing.assert_close(teacher_t[0]["boxes"], teacher[0]["boxes"] * 0.75, rtol=0, atol=1e-4)

    with torch.no_grad():
        features = {k: v.double().requires_grad_() for k, v in _features(cascade, batch_t).items()}
    # what the RoI heads' hook adds (test_teach_adds_the_loss_inside_the_forward), on these features
    hook = [soft._stage_kl(features, st, k, "cpu") for k, st in enumerate(soft._stages(teacher_t))]
    total = sum(hook)
    (grad_hook,) = torch.autograd.grad(total, [features["p2"]], retain_graph=False)

    # by hand: the stage classifiers on the stage RoIs, the reference KL, no gradient scaling
    manual = 0
    for k, st in enumerate(soft._stages(teacher_t)):
        boxes = [Boxes(t["boxes"]) for t in st]
        x = roi.box_pooler([features[f] for f in roi.box_in_features], boxes)
        scores, _ = roi.box_predictor[k](roi.box_head[k](x))
        target = torch.cat([t["logits"] for t in st])
        w = torch.cat([t["weights"] for t in st])
        kl = F.kl_div(F.log_softmax(scores, 1), F.softmax(target, 1), reduction="none").sum(1)
        manual = manual + (kl * w).sum() / w.sum()
    (grad_manual,) = torch.autograd.grad(manual, [features["p2"]])
    # the KL itself runs in float32 (losses.soft_label_kl casts, for AMP): relative error ~1e-7
    # per term over a few hundred terms; 1e-5 still tells a missing stage or a factor 3 apart
    torch.testing.assert_close(total.double(), manual, rtol=1e-5, atol=0)
    assert total > 0.1
    torch.testing.assert_close(grad_hook, grad_manual / 3, rtol=1e-5, atol=1e-5 * grad_manual.abs().max().item())
    assert grad_manual.abs().max() > 0


def test_teach_adds_the_loss_inside_the_forward(cascade):
    """With teach(), the RoI heads' loss dict of a training forward gains loss_soft_cls."""
    soft = RoIClassifierSoftLabels(cascade)
    batch = _batch(seed=4)
    torch.manual_seed(1)
    with soft.record() as teacher:
        cascade(batch)
    torch.manual_seed(1)
    with soft.teach(teacher):
        losses = cascade(batch)
    # same network, same RoIs, the teacher's own logits: every stage's KL is 0
    assert "loss_soft_cls" in losses and abs(losses["loss_soft_cls"].item()) < 1e-6
    assert {"loss_cls_stage0", "loss_cls_stage2"} <= set(losses)
