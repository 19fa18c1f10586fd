"""SlimmableResNet for mmdet: weights and outputs of mmdet's ResNet; true sub-networks."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from mmdet.models.backbones import ResNet

from gradaug_det.mmdet import SlimmableResNet
from gradaug_det.slim import residual_blocks, set_depth_mask, set_width, slim_channels, width

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _pair(depth=18, seed=0, **kwargs):
    """mmdet's ResNet and a SlimmableResNet with the same arguments and weights."""
    args = dict(depth=depth, norm_eval=False, init_cfg=None, **kwargs)
    torch.manual_seed(seed)
    ref = ResNet(**args)
    ref.init_weights()
    for m in ref.modules():  # non-trivial BN statistics and affine parameters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    slim = SlimmableResNet(**args)
    slim.load_state_dict(ref.state_dict(), strict=True)
    return ref, slim


@pytest.mark.parametrize("depth", [18, 50])
def test_state_dict_is_mmdet_resnet(depth):
    ref, slim = _pair(depth)
    assert list(slim.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert slim.state_dict()[k].shape == v.shape, k


@pytest.mark.parametrize("depth,train", [(18, False), (18, True), (50, False)])
def test_width_one_equals_mmdet_resnet(depth, train):
    ref, slim = _pair(depth)
    ref.train(train)
    slim.train(train)
    x = torch.randn(2, 3, 64, 96)
    out_ref, out_slim = ref(x), slim(x)
    assert len(out_ref) == len(out_slim) == 4
    for a, b in zip(out_ref, out_slim):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def _narrow_copy(ref, w, depth):
    """A physically narrow mmdet ResNet holding the leading channels of ``ref``'s weights."""
    base = slim_channels(64, w)
    narrow = ResNet(depth=depth, base_channels=base, norm_eval=False, init_cfg=None)
    full = ref.state_dict()
    state = {}
    for k, v in narrow.state_dict().items():
        src = full[k]
        if v.dim() == 0:
            state[k] = src
        else:
            state[k] = src[tuple(slice(0, n) for n in v.shape)]
    narrow.load_state_dict(state)
    return narrow


@pytest.mark.parametrize("depth,w", [(18, 0.75), (50, 0.5)])
@pytest.mark.parametrize("train", [False, True])
def test_subnetwork_equals_narrow_resnet(depth, w, train):
    ref, slim = _pair(depth)
    narrow = _narrow_copy(ref, w, depth)
    narrow.train(train)
    slim.train(train)
    x = torch.randn(2, 3, 64, 64)
    full_channels = [o.shape[1] for o in slim(x)]
    with width(slim, w):
        outs = slim(x)
    for got, want, full in zip(outs, narrow(x), full_channels):
        c = want.shape[1]
        assert c == slim_channels(full, w) and got.shape[1] == full
        torch.testing.assert_close(got[:, :c], want, rtol=1e-4, atol=1e-5)
        assert torch.count_nonzero(got[:, c:]) == 0  # zeros after the sub-network's channels


def test_subnetwork_never_updates_running_stats_and_grads_stay_leading():
    ref, slim = _pair(18)
    slim.train()
    before = {k: v.clone() for k, v in slim.state_dict().items() if "running" in k}
    with width(slim, 0.5):
        sum(o.sum() for o in slim(torch.randn(2, 3, 64, 64))).backward()
    after = {k: v for k, v in slim.state_dict().items() if "running" in k}
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    g = slim.layer2[0].conv1.weight.grad  # 64 -> 128 channels, 3x3
    keep_out, keep_in = slim_channels(128, 0.5), slim_channels(64, 0.5)
    assert g[:keep_out, :keep_in].abs().sum() > 0
    assert g[keep_out:].abs().sum() == 0 and g[:, keep_in:].abs().sum() == 0


def test_depth_drop_skips_residual_branch():
    ref, slim = _pair(18)
    slim.eval()
    blocks = residual_blocks(slim)
    assert len(blocks) == 8
    keep = [True] * 8
    keep[3] = False  # layer2[1]: identity shortcut
    x = torch.randn(1, 3, 64, 64)
    set_depth_mask(slim, keep)
    got = slim(x)
    set_depth_mask(slim, [True] * 8)
    # the same network with that block replaced by relu(x)
    ref.eval()
    ref.layer2[1].forward = lambda t: torch.relu(t)
    want = ref(x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key,value", [("dcn", dict(type="DCNv2", deform_groups=1)),
                                       ("conv_cfg", dict(type="ConvWS")),
                                       ("channel_divisor", 0)])
def test_bad_arguments_name_the_key(key, value):
    with pytest.raises(ValueError, match=f"model.backbone.{key}"):
        SlimmableResNet(depth=18, **{key: value})


def test_group_norm_needs_a_divisor_of_whole_groups():
    with pytest.raises(ValueError, match="channel_divisor=1; set it to a multiple of 16"):
        SlimmableResNet(depth=18, norm_cfg=dict(type="GN", num_groups=32))
    # the rule detectron2's backbone uses (slim/channels.py: check_group_norm_slicing), in mmdet's keys
    with pytest.raises(ValueError, match=r"^SlimmableResNet: .*: model\.backbone\.channel_rule='reference' keeps "
                                         r"channel counts that are not whole GN groups\. Use "
                                         r"model\.backbone\.channel_rule='round' with "
                                         r"model\.backbone\.channel_divisor a multiple of 16"):
        SlimmableResNet(depth=18, norm_cfg=dict(type="GN", num_groups=32), channel_rule="reference")
    slim = SlimmableResNet(depth=18, norm_cfg=dict(type="GN", num_groups=32), channel_divisor=16)
    set_width(slim, 0.75)
    assert [o.shape[1] for o in slim(torch.randn(1, 3, 64, 64))] == [64, 128, 256, 512]


def test_shared_core_imports_without_detectron2():
    """gradaug_det.mmdet, the width machinery and the GradAug step need no detectron2."""
    script = textwrap.dedent("""
        import sys
        sys.modules["detectron2"] = None  # as if it were not installed
        import torch
        import gradaug_det.mmdet
        from gradaug_det.gradaug import gradaug_step, SubnetSampler
        from gradaug_det import width
        from gradaug_det.data import generate_coco_shapes  # the quickstart data, too
        net = gradaug_det.mmdet.SlimmableResNet(depth=18, init_cfg=None)
        with width(net, 0.9):
            outs = net(torch.randn(1, 3, 64, 64))
        assert [o.shape[1] for o in outs] == [64, 128, 256, 512]
        assert not gradaug_det.HAS_DETECTRON2
        assert not [m for m in sys.modules if m.startswith("detectron2.")], "detectron2 was imported"
        print("OK")
    """)
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


def test_torchvision_layout_checkpoint_loads_through_init_cfg(tmp_path):
    """What mmdet configs do (init_cfg Pretrained, e.g. torchvision://resnet50 or a GradAug
    classifier converted with tools/convert_pretrained.py --target torchvision)."""
    import torchvision

    torch.manual_seed(1)
    source = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "r18.pth"
    torch.save(source, path)
    slim = SlimmableResNet(depth=18, init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    slim.init_weights()
    for k, v in slim.state_dict().items():
        torch.testing.assert_close(v, source[k], rtol=0, atol=0, msg=k)
