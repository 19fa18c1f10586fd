"""cutmix(): label mass, area-corrected lam, determinism, the images it mixes."""
import pytest
import torch

from gradaug_det.data.classification import CutMix, cutmix


def _batch(n=6, size=20, num_classes=5):
    return [{"image": torch.full((3, size, size), i * 10, dtype=torch.uint8), "class_id": i % num_classes,
             "file_name": f"{i}.jpg"} for i in range(n)]


def test_label_mass_and_lam():
    batch = _batch()
    for seed in range(10):
        out = cutmix(batch, 1.0, torch.Generator().manual_seed(seed), num_classes=5)
        lam = out[0]["cutmix_lam"]
        for i, d in enumerate(out):
            soft = d["soft_label"]
            assert soft.shape == (5,) and soft.sum().item() == pytest.approx(1.0)
            assert torch.all(soft >= 0)
            # lam is the fraction of image i's own pixels that survived
            own = (d["image"] == i * 10).float().mean().item()
            assert d["cutmix_lam"] == lam
            if (d["image"] != i * 10).any():  # mixed with another image
                assert own == pytest.approx(lam)
                assert soft[batch[i]["class_id"]].item() >= lam - 1e-6
            assert d["image"].dtype == torch.uint8
        # the input batch is left untouched
        assert all((b["image"] == i * 10).all() and "soft_label" not in b for i, b in enumerate(batch))


def test_lam_follows_the_box_area_on_average():
    batch = _batch(n=2)
    lams = [cutmix(batch, 1.0, torch.Generator().manual_seed(s), num_classes=5)[0]["cutmix_lam"]
            for s in range(400)]
    mean = sum(lams) / len(lams)
    # Beta(1, 1): the box side is sqrt(u) of the image side, u ~ U(0, 1); clipping at the border
    # keeps E[(s - s^2/4)^2] = 0.321 of the area on average, so E[lam] ~ 0.68 (a bit more with
    # the integer box sides of a 20 px image).
    assert 0.62 < mean < 0.78


def test_deterministic_given_generator():
    batch = _batch()
    a = cutmix(batch, 1.0, torch.Generator().manual_seed(3), num_classes=5)
    b = cutmix(batch, 1.0, torch.Generator().manual_seed(3), num_classes=5)
    c = cutmix(batch, 1.0, torch.Generator().manual_seed(4), num_classes=5)
    assert all(torch.equal(x["image"], y["image"]) and torch.equal(x["soft_label"], y["soft_label"])
               for x, y in zip(a, b))
    assert any(not torch.equal(x["image"], y["image"]) for x, y in zip(a, c))


def test_prob_zero_gives_one_hot():
    out = cutmix(_batch(), 1.0, torch.Generator().manual_seed(0), num_classes=5, prob=0.0)
    for i, d in enumerate(out):
        assert d["cutmix_lam"] == 1.0 and d["soft_label"].argmax().item() == i % 5
        assert d["soft_label"].max().item() == 1.0


def test_bad_alpha_names_the_key():
    with pytest.raises(ValueError, match="INPUT.CUTMIX.ALPHA"):
        cutmix(_batch(), 0.0, torch.Generator(), num_classes=5)


def test_cutmix_object_state_round_trip():
    mixer = CutMix(alpha=1.0, prob=1.0, num_classes=5, seed=7)
    state = mixer.state_dict()
    first = mixer(_batch())
    mixer.load_state_dict(state)
    again = mixer(_batch())
    assert all(torch.equal(x["soft_label"], y["soft_label"]) for x, y in zip(first, again))


def test_cutmix_state_resumes_every_rank_its_own_draws():
    """Rank 0 writes the checkpoint; every rank (its own seed) resumes its own draws from it."""
    ranks = [CutMix(alpha=1.0, prob=1.0, num_classes=5, seed=1000 + r + 1) for r in range(2)]
    for _ in range(3):
        for m in ranks:
            m(_batch())
    state = ranks[0].state_dict()  # what rank 0 saves
    expected = [m(_batch()) for m in ranks]  # the uninterrupted run's 4th draws
    assert not all(torch.equal(x["soft_label"], y["soft_label"]) for x, y in zip(*expected))  # ranks differ
    for r in range(2):
        resumed = CutMix(alpha=1.0, prob=1.0, num_classes=5, seed=1000 + r + 1)
        resumed.load_state_dict(state)
        got = resumed(_batch())
        assert all(torch.equal(x["soft_label"], y["soft_label"]) and torch.equal(x["image"], y["image"])
                   for x, y in zip(got, expected[r])), r
    with pytest.raises(ValueError, match="gradaug-det 0.1.0"):
        resumed.load_state_dict({"generator": torch.Generator().get_state()})
