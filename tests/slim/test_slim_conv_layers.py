"""SlimConv2d and slim_norm against hand-sliced stock detectron2 / torch layers."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import Conv2d, FrozenBatchNorm2d

from gradaug_det.slim import SlimConv2d, set_width, slim_norm


def _rand_norm_(norm, generator):
    """Give a norm layer non-trivial affine parameters and running statistics."""
    with torch.no_grad():
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=generator) + 0.5)
        norm.bias.copy_(torch.randn(norm.bias.shape, generator=generator) * 0.3)
        if getattr(norm, "running_mean", None) is not None:
            norm.running_mean.copy_(torch.randn(norm.running_mean.shape, generator=generator) * 0.3)
            norm.running_var.copy_(torch.rand(norm.running_var.shape, generator=generator) + 0.5)
    return norm


def _make(cin, cout, k=3, norm=None, **slim_kwargs):
    g = torch.Generator().manual_seed(cin * 100 + cout)
    conv = Conv2d(cin, cout, k, padding=k // 2, bias=norm is None, norm=norm,
                  groups=slim_kwargs.pop("groups", 1))
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.2)
        if conv.bias is not None:
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g))
    if norm is not None:
        _rand_norm_(norm, g)
    return SlimConv2d.convert(conv, **slim_kwargs)


def _stock_sliced(slim, cin, cout, norm=None):
    """A stock ``Conv2d`` holding the leading ``cout`` x ``cin`` block of ``slim``."""
    ref = Conv2d(cin, cout, slim.kernel_size, padding=slim.padding, bias=slim.bias is not None, norm=norm)
    with torch.no_grad():
        ref.weight.copy_(slim.weight[:cout, :cin])
        if slim.bias is not None:
            ref.bias.copy_(slim.bias[:cout])
    return ref


def test_convert_shares_parameters_and_names():
    conv = Conv2d(8, 16, 3, padding=1, bias=False, norm=nn.BatchNorm2d(16))
    slim = SlimConv2d.convert(conv)
    assert slim.weight is conv.weight
    assert slim.norm is conv.norm
    assert list(slim.state_dict()) == list(conv.state_dict())
    assert slim.weight.device.type == "cpu"
    x = torch.randn(2, 8, 9, 9)
    conv.eval(), slim.eval()
    assert torch.equal(slim(x), conv(x))


@pytest.mark.parametrize("w, cin, cout", [(0.5, 8, 16), (0.75, 12, 24), (0.9, 14, 29)])
def test_sub_width_equals_sliced_stock_conv(w, cin, cout):
    slim = _make(16, 32)  # biased, no norm
    set_width(slim, w)
    assert slim.active_channels() == (cin, cout)
    ref = _stock_sliced(slim, cin, cout)
    x = torch.randn(2, cin, 10, 10)
    out = slim(x)
    assert out.shape == (2, cout, 10, 10)
    torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-5)
    # a full-size input whose tail is zero (a padded feature) gives the same result
    padded = torch.cat([x, torch.zeros(2, 16 - cin, 10, 10)], 1)
    torch.testing.assert_close(slim(padded), out, rtol=0, atol=0)


def test_sub_width_rejects_wrong_input_channels():
    slim = _make(16, 32)
    set_width(slim, 0.5)
    with pytest.raises(RuntimeError, match="expects 8 or 16 input channels, got 10"):
        slim(torch.randn(1, 10, 5, 5))


def test_slim_in_false_and_slim_out_false():
    stem = _make(3, 16, slim_in=False)
    set_width(stem, 0.5)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(stem(x), _stock_sliced(stem, 3, 8)(x), rtol=1e-5, atol=1e-5)
    head = _make(16, 6, slim_out=False)
    set_width(head, 0.5)
    x = torch.randn(2, 8, 8, 8)
    torch.testing.assert_close(head(x), _stock_sliced(head, 8, 6)(x), rtol=1e-5, atol=1e-5)


def test_conv_weight_really_sliced(monkeypatch):
    """The convolution itself runs on the sliced weight (compute shrinks)."""
    slim = _make(16, 32, norm=FrozenBatchNorm2d(32))
    shapes = []
    real = F.conv2d

    def spy(x, weight, *args, **kwargs):
        shapes.append((tuple(x.shape), tuple(weight.shape)))
        return real(x, weight, *args, **kwargs)

    monkeypatch.setattr(F, "conv2d", spy)
    set_width(slim, 0.5)
    slim(torch.randn(1, 16, 6, 6))
    set_width(slim, 0.75)
    slim(torch.randn(1, 12, 6, 6))
    assert shapes == [((1, 8, 6, 6), (16, 8, 3, 3)), ((1, 12, 6, 6), (24, 12, 3, 3))]


def test_gradient_only_reaches_kept_weights():
    slim = _make(16, 32)
    set_width(slim, 0.5)
    slim(torch.randn(2, 8, 6, 6)).square().sum().backward()
    grad = slim.weight.grad
    assert grad[:16, :8].abs().sum() > 0
    assert grad[16:].abs().sum() == 0 and grad[:, 8:].abs().sum() == 0
    assert slim.bias.grad[:16].abs().sum() > 0 and slim.bias.grad[16:].abs().sum() == 0


def test_frozen_bn_uses_sliced_buffers():
    slim = _make(16, 32, norm=FrozenBatchNorm2d(32))
    set_width(slim, 0.5)
    ref_norm = FrozenBatchNorm2d(16)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(ref_norm, name).copy_(getattr(slim.norm, name)[:16])
    ref = _stock_sliced(slim, 8, 16, norm=ref_norm)
    x = torch.randn(2, 8, 7, 7)
    torch.testing.assert_close(slim(x), ref(x), rtol=1e-5, atol=1e-5)


def _sliced_bn(bn, keep):
    ref = nn.BatchNorm2d(keep)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(ref, name).copy_(getattr(bn, name)[:keep])
    return ref


@pytest.mark.parametrize("train", [False, True])
def test_bn_sub_width(train):
    slim = _make(16, 32, norm=nn.BatchNorm2d(32))
    before = {k: v.clone() for k, v in slim.norm.state_dict().items()}
    ref_norm = _sliced_bn(slim.norm, 16)
    ref = _stock_sliced(slim, 8, 16, norm=ref_norm)
    slim.train(train), ref.train(train)
    set_width(slim, 0.5)
    x = torch.randn(4, 8, 7, 7)
    out = slim(x)
    torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    for k, v in slim.norm.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed at width 0.5"
    if train:  # the check above is meaningful: the stock layer did move its statistics
        assert not torch.equal(ref_norm.running_mean, before["running_mean"][:16])


def test_bn_full_width_updates_running_stats():
    slim = _make(16, 32, norm=nn.BatchNorm2d(32))
    before = slim.norm.running_mean.clone()
    slim.train()
    slim(torch.randn(4, 16, 7, 7))
    assert not torch.equal(slim.norm.running_mean, before)
    assert slim.norm.num_batches_tracked.item() == 1


def test_group_norm_keeps_whole_groups():
    slim = _make(16, 32, norm=nn.GroupNorm(8, 32))  # 4 channels per group
    set_width(slim, 0.5)  # keeps 16 channels = 4 whole groups
    ref_norm = nn.GroupNorm(4, 16)
    with torch.no_grad():
        ref_norm.weight.copy_(slim.norm.weight[:16])
        ref_norm.bias.copy_(slim.norm.bias[:16])
    ref = _stock_sliced(slim, 8, 16, norm=ref_norm)
    x = torch.randn(2, 8, 7, 7)
    torch.testing.assert_close(slim(x), ref(x), rtol=1e-5, atol=1e-5)


def test_unsupported_norm_raises_at_sub_width():
    slim = _make(8, 8, k=1, norm=nn.InstanceNorm2d(8, affine=True))
    set_width(slim, 0.5)
    with pytest.raises(TypeError, match="InstanceNorm2d cannot be slimmed"):
        slim(torch.randn(1, 4, 3, 3))
    with pytest.raises(TypeError, match="cannot be slimmed"):
        slim_norm(nn.LayerNorm(8), torch.randn(1, 4, 3, 3), 1, 4)


def _group_index(groups, per_group, keep):
    """Indices of the leading ``keep`` channels of each of ``groups`` groups."""
    return torch.tensor([g * per_group + i for g in range(groups) for i in range(keep)])


@pytest.mark.parametrize("w, keep", [(0.5, 2), (0.75, 3), (0.9, 4)])
def test_grouped_conv_keeps_leading_channels_of_every_group(w, keep):
    groups, per = 4, 4
    slim = _make(groups * per, groups * per, norm=FrozenBatchNorm2d(groups * per), groups=groups,
                 in_layout=groups, out_layout=groups)
    set_width(slim, w)
    assert slim.active_channels() == (groups * keep, groups * keep)
    idx = _group_index(groups, per, keep)
    ref_norm = FrozenBatchNorm2d(groups * keep)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(ref_norm, name).copy_(getattr(slim.norm, name)[idx])
    ref = Conv2d(groups * keep, groups * keep, 3, padding=1, bias=False, groups=groups, norm=ref_norm)
    with torch.no_grad():
        ref.weight.copy_(slim.weight[idx, :keep])
    x_full = torch.randn(2, groups * per, 6, 6)
    x = x_full[:, idx]
    torch.testing.assert_close(slim(x), ref(x), rtol=1e-5, atol=1e-5)
    # a full-size input is reduced to the same per-group channels
    torch.testing.assert_close(slim(x_full), ref(x), rtol=1e-5, atol=1e-5)


def test_layout_conversions_between_plain_and_grouped():
    """conv1-like (plain -> grouped) and conv3-like (grouped -> plain) slicing."""
    groups, per = 4, 4
    expand = _make(8, groups * per, k=1, out_layout=groups)
    reduce = _make(groups * per, 8, k=1, in_layout=groups)
    set_width(expand, 0.5), set_width(reduce, 0.5)
    idx = _group_index(groups, per, 2)
    x = torch.randn(2, 4, 5, 5)
    mid = expand(x)
    ref_mid = F.conv2d(x, expand.weight[idx, :4], expand.bias[idx], padding=0)
    torch.testing.assert_close(mid, ref_mid, rtol=1e-5, atol=1e-5)
    out = reduce(mid)
    ref_out = F.conv2d(ref_mid, reduce.weight[:4][:, idx], reduce.bias[:4])
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", [1, 2])
def test_sub_width_gradients_gradcheck(layout):
    """Analytical gradients of a sub-width conv (input, weight, bias) match finite differences."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~1000 tiny convolutions: threads only add contention
    try:
        torch.manual_seed(0)
        conv = Conv2d(4, 4, 3, padding=1, bias=True).double()
        slim = SlimConv2d.convert(conv, in_layout=layout, out_layout=layout)
        set_width(slim, 0.5)
        x = torch.randn(2, 2, 3, 3, dtype=torch.double, requires_grad=True)
        w = conv.weight.detach().clone().requires_grad_()
        b = conv.bias.detach().clone().requires_grad_()

        def f(inp, weight, bias):
            return torch.func.functional_call(slim, {"weight": weight, "bias": bias}, (inp,))

        assert f(x, w, b).shape == (2, 2, 3, 3)
        assert torch.autograd.gradcheck(f, (x, w, b))
    finally:
        torch.set_num_threads(threads)


