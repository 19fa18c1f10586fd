"""evaluate_at_widths: one result per width, width restored; the table and flat results."""
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, print_csv_format
from detectron2.modeling import build_model

import gradaug_det
from gradaug_det.data import generate_coco_shapes
from gradaug_det.evaluation import (
    evaluate_at_widths,
    merge_width_results,
    normalize_widths,
    split_width_key,
    split_width_results,
    width_results_table,
    width_task_key,
)
from gradaug_det.slim import SlimConv2d


class _TinySlim(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = SlimConv2d(3, 8, 1, slim_in=False)

    def forward(self, batch):
        return [self.conv(batch).shape[1]]


class _Recorder(DatasetEvaluator):
    """Records the active output channels seen; fails on request."""

    def __init__(self, fail_at=None):
        self.fail_at = fail_at
        self.seen = []

    def reset(self):
        self.channels = []

    def process(self, inputs, outputs):
        self.channels.extend(outputs)

    def evaluate(self):
        self.seen.append(self.channels[0])
        if self.fail_at is not None and len(self.seen) == self.fail_at:
            raise RuntimeError("boom")
        return {"cls": {"top1": 10.0 * self.channels[0], "top5": 100.0}}


def _loader():
    return [torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)]


def test_normalize_widths():
    assert normalize_widths([0.75, 0.9, 1.0, 0.9]) == [1.0, 0.9, 0.75]
    assert normalize_widths(None) == [1.0]
    with pytest.raises(ValueError, match="TEST.SLIM_WIDTHS"):
        normalize_widths([0.5, 1.5])
    with pytest.raises(ValueError, match="--widths"):
        normalize_widths([0], key="--widths")


def test_one_result_per_width_and_width_restored():
    model = _TinySlim()
    gradaug_det.set_width(model, 0.5)
    evaluator = _Recorder()
    results = evaluate_at_widths(model, _loader(), evaluator, [0.75, 1.0, 0.75])
    assert list(results) == [1.0, 0.75]
    assert evaluator.seen == [6, 8]  # the full network runs last
    assert results[0.75]["cls"]["top1"] == 60.0
    assert gradaug_det.get_width(model) == 0.5
    table = width_results_table(results)
    lines = table.splitlines()
    assert len(lines) == 4 and "cls top1" in lines[0] and "cls top5" in lines[0]
    assert "1.0" in lines[2] and "0.75" in lines[3] and "60.000" in lines[3]


def test_width_restored_on_error():
    model = _TinySlim()
    with pytest.raises(RuntimeError, match="boom"):
        evaluate_at_widths(model, _loader(), _Recorder(fail_at=2), [0.5])
    assert gradaug_det.get_width(model) == 1.0


def test_non_slimmable_model_rejected():
    model = nn.Conv2d(3, 3, 1)
    with pytest.raises(ValueError, match="TEST.SLIM_WIDTHS"):
        evaluate_at_widths(model, _loader(), _Recorder(), [0.5])


def test_flat_results_keys():
    per_width = OrderedDict([(1.0, {"bbox": {"AP": 1.0}}), (0.75, {"bbox": {"AP": 0.5}, "segm": {"AP": 0.2}})])
    flat = merge_width_results(per_width)
    assert list(flat) == ["bbox", "bbox@w0.75", "segm@w0.75"]
    assert split_width_key("bbox@w0.75/AP") == ("bbox/AP", 0.75)
    assert split_width_key("segm/AP50") == ("segm/AP50", 1.0)
    assert width_task_key("segm", 0.9) == "segm@w0.9"
    assert split_width_results(flat) == per_width
    print_csv_format(flat)  # detectron2's consumer accepts it
    assert width_results_table(flat) == width_results_table(per_width)
    assert "-" in width_results_table(flat).splitlines()[2]  # segm missing at width 1.0


class _Predictions(DatasetEvaluator):
    """Keeps every image's detections as (class, score, XYXY box) lists, one list per evaluation."""

    def __init__(self):
        self.runs = []

    def reset(self):
        self.runs.append([])

    def process(self, inputs, outputs):
        for o in outputs:
            inst = o["instances"].to("cpu")
            self.runs[-1].append(list(zip(inst.pred_classes.tolist(), inst.scores.tolist(),
                                          inst.pred_boxes.tensor.tolist())))

    def evaluate(self):
        return {}


def test_coco_ap_per_width(tmp_path, make_rcnn_cfg, assert_same_detections):
    """Each width's COCO AP (from detectron2's COCOEvaluator) and detections equal those of the
    model physically pruned to that width (tools/prune.py's surgery), evaluated on its own, and
    differ from width 1.0's: they fail if width switching is broken."""
    from detectron2.evaluation import DatasetEvaluators, inference_on_dataset

    from gradaug_det.utils.analysis import count_parameters
    from gradaug_det.checkpoint.prune import prune_model

    paths = generate_coco_shapes(str(tmp_path), num_train=1, num_val=2, image_size=64, progress=False)
    name = "gradaug_test_eval_widths_val"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, paths["val"]["json_file"], paths["val"]["image_root"])
    cfg = make_rcnn_cfg()
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 64
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.DATALOADER.NUM_WORKERS = 0
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    loader = build_detection_test_loader(cfg, name)
    predictions = _Predictions()
    evaluator = DatasetEvaluators([COCOEvaluator(name, output_dir=str(tmp_path / "inference")), predictions])
    results = evaluate_at_widths(model, loader, evaluator, [0.5])
    assert list(results) == [1.0, 0.5]
    assert gradaug_det.get_width(model) == 1.0
    slim_predictions, full_predictions = predictions.runs  # sub-widths first, width 1.0 last

    _, pruned = prune_model(model, cfg, 0.5)
    assert count_parameters(pruned) < count_parameters(model)
    pruned_predictions = _Predictions()
    pruned_results = inference_on_dataset(
        pruned.eval(), loader,
        DatasetEvaluators([COCOEvaluator(name, output_dir=str(tmp_path / "pruned")), pruned_predictions]))
    assert_same_detections(slim_predictions, pruned_predictions.runs[0], cfg.INPUT.MAX_SIZE_TEST)
    assert sum(map(len, slim_predictions)) > 0
    for task in ("bbox", "segm"):
        # every COCO metric: same detections within float32 rounding, and no score tie here
        assert results[0.5][task] == pytest.approx(pruned_results[task], abs=1e-9, nan_ok=True), task
        assert not math.isnan(results[0.5][task]["AP"]) and not math.isnan(results[1.0][task]["AP"])
    # width 1.0 is another network: other detections and other AP
    assert results[0.5]["bbox"] != results[1.0]["bbox"]
    assert slim_predictions != full_predictions
    lines = width_results_table(results).splitlines()
    assert len(lines) == 4
    assert [c.strip() for c in lines[0].strip("|").split("|")] == [
        "width", "bbox AP", "bbox AP50", "bbox AP75", "segm AP", "segm AP50", "segm AP75"]
