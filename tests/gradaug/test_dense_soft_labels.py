"""The dense soft label's core (plain torch, shared by the mmdet RetinaNet side): the per-class
Bernoulli KL (gradaug/losses.py) and the teacher's per-anchor maps moved onto a sub-network's
anchors (gradaug/geometry.py), each against a hand computation on a tiny input."""
import math

import pytest
import torch

from gradaug_det.gradaug.geometry import AffineGeometry, AnchorLayout, anchor_scale_pairs, map_teacher_anchors
from gradaug_det.gradaug.losses import sigmoid_soft_target_kl


def _bernoulli_kl(p, x):
    q = 1 / (1 + math.exp(-x))
    return sum(a * math.log(a / b) for a, b in ((p, q), (1 - p, 1 - q)) if a > 0)


def test_sigmoid_kl_equals_hand_computation_and_its_gradient():
    # (N=1, C=2, rows=3): per row the two classes' Bernoulli KLs, summed
    x = torch.tensor([[[0.5, -1.0, 2.0], [-3.0, 0.0, 1.5]]], dtype=torch.float64, requires_grad=True)
    p = torch.tensor([[[0.7, 0.0, 1.0], [0.1, 0.5, 0.25]]], dtype=torch.float64)
    w = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)
    rows = [sum(_bernoulli_kl(float(p[0, c, r]), float(x[0, c, r].detach())) for c in range(2)) for r in range(3)]
    # the KL of row 2's class 0 (p = 1): -log sigmoid(2) = 0.126928...
    assert rows[2] == pytest.approx(math.log(1 + math.exp(-2.0)) + _bernoulli_kl(0.25, 1.5), rel=1e-12)

    loss = sigmoid_soft_target_kl(x, p, w, normalizer=4.0)
    assert float(loss.detach()) == pytest.approx((rows[0] + rows[2]) / 4.0, rel=1e-6)
    loss.backward()
    # d KL / d x = sigmoid(x) - p, times the row weight, over the normaliser
    torch.testing.assert_close(x.grad, (torch.sigmoid(x.detach()) - p) * w[:, None] / 4.0)
    # default: the weighted mean over rows; no weights: the mean over all rows
    assert float(sigmoid_soft_target_kl(x.detach(), p, w)) == pytest.approx((rows[0] + rows[2]) / 2, rel=1e-6)
    assert float(sigmoid_soft_target_kl(x.detach(), p)) == pytest.approx(sum(rows) / 3, rel=1e-6)
    # zero where the student is the teacher; empty input gives 0 in the graph
    assert float(sigmoid_soft_target_kl(torch.logit(p.clamp(0.2, 0.8)), p.clamp(0.2, 0.8))) == pytest.approx(0, abs=1e-6)
    empty = torch.zeros(0, 2, requires_grad=True)
    zero = sigmoid_soft_target_kl(empty, empty.detach())
    assert zero.requires_grad and float(zero.detach()) == 0.0
    with pytest.raises(ValueError, match="target shape"):
        sigmoid_soft_target_kl(x, p[:, :1])
    with pytest.raises(ValueError, match="normalizer must be > 0"):
        sigmoid_soft_target_kl(x, p, normalizer=0.0)


def _layout(strides=(8, 16, 32), octaves=3):
    """mmdet's RetinaNet anchors (ratio 1 only): size 4 * stride * 2^(o / octaves), centred on
    cell (0, 0) at the origin (``center_offset=0``)."""
    base = []
    for s in strides:
        half = torch.tensor([4 * s * 2 ** (o / octaves) / 2 for o in range(octaves)], dtype=torch.float64)
        base.append(torch.stack([-half, -half, half, half], 1))
    return AnchorLayout.from_base_anchors(strides, base)


def _maps(layout, size, n=2, c=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, len(layout.sizes[k]) * c, math.ceil(size[0] / s[1]), math.ceil(size[1] / s[0]),
                       generator=g, dtype=torch.float64) for k, s in enumerate(layout.strides)]


def _scaled(f):
    return lambda x, y: (x[None].expand(2, -1, -1) / f, y[None].expand(2, -1, -1) / f)


def test_layout_and_scale_pairs():
    layout = _layout()
    assert layout.strides == ((8.0, 8.0), (16.0, 16.0), (32.0, 32.0)) and layout.origins[1] == (0.0, 0.0)
    assert layout.sizes[0] == pytest.approx((32.0, 32 * 2 ** (1 / 3), 32 * 2 ** (2 / 3)))
    assert anchor_scale_pairs(layout, 1.0) == [[[(k, a, 1.0)] for a in range(3)] for k in range(3)]
    # half size: the same anchor type one level up; the top level has no teacher
    assert anchor_scale_pairs(layout, 0.5) == [[[(k + 1, a, 1.0)] for a in range(3)] for k in range(2)] + [[[]] * 3]
    # 0.75: log2(1 / 0.75) = 0.415 octaves up, between types o + 1 and o + 2 (thirds of an octave)
    pairs = anchor_scale_pairs(layout, 0.75)
    t = (math.log2(1 / 0.75) - 1 / 3) * 3
    assert pairs[0][0] == [(0, 1, pytest.approx(1 - t)), (0, 2, pytest.approx(t))]
    assert pairs[0][2] == [(1, 0, pytest.approx(1 - t)), (1, 1, pytest.approx(t))]
    assert pairs[2][2] == []  # above the teacher's largest anchor
    with pytest.raises(ValueError, match="factor must be > 0"):
        anchor_scale_pairs(layout, 0.0)


