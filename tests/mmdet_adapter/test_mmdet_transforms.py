"""Sub-network input transforms of mmdet batches: rotation equals mmdet's own Rotate."""
import copy

import cv2
import numpy as np
import pytest
import torch
from mmengine.structures import InstanceData

from mmdet.datasets.transforms import Rotate
from mmdet.structures import DetDataSample
from mmdet.structures.bbox import HorizontalBoxes

from gradaug_det.mmdet import rotate_batch, transform_batch


def _padded(shapes_dataset, index, pad_to=128):
    """One data set image (96 px after a keep-ratio resize), padded into a ``pad_to`` square
    as the data preprocessor would, as a float batch of one; and its data sample."""
    item = shapes_dataset[index]
    img = item["inputs"].float()
    sample = copy.deepcopy(item["data_samples"])
    h, w = sample.metainfo["img_shape"][:2]
    assert (h, w) == tuple(img.shape[-2:]) and max(h, w) < pad_to
    batch = torch.full((1, 3, pad_to, pad_to), 128.0)
    batch[0, :, :h, :w] = img
    sample.set_metainfo({"pad_shape": (pad_to, pad_to), "batch_input_shape": (pad_to, pad_to)})
    sample.gt_instances.masks = sample.gt_instances.masks.pad((pad_to, pad_to))
    return batch, sample, item


@pytest.fixture
def rotation_dataset(shapes_dataset):
    data = copy.copy(shapes_dataset)
    data.pipeline = type(shapes_dataset.pipeline)([
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
        dict(type="Resize", scale=(96, 96), keep_ratio=True),
        dict(type="PackDetInputs"),
    ])
    return data


@pytest.mark.parametrize("angle", [17.0, -30.0])
def test_rotation_equals_mmdet_rotate(rotation_dataset, angle):
    batch, sample, item = _padded(rotation_dataset, 0)
    h, w = sample.metainfo["img_shape"][:2]
    before = batch.clone()
    out, samples = rotate_batch(batch, [sample], angle, pad_value=128.0)
    assert torch.equal(batch, before)  # the input batch is not modified

    # mmdet's own Rotate on the same (unpadded) image: angle exactly ``angle`` (level 10,
    # min_mag = max_mag = |angle|, the sign through reversal_prob)
    ref = Rotate(prob=1.0, level=10, min_mag=abs(angle), max_mag=abs(angle),
                 reversal_prob=1.0 if angle > 0 else 0.0, img_border_value=128)
    gt = item["data_samples"].gt_instances
    results = ref.transform(dict(img=item["inputs"].permute(1, 2, 0).numpy().copy(), img_shape=(h, w),
                                 gt_bboxes=gt.bboxes.clone(), gt_masks=copy.deepcopy(gt.masks),
                                 gt_bboxes_labels=gt.labels.numpy(), gt_ignore_flags=np.zeros(len(gt), bool)))
    got = samples[0].gt_instances
    keep = (results["gt_bboxes"].widths > 1e-5) & (results["gt_bboxes"].heights > 1e-5)
    assert len(got) == int(keep.sum()) > 0
    torch.testing.assert_close(got.bboxes.tensor, results["gt_bboxes"].tensor[keep], rtol=0, atol=1e-4)
    masks = results["gt_masks"].masks[keep.numpy()]
    assert np.array_equal(got.masks.masks[:, :h, :w], masks)
    assert got.masks.masks.shape[1:] == (128, 128) and not got.masks.masks[:, h:].any()

    # the image: bilinear both (cv2: 1/32-pixel fixed-point weights and uint8 rounding),
    # compared where the source point lies 1 px inside the image or 1 px outside it (the
    # fill); within the 1 px ring cv2 blends image and fill, grid_sample does not.
    rotated = out[0, :, :h, :w].permute(1, 2, 0).numpy()
    diff = np.abs(rotated - results["img"].astype(np.float32)).max(-1)
    ys, xs = np.mgrid[0:h, 0:w]
    inverse = cv2.invertAffineTransform(cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), -angle, 1.0))
    src = np.stack([xs, ys, np.ones_like(xs)], -1) @ inverse.T
    inside = np.minimum.reduce([src[..., 0] + 0.5, w - 0.5 - src[..., 0], src[..., 1] + 0.5, h - 0.5 - src[..., 1]])
    assert diff[inside >= 1].max() <= 4.0 and diff[inside >= 1].mean() < 0.6, diff[inside >= 1].max()
    assert (inside < -1).any() and diff[inside < -1].max() == 0
    assert torch.all(out[0, :, h:, :] == 128.0) and torch.all(out[0, :, :, w:] == 128.0)
    assert samples[0].metainfo["img_shape"][:2] == (h, w)


