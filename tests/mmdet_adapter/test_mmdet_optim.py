"""PerParameterClipOptimWrapper: each parameter's gradient clipped on its own, as detectron2's
SOLVER.CLIP_GRADIENTS (CLIP_TYPE "norm") does, unlike mmengine's clip of the total norm."""
import pytest
import torch
from mmengine.optim import OptimWrapper

from gradaug_det.mmdet import PerParameterClipOptimWrapper


def _params():
    """Two parameters with gradient norms 10 (3-4-5 x 2) and 1."""
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    a.grad = torch.tensor([6.0, 8.0])
    b.grad = torch.tensor([0.0, 0.6, 0.8])
    return a, b


def test_each_gradient_is_clipped_alone():
    a, b = _params()
    wrapper = PerParameterClipOptimWrapper(optimizer=torch.optim.SGD([a, b], lr=0.0), clip_grad=dict(max_norm=5.0))
    wrapper.step()
    # a: norm 10 > 5, scaled by 5 / 10 (torch's clip_grad_norm_ adds 1e-6 to the norm); b: norm 1, untouched
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 4.0]), rtol=1e-6, atol=0)
    assert torch.equal(b.grad, torch.tensor([0.0, 0.6, 0.8]))
    assert wrapper.message_hub.get_scalar("train/grad_norm").current() == pytest.approx(10.0)

    # mmengine's own wrapper clips the total norm sqrt(101): b is scaled down too
    a, b = _params()
    OptimWrapper(optimizer=torch.optim.SGD([a, b], lr=0.0), clip_grad=dict(max_norm=5.0)).step()
    torch.testing.assert_close(b.grad, torch.tensor([0.0, 0.6, 0.8]) * 5.0 / 101 ** 0.5, rtol=1e-5, atol=0)


def test_same_gradients_as_detectron2s_clipping():
    detectron2_config = pytest.importorskip("detectron2.config")
    from detectron2.solver.build import maybe_add_gradient_clipping

    cfg = detectron2_config.get_cfg()
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "norm"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 5.0
    ours, theirs = _params(), _params()
    PerParameterClipOptimWrapper(optimizer=torch.optim.SGD(ours, lr=0.0), clip_grad=dict(max_norm=5.0)).step()
    maybe_add_gradient_clipping(cfg, torch.optim.SGD(theirs, lr=0.0)).step()
    for p, q in zip(ours, theirs):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("clip", [None, dict(type="value", clip_value=1.0)])
def test_refuses_clipping_it_does_not_do(clip):
    a, _ = _params()
    with pytest.raises(ValueError, match="needs clip_grad=dict\\(max_norm"):
        PerParameterClipOptimWrapper(optimizer=torch.optim.SGD([a], lr=0.0), clip_grad=clip)