def test_scale_one_is_the_identity():
    layout, size = _layout(), (64, 96)
    teacher = _maps(layout, size)
    targets, weights = map_teacher_anchors(teacher, layout, [t.shape[-2:] for t in teacher], _scaled(1.0),
                                           size, 1.0)
    for t, got, w in zip(teacher, targets, weights):
        torch.testing.assert_close(got, t, rtol=0, atol=1e-12)
        assert w.shape == (2, 3, *t.shape[-2:]) and bool((w == 1).all())


def test_half_scale_is_the_next_level_downsampled_by_hand():
    """At 0.5 a sub-network's anchor (level k, type a, cell (i, j)), centred at (8j, 8i) * 2^k
    of its image, comes from (16j, 16i) * 2^k: the full network's cell (2i, 2j) of level k —
    a downsample by 2 — but an object there is twice the size, so it is the same anchor
    type at cell (i, j) of level k + 1. The top level has no teacher: weight 0."""
    layout, size = _layout(), (64, 96)
    teacher = _maps(layout, size)
    student = [(math.ceil(32 / s), math.ceil(48 / s)) for s in (8, 16, 32)]  # (4, 6), (2, 3), (1, 2)
    targets, weights = map_teacher_anchors(teacher, layout, student, _scaled(0.5), size, 0.5)
    for k in range(2):
        hs, ws = student[k]
        assert teacher[k + 1].shape[-2:] == (hs, ws)  # level k + 1 is level k's grid downsampled by 2
        want = torch.stack([torch.stack([teacher[k + 1][:, :, i, j] for j in range(ws)], -1) for i in range(hs)], -2)
        torch.testing.assert_close(targets[k], want, rtol=0, atol=1e-12)
        assert bool((weights[k] == 1).all())
    assert targets[2].shape == (2, 6, 1, 2) and bool((weights[2] == 0).all())


def _bilinear(m, cx, cy):
    """m (Ht, Wt) at cell coordinates (cx, cy), clamped to the outermost cells, by hand."""
    ht, wt = m.shape
    cx, cy = min(max(cx, 0.0), wt - 1.0), min(max(cy, 0.0), ht - 1.0)
    x0, y0 = int(math.floor(cx)), int(math.floor(cy))
    x1, y1 = min(x0 + 1, wt - 1), min(y0 + 1, ht - 1)
    fx, fy = cx - x0, cy - y0
    return ((1 - fy) * ((1 - fx) * m[y0, x0] + fx * m[y0, x1]) + fy * ((1 - fx) * m[y1, x0] + fx * m[y1, x1]))


@pytest.mark.parametrize("scale, angle", [(0.75, 0.0), (1.0, 30.0), (0.75, -20.0)])
def test_rescale_and_rotation_equal_a_hand_computation(scale, angle):
    """Every target: the two paired anchor types' maps, each sampled bilinearly by hand at the
    anchor centre's source point (the shared geometry's inverse map), mixed by the pair weights;
    weight 0 where the source point leaves the full network's image."""
    layout, size, c = _layout(), (64, 96), 2
    teacher = _maps(layout, size, c=c)
    geo = AffineGeometry(size[0], size[1], scale, angle, center="pixels")
    factor = math.sqrt(geo.factors[0] * geo.factors[1])
    student = [(math.ceil(geo.size[0] / s), math.ceil(geo.size[1] / s)) for s in (8, 16, 32)]

    def source(x, y):
        sx, sy = geo.inverse_points(x, y)
        return sx[None].expand(2, -1, -1), sy[None].expand(2, -1, -1)

    targets, weights = map_teacher_anchors(teacher, layout, student, source, size, factor)
    pairs = anchor_scale_pairs(layout, factor)
    outside = 0
    for k, (hs, ws) in enumerate(student):
        stride = 8 * 2 ** k
        for i in range(hs):
            for j in range(ws):
                px, py = geo.inverse_points(torch.tensor(j * stride, dtype=torch.float64),
                                            torch.tensor(i * stride, dtype=torch.float64))
                px, py = float(px), float(py)
                inside = 0 <= px <= size[1] and 0 <= py <= size[0]
                outside += not inside
                for a in range(3):
                    assert float(weights[k][0, a, i, j]) == float(inside and bool(pairs[k][a]))
                    for cls in range(c):
                        want = sum(w * _bilinear(teacher[lt][1, at * c + cls], px / (8 * 2 ** lt), py / (8 * 2 ** lt))
                                   for lt, at, w in pairs[k][a])
                        assert float(targets[k][1, a * c + cls, i, j]) == pytest.approx(float(want), abs=1e-6)
    assert (outside > 0) == (angle != 0)  # a rotation brings in corners from outside the image