def _sample(img_shape, boxes, pad_shape):
    s = DetDataSample(metainfo=dict(img_shape=img_shape, pad_shape=pad_shape, batch_input_shape=pad_shape))
    s.gt_instances = InstanceData(bboxes=HorizontalBoxes(torch.tensor(boxes, dtype=torch.float32)),
                                  labels=torch.arange(len(boxes)))
    return s


def test_boxes_rotated_out_of_the_image_are_dropped_rois_get_weight_0():
    # a wide 40 x 100 image: a box at its left end leaves it after a quarter turn
    inputs = torch.zeros(2, 3, 64, 128)
    inside, leaving = [40.0, 15.0, 60.0, 25.0], [0.0, 15.0, 10.0, 25.0]
    samples = [_sample((40, 100), [inside, leaving], (64, 128)), _sample((64, 128), [inside], (64, 128))]
    out, new, geometry = transform_batch(inputs, samples, scale=1.0, angle=90.0)
    assert len(new[0].gt_instances) == 1 and new[0].gt_instances.labels.tolist() == [0]
    # 90 degrees clockwise about (49.5, 19.5) (y points down: right -> down, down -> left):
    # the box's centre (50, 20) goes to (49, 20), its 20 x 10 extent becomes 10 x 20
    torch.testing.assert_close(new[0].gt_instances.bboxes.tensor, torch.tensor([[44.0, 10.0, 54.0, 30.0]]))
    assert len(new[1].gt_instances) == 1
    rois = torch.tensor([[0.0, *inside], [0.0, *leaving], [1.0, *inside]])
    # every RoI keeps its row (no boolean indexing, no host sync); the one rotated out weighs 0
    moved, weights = geometry.map_rois(rois)
    assert moved[:, 0].tolist() == [0.0, 0.0, 1.0] and weights.tolist() == [1.0, 0.0, 1.0]
    assert weights.dtype == torch.float32
    torch.testing.assert_close(moved[0, 1:], new[0].gt_instances.bboxes.tensor[0])
    assert not bool(((moved[1, 3] > moved[1, 1]) & (moved[1, 4] > moved[1, 2])))  # no area left


def test_rescale_then_rotate_maps_rois_like_boxes():
    inputs = torch.zeros(1, 3, 64, 96)
    boxes = [[10.0, 8.0, 40.0, 30.0], [50.0, 20.0, 90.0, 60.0]]
    samples = [_sample((64, 96), boxes, (64, 96))]
    out, new, geometry = transform_batch(inputs, samples, scale=0.75, angle=-12.0, size_divisor=32)
    assert out.shape[-2:] == (64, 96)  # 48 x 72, padded to multiples of 32
    assert new[0].metainfo["img_shape"][:2] == (48, 72)
    rois = torch.tensor([[0.0, *b] for b in boxes])
    moved, _ = geometry.map_rois(rois)
    torch.testing.assert_close(moved[:, 1:], new[0].gt_instances.bboxes.tensor)
    assert (new[0].gt_instances.bboxes.tensor[:, 2:] <= torch.tensor([72.0, 48.0])).all()


def test_transforms_keep_float32_coordinates_under_autocast():
    """Sub-network passes run inside the optimizer wrapper's autocast (AMP): the geometry
    must not drop to half precision (bf16 on CPU here, fp16 on GPUs)."""
    inputs = torch.rand(1, 3, 64, 96) * 100
    boxes = [[10.3, 8.1, 40.7, 30.2], [50.0, 20.5, 90.1, 60.9]]
    rois = torch.tensor([[0.0, *b] for b in boxes])

    def run():
        out, new, geometry = transform_batch(inputs, [_sample((64, 96), boxes, (64, 96))],
                                             scale=0.857, angle=13.0, size_divisor=32)
        return out, new[0].gt_instances.bboxes.tensor, geometry.map_rois(rois)[0]

    want = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run()
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("scale,angle", [(0.75, 0.0), (1.0, 15.0)])
def test_semantic_maps_are_refused_by_every_transform(scale, angle):
    from mmengine.structures import PixelData

    sample = _sample((64, 96), [[10.0, 8.0, 40.0, 30.0]], (64, 96))
    sample.gt_sem_seg = PixelData(sem_seg=torch.zeros(1, 64, 96, dtype=torch.long))
    with pytest.raises(NotImplementedError, match="semantic/panoptic"):
        transform_batch(torch.zeros(1, 3, 64, 96), [sample], scale=scale, angle=angle)


