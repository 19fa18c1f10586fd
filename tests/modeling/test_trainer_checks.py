"""GradAugTrainer refuses a model GradAug cannot train before any data is read, naming the
key and the value to set (gradaug_det/engine/checks.py)."""
import pytest

from detectron2.data import DatasetCatalog, MetadataCatalog

from gradaug_det.engine import GradAugTrainer
from gradaug_det.modeling import SLIMMABLE_TWINS


@pytest.fixture
def never_read():
    reads = []
    name = "gradaug_test_never_read"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: reads.append(1) or [])
    yield name, reads
    DatasetCatalog.remove(name)


@pytest.mark.parametrize("stock", sorted(SLIMMABLE_TWINS))
@pytest.mark.parametrize("sampling", ["width", "depth"])
def test_stock_backbone_refused_naming_its_twin(stock, sampling, never_read, tmp_path):
    from gradaug_det.engine.setup import get_gradaug_cfg

    name, reads = never_read
    cfg = get_gradaug_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = stock
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    if stock == "build_resnet_backbone":  # a C4 model
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res4"]
        cfg.MODEL.RPN.IN_FEATURES = cfg.MODEL.ROI_HEADS.IN_FEATURES = ["res4"]
        cfg.MODEL.ROI_HEADS.NAME = "Res5ROIHeads"
    else:
        cfg.MODEL.RESNETS.OUT_FEATURES = cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
        cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
        cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
        cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
        cfg.MODEL.ROI_BOX_HEAD.NAME, cfg.MODEL.ROI_BOX_HEAD.NUM_FC = "FastRCNNConvFCHead", 2
    if stock == "build_retinanet_resnet_fpn_backbone":
        cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
        cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    cfg.GRADAUG.ENABLED = True
    cfg.GRADAUG.SAMPLING = sampling
    cfg.GRADAUG.SUBNET_LOSS = "gt"
    cfg.DATASETS.TRAIN = (name,)
    cfg.OUTPUT_DIR = str(tmp_path)
    with pytest.raises(ValueError, match=f"MODEL.BACKBONE.NAME='{SLIMMABLE_TWINS[stock]}'"):
        GradAugTrainer(cfg)
    assert reads == []
