"""The GradAug iteration of an mmdet detector, through train_step and the optim wrapper."""
import copy

import pytest
import torch
from mmengine.optim import OptimWrapper

from gradaug_det.gradaug import SubnetSampler
from gradaug_det.mmdet import transform_batch
from gradaug_det.slim import get_width, width



def _wrapper(model, lr=0.0, **kwargs):
    return OptimWrapper(torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0), **kwargs)


def _capture_steps(optim_wrapper, model):
    """Record every parameter's gradient each time the wrapper steps."""
    captured = []
    real_step = optim_wrapper.step

    def step(**kwargs):
        captured.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        real_step(**kwargs)

    optim_wrapper.step = step
    return captured


def _stepped_gradients(model, batch, seed):
    """The gradients one train_step hands to the optimizer (lr 0), torch seeded with ``seed``."""
    ow = _wrapper(model)
    captured = _capture_steps(ow, model)
    torch.manual_seed(seed)
    log_vars = model.train_step(copy.deepcopy(batch), ow)
    return captured[0], log_vars, ow


def _full_pass_backward(ref, batch, seed):
    """By hand: the full network's standard losses on the batch, back-propagated."""
    torch.manual_seed(seed)
    ref.zero_grad()
    data = ref.data_preprocessor(copy.deepcopy(batch), True)
    loss, _ = ref.parse_losses(ref.loss(data["inputs"], data["data_samples"]))
    loss.backward()
    return data


def _passes(model):
    """Record (width, input height, input width) of every backbone forward."""
    seen = []
    model.backbone.register_forward_pre_hook(lambda m, args: seen.append((get_width(m), *args[0].shape[-2:])))
    return seen


def test_train_step_runs_full_network_then_subnetworks(make_batch, mask_rcnn_cfg, detector):
    model = detector(mask_rcnn_cfg(gradaug=dict(seed=3)))
    model.train()
    seen = _passes(model)
    ow = _wrapper(model, lr=0.01)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sampler = SubnetSampler(seed=3)
    for it in range(2):
        specs = sampler.sample()
        log_vars = model.train_step(make_batch((2 * it, 2 * it + 1)), ow)
        passes = seen[4 * it: 4 * it + 4]
        assert len(passes) == 4
        full_h, full_w = passes[0][1:]
        assert passes[0][0] == 1.0
        for (w, h, wd), spec in zip(passes[1:], specs):
            assert w == pytest.approx(spec.width)
            assert h == -(-round(full_h * spec.scale) // 32) * 32 and wd == -(-round(full_w * spec.scale) // 32) * 32
            assert log_vars[f"gradaug/sub{specs.index(spec)}/width"] == pytest.approx(spec.width)
        assert specs[-1].width == 0.9 and all(0.9 <= s.width <= 1.0 for s in specs)
        assert torch.isfinite(log_vars["loss"]) and float(log_vars["loss"]) > 0
        for i in range(3):
            assert float(log_vars[f"gradaug/sub{i}/loss_soft_cls"]) >= 0
            assert "gradaug/sub0/loss_rpn_cls" not in log_vars  # soft-only: no ground-truth terms
    assert get_width(model.backbone) == 1.0
    assert ow.inner_count == 2
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("backbone.") for n in changed) and any(n.startswith("roi_head.bbox_head") for n in changed)


@pytest.mark.parametrize("transform", ["scale", "scale_rotate"])
def test_gradients_equal_hand_computed_iteration(make_batch, mask_rcnn_cfg, detector, transform):
    """gt sub-network loss: the accumulated gradient is the sum of the four passes' gradients."""
    cfg = mask_rcnn_cfg(gradaug=dict(subnet_loss="gt", seed=5, transform=transform))
    model = detector(cfg)
    model.train()
    ref = copy.deepcopy(model)
    batch = make_batch((0, 1))

    got, _, _ = _stepped_gradients(model, batch, 11)

    data = _full_pass_backward(ref, batch, 11)
    specs = SubnetSampler(seed=5, transform=transform).sample()
    assert all(s.angle != 0.0 for s in specs) == (transform == "scale_rotate")
    prep = ref.data_preprocessor
    for spec in specs:
        inputs, samples, _ = transform_batch(data["inputs"], data["data_samples"], spec.scale, spec.angle,
                                             prep.pad_size_divisor)
        with width(ref, spec.width):
            loss, _ = ref.parse_losses(ref.loss(inputs, samples))
        loss.backward()
    want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)


