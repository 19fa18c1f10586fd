"""ClassificationEvaluator top-k on crafted logits; FGSM on a tiny trained model."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import CfgNode

from gradaug_det.evaluation import ClassificationEvaluator, FGSMEvaluator, evaluate_classifier, fgsm_key


def fgsm_accuracy(model, data_loader, epsilons):
    """FGSM top-1 through evaluate_classifier, what --eval-only and the trainer's test call."""
    cfg = CfgNode({"TEST": {"TOPK": (1,), "FGSM_EPSILONS": list(epsilons)}})
    return evaluate_classifier(cfg, model, "generated", data_loader=data_loader)["fgsm"]


def test_topk_on_crafted_logits():
    ev = ClassificationEvaluator("crafted", topk=(1, 2, 5), distributed=False)
    ev.reset()
    logits = torch.tensor([
        [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # true 0: top-1
        [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # true 1: top-2
        [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # true 4: top-5
        [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # true 5: not in top-5
    ])
    targets = [0, 1, 4, 5]
    ev.process([{"class_id": t} for t in targets[:2]], [{"logits": l} for l in logits[:2]])
    ev.process([{"class_id": t} for t in targets[2:]], [{"logits": l} for l in logits[2:]])
    res = ev.evaluate()
    assert list(res) == ["classification"]
    assert res["classification"]["top1"] == pytest.approx(25.0)
    assert res["classification"]["top2"] == pytest.approx(50.0)
    assert res["classification"]["top5"] == pytest.approx(75.0)


def test_topk_larger_than_classes():
    ev = ClassificationEvaluator(topk=(1, 5), distributed=False)
    ev.process([{"class_id": 1}, {"class_id": 0}], [{"logits": torch.tensor([0.0, 1.0])},
                                                  {"logits": torch.tensor([0.0, 1.0])}])
    assert ev.evaluate()["classification"] == {"top1": 50.0, "top5": 100.0}


class TinyClassifier(nn.Module):
    """A detectron2-style classifier on flat 2x4x4 'images' (0-255)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(32, 2)

    def forward(self, batched_inputs):
        x = torch.stack([d["image"].float() for d in batched_inputs]) / 255.0 - 0.5
        logits = self.head(x.flatten(1))
        if self.training:
            target = torch.tensor([d["class_id"] for d in batched_inputs])
            return {"loss_cls": F.cross_entropy(logits, target)}
        return [{"logits": row} for row in logits]


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = []
    for i in range(n):
        c = i % 2
        image = torch.randint(0, 90, (2, 4, 4), generator=g).float()
        image[c] += 120  # the class is the brighter channel, by a margin of various sizes
        image[c] -= torch.randint(0, 110, (1,), generator=g).float()
        data.append({"image": image.clamp(0, 255).to(torch.uint8), "class_id": c})
    return data


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = TinyClassifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    data = _data()
    for _ in range(30):
        loss = model(data)["loss_cls"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    return model


def test_fgsm_eps0_is_clean_and_accuracy_falls(trained):
    loader = [b for b in (_data(seed=1)[i:i + 16] for i in range(0, 64, 16))]
    ev = ClassificationEvaluator(topk=(1,), distributed=False)
    with torch.no_grad():
        for inputs in loader:
            ev.process(inputs, trained(inputs))
    clean = ev.evaluate()["classification"]["top1"]
    eps = [0.0, 0.02, 0.05, 0.1, 0.3]
    acc = fgsm_accuracy(trained, loader, eps)
    assert list(acc) == [fgsm_key(e) for e in eps]
    values = list(acc.values())
    assert clean > 80.0
    assert values[0] == pytest.approx(clean)
    assert all(b <= a for a, b in zip(values, values[1:]))
    assert values[-1] < clean - 30
    assert not trained.training and all(p.grad is None for p in trained.parameters())


def test_fgsm_evaluator_inside_no_grad(trained):
    ev = FGSMEvaluator(trained, [0.0, 0.3], distributed=False)
    ev.reset()
    data = _data(seed=1)
    with torch.no_grad():  # as in detectron2's inference_on_dataset
        ev.process(data, trained(data))
    res = ev.evaluate()["fgsm"]
    direct = fgsm_accuracy(trained, [data], [0.0, 0.3])
    assert res == pytest.approx(dict(direct))


def test_fgsm_epsilon_range():
    with pytest.raises(ValueError, match="TEST.FGSM_EPSILONS"):
        FGSMEvaluator(nn.Linear(1, 1), [8.0])
