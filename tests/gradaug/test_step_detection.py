"""One GradAug iteration on Mask R-CNN equals the passes computed by hand."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage

import gradaug_det
from gradaug_det.gradaug import DetectionTask, GradAugOptions, SubnetSampler, gradaug_step


def _grads(model):
    return {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            for n, p in model.named_parameters()}


def _resize_by_hand(batch, scale):
    """The sub-network input, built independently: PIL-resize images, scale boxes/polygons."""
    out = []
    for d in batch:
        h, w = d["image"].shape[-2:]
        nh, nw = int(round(h * scale)), int(round(w * scale))
        img = T.ResizeTransform(h, w, nh, nw).apply_image(d["image"].permute(1, 2, 0).numpy())
        sx, sy = nw / w, nh / h
        inst = Instances((nh, nw))
        factor = torch.tensor([sx, sy, sx, sy])
        inst.gt_boxes = Boxes(d["instances"].gt_boxes.tensor * factor)
        inst.gt_classes = d["instances"].gt_classes
        polys = [[(p.reshape(-1, 2) * np.array([sx, sy])).reshape(-1) for p in obj]
                 for obj in d["instances"].gt_masks.polygons]
        inst.gt_masks = PolygonMasks(polys)
        out.append({"image": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
                    "instances": inst, "height": d["height"], "width": d["width"]})
    return out


def _hand_iteration(model, batch, specs, loss_mode):
    """GradAug by hand: explicit hooks, explicit KL formula, explicit width switches."""
    roi = model.roi_heads
    rec = {}

    def on_pool(m, args, out):
        rec["boxes"] = [b.tensor.clone() for b in args[1]]

    def on_predict(m, args, out):
        rec["logits"] = out[0].detach().clone()

    h1 = roi.box_pooler.register_forward_hook(on_pool)
    h2 = roi.box_predictor.register_forward_hook(on_predict)
    losses = model(batch)
    h1.remove(), h2.remove()
    sum(losses.values()).backward()
    for spec in specs:
        gradaug_det.set_width(model, spec.width)
        sub_batch = _resize_by_hand(batch, spec.scale)
        kl = {}

        def student(m, args, output):
            features = args[1]
            boxes = []
            for d, sd, b in zip(batch, sub_batch, rec["boxes"]):
                sx = sd["image"].shape[-1] / d["image"].shape[-1]
                sy = sd["image"].shape[-2] / d["image"].shape[-2]
                bb = Boxes(b * torch.tensor([sx, sy, sx, sy]))
                bb.clip(sd["image"].shape[-2:])
                boxes.append(bb)
            x = roi.box_pooler([features[f] for f in roi.box_in_features], boxes)
            s = roi.box_predictor(roi.box_head(x))[0]
            p = F.softmax(rec["logits"], 1)
            kl["v"] = (p * (torch.log(p) - F.log_softmax(s, 1))).sum() / len(p)
            return output

        h = roi.register_forward_hook(student)
        sub_losses = model(sub_batch)
        h.remove()
        total = 0.0
        if "soft" in loss_mode:
            total = total + kl["v"]
        if "gt" in loss_mode:
            total = total + sum(sub_losses.values())
        total.backward()
    gradaug_det.set_width(model, 1.0)


@pytest.mark.parametrize("loss_mode", ["soft", "gt+soft"])
def test_gradient_parity_with_hand_computation(make_rcnn_cfg, make_batch, loss_mode):
    cfg = make_rcnn_cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    batch = make_batch(2, 96)
    sampler = SubnetSampler(num_subnets=3, min_width=0.6, max_width=1.0, scales=(1.0, 0.75, 0.5), seed=3)
    specs = copy.deepcopy(sampler).sample()
    assert {s.scale for s in specs} != {1.0}, "the draw should exercise a rescale"
    state = copy.deepcopy(model.state_dict())
    with EventStorage(0):
        torch.manual_seed(1)
        gradaug_step(model, batch, sampler, DetectionTask(model, GradAugOptions(subnet_loss=loss_mode)))
        ours = _grads(model)
        model.zero_grad(set_to_none=True)
        model.load_state_dict(state)  # BN running stats of the full pass
        torch.manual_seed(1)
        _hand_iteration(model, batch, specs, loss_mode)
        ref = _grads(model)
    worst = max((ours[n] - ref[n]).abs().max().item() for n in ours)
    scale = max(ref[n].abs().max().item() for n in ref)
    assert scale > 0
    assert worst <= 1e-5 * max(1.0, scale), f"max gradient difference {worst}"
    # the sub-networks really contributed: gradients differ from the full pass alone
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)
    with EventStorage(0):
        torch.manual_seed(1)
        sum(model(batch).values()).backward()
    full_only = _grads(model)
    assert max((ours[n] - full_only[n]).abs().max().item() for n in ours) > 1e-4


def test_subnets_leave_bn_running_stats_and_width(make_rcnn_cfg, make_batch):
    cfg = make_rcnn_cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    batch = make_batch(2, 96)
    bn_names = [n for n, b in model.named_buffers() if "running_" in n]
    assert bn_names
    state = copy.deepcopy(model.state_dict())
    with EventStorage(0):
        torch.manual_seed(1)
        model(batch)  # the full pass alone
        after_full = {n: b.clone() for n, b in model.named_buffers()}
        model.load_state_dict(state)
        torch.manual_seed(1)
        gradaug_step(model, batch, SubnetSampler(seed=0, min_width=0.5),
                     DetectionTask(model, GradAugOptions(subnet_loss="gt")))
    for n, b in model.named_buffers():
        if "running_" in n:
            assert torch.equal(b, after_full[n]), n
    assert any(not torch.equal(after_full[n], state[n]) for n in bn_names), "full pass updates BN"
    assert gradaug_det.get_width(model) == 1.0


def test_width_restored_when_a_pass_raises(make_rcnn_cfg, make_batch):
    model = build_model(make_rcnn_cfg())
    model.train()

    class Boom(DetectionTask):
        def subnet_pass(self, model, batch, teacher, spec):
            raise RuntimeError("boom")

    with EventStorage(0), pytest.raises(RuntimeError, match="boom"):
        gradaug_step(model, make_batch(1, 64), SubnetSampler(seed=0), Boom(model, GradAugOptions(subnet_loss="gt")))
    assert gradaug_det.get_width(model) == 1.0
    with EventStorage(0), pytest.raises(RuntimeError, match="boom"):
        gradaug_step(model, make_batch(1, 64), SubnetSampler(seed=0, sampling="depth", depth_min_keep=0.1),
                     Boom(model, GradAugOptions(subnet_loss="gt")))
    assert not any(b.drop for b in gradaug_det.slim.residual_blocks(model))


def test_soft_only_subnetworks_compute_features_and_soft_labels_only(make_rcnn_cfg, make_batch):
    """With SUBNET_LOSS "soft" the sub-network passes skip RPN and the RoI heads' own work."""
    cfg = make_rcnn_cfg()
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    calls = {}
    for name, module in (("anchors", model.proposal_generator.anchor_generator),
                         ("mask", model.roi_heads.mask_head), ("backbone", model.backbone)):
        calls[name] = 0
        module.register_forward_hook(lambda *a, name=name: calls.__setitem__(name, calls[name] + 1))
    with EventStorage(0):
        out = gradaug_step(model, make_batch(2, 96), SubnetSampler(num_subnets=3, seed=0),
                           DetectionTask(model, GradAugOptions(subnet_loss="soft")))
    assert calls == {"anchors": 1, "mask": 1, "backbone": 4}  # RPN and mask head: full pass only
    assert [set(d) for d in out.subnet_losses] == [{"loss_soft_cls"}] * 3
    assert all(float(d["loss_soft_cls"]) > 0 for d in out.subnet_losses)
    # the modules' own forwards are back
    assert "forward" not in vars(model.roi_heads) and "forward" not in vars(model.proposal_generator)
    assert model.vis_period == cfg.VIS_PERIOD


