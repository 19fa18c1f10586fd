"""Every detectron2 model-zoo config with its slimmable twin and GradAug on, for sub-network
losses "gt" and "soft": trains two iterations with finite losses, or is refused by
``GradAugTrainer``'s constructor before any data is read, naming the key (issue 10 §4).
How configs are shrunk and de-duplicated: :mod:`zoo_matrix` (tests/modeling/zoo_matrix.py)."""
import math
import os
import sys

import pytest
import torch

from detectron2.engine import hooks

from gradaug_det.engine import GradAugTrainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zoo_matrix as zm  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAINS = "trains"
DCONV = "MODEL.RESNETS.DEFORM_ON_PER_STAGE"
SOFT = "GRADAUG.SUBNET_LOSS"
GN_DIVISOR = {"MODEL.SLIMMABLE.CHANNEL_DIVISOR": 16}  # lcm of channels per GN group, shrunk R18 (R-50: 64)

#: Representative config -> outcome per sub-network loss: TRAINS, or the key the refusal names.
EXPECTED = {
    "COCO-Detection/fast_rcnn_R_50_FPN_1x.yaml": (TRAINS, TRAINS),
    "COCO-Detection/faster_rcnn_R_101_C4_3x.yaml": (TRAINS, TRAINS),
    "COCO-Detection/faster_rcnn_R_101_DC5_3x.yaml": (TRAINS, TRAINS),
    "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml": (TRAINS, TRAINS),
    "COCO-Detection/faster_rcnn_X_101_32x8d_FPN_3x.yaml": (TRAINS, TRAINS),
    "COCO-Detection/retinanet_R_101_FPN_3x.yaml": (TRAINS, SOFT),
    "COCO-Detection/rpn_R_50_C4_1x.yaml": (TRAINS, SOFT),
    "COCO-Detection/rpn_R_50_FPN_1x.yaml": (TRAINS, SOFT),
    "COCO-InstanceSegmentation/mask_rcnn_R_101_C4_3x.yaml": (TRAINS, TRAINS),
    "COCO-InstanceSegmentation/mask_rcnn_R_101_DC5_3x.yaml": (TRAINS, TRAINS),
    "COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml": (TRAINS, TRAINS),
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_giou.yaml": (TRAINS, TRAINS),
    "COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x.yaml": (TRAINS, TRAINS),
    "COCO-Keypoints/keypoint_rcnn_R_101_FPN_3x.yaml": (TRAINS, TRAINS),
    "COCO-Keypoints/keypoint_rcnn_X_101_32x8d_FPN_3x.yaml": (TRAINS, TRAINS),
    "COCO-PanopticSegmentation/panoptic_fpn_R_101_3x.yaml": (TRAINS, TRAINS),
    "Detectron1-Comparisons/faster_rcnn_R_50_FPN_noaug_1x.yaml": (TRAINS, TRAINS),
    "Detectron1-Comparisons/keypoint_rcnn_R_50_FPN_1x.yaml": (TRAINS, TRAINS),
    "Detectron1-Comparisons/mask_rcnn_R_50_FPN_noaug_1x.yaml": (TRAINS, TRAINS),
    "Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml": (TRAINS, TRAINS),
    "Misc/cascade_mask_rcnn_X_152_32x8d_FPN_IN5k_gn_dconv.yaml": (DCONV, DCONV),
    "Misc/mask_rcnn_R_50_FPN_1x_cls_agnostic.yaml": (TRAINS, TRAINS),
    "Misc/mask_rcnn_R_50_FPN_1x_dconv_c3-c5.yaml": (DCONV, DCONV),
    "Misc/mask_rcnn_R_50_FPN_3x_gn.yaml": (TRAINS, TRAINS),
    "Misc/mask_rcnn_R_50_FPN_3x_syncbn.yaml": (TRAINS, TRAINS),
    "Misc/panoptic_fpn_R_101_dconv_cascade_gn_3x.yaml": (DCONV, DCONV),
    "Misc/scratch_mask_rcnn_R_50_FPN_3x_gn.yaml": (TRAINS, TRAINS),
    "Misc/scratch_mask_rcnn_R_50_FPN_9x_syncbn.yaml": (TRAINS, TRAINS),
    "Misc/semantic_R_50_FPN_1x.yaml": (TRAINS, TRAINS),
    "quick_schedules/mask_rcnn_R_50_FPN_pred_boxes_training_acc_test.yaml": (TRAINS, TRAINS),
}
#: Settings a config needs beyond its twin backbone (its refusal without them is tested too).
NEEDS = {
    "Misc/mask_rcnn_R_50_FPN_3x_gn.yaml": GN_DIVISOR,
    "Misc/scratch_mask_rcnn_R_50_FPN_3x_gn.yaml": GN_DIVISOR,
}
LOSSES = ("gt", "soft")
CASES = [(path, loss) for path in EXPECTED for loss in LOSSES]