_SLICES = [  # (in, out, kernel, groups, in_layout, out_layout, kept in, kept out, stride, padding, dilation, bias)
    (16, 32, 3, 1, 1, 1, 8, 16, 1, 1, 1, True),
    (16, 32, 3, 1, 1, 1, 8, 16, 2, 2, 2, True),
    (16, 16, 3, 4, 4, 4, 8, 12, 1, 1, 1, False),  # ResNeXt conv2
    (8, 16, 1, 1, 1, 4, 4, 8, 1, 0, 1, True),  # conv1: plain -> grouped
    (16, 8, 1, 1, 4, 1, 8, 4, 1, 0, 1, False),  # conv3: grouped -> plain
]


def _autograd_through_slice(conv, x, s):
    """The convolution as autograd sees it through a (contiguous) copy of the kept weight."""
    return F.conv2d(x, s.weight(conv.weight).contiguous(), s.out(conv.bias), conv.stride, conv.padding,
                    conv.dilation, conv.groups)


@pytest.mark.parametrize("case", _SLICES)
@pytest.mark.parametrize("mode", ["float64", "bf16_autocast", "channels_last"])
def test_sliced_conv_gradients_equal_autograd_through_the_slice(case, mode):
    """conv2d_slice saves the full weight and re-slices in backward: outputs and gradients
    (input, weight, bias) are those of autograd through the sliced copy, to the bit."""
    from gradaug_det.slim import conv2d_slice, conv_slice

    cin, cout, k, groups, il, ol, kin, kout, stride, pad, dil, bias = case
    dtype = torch.float32 if mode == "bf16_autocast" else torch.float64
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dil, groups=groups, bias=bias).to(dtype)
    x = torch.randn(2, kin, 9, 9, dtype=dtype)
    if mode == "channels_last":
        conv, x = conv.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    s = conv_slice(conv, kin, kout, il, ol)
    results = []
    for f in (_autograd_through_slice, conv2d_slice):
        conv.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16_autocast"):
            out = f(conv, x, s)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        (out.double() * g).sum().backward()
        results.append([out.detach(), x.grad, conv.weight.grad] + ([conv.bias.grad] if bias else []))
    assert results[1][0].shape == (2, kout) + results[0][0].shape[2:]
    if mode == "bf16_autocast":
        assert results[1][0].dtype == torch.bfloat16
    for ref, got in zip(*results):
        assert got.dtype == ref.dtype and torch.equal(got, ref)


def test_sliced_conv_saves_the_full_weight_not_a_copy():
    """For backward a sub-width convolution keeps its input and the parameter itself, never
    a sliced copy of the weight."""
    slim = _make(16, 32)
    set_width(slim, 0.5)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        slim(torch.randn(2, 8, 6, 6, requires_grad=True))
    assert [tuple(t.shape) for t in saved] == [(2, 8, 6, 6), (32, 16, 3, 3)]
    assert saved[1].data_ptr() == slim.weight.data_ptr()
