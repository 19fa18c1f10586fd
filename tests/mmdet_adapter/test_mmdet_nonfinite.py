"""Issue 11 §2 in the MMDetection train step: a non-finite loss in any pass stops the
iteration before the optimizer steps, naming the pass; loss weights must be finite."""
import math

import pytest
import torch
from mmengine.optim import OptimWrapper

from gradaug_det.gradaug import SubnetSampler
from gradaug_det.slim import get_width


def test_nan_in_one_subnetwork_stops_before_the_optimizer_step(make_batch, mask_rcnn_cfg, detector):
    model = detector(mask_rcnn_cfg(gradaug=dict(seed=3, subnet_loss="gt+soft")))
    model.train()
    specs = SubnetSampler(seed=3).sample()  # the draws the model's own sampler (seed 3) makes
    calls = []

    def poison_first_subnet(module, args, output):
        # the backbone's forward at the first sub-network's width (the full pass runs at 1.0 first)
        calls.append(get_width(module))
        if len(calls) == 2:
            return tuple(o * float("nan") for o in output)
        return output

    model.backbone.register_forward_hook(poison_first_subnet)
    ow = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.0))
    steps = []
    real_step = ow.step
    ow.step = lambda **kw: (steps.append(1), real_step(**kw))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(FloatingPointError) as e:
        model.train_step(make_batch((0, 1)), ow)
    msg = str(e.value)
    s = specs[0]
    assert f"sub-network 1 (width {s.width:g}, scale {s.scale:g}, angle {s.angle:g} degrees)" in msg, msg
    assert "No optimizer step was taken" in msg
    assert len(calls) == 4  # every pass ran (one host sync after the last), then the refusal
    assert calls[0] == 1.0 and calls[1] == pytest.approx(s.width)
    assert steps == []
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
    assert get_width(model.backbone) == 1.0  # the width context was left


@pytest.mark.parametrize("key,value", [("soft_weight", math.inf), ("soft_weight", 1e400), ("gt_weight", math.nan),
                                       ("soft_weight", -1.0)])
def test_non_finite_or_negative_loss_weight_refused(mask_rcnn_cfg, detector, key, value):
    with pytest.raises(ValueError, match=rf"model\.gradaug\.{key}=.* a loss weight must be a finite number >= 0"):
        detector(mask_rcnn_cfg(gradaug={key: value}))