class MatrixTrainer(GradAugTrainer):
    """The trainer users run, without its final checkpoint write (tested elsewhere; saves time)."""

    def build_hooks(self):
        return [h for h in super().build_hooks() if not isinstance(h, hooks.PeriodicCheckpointer)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    reads = []
    _, proposal_file = zm.register_matrix_dataset(str(tmp_path_factory.mktemp("zoo_matrix")), reads)
    return reads, proposal_file


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _cfg(path, loss, tmp_path, proposal_file, extra=None):
    cfg = zm.matrix_cfg(path, loss, str(tmp_path / "out"), proposal_file)
    for key, value in (extra or {}).items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


@pytest.mark.parametrize("path, loss", CASES, ids=[f"{p.split('/')[-1][:-5]}-{loss}" for p, loss in CASES])
def test_zoo_config_trains_or_is_refused_up_front(path, loss, data, tmp_path):
    reads, proposal_file = data
    expected = EXPECTED[path][LOSSES.index(loss)]
    before = len(reads)
    if path in NEEDS:  # without the setting: refused up front, naming it
        with pytest.raises(ValueError, match="|".join(NEEDS[path])):
            MatrixTrainer(_cfg(path, loss, tmp_path, proposal_file))
        assert len(reads) == before
    cfg = _cfg(path, loss, tmp_path, proposal_file, NEEDS.get(path))
    if expected != TRAINS:
        with pytest.raises(ValueError, match=expected) as err:
            MatrixTrainer(cfg)
        assert "set " in str(err.value)  # says what to set
        assert len(reads) == before, "the refusal came after the dataset was read"
        return
    trainer = MatrixTrainer(cfg)
    assert len(reads) > before  # (twice with SyncBN: detectron2's PreciseBN hook has its own loader)
    trainer.train()
    storage = trainer.storage
    full = storage.history("total_loss").values()
    assert [it for _, it in full] == [0, 1]
    assert all(math.isfinite(v) for v, _ in full)
    sub = {k: h.values() for k, h in storage.histories().items() if k.startswith("gradaug/sub")}
    assert "gradaug/sub1/total_loss" in sub  # both sub-networks ran, in both iterations
    assert all(len(v) == 2 and all(math.isfinite(x) for x, _ in v) for v in sub.values())
    losses = [k for k in sub if k.split("/")[-1].startswith("loss")]
    if loss == "soft":  # the sub-networks learned soft labels, and only those
        assert losses and all("loss_soft" in k for k in losses), losses
    else:
        assert losses and not any("loss_soft" in k for k in losses), losses


def test_matrix_covers_every_zoo_config_once():
    """The expectations name exactly one representative per distinct model of the zoo."""
    groups = zm.distinct_models()
    assert list(groups) == list(EXPECTED)
    assert sum(len(v) for v in groups.values()) == len(zm.zoo_configs()) > 80
    assert set(NEEDS) <= set(EXPECTED)


def test_docs_table_is_the_measured_matrix():
    table = zm.render_table(zm.distinct_models(), EXPECTED, NEEDS, LOSSES)
    with open(os.path.join(ROOT, "docs", "own_project.md")) as f:
        assert table in f.read(), "docs/own_project.md's model-zoo table differs from the matrix; regenerate it:\n" + table
