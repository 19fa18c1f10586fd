"""SlimLinear: a sliced nn.Linear at width < 1, exactly nn.Linear at width 1.0."""
import pytest
import torch
from torch import nn

import gradaug_det
from gradaug_det.slim import SlimLinear, slim_channels


def _pair(in_features=10, out_features=3, divisor=1):
    torch.manual_seed(0)
    slim = SlimLinear(in_features, out_features, divisor=divisor)
    ref = nn.Linear(in_features, out_features)
    ref.load_state_dict(slim.state_dict())
    return slim, ref


def test_width_one_is_linear():
    slim, ref = _pair()
    x = torch.randn(5, 10)
    assert torch.equal(slim(x), ref(x))
    assert set(slim.state_dict()) == {"weight", "bias"}


@pytest.mark.parametrize("w,divisor", [(0.9, 1), (0.5, 1), (0.33, 1), (0.7, 4)])
def test_slimmed_equals_sliced_linear(w, divisor):
    slim, ref = _pair(divisor=divisor)
    keep = slim_channels(10, w, divisor)
    assert keep < 10
    x = torch.randn(5, 10)
    expected = x[:, :keep] @ ref.weight[:, :keep].T + ref.bias
    with gradaug_det.width(slim, w):
        assert slim.active_in_features() == keep
        narrow = slim(x[:, :keep])
        padded = slim(torch.cat([x[:, :keep], torch.zeros(5, 10 - keep)], 1))
        full = slim(x)  # a full-size input: its leading features are used
    assert narrow.shape == (5, 3)  # the classes are never slimmed
    torch.testing.assert_close(narrow, expected)
    torch.testing.assert_close(padded, expected)
    torch.testing.assert_close(full, expected)
    assert slim.width == 1.0


def test_wrong_input_size_names_the_counts():
    slim, _ = _pair()
    with gradaug_det.width(slim, 0.5), pytest.raises(RuntimeError, match="expects 5 or 10"):
        slim(torch.randn(2, 7))


def test_width_api_reaches_it():
    model = nn.Sequential(nn.ReLU(), SlimLinear(8, 2))
    gradaug_det.set_width(model, 0.75)
    assert model[1].width == 0.75 and gradaug_det.get_width(model) == 0.75
