"""Sub-network draws (reference semantics) and the detection batch transforms."""
import copy

import numpy as np
import pytest
import torch

from gradaug_det.gradaug import SubnetSampler, SubnetSpec, transform_classification_batch, transform_detection_batch
from gradaug_det.slim import linear_keep_probs


def test_width_draws_follow_the_reference():
    s = SubnetSampler(num_subnets=3, min_width=0.9, max_width=1.0, seed=0)
    for _ in range(200):
        specs = s.sample()
        widths = [x.width for x in specs]
        assert len(widths) == 3 and widths[-1] == 0.9  # smallest always, run last
        assert widths == sorted(widths, reverse=True)  # widest first
        assert all(0.9 <= w <= 1.0 for w in widths)
        assert all(x.scale in (1.0, 0.857, 0.714, 0.571) and x.angle == 0.0 for x in specs)
    no_smallest = SubnetSampler(num_subnets=2, min_width=0.5, smallest_subnet=False, seed=1)
    assert not any(x.width == 0.5 for _ in range(50) for x in no_smallest.sample())


def test_depth_draws_keep_linearly_falling_probabilities():
    s = SubnetSampler(num_subnets=1, sampling="depth", depth_min_keep=0.5, seed=0)
    keeps = np.array([s.sample(num_blocks=5)[0].keep for _ in range(4000)], dtype=float)
    expected = linear_keep_probs(5, 0.5)
    assert expected == pytest.approx([1.0, 0.875, 0.75, 0.625, 0.5])
    assert keeps.mean(0) == pytest.approx(expected, abs=0.03)
    assert keeps[:, 0].min() == 1.0


def test_rotation_and_resume_state():
    s = SubnetSampler(transform="scale_rotate", rotation=(-10, 10), seed=5)
    s.sample()
    state = copy.deepcopy(s.state_dict())
    nxt = [s.sample() for _ in range(3)]
    t = SubnetSampler(transform="scale_rotate", rotation=(-10, 10), seed=99)
    t.load_state_dict(state)
    assert [t.sample() for _ in range(3)] == nxt
    assert all(-10 <= x.angle <= 10 for specs in nxt for x in specs)
    # a checkpoint round trip turns tuples into lists; still restorable
    t.load_state_dict({"rng": [state["rng"][0], list(state["rng"][1]), state["rng"][2]]})
    assert t.sample() == nxt[0]


@pytest.mark.parametrize("kwargs, key", [
    (dict(num_subnets=0), "GRADAUG.NUM_SUBNETS=0"),
    (dict(min_width=0.0), "GRADAUG.MIN_WIDTH=0.0"),
    (dict(max_width=1.2), "GRADAUG.MAX_WIDTH=1.2"),
    (dict(min_width=0.9, max_width=0.8), "GRADAUG.MIN_WIDTH=0.9"),
    (dict(sampling="channels"), "GRADAUG.SAMPLING='channels'"),
    (dict(transform="flip"), "GRADAUG.TRANSFORM='flip'"),
    (dict(scales=()), "GRADAUG.SCALES=()"),
    (dict(rotation=(10, -10)), "GRADAUG.ROTATION"),
    (dict(depth_min_keep=0.0), "GRADAUG.DEPTH_MIN_KEEP=0.0"),
])
def test_invalid_arguments_name_the_key(kwargs, key):
    with pytest.raises(ValueError) as e:
        SubnetSampler(**kwargs)
    assert key in str(e.value)


def test_detection_transform_is_consistent_and_leaves_input_alone(make_batch):
    batch = make_batch(2, 96)
    original = copy.deepcopy(batch)
    teacher = [{"boxes": d["instances"].gt_boxes.tensor.clone(), "logits": torch.randn(2, 4)} for d in batch]
    out, out_t = transform_detection_batch(batch, SubnetSpec(scale=0.5), teacher)
    for d, o, t, ot in zip(original, out, teacher, out_t):
        assert o["image"].shape == (3, 48, 48)
        assert torch.allclose(o["instances"].gt_boxes.tensor, d["instances"].gt_boxes.tensor * 0.5)
        poly = o["instances"].gt_masks.polygons[0][0]
        assert np.allclose(poly, d["instances"].gt_masks.polygons[0][0] * 0.5)
        assert torch.allclose(ot["boxes"], t["boxes"] * 0.5) and torch.equal(ot["logits"], t["logits"])
    for d, b in zip(original, batch):  # the input batch is untouched
        assert torch.equal(d["image"], b["image"])
        assert torch.equal(d["instances"].gt_boxes.tensor, b["instances"].gt_boxes.tensor)
        assert np.array_equal(d["instances"].gt_masks.polygons[0][0], b["instances"].gt_masks.polygons[0][0])
    # rotation by 90 degrees about the centre maps a box to its rotated enclosing box
    rot, rot_t = transform_detection_batch(batch, SubnetSpec(angle=90.0), teacher)
    x0, y0, x1, y1 = batch[0]["instances"].gt_boxes.tensor[0].tolist()
    c = 48.0  # rotation centre (w/2, h/2); counter-clockwise: (x, y) -> (y, 2c - x)
    expected = torch.tensor([y0, 2 * c - x1, y1, 2 * c - x0]).clamp(0, 96)
    assert torch.allclose(rot[0]["instances"].gt_boxes.tensor[0], expected, atol=1e-3)


def test_classification_resize_matches_reference():
    g = torch.Generator().manual_seed(0)
    batch = [{"image": (torch.rand(3, 224, 224, generator=g) * 255).to(torch.uint8), "class_id": i} for i in range(2)]
    out = transform_classification_batch(batch, SubnetSpec(scale=0.571))
    assert out[0]["image"].shape == (3, 128, 128)
    ref = torch.nn.functional.interpolate(batch[1]["image"][None].float(), size=(128, 128), mode="bilinear",
                                          align_corners=True)[0]
    assert torch.allclose(out[1]["image"], ref)
    assert out[1]["class_id"] == 1 and batch[1]["image"].shape == (3, 224, 224)