def _corner_batch(size=64):
    """One image whose only object sits in the top-left corner: a 45 degree turn about the
    centre moves it out of the image, so the sub-network's batch keeps no object."""
    img = (torch.rand(3, size, size, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    inst = Instances((size, size))
    box = torch.tensor([0.0, 0.0, 6.0, 6.0])
    inst.gt_boxes = Boxes(box[None])
    inst.gt_classes = torch.tensor([1])
    inst.gt_masks = PolygonMasks([[box[[0, 1, 2, 1, 2, 3, 0, 3]].numpy()]])
    return [{"image": img, "instances": inst, "height": size, "width": size}]


def test_syncbn_mask_head_trains_on_a_subnetwork_batch_without_objects(make_rcnn_cfg):
    """MODEL.ROI_MASK_HEAD.NORM "SyncBN" (the model zoo's syncbn Mask R-CNN): a rotated
    sub-network batch without objects skips the mask head (loss 0, zero gradient), where
    detectron2's Conv2d would refuse the empty input; the other losses are the same as with
    the head switched off by hand."""
    from gradaug_det.gradaug import SubnetSpec

    cfg = make_rcnn_cfg()
    cfg.MODEL.ROI_MASK_HEAD.NORM = "SyncBN"
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    task = DetectionTask(model, GradAugOptions(subnet_loss="gt"))
    assert task.sync_norm_heads == [("mask_head", "mask_on", "loss_mask")]
    with EventStorage(0):
        _, teacher = task.full_pass(model, _corner_batch())
        torch.manual_seed(1)
        sub = task.subnet_pass(model, _corner_batch(), teacher, SubnetSpec(angle=45.0))
        sum(sub.values()).backward()
        assert sub["loss_mask"].item() == 0.0
        assert all(p.grad is not None and not p.grad.any() for p in model.roi_heads.mask_head.parameters())
        model.zero_grad()
        model.roi_heads.mask_on = False  # the reference: the head switched off by hand
        torch.manual_seed(1)
        ref = DetectionTask(model, GradAugOptions(subnet_loss="gt")).subnet_pass(
            model, _corner_batch(), teacher, SubnetSpec(angle=45.0))
    assert ref.keys() == sub.keys() - {"loss_mask"}
    for k in ref:
        assert sub[k].item() == ref[k].item(), k


def test_syncbn_mask_head_on_two_gloo_workers_one_without_objects(tmp_path):
    """naiveSyncBN mask head, 2 gloo workers; worker 0's rotated batch keeps no object,
    worker 1's keeps its object: both skip the head for that pass (no worker waits in the
    head's all-reduce, none divides by an empty batch), and DDP's gradients agree."""
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "syncbn_heads_check.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, script, "naiveSyncBN", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["heads"] == r1["heads"] == [("mask_head", "mask_on", "loss_mask")]
    assert r0["losses"]["loss_mask"] == r1["losses"]["loss_mask"] == 0.0
    assert r0["losses"].keys() == r1["losses"].keys()
    assert all(np.isfinite(v) for r in (r0, r1) for v in r["losses"].values())
    assert r0["grads"].keys() == r1["grads"].keys()
    for n in r0["grads"]:
        assert torch.allclose(r0["grads"][n], r1["grads"][n], rtol=1e-5, atol=1e-7), n