def test_soft_labels_vanish_for_a_subnetwork_equal_to_the_full_network(make_batch, mask_rcnn_cfg, detector):
    """Width 1.0 at scale 1.0 reproduces the teacher: KL 0, no gradient beyond the full pass."""
    cfg = mask_rcnn_cfg(gradaug=dict(min_width=1.0, max_width=1.0, scales=(1.0,), seed=0),
                        backbone=dict(norm_eval=True))
    model = detector(cfg)
    model.train()
    ref = copy.deepcopy(model)
    batch = make_batch((2, 3))

    same, log_vars, _ = _stepped_gradients(model, batch, 2)
    for i in range(3):
        assert abs(float(log_vars[f"gradaug/sub{i}/loss_soft_cls"])) < 1e-7

    _full_pass_backward(ref, batch, 2)
    for n, p in ref.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(same[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)

    # a real sub-network (narrower, smaller input) has something to learn
    model.gradaug_sampler = SubnetSampler(min_width=0.5, max_width=0.5, scales=(0.5,), seed=0)
    narrow, log_vars, _ = _stepped_gradients(model, batch, 2)
    assert float(log_vars["gradaug/sub0/loss_soft_cls"]) > 1e-5
    moved = [n for n, g in narrow.items() if not torch.allclose(g, same[n], rtol=1e-3, atol=1e-7)]
    assert any(n.startswith("backbone.") for n in moved) and any("bbox_head.fc_cls" in n for n in moved)


def test_gradient_accumulation_steps_once_per_window_with_scaled_losses(make_batch, mask_rcnn_cfg, detector):
    cfg = mask_rcnn_cfg(gradaug=dict(subnet_loss="gt+soft", seed=1))
    batches = [make_batch((0, 1)), make_batch((2, 3))]
    runs = []
    for counts in (1, 2):
        model = detector(cfg)
        model.train()
        ow = _wrapper(model, accumulative_counts=counts)
        ow.initialize_count_status(model, 0, 4)
        captured = _capture_steps(ow, model)
        torch.manual_seed(4)
        for i, b in enumerate(batches):
            model.train_step(copy.deepcopy(b), ow)
            assert ow.inner_count == i + 1
            assert len(captured) == (i + 1 if counts == 1 else (i + 1) // 2)
        runs.append(captured)
    per_iter, accumulated = runs
    for n, g in accumulated[0].items():
        torch.testing.assert_close(g, (per_iter[0][n] + per_iter[1][n]) / 2, rtol=1e-4, atol=1e-6, msg=n)


def test_inference_and_weights_are_mmdet_mask_rcnn(make_batch, mask_rcnn_cfg, detector):
    from mmdet.registry import MODELS

    model = detector(mask_rcnn_cfg(gradaug={}))
    stock_cfg = mask_rcnn_cfg(detector="MaskRCNN")
    stock_cfg["backbone"]["type"] = "ResNet"
    stock_cfg["backbone"].pop("channel_divisor")
    stock = MODELS.build(stock_cfg)
    stock.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    stock.eval()
    data = model.data_preprocessor(make_batch((0, 1)), False)
    with torch.no_grad():
        a = model(**data, mode="predict")
        b = stock(**copy.deepcopy(data), mode="predict")
    for x, y in zip(a, b):
        torch.testing.assert_close(x.pred_instances.bboxes, y.pred_instances.bboxes, rtol=0, atol=0)
        torch.testing.assert_close(x.pred_instances.scores, y.pred_instances.scores, rtol=0, atol=0)


@pytest.mark.parametrize("gradaug,match", [
    (dict(num_subnet=3), "unknown keys \\['num_subnet'\\]"),
    (dict(transform="flip"), "model.gradaug.transform='flip'.*allowed: scale, rotate, scale_rotate"),
    (dict(rotation=(20, -20)), "model.gradaug.rotation=\\(20, -20\\)"),
    (dict(min_width=1.5), "model.gradaug.min_width=1.5"),
    (dict(min_width=0.9, max_width=0.8), "model.gradaug.min_width=0.9.*model.gradaug.max_width"),
    (dict(subnet_loss="kl"), "model.gradaug.subnet_loss='kl'"),
])
def test_bad_gradaug_options_name_the_key(gradaug, match, mask_rcnn_cfg, detector):
    with pytest.raises(ValueError, match=match):
        detector(mask_rcnn_cfg(gradaug=gradaug))


def test_plain_backbone_is_refused_with_the_fix(mask_rcnn_cfg, detector):
    cfg = mask_rcnn_cfg(gradaug={})
    cfg["backbone"]["type"] = "ResNet"
    cfg["backbone"].pop("channel_divisor")
    with pytest.raises(ValueError, match="model.backbone.type='SlimmableResNet'"):
        detector(cfg)


class _ScalingWrapper(OptimWrapper):
    """Scales each loss in ``backward`` and unscales the gradients in ``step``, entering a
    context per forward, as ``AmpOptimWrapper`` does (which needs CUDA)."""

    SCALE = 1024.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = {"backward": 0, "step": 0, "context": 0}
        self.stepped_grads = None

    def backward(self, loss, **kwargs):
        self.calls["backward"] += 1
        super().backward(loss * self.SCALE, **kwargs)

    def step(self, **kwargs):
        self.calls["step"] += 1
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        for p in params:
            p.grad.div_(self.SCALE)
        self.stepped_grads = [p.grad.clone() for p in params]
        super().step(**kwargs)

    def optim_context(self, model):
        self.calls["context"] += 1
        return super().optim_context(model)


def test_every_pass_goes_through_the_optim_wrapper(make_batch, mask_rcnn_cfg, detector):
    """A loss-scaling wrapper (the AMP contract) sees 4 backwards, 1 step, unscaled gradients."""
    cfg = mask_rcnn_cfg(gradaug=dict(subnet_loss="gt+soft", seed=2))
    batch = make_batch((0, 3))
    plain, _, _ = _stepped_gradients(detector(cfg).train(), batch, 9)

    model = detector(cfg).train()
    sw = _ScalingWrapper(torch.optim.SGD(model.parameters(), lr=0.0))
    torch.manual_seed(9)
    model.train_step(copy.deepcopy(batch), sw)
    assert sw.calls == {"backward": 4, "step": 1, "context": 5}  # preprocessor + 4 passes
    assert sw.inner_count == 1
    want = [plain[n] for n, p in model.named_parameters() if n in plain]
    assert len(want) == len(sw.stepped_grads)
    for g, w in zip(sw.stepped_grads, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_rotated_subnetworks_learn_on_the_teachers_rotated_rois(make_batch, mask_rcnn_cfg, detector):
    """transform='rotate': each soft-only sub-network classifies the full network's RoIs moved
    with its input (boxes enclosing the rotated RoIs; RoIs rotated out keep their row, weight 0)."""
    model = detector(mask_rcnn_cfg(gradaug=dict(transform="rotate", rotation=(-45.0, 45.0), seed=4)))
    model.train()
    seen = []
    model.roi_head.bbox_roi_extractor.register_forward_hook(lambda m, args, out: seen.append(args[1].detach()))
    batch = make_batch((0, 1))
    log_vars = model.train_step(copy.deepcopy(batch), _wrapper(model))
    assert len(seen) == 4  # the full network's sampled RoIs, then one set per sub-network
    data = model.data_preprocessor(copy.deepcopy(batch), True)
    specs = SubnetSampler(transform="rotate", rotation=(-45.0, 45.0), seed=4).sample()
    for spec, rois in zip(specs, seen[1:]):
        assert spec.angle != 0.0 and spec.scale == 1.0
        _, _, geometry = transform_batch(data["inputs"], data["data_samples"], spec.scale, spec.angle, 32)
        want, _ = geometry.map_rois(seen[0])
        torch.testing.assert_close(rois, want)
        assert not torch.equal(rois[:, 1:], seen[0][: len(rois), 1:])
        assert float(log_vars[f"gradaug/sub{specs.index(spec)}/angle"]) == pytest.approx(spec.angle)
    assert all(torch.isfinite(log_vars[f"gradaug/sub{i}/loss_soft_cls"]) for i in range(3))


def test_soft_loss_leaves_out_rois_rotated_out_of_the_image(make_batch, mask_rcnn_cfg, detector):
    """A teacher RoI that the rotation leaves without area keeps its row with weight 0 (no
    boolean indexing): the sub-network's soft KL is the mean over the other RoIs only."""
    from gradaug_det.gradaug import SubnetSpec, soft_label_kl

    model = detector(mask_rcnn_cfg(gradaug=dict(subnet_loss="soft", transform="rotate", seed=0)))
    model.train()
    data = model.data_preprocessor(copy.deepcopy(make_batch((0, 1))), True)
    # a small box in an image's corner leaves it when turned 45 degrees about the centre
    rois = torch.tensor([[0.0, 30.0, 30.0, 60.0, 50.0], [0.0, 0.0, 0.0, 4.0, 4.0], [1.0, 20.0, 25.0, 50.0, 70.0]])
    num_classes = model.roi_head.bbox_head.num_classes + 1
    logits = torch.randn(3, num_classes, generator=torch.Generator().manual_seed(0))
    spec = SubnetSpec(scale=1.0, angle=45.0)
    out = model.gradaug_task.subnet_pass(model, data, {"rois": [rois], "logits": [logits]}, spec)

    inputs, _, geometry = transform_batch(data["inputs"], data["data_samples"], 1.0, 45.0,
                                          model.data_preprocessor.pad_size_divisor)
    moved, weights = geometry.map_rois(rois)
    assert weights.tolist() == [1.0, 0.0, 1.0]
    student = model.gradaug_task.soft.student_logits(model.extract_feat(inputs), moved)
    keep = [0, 2]
    want = soft_label_kl(student[keep], logits[keep]) * model.gradaug_options.soft_weight
    torch.testing.assert_close(out["loss_soft_cls"], want)
    assert not torch.allclose(out["loss_soft_cls"], soft_label_kl(student, logits) * model.gradaug_options.soft_weight)
