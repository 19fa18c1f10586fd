"""gradaug_det.data.datasets.subsample_images / register_subset: the scarce-data split of
tools/compare.py --train-fraction (seeded, the right size, nested, disjoint from val)."""
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from gradaug_det.data.datasets import register_subset, subsample_images, subset_name


def _records(n):
    return [{"file_name": f"img{i:03d}.png", "image_id": i, "annotations": []} for i in range(n)]


def test_subsample_images_size_determinism_and_nesting():
    records = _records(800)
    tenth = subsample_images(records, 0.1, seed=0)
    assert len(tenth) == 80  # round(0.1 * 800)
    assert [r["image_id"] for r in tenth] == [r["image_id"] for r in subsample_images(records, 0.1, seed=0)]
    # the input order does not matter; the output keeps the input order
    assert sorted(r["image_id"] for r in subsample_images(records[::-1], 0.1, seed=0)) == \
        [r["image_id"] for r in tenth]
    assert [r["image_id"] for r in tenth] == sorted(r["image_id"] for r in tenth)
    # nested: for one seed, the 10 % are among the 20 %; another seed draws other images
    fifth = {r["image_id"] for r in subsample_images(records, 0.2, seed=0)}
    assert len(fifth) == 160 and {r["image_id"] for r in tenth} <= fifth
    assert {r["image_id"] for r in subsample_images(records, 0.1, seed=1)} != {r["image_id"] for r in tenth}
    # round half up, at least one image; copies, not the caller's dicts
    assert len(subsample_images(_records(5), 0.1)) == 1 and len(subsample_images(_records(15), 0.1)) == 2
    assert subsample_images(records, 1.0)[0] is not records[0]


@pytest.mark.parametrize("fraction, seed", [(0, 0), (1.5, 0), ("0.1", 0), (0.1, -1), (True, 0)])
def test_subsample_images_refuses_out_of_range(fraction, seed):
    with pytest.raises(ValueError):
        subsample_images(_records(4), fraction, seed)


def test_register_subset_of_a_registered_training_split(tiny_coco):
    _, train, val = tiny_coco
    name = register_subset(train, 0.5, seed=3)
    assert name == subset_name(train, 0.5, 3) == f"{train}_frac0.5_seed3"
    assert register_subset(train, 0.5, seed=3) == name  # idempotent
    subset = DatasetCatalog.get(name)
    full = {r["file_name"] for r in DatasetCatalog.get(train)}
    held_out = {r["file_name"] for r in DatasetCatalog.get(val)}
    assert len(subset) == 2 and {r["file_name"] for r in subset} <= full
    assert not {r["file_name"] for r in subset} & held_out
    assert [r["file_name"] for r in subset] == [r["file_name"] for r in DatasetCatalog.get(name)]
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == MetadataCatalog.get(train).thing_classes
    assert (meta.fraction, meta.subsample_seed, meta.subset_of) == (0.5, 3, train)
    assert not hasattr(meta, "json_file")  # the source's file lists every image
    with pytest.raises(KeyError):
        register_subset("no_such_dataset", 0.5)