@pytest.mark.parametrize("scale", [0.5, 0.857, 0.714])
def test_rescale_equals_mmdet_resize(scale):
    """A sub-network's rescale is mmdet's own ``Resize`` (``mmcv.imresize``: cv2 bilinear, pixel
    centres at i + 0.5) on the image and its boxes. Both interpolate the same float image; cv2
    computes its source positions and weights in float32 (positions < 96 px: 2 ulp < 1.6e-5 px),
    so on a random image (slopes up to 255 per px) values agree within 255 * 1.6e-5 + float32
    rounding < 5e-3."""
    from mmdet.datasets.transforms import Resize

    h, w = 64, 96
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, h, w, generator=g) * 255
    boxes = [[10.0, 8.0, 40.0, 30.0], [50.5, 20.25, 90.0, 60.0]]
    out, samples, _ = transform_batch(img[None], [_sample((h, w), boxes, (h, w))], scale=scale)
    nh, nw = out.shape[-2:]
    assert (nh, nw) == (int(round(h * scale)), int(round(w * scale)))
    ref = Resize(scale=(nw, nh), keep_ratio=False).transform(
        dict(img=img.permute(1, 2, 0).numpy().copy(), img_shape=(h, w), gt_bboxes=HorizontalBoxes(torch.tensor(boxes))))
    assert ref["img_shape"] == (nh, nw) == samples[0].metainfo["img_shape"][:2]
    torch.testing.assert_close(out[0].permute(1, 2, 0), torch.from_numpy(ref["img"]), rtol=0, atol=5e-3)
    torch.testing.assert_close(samples[0].gt_instances.bboxes.tensor, ref["gt_bboxes"].tensor, rtol=0, atol=0)


def test_rotation_is_batched_per_image_size():
    """Images that share their valid region are rotated in one call; the result equals rotating
    each image alone, and images of another size get their own centre."""
    g = torch.Generator().manual_seed(1)
    inputs = torch.rand(3, 3, 64, 96, generator=g) * 100
    samples = [_sample((64, 96), [[10.0, 8.0, 40.0, 30.0]], (64, 96)), _sample((40, 60), [[5.0, 5.0, 20.0, 20.0]], (64, 96)),
               _sample((64, 96), [[30.0, 20.0, 60.0, 50.0]], (64, 96))]
    out, new = rotate_batch(inputs, samples, 21.0, pad_value=7.0)
    for i, s in enumerate(samples):
        alone, alone_new = rotate_batch(inputs[i:i + 1], [s], 21.0, pad_value=7.0)
        torch.testing.assert_close(out[i], alone[0], rtol=0, atol=0)
        torch.testing.assert_close(new[i].gt_instances.bboxes.tensor, alone_new[0].gt_instances.bboxes.tensor)
    assert torch.all(out[1, :, 40:, :] == 7.0) and torch.all(out[1, :, :, 60:] == 7.0)


@pytest.mark.parametrize("scale,angle", [(0.5, 0.0), (0.857, 45.0), (1.0, -30.0)])
def test_images_and_rois_are_never_read_on_the_host(scale, angle):
    """The batch tensor and the teacher's RoIs live on PyTorch's "meta" device here, where any
    host read of a value (``.item()``, ``bool()``, ``.cpu()``, boolean indexing, ``nonzero``)
    raises: the images and the RoIs are transformed, and the soft-label loss formed, without a
    host synchronisation. Ground-truth boxes stay on the host here (deciding whether a rotation
    dropped one reads them, once per image)."""
    from gradaug_det.gradaug import soft_label_kl

    meta = torch.device("meta")
    samples = [_sample((64, 96), [[10.0, 8.0, 40.0, 30.0]], (64, 96)), _sample((40, 60), [[0.0, 0.0, 4.0, 4.0]], (64, 96))]
    inputs = torch.zeros(2, 3, 64, 96, device=meta)
    rois = torch.zeros(7, 5, device=meta)
    out, new, geometry = transform_batch(inputs, samples, scale=scale, angle=angle, size_divisor=32, pad_value=0.0)
    assert out.device == meta and out.shape[0] == 2
    moved, weights = geometry.map_rois(rois)
    assert moved.device == meta and moved.shape == (7, 5) and weights.shape == (7,) and weights.device == meta
    loss = soft_label_kl(torch.zeros(7, 3, device=meta), torch.zeros(7, 3, device=meta), weights)
    assert loss.device == meta
