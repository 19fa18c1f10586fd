"""The cost model counts exactly what each pass runs in training (hand-computed FLOPs)."""
import pytest
import torch
from torch import nn

from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from gradaug_det.benchmark import PHASES, PassProbe, PassRecord, cost_model, count_train_flops
from gradaug_det.benchmark.iteration import FixedSampler, synthetic_detection_batch
from gradaug_det.gradaug import DetectionTask, GradAugOptions, SubnetSpec, gradaug_step


class _Toy(nn.Module):
    """backbone: frozen conv 3->8 (3x3, pad 1) + conv 8->4 (1x1); head: linear 4*H*W -> 5."""

    def __init__(self, hw):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
        self.backbone[0].requires_grad_(False)
        self.head = nn.Linear(4 * hw * hw, 5)

    def forward(self, x):
        return self.head(self.backbone(x).flatten(1))


def test_probe_counts_forward_and_backward_by_hand():
    n, hw = 2, 6
    model = _Toy(hw)
    x = torch.randn(n, 3, hw, hw)

    def run(autocast, backward):
        with autocast():
            loss = model(x).sum()
        backward(loss)

    (rec,) = count_train_flops(run, model)
    pixels = n * hw * hw
    conv1 = 2 * pixels * 8 * 3 * 9   # 2 FLOPs per multiply-add
    conv2 = 2 * pixels * 4 * 8
    fc = 2 * n * (4 * hw * hw) * 5
    assert rec.backbone_fwd_flops == conv1 + conv2
    assert rec.fwd_flops == conv1 + conv2 + fc
    # backward: fc weight + fc input grads, conv2 weight grad only (its input comes from a
    # frozen layer on an input without grad), nothing for the frozen conv1
    assert rec.bwd_flops == 2 * fc + conv2
    assert rec.flops == rec.fwd_flops + rec.bwd_flops and rec.name == "full"


def test_flop_counter_is_twice_fvcore_on_a_slimmed_backbone(make_rcnn_cfg):
    """FlopCounterMode counts 2 FLOPs per multiply-add, fvcore one: the same forward,
    at width 0.75 (sliced weights), must give exactly a factor 2 on the convolutions (the
    backbone's only matrix work; fvcore also prices BN and upsampling, FlopCounterMode not)."""
    from fvcore.nn import FlopCountAnalysis

    import gradaug_det

    cfg = make_rcnn_cfg()
    torch.manual_seed(0)
    backbone = build_model(cfg).backbone.eval()
    x = torch.randn(1, 3, 64, 64)
    with gradaug_det.width(backbone, 0.75), torch.no_grad():
        fv = FlopCountAnalysis(backbone, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        fv_total = fv.by_operator()["conv"]

        def run(autocast, backward):
            with autocast():
                backbone(x)

        ours = PassProbe(backbone, "flops")
        with ours:
            run(ours.autocast, ours.backward)
    assert fv_total > 0 and ours.passes[0].fwd_flops == 2 * fv_total


def _box_head_flops(model, rois):
    """Forward FLOPs of the box head + predictor on ``rois`` RoIs, by hand (2 per multiply-add)."""
    roi = model.roi_heads
    fc1 = roi.box_head.fc1
    fc2 = roi.box_head.fc2
    pred = roi.box_predictor
    total = fc1.in_features * fc1.out_features + fc2.in_features * fc2.out_features
    total += pred.cls_score.in_features * pred.cls_score.out_features
    total += pred.bbox_pred.in_features * pred.bbox_pred.out_features
    return 2 * rois * total


def test_soft_subnet_pass_counts_backbone_and_box_head_only(make_rcnn_cfg):
    """A soft-label sub-network pass runs the backbone and the box head on the teacher's
    RoIs, no RPN, no mask head: its forward FLOPs are exactly those, by hand."""
    cfg = make_rcnn_cfg()
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = synthetic_detection_batch(2, 64, 64, num_classes=3, instances=2)
    task = DetectionTask(model, GradAugOptions(subnet_loss="soft"))
    rois = []
    handle = model.roi_heads.box_head.register_forward_hook(lambda m, a, o: rois.append(a[0].shape[0]))
    sampler = FixedSampler([[SubnetSpec(width=1.0), SubnetSpec(width=0.5, scale=0.5)]])
    with EventStorage(0):
        passes = count_train_flops(
            lambda a, b: gradaug_step(model, batch, sampler, task, autocast=a, backward=b), model)
    handle.remove()
    full, same, half = passes
    assert [p.name for p in passes] == ["full", "sub1", "sub2"]
    assert rois[1] == rois[2] == rois[0] > 0  # the teacher's RoIs, all inside the image
    # width 1.0, scale 1.0: the very backbone of the full pass, then the box head only
    assert same.backbone_fwd_flops == full.backbone_fwd_flops
    assert same.fwd_flops == same.backbone_fwd_flops + _box_head_flops(model, rois[1])
    assert full.fwd_flops > same.fwd_flops  # the full pass also runs RPN and mask head
    assert half.input_hw == (32, 32) and half.num_images == 2
    assert half.fwd_flops == half.backbone_fwd_flops + _box_head_flops(model, rois[2])
    # the backbones equal the backbone counted alone on one image, times the 2 images: width
    # 1.0 at 64x64, width 0.5 (sliced weights) at 32x32
    import gradaug_det
    from gradaug_det.utils.analysis import backbone_flops

    assert full.backbone_fwd_flops == 2 * backbone_flops(model, 64, 64)
    with gradaug_det.width(model, 0.5):
        assert half.backbone_fwd_flops == 2 * backbone_flops(model, 32, 32)
    assert all(p.bwd_flops > p.fwd_flops for p in passes)


def test_time_probe_records_every_phase(make_rcnn_cfg):
    cfg = make_rcnn_cfg()
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = synthetic_detection_batch(2, 64, 64, num_classes=3, instances=2)
    task = DetectionTask(model, GradAugOptions(subnet_loss="soft"))
    sampler = FixedSampler([[SubnetSpec(width=0.75, scale=0.5)]])
    with EventStorage(0), PassProbe(model, "time") as probe:
        gradaug_step(model, batch, sampler, task, autocast=probe.autocast, backward=probe.backward)
    full, sub = probe.passes
    for p in (full, sub):
        assert set(p.seconds) == set(PHASES) and all(v >= 0 for v in p.seconds.values())
        assert p.seconds["backbone"] > 0 and p.seconds["backward"] > 0 and p.rss_mb > 0
    assert sub.seconds["transform"] > 0 and sub.input_hw == (32, 32)


def test_cost_model_prices_at_the_baseline_rate():
    base = PassRecord("full", fwd_flops=100, bwd_flops=200, seconds={"backbone": 1.0, "backward": 2.0})
    passes = [PassRecord("full", fwd_flops=100, bwd_flops=200), PassRecord("sub1", fwd_flops=20, bwd_flops=40),
              PassRecord("sub2", fwd_flops=10, bwd_flops=20)]
    m = cost_model(base, 3.5, passes)
    assert m["rate_s_per_gflop"] == pytest.approx(1e7)   # 3 s / 300 FLOPs
    assert m["pass_model_s"] == pytest.approx([3.0, 0.6, 0.3])
    assert m["iteration_model_s"] == pytest.approx(3.5 + 0.9)
    with pytest.raises(ValueError, match="calibrate"):
        cost_model(PassRecord("full"), 1.0, passes)
    with pytest.raises(ValueError, match="mode"):
        PassProbe(nn.Linear(1, 1), "energy")
