"""The slimmable twin of detectron2's ``build_retinanet_resnet_fpn_backbone`` (issue 10 §4):
same keys, same state dict, the same outputs at width 1.0, and a sub-width forward equal to
the physically narrow stock network (P6/P7 from the kept C5 channels)."""
import os

import pytest
import torch

from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, build_model
from detectron2.modeling.backbone.fpn import LastLevelP6P7

import gradaug_det
from gradaug_det.modeling import SLIMMABLE_TWINS, SlimLastLevelP6P7
from gradaug_det.slim import SlimConv2d

CONFIGS = {
    "R18": dict(depth=18),
    "R50-BN": dict(depth=50, MODEL__RESNETS__NORM="BN", MODEL__BACKBONE__FREEZE_AT=0),
}


def _input(size=64, seed=1, dtype=torch.float32):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_every_stock_resnet_builder_has_a_registered_twin():
    stock = {name for name in BACKBONE_REGISTRY._obj_map if "resnet" in name and "slimmable" not in name
             and "pruned" not in name}
    assert stock == set(SLIMMABLE_TWINS)
    assert all(twin in BACKBONE_REGISTRY for twin in SLIMMABLE_TWINS.values())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_retinanet_fpn_is_stock_at_full_width(bb, name):
    cfg = bb.make_cfg(**CONFIGS[name])
    stock, slim = bb.stock_and_slim(cfg, fpn="retinanet")
    sd_stock, sd_slim = stock.state_dict(), slim.state_dict()
    assert [(k, v.shape) for k, v in sd_stock.items()] == [(k, v.shape) for k, v in sd_slim.items()]
    assert "top_block.p6.weight" in sd_slim and "top_block.p7.bias" in sd_slim
    assert isinstance(slim.top_block.p6, SlimConv2d) and isinstance(slim.top_block.p7, SlimConv2d)
    assert stock.output_shape() == slim.output_shape()
    assert list(slim.output_shape()) == ["p2", "p3", "p4", "p5", "p6", "p7"]
    for train in ((False, True) if cfg.MODEL.RESNETS.NORM == "BN" else (False,)):
        stock.train(train), slim.train(train)
        a, b = stock(_input()), slim(_input())
        assert list(a) == list(b)
        for k in a:  # the same code runs at width 1.0: bit-identical
            assert torch.equal(a[k], b[k]), k
    for k, v in stock.state_dict().items():  # BN statistics moved identically
        assert torch.equal(slim.state_dict()[k], v), k


def test_stock_initialisation_of_p6_p7():
    """P6/P7 keep detectron2's c2_xavier_fill init (zero bias, kaiming-uniform a=1 weights)."""
    torch.manual_seed(0)
    stock = LastLevelP6P7(64, 32)
    torch.manual_seed(0)
    slim = SlimLastLevelP6P7(64, 32)
    for k, v in stock.state_dict().items():
        assert torch.equal(slim.state_dict()[k], v), k


@pytest.mark.parametrize("name, w, slim_fpn", [("R18", 0.5, True), ("R18", 0.75, False), ("R50-BN", 0.6, True)])
def test_retinanet_fpn_sub_width_equals_sliced_stock(bb, name, w, slim_fpn):
    """Compared in float64: the claim is equality of two orderings of the same sums."""
    cfg = bb.make_cfg(**CONFIGS[name])
    cfg.MODEL.SLIMMABLE.SLIM_FPN = slim_fpn
    _, slim = bb.stock_and_slim(cfg, fpn="retinanet")
    slim.double()
    channels = {k: s.channels for k, s in slim.output_shape().items()}
    for train in ((False, True) if cfg.MODEL.RESNETS.NORM == "BN" else (False,)):
        slim.train(train)
        ref = bb.sliced_reference(cfg, slim, w, fpn="retinanet")
        x = _input(dtype=torch.float64)
        with gradaug_det.width(slim, w):
            out = slim(x)
        expected = ref(x)
        assert expected["p6"].shape[1] < 2048 and "p7" in expected
        if slim_fpn:
            bb.assert_sub_width(out, expected, channels, rel=1e-10)
        else:  # full-width FPN and P6/P7 on a slimmed bottom-up network
            bb.assert_same(out, expected, rel=1e-10)
    assert {k: s.channels for k, s in slim.output_shape().items()} == channels


def test_retinanet_needs_res5():
    cfg = gradaug_det.add_gradaug_config(get_cfg())
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.OUT_FEATURES = cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4"]
    with pytest.raises(ValueError, match="OUT_FEATURES.*res5"):
        BACKBONE_REGISTRY.get("build_slimmable_retinanet_resnet_fpn_backbone")(cfg, ShapeSpec(channels=3))


def test_model_zoo_retinanet_with_twin_loads_stock_weights_and_matches():
    """detectron2's own ``retinanet_R_50_FPN_1x.yaml`` (shrunk to R18, no add_gradaug_config):
    only the builder name changes; the stock model's weights load strictly and every
    detection is the same."""
    import detectron2

    path = os.path.join(os.path.dirname(detectron2.__file__), "model_zoo", "configs", "COCO-Detection",
                        "retinanet_R_50_FPN_1x.yaml")
    cfg = get_cfg()
    cfg.merge_from_file(path)
    cfg.merge_from_list(["MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64, "MODEL.DEVICE", "cpu",
                         "MODEL.FPN.OUT_CHANNELS", 32, "MODEL.RETINANET.NUM_CLASSES", 3,
                         "MODEL.RETINANET.NUM_CONVS", 1, "MODEL.RETINANET.SCORE_THRESH_TEST", 0.0])
    torch.manual_seed(0)
    stock = build_model(cfg).eval()
    slim_cfg = cfg.clone()
    slim_cfg.MODEL.BACKBONE.NAME = SLIMMABLE_TWINS[cfg.MODEL.BACKBONE.NAME]
    slim = build_model(slim_cfg).eval()
    slim.load_state_dict(stock.state_dict(), strict=True)
    image = (torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(2)) * 255)
    inputs = [{"image": image, "height": 64, "width": 96}]
    with torch.no_grad():
        a = stock(inputs)[0]["instances"]
        b = slim(inputs)[0]["instances"]
        assert len(a) > 0
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_classes, b.pred_classes)
        with gradaug_det.width(slim, 0.5):
            c = slim(inputs)[0]["instances"]
    assert len(c) > 0 and torch.isfinite(c.scores).all()


def test_lazy_retinanet_twin():
    """detectron2's LazyConfig RetinaNet made slimmable: same state dict as the stock model,
    P6/P7 slimmable, a sub-width forward runs."""
    from detectron2.config import instantiate
    from detectron2.model_zoo import get_config

    from gradaug_det.modeling.lazy import make_lazy_model_slimmable

    node = get_config("COCO-Detection/retinanet_R_50_FPN_1x.py").model
    torch.manual_seed(0)
    stock = instantiate(node).backbone
    make_lazy_model_slimmable(node)
    torch.manual_seed(0)
    slim = instantiate(node).backbone
    assert isinstance(slim.top_block, SlimLastLevelP6P7)
    assert [(k, v.shape) for k, v in stock.state_dict().items()] == [(k, v.shape) for k, v in slim.state_dict().items()]
    slim.load_state_dict(stock.state_dict())
    x = _input()
    a, b = stock.eval()(x), slim.eval()(x)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad(), gradaug_det.width(slim, 0.5):
        c = slim(x)
    assert c["p7"].shape == a["p7"].shape and torch.count_nonzero(c["p7"][:, 128:]) == 0
