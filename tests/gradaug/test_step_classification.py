"""One GradAug iteration of the ImageNet classifier equals the reference computed by hand."""
import copy

import torch
import torch.nn.functional as F
from detectron2.modeling import build_model

import gradaug_det
from gradaug_det.engine.setup import get_gradaug_cfg
from gradaug_det.gradaug import ClassificationTask, SubnetSampler, gradaug_step


def _classifier():
    cfg = get_gradaug_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = "SlimmableClassifier"
    cfg.MODEL.BACKBONE.NAME = "build_slimmable_resnet_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    cfg.MODEL.CLASSIFIER.NUM_CLASSES = 6
    torch.manual_seed(0)
    return build_model(cfg)


def test_classification_iteration_matches_reference_by_hand():
    model = _classifier()
    model.train()
    g = torch.Generator().manual_seed(1)
    batch = [{"image": (torch.rand(3, 64, 64, generator=g) * 255).to(torch.uint8), "class_id": i % 6}
             for i in range(4)]
    sampler = SubnetSampler(num_subnets=3, min_width=0.5, max_width=1.0, scales=(0.75, 0.5), seed=2)
    specs = copy.deepcopy(sampler).sample()
    state = copy.deepcopy(model.state_dict())
    gradaug_step(model, batch, sampler, ClassificationTask(model))
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}

    # by hand: reference GradAug (CE on the full net, KL batchmean to its detached softmax)
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)
    mean = model.pixel_mean.view(1, -1, 1, 1)
    std = model.pixel_std.view(1, -1, 1, 1)
    images = torch.stack([d["image"] for d in batch]).float()
    labels = torch.tensor([d["class_id"] for d in batch])

    def logits(x):
        return model.head(model.backbone((x - mean) / std)["res5"].mean(dim=(2, 3)))

    full = logits(images)
    F.cross_entropy(full, labels).backward()
    teacher = F.softmax(full.detach(), dim=1)
    for spec in specs:
        gradaug_det.set_width(model, spec.width)
        size = int(round(64 * spec.scale))
        x = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=True)
        log_q = F.log_softmax(logits(x), dim=1)
        ((teacher * (teacher.log() - log_q)).sum() / len(batch)).backward()
    gradaug_det.set_width(model, 1.0)
    worst = max((ours[n] - p.grad).abs().max().item() for n, p in model.named_parameters())
    assert worst < 1e-5, worst
    assert any(s.width < 1.0 for s in specs) and any(s.scale < 1.0 for s in specs)
