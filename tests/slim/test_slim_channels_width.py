"""The channel rule (``slim_channels``) and the width API (set_width / get_width / width)."""
import pytest
from torch import nn

from gradaug_det.slim import SlimConv2d, check_width, get_width, set_width, slim_channels, width


@pytest.mark.parametrize(
    "channels, w, expected",
    [
        (64, 0.9, 58),  # 57.6 -> 58
        (128, 0.9, 115),  # 115.2 -> 115
        (256, 0.9, 230),  # 230.4 -> 230
        (512, 0.9, 461),  # 460.8 -> 461
        (1024, 0.9, 922),  # 921.6 -> 922
        (2048, 0.9, 1843),  # 1843.2 -> 1843
        (64, 0.75, 48),
        (64, 0.5, 32),
        (2048, 0.5, 1024),
        (5, 0.5, 3),  # 2.5 rounds half up
        (3, 0.5, 2),  # 1.5 rounds half up
        (10, 0.25, 3),  # 2.5 rounds half up
        (7, 0.5, 4),  # 3.5 rounds half up
        (7, 0.3, 2),  # 2.1 -> 2
        (1, 0.5, 1),  # 0.5 -> 1
        (3, 0.1, 1),  # 0.3 -> min 1
        (100, 0.001, 1),  # 0.1 -> min 1
        (64, 1.0, 64),
        (3, 1.0, 3),
    ],
)
def test_slim_channels_reference_rule(channels, w, expected):
    assert slim_channels(channels, w) == expected
    assert slim_channels(channels, w, 1) == expected


@pytest.mark.parametrize(
    "channels, w, divisor, expected",
    [
        (64, 0.9, 8, 56),  # 7.2 groups of 8 -> 7
        (128, 0.9, 8, 112),  # 14.4 -> 14
        (256, 0.9, 8, 232),  # 28.8 -> 29
        (512, 0.9, 8, 464),  # 57.6 -> 58
        (64, 0.75, 8, 48),
        (64, 0.5, 8, 32),
        (40, 0.5, 8, 24),  # 2.5 groups rounds half up -> 3
        (24, 0.5, 8, 16),  # 1.5 -> 2
        (64, 0.05, 8, 8),  # 0.4 -> 0 -> min divisor
        (64, 0.01, 16, 16),  # min divisor
        (20, 0.9, 8, 16),  # 2.25 -> 2
        (20, 0.99, 8, 16),  # 19.8 / 8 = 2.475 -> 2 groups of 8
        (12, 0.99, 8, 8),  # 11.88/8 = 1.485 -> 1 -> 8
        (12, 0.7, 16, 12),  # min divisor 16 capped at the layer's 12
        (4, 0.5, 8, 4),  # divisor larger than the layer: whole layer
        (2048, 0.9, 64, 1856),  # 28.8 -> 29 groups of 64
        (64, 1.0, 8, 64),
    ],
)
def test_slim_channels_divisor(channels, w, divisor, expected):
    assert slim_channels(channels, w, divisor) == expected


@pytest.mark.parametrize("divisor", [1, 2, 8, 16, 64])
def test_slim_channels_bounds(divisor):
    for channels in (1, 3, 7, 8, 15, 64, 100, 256, 2048):
        previous = 0
        for step in range(1, 101):
            w = step / 100
            kept = slim_channels(channels, w, divisor)
            assert kept <= channels, (channels, w, divisor, kept)
            assert kept >= min(divisor, channels), (channels, w, divisor, kept)  # hence >= 1
            if kept < channels:
                assert kept % divisor == 0
            assert kept >= previous, "the kept count must not shrink as the width grows"
            previous = kept
        assert slim_channels(channels, 1.0, divisor) == channels


def test_slim_channels_rejects_bad_divisor():
    with pytest.raises(ValueError, match="divisor"):
        slim_channels(64, 0.5, 0)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, 1.0000001, float("nan"), float("inf"), "a", None, [0.5]])
def test_check_width_rejects(bad):
    with pytest.raises(ValueError) as info:
        check_width(bad)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("good", [1, 1.0, 0.9, 0.5, 1e-3])
def test_check_width_accepts(good):
    assert check_width(good) == float(good)
    assert isinstance(check_width(good), float)


def _toy():
    """A module tree with three slimmable convolutions and one stock layer."""
    return nn.Sequential(
        SlimConv2d(3, 8, 3, slim_in=False),
        nn.ReLU(),
        nn.Sequential(SlimConv2d(8, 8, 1), nn.Conv2d(8, 8, 1)),
        SlimConv2d(8, 4, 1, slim_out=False),
    )


def _widths(model):
    return [m.width for m in model.modules() if isinstance(m, SlimConv2d)]


def test_set_and_get_width():
    model = _toy()
    assert get_width(model) == 1.0
    set_width(model, 0.75)
    assert _widths(model) == [0.75, 0.75, 0.75]
    assert get_width(model) == 0.75
    set_width(model, 1)
    assert _widths(model) == [1.0, 1.0, 1.0]
    assert get_width(nn.Conv2d(1, 1, 1)) == 1.0  # nothing slimmable


def test_get_width_mixed_raises():
    model = _toy()
    model[0].width = 0.5
    with pytest.raises(RuntimeError, match="mixed"):
        get_width(model)


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan"), "a"])
def test_set_width_rejects_and_leaves_model(bad):
    model = _toy()
    set_width(model, 0.9)
    with pytest.raises(ValueError) as info:
        set_width(model, bad)
    assert repr(bad) in str(info.value)
    assert _widths(model) == [0.9, 0.9, 0.9]
    with pytest.raises(ValueError) as info:
        with width(model, bad):
            pytest.fail("the body must not run for an invalid width")
    assert repr(bad) in str(info.value)
    assert _widths(model) == [0.9, 0.9, 0.9]


def test_width_context_restores_previous_widths():
    model = _toy()
    model[0].width = 0.5  # deliberately mixed: each layer gets its own width back
    with width(model, 0.75) as m:
        assert m is model
        assert _widths(model) == [0.75, 0.75, 0.75]
        with width(model, 0.25):
            assert get_width(model) == 0.25
        assert _widths(model) == [0.75, 0.75, 0.75]
    assert _widths(model) == [0.5, 1.0, 1.0]


def test_width_context_restores_when_body_raises():
    model = _toy()
    set_width(model, 0.9)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with width(model, 0.5):
            assert get_width(model) == 0.5
            raise Boom()
    assert _widths(model) == [0.9, 0.9, 0.9]


def test_linear_keep_probs():
    from gradaug_det.slim import linear_keep_probs

    probs = linear_keep_probs(16, 0.8)
    assert len(probs) == 16
    assert probs[0] == 1.0 and abs(probs[-1] - 0.8) < 1e-12
    steps = [a - b for a, b in zip(probs, probs[1:])]
    assert all(abs(s - 0.2 / 15) < 1e-12 for s in steps)
    assert linear_keep_probs(1, 0.5) == [1.0]
    assert linear_keep_probs(3, 0.5) == [1.0, 0.75, 0.5]
