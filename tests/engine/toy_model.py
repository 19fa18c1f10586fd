"""A small slimmable classifier for engine tests (CPU, gloo): no RoI sampling randomness,
FrozenBN so per-process batches give the same gradients as one global batch."""
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import ShapeSpec

from gradaug_det.engine.setup import get_gradaug_cfg
from gradaug_det.modeling.resnet import make_slimmable_resnet

NUM_CLASSES = 5


class ToyClassifier(nn.Module):
    """Slimmable R18 + linear head, detectron2-style list-of-dicts input."""

    def __init__(self, norm="FrozenBN"):
        super().__init__()
        cfg = get_gradaug_cfg()
        cfg.MODEL.RESNETS.DEPTH = 18
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
        cfg.MODEL.RESNETS.NORM = norm
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
        cfg.MODEL.BACKBONE.FREEZE_AT = 0
        self.backbone = make_slimmable_resnet(cfg, ShapeSpec(channels=3))
        self.head = nn.Linear(512, NUM_CLASSES)

    def forward(self, batched_inputs):
        x = torch.stack([d["image"] for d in batched_inputs]).to(self.head.weight.dtype) / 255.0
        logits = self.head(self.backbone(x)["res5"].mean(dim=(2, 3)))
        if not self.training:
            return logits
        if "soft_label" in batched_inputs[0]:
            soft = torch.stack([d["soft_label"] for d in batched_inputs]).to(logits.dtype)
            return {"loss_cls": F.kl_div(F.log_softmax(logits, 1), soft, reduction="batchmean")}
        labels = torch.tensor([d["class_id"] for d in batched_inputs])
        return {"loss_cls": F.cross_entropy(logits, labels)}


def toy_batch(n, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return [{"image": (torch.rand(3, size, size, generator=g) * 255).to(torch.uint8),
             "class_id": int(torch.randint(0, NUM_CLASSES, (1,), generator=g))} for _ in range(n)]


def grads(model):
    return {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters()}
