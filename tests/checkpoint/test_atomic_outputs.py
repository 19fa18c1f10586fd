"""Result files are renamed into place complete, or not written at all (issue 11 §4)."""
import json
import os

import pytest
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, Instances

from gradaug_det.utils.io import atomic_path, atomic_torch_save, atomic_write
from gradaug_det.evaluation.coco import AtomicCOCOEvaluator


@pytest.fixture
def coco_name(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 48} for i in (1, 2)]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 16], "area": 320, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [30, 10, 20, 30], "area": 600, "iscrowd": 0}]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "box"}]}))
    name = f"h4_atomic_{os.getpid()}_{tmp_path.name}"
    register_coco_instances(name, {}, str(path), str(tmp_path))
    DatasetCatalog.get(name)
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _feed(evaluator):
    evaluator.reset()
    for image_id, box in ((1, [4, 4, 24, 20]), (2, [31, 10, 50, 40])):
        inst = Instances((48, 64))
        inst.pred_boxes = Boxes(torch.tensor([box], dtype=torch.float32))
        inst.scores = torch.tensor([0.9])
        inst.pred_classes = torch.tensor([0])
        evaluator.process([{"image_id": image_id}], [{"instances": inst}])


def test_coco_results_equal_detectron2_and_no_temporaries_remain(tmp_path, coco_name):
    ours, stock = tmp_path / "ours", tmp_path / "stock"
    results = []
    for cls, out in ((AtomicCOCOEvaluator, ours), (COCOEvaluator, stock)):
        ev = cls(coco_name, tasks=("bbox",), output_dir=str(out))
        _feed(ev)
        results.append(ev.evaluate())
    assert repr(results[0]) == repr(results[1]) and results[0]["bbox"]["AP"] > 50  # repr: APm, APl are nan
    assert sorted(os.listdir(ours)) == sorted(os.listdir(stock)) == ["coco_instances_results.json",
                                                                     "instances_predictions.pth"]
    assert (ours / "coco_instances_results.json").read_text() == (stock / "coco_instances_results.json").read_text()


def test_failed_evaluation_leaves_no_partial_file(tmp_path, coco_name, monkeypatch):
    out = tmp_path / "inference"
    ev = AtomicCOCOEvaluator(coco_name, tasks=("bbox",), output_dir=str(out))
    _feed(ev)

    def dies_while_writing(self, predictions, img_ids=None):
        with open(os.path.join(self._output_dir, "coco_instances_results.json"), "w") as f:
            f.write('[{"image_id": 1, "bbo')
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(COCOEvaluator, "_eval_predictions", dies_while_writing)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate()
    assert os.listdir(out) == []  # neither the partial json nor the predictions file


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("old: 1\n")
    with pytest.raises(RuntimeError):
        with atomic_write(str(path), "w") as f:
            f.write("new: ")
            raise RuntimeError("killed")
    assert path.read_text() == "old: 1\n" and os.listdir(tmp_path) == ["config.yaml"]
    with atomic_write(str(path), "w") as f:
        f.write("new: 2\n")
    assert path.read_text() == "new: 2\n" and os.listdir(tmp_path) == ["config.yaml"]


def test_failed_checkpoint_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """GradAugCheckpointer writes fvcore's checkpoint through an atomic file: a save that fails
    mid-write leaves neither a partial file nor a last_checkpoint naming it."""
    import fvcore.common.checkpoint as fv

    from gradaug_det.checkpoint.checkpointer import GradAugCheckpointer

    model = torch.nn.Linear(2, 2)
    checkpointer = GradAugCheckpointer(model, str(tmp_path), save_to_disk=True)
    checkpointer.save("model_0000000", iteration=0)
    before = (tmp_path / "model_0000000.pth").read_bytes()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"

    def killed(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise RuntimeError("killed while writing")

    monkeypatch.setattr(fv.torch, "save", killed)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="killed while writing"):
        checkpointer.save("model_0000001", iteration=1)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000000.pth"]  # no temporary left
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"
    assert (tmp_path / "model_0000000.pth").read_bytes() == before
    monkeypatch.undo()
    checkpointer.save("model_0000001", iteration=1)
    saved = torch.load(tmp_path / "model_0000001.pth", weights_only=True)
    assert saved["iteration"] == 1 and torch.equal(saved["model"]["weight"], model.weight.detach())
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    """mkstemp's 0600 used to survive the rename: teammates could not read a run's weights."""
    old = os.umask(umask)
    try:
        atomic_torch_save({"w": torch.ones(2)}, str(tmp_path / "model.pth"))
        with atomic_write(str(tmp_path / "last_checkpoint"), "w") as f:
            f.write("model.pth")
        with atomic_path(str(tmp_path / "plot.png")) as tmp:
            with open(tmp, "wb") as f:  # as savefig / cv2.imwrite write to the name
                f.write(b"png")
    finally:
        os.umask(old)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {
        "model.pth": oct(mode), "last_checkpoint": oct(mode), "plot.png": oct(mode)}
