"""LazyConfig path: the slimmable lazy model equals the yacs one; its GradAug trainer steps."""
import os

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import gradaug_det
from gradaug_det.engine import GradAugSimpleTrainer
from gradaug_det.engine.lazy import build_lazy_step_trainer, needs_unused_parameter_search_lazy
from gradaug_det.engine.setup import get_gradaug_cfg
from gradaug_det.modeling import SlimBottleneckBlock, SlimmableFPN

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAZY = os.path.join(ROOT, "configs", "lazy", "mask_rcnn_gradaug_R_50_FPN_1x.py")


class _Loader:
    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


def test_lazy_config_builds_the_yacs_model_and_trains_with_gradaug(make_batch):
    cfg = LazyConfig.load(LAZY)
    model = instantiate(cfg.model)
    assert isinstance(model.backbone, SlimmableFPN)
    assert isinstance(model.backbone.bottom_up.res3[0], SlimBottleneckBlock)
    yacs = get_gradaug_cfg()
    yacs.merge_from_file(os.path.join(ROOT, "configs", "mask_rcnn_gradaug.yaml"))
    yacs.MODEL.DEVICE = "cpu"
    ref = build_model(yacs)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert needs_unused_parameter_search_lazy(cfg)  # "soft" sub-network loss under DDP

    cfg.gradaug.subnet_loss = "gt+soft"
    cfg.gradaug.num_subnets = 1
    model.train()
    optim = torch.optim.SGD(model.parameters(), lr=1e-3)
    trainer = build_lazy_step_trainer(cfg, model, _Loader(make_batch(1, 64)), optim)
    assert isinstance(trainer, GradAugSimpleTrainer)
    with EventStorage(0) as storage:
        trainer.iter = 0
        trainer.run_step()
    latest = storage.latest()
    assert "gradaug/sub0/loss_soft_cls" in latest and "gradaug/sub0/loss_mask" in latest
    assert gradaug_det.get_width(model) == 1.0
