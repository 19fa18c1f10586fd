"""SlimmableClassifier: build from config, train/eval outputs, the two losses."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import gradaug_det
from gradaug_det import add_gradaug_config
from gradaug_det.slim import SlimLinear

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "imagenet"


def tiny_cfg(num_classes=5):
    cfg = add_gradaug_config(get_cfg())
    cfg.merge_from_file(str(CONFIGS / "quickstart.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.CLASSIFIER.NUM_CLASSES = num_classes
    return cfg


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_cfg())


def _batch(n=4, size=32, soft=False, num_classes=5):
    g = torch.Generator().manual_seed(1)
    batch = [{"image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g),
              "class_id": i % num_classes} for i in range(n)]
    if soft:
        probs = torch.rand(n, num_classes, generator=g)
        probs = probs / probs.sum(1, keepdim=True)
        for d, p in zip(batch, probs):
            d["soft_label"] = p
    return batch


def _hooked_logits(model, batch):
    seen = []
    handle = model.head.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        out = model(batch)
    finally:
        handle.remove()
    return out, seen[0]


def test_structure(model):
    assert type(model).__name__ == "SlimmableClassifier"
    assert isinstance(model.head, SlimLinear) and model.head.out_features == 5
    assert model.head.in_features == 512
    assert torch.all(model.head.bias == 0) and 0.005 < model.head.weight.std() < 0.02
    names = list(model.state_dict())
    assert all(n.startswith(("backbone.", "head.")) for n in names)
    assert "backbone.res5.1.conv2.weight" in names and "backbone.stem.conv1.norm.running_mean" in names
    assert model.pixel_mean.flatten().tolist() == pytest.approx([123.675, 116.28, 103.53])


def test_train_cross_entropy(model):
    model.train()
    batch = _batch()
    out, logits = _hooked_logits(model, batch)
    assert set(out) == {"loss_cls"}
    target = torch.tensor([d["class_id"] for d in batch])
    torch.testing.assert_close(out["loss_cls"], F.cross_entropy(logits, target))


def test_label_smoothing():
    cfg = tiny_cfg()
    cfg.MODEL.CLASSIFIER.LABEL_SMOOTHING = 0.1
    model = build_model(cfg).train()
    batch = _batch()
    out, logits = _hooked_logits(model, batch)
    target = torch.tensor([d["class_id"] for d in batch])
    torch.testing.assert_close(out["loss_cls"], F.cross_entropy(logits, target, label_smoothing=0.1))


def test_soft_label_kl_loss_and_gradient(model):
    model.train()
    batch = _batch(soft=True)
    grads = []

    def keep_grad(module, inputs, output):
        output.register_hook(grads.append)

    handle = model.head.register_forward_hook(keep_grad)
    try:
        loss = model(batch)["loss_cls"]
        loss.backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    _, logits = _hooked_logits(model, batch)
    p = torch.stack([d["soft_label"] for d in batch])
    expected = (p * (p.log() - F.log_softmax(logits, 1))).sum() / len(batch)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # d loss / d logits = (softmax(s) - p) / N
    torch.testing.assert_close(grads[0], (F.softmax(logits.detach(), 1) - p) / len(batch), rtol=1e-4, atol=1e-7)


def test_mixed_soft_and_hard_batch_is_an_error(model):
    model.train()
    batch = _batch(soft=True)
    del batch[0]["soft_label"]
    with pytest.raises(ValueError, match="soft_label"):
        model(batch)


def test_eval_logits_at_two_widths(model):
    model.eval()
    batch = _batch(n=3)
    with torch.no_grad():
        out = model(batch)
        with gradaug_det.width(model, 0.9):
            out_slim = model(batch)
    assert len(out) == 3 and out[0]["logits"].shape == (5,)
    assert len(out_slim) == 3 and out_slim[0]["logits"].shape == (5,)
    assert not torch.allclose(out[0]["logits"], out_slim[0]["logits"])
    assert gradaug_det.get_width(model) == 1.0


def test_slimmed_training_pass(model):
    model.train()
    with gradaug_det.width(model, 0.5):
        loss = model(_batch())["loss_cls"]
    loss.backward()
    model.zero_grad(set_to_none=True)


def test_images_of_different_sizes_are_rejected(model):
    batch = _batch(n=2)
    batch[1]["image"] = batch[1]["image"][:, :16]
    with pytest.raises(ValueError, match="CROP_SIZE"):
        model(batch)


def test_bad_out_features():
    cfg = tiny_cfg()
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res4", "res5"]
    with pytest.raises(ValueError, match="OUT_FEATURES"):
        build_model(cfg)
