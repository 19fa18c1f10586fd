"""subnet_loss='soft' for mmdet's Cascade R-CNN: every stage's box classifier learns the full
network's same stage, on that stage's RoIs moved with the sub-network's input, the stages
weighted by ``stage_loss_weights``. Checked against a hand computation on a small Cascade
R-CNN (mmdet's config, R18 and small heads: test_mmdet_zoo_matrix.py trains it two iterations)."""
import copy

import torch
import torch.nn.functional as F

from gradaug_det.gradaug import SubnetSpec
from gradaug_det.mmdet import transform_batch
from gradaug_det.slim import width

from .test_mmdet_zoo_matrix import zoo_gradaug_cfg

SPEC = SubnetSpec(width=0.75, scale=0.714)


def test_cascade_soft_loss_gradients_equal_hand_computation(make_batch, detector):
    model = detector(zoo_gradaug_cfg("cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py", "soft"))
    model.train()
    ref = copy.deepcopy(model)
    data = model.data_preprocessor(copy.deepcopy(make_batch((0, 1))), True)
    torch.manual_seed(0)
    _, teacher = model.gradaug_task.full_pass(model, data)
    model.zero_grad()
    stages = model.roi_head.num_stages
    assert stages == 3 and len(teacher["rois"]) == len(teacher["logits"]) == stages
    # each stage pooled its own RoIs (refined by the previous stage) and classified them
    assert not torch.equal(teacher["rois"][0], teacher["rois"][1])
    with width(model, SPEC.width):
        out = model.gradaug_task.subnet_pass(model, data, teacher, SPEC)
    assert set(out) == {"loss_soft_cls"}
    out["loss_soft_cls"].backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    # by hand: KL(softmax(teacher_k) || softmax(student_k)) per RoI, mean over RoIs, weighted by stage
    inputs, _, geometry = transform_batch(data["inputs"], data["data_samples"], SPEC.scale, SPEC.angle,
                                          ref.data_preprocessor.pad_size_divisor)
    total = 0.0
    with width(ref, SPEC.width):
        x = ref.extract_feat(inputs)
        for k in range(stages):
            rois, weights = geometry.map_rois(teacher["rois"][k])
            assert weights is None or bool((weights == 1).all())
            extractor = ref.roi_head.bbox_roi_extractor[k]
            student = ref.roi_head.bbox_head[k](extractor(x[:extractor.num_inputs], rois))[0]
            p = F.softmax(teacher["logits"][k].double(), dim=1)
            kl = (p * (p.log() - F.log_softmax(student.double(), dim=1))).sum(dim=1).mean()
            total = total + ref.roi_head.stage_loss_weights[k] * kl
    (total * ref.gradaug_options.soft_weight).backward()
    want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n].to(got[n].dtype), rtol=1e-4, atol=1e-7, msg=n)
    torch.testing.assert_close(out["loss_soft_cls"].double(), total * ref.gradaug_options.soft_weight,
                               rtol=1e-5, atol=1e-7)
    # every stage's classifier, and the backbone, learn from it
    for k in range(stages):
        assert got[f"roi_head.bbox_head.{k}.fc_cls.weight"].abs().sum() > 0
    assert any(n.startswith("backbone.") and g.abs().sum() > 0 for n, g in got.items())
