"""Issue 10 §4, MMDetection: SlimmableResNet / SlimmableFPN in mmdet's own Faster R-CNN,
Mask R-CNN, Cascade (Mask) R-CNN and RetinaNet configs (as installed with mmdet), GradAug
on: two iterations on the project's generated shapes data with finite losses, or refused
when the model is built, naming the key and what to set.

The models are made small (R18, 32-channel FPN and heads, few proposals and RoIs) by
rewriting the configs' channel and sampling numbers; the structure is mmdet's.
"""
import copy
import math
import os

import mmdet
import pytest
import torch
from mmengine.config import Config
from mmengine.optim import OptimWrapper

CONFIG_DIR = os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs")

# config -> {subnet_loss: "trains" or the refusal's text}
MATRIX = {
    "faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py": {"gt": "trains", "soft": "trains"},
    "mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py": {"gt": "trains", "soft": "trains"},
    "cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py": {"gt": "trains", "soft": "trains"},
    "cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py": {"gt": "trains", "soft": "trains"},
    "retinanet/retinanet_r50_fpn_1x_coco.py": {"gt": "trains", "soft": "trains", "gt+soft": "trains"},
}
CASES = [(c, loss) for c, losses in MATRIX.items() for loss in losses]

_SMALL = {"in_channels": (256, 32), "out_channels": (256, 32), "feat_channels": (256, 32),
          "conv_out_channels": (256, 32), "fc_out_channels": (1024, 64), "num": (512, 32),
          "nms_pre": (2000, 200), "max_per_img": (1000, 50)}


def _shrink(node):
    """Small channel counts, proposals and RoI samples throughout a model config."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k in _SMALL and v == _SMALL[k][0]:
                node[k] = _SMALL[k][1]
            else:
                _shrink(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            _shrink(v)


def zoo_gradaug_cfg(config: str, subnet_loss: str) -> dict:
    """mmdet's model config with the slimmable twins, made small, as its GradAug detector."""
    model = Config.fromfile(os.path.join(CONFIG_DIR, config)).model  # a ConfigDict: mmdet reads train_cfg.rpn
    _shrink(model)
    model["type"] = "GradAug" + model["type"]
    model["backbone"].update(type="SlimmableResNet", depth=18, init_cfg=None)
    model["neck"].update(type="SlimmableFPN", in_channels=[64, 128, 256, 512])
    model["gradaug"] = dict(subnet_loss=subnet_loss, seed=1)
    return model


@pytest.mark.parametrize("config,subnet_loss", CASES, ids=[f"{c.split('/')[1][:-3]}-{s}" for c, s in CASES])
def test_zoo_config_trains_two_iterations_or_is_refused(config, subnet_loss, detector, make_batch):
    cfg = zoo_gradaug_cfg(config, subnet_loss)
    if MATRIX[config][subnet_loss] == "refused":
        with pytest.raises(ValueError, match=r"model\.gradaug\.subnet_loss='gt'"):
            detector(cfg)
        return
    model = detector(copy.deepcopy(cfg))
    model.train()
    ow = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for it in range(2):
        log_vars = model.train_step(make_batch((2 * it, 2 * it + 1)), ow)
        assert math.isfinite(float(log_vars["loss"])) and float(log_vars["loss"]) > 0
        for i in range(3):
            sub = {k: float(v) for k, v in log_vars.items() if k.startswith(f"gradaug/sub{i}/loss")}
            assert sub and all(math.isfinite(v) for v in sub.values()), (i, sub)
            soft = f"gradaug/sub{i}/loss_soft_cls"
            if "gt" in subnet_loss:  # the sub-networks learn from the rescaled annotations
                assert any("cls" in k and k != soft for k in sub) and (soft in sub) == ("soft" in subnet_loss)
            else:
                assert set(sub) == {soft}
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert any(n.startswith("backbone.") for n in changed) and any(n.startswith("neck.") for n in changed)
