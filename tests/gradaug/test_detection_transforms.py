"""Sub-network transforms of detectron2 training dicts: every field moves with the image.

References: detectron2's own CPU transforms (``ResizeTransform`` through PIL,
``RotationTransform`` through OpenCV, ``transform_keypoint_annotations``,
``transform_proposals``) and hand computations (quarter turns, a 0.5 rescale).
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detectron2.data import detection_utils as utils
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances, Keypoints, PolygonMasks, RotatedBoxes
from detectron2.utils.events import EventStorage

from gradaug_det.gradaug import DetectionTask, GradAugOptions, SubnetSampler, SubnetSpec, gradaug_step, soft_label_kl
from gradaug_det.gradaug.tasks import check_subnet_loss_support
from gradaug_det.gradaug.transforms import (
    SubnetGeometry, check_batch_fields, check_transformable_fields, transform_detection_batch,
)


def _rand_image(c, h, w, seed=0, dtype=torch.uint8):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(c, h, w, generator=g) * 255
    return x.to(torch.uint8) if dtype == torch.uint8 else x.to(dtype)


def _d2_image(geo, img):
    """detectron2's CPU result for a (C, H, W) tensor, as a (C, H', W') tensor."""
    out = geo.transform.apply_image(img.permute(1, 2, 0).numpy().copy())
    if out.ndim == 2:
        out = out[..., None]
    return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1)


@pytest.mark.parametrize("size, scale", [((96, 128), 0.857), ((96, 96), 0.5), ((37, 53), 0.714), ((64, 80), 1.3)])
@pytest.mark.parametrize("channels", [3, 1])
def test_uint8_resize_is_bit_identical_to_detectron2(size, scale, channels):
    img = _rand_image(channels, *size)
    geo = SubnetGeometry(*size, SubnetSpec(scale=scale))
    ours = geo.images(img[None])[0]
    assert ours.dtype == torch.uint8 and ours.shape == (channels,) + geo.size
    assert torch.equal(ours, _d2_image(geo, img))  # PIL's integer filter reproduced exactly


def test_float_resize_matches_detectron2_float_path():
    img = _rand_image(3, 50, 70, dtype=torch.float64)
    geo = SubnetGeometry(50, 70, SubnetSpec(scale=0.571))
    assert torch.allclose(geo.images(img[None])[0], _d2_image(geo, img), atol=1e-9)


def test_quarter_turn_by_hand_any_channel_count():
    # INPUT.FORMAT "L": one channel crashed under rotation; a quarter turn counter-clockwise of a
    # square image is exactly torch.rot90 (pixel (0, 0) goes to the bottom-left corner)
    for c in (1, 3, 5):
        img = _rand_image(c, 32, 32, seed=c)
        geo = SubnetGeometry(32, 32, SubnetSpec(angle=90.0))
        assert torch.equal(geo.images(img[None])[0], torch.rot90(img, 1, (-2, -1)))
        assert torch.equal(geo.label_map(img, 255), torch.rot90(img, 1, (-2, -1)))
    pts = geo.points(torch.tensor([[0.5, 0.5], [32.0, 0.0]]))  # continuous coordinates
    assert torch.allclose(pts, torch.tensor([[0.5, 31.5], [0.0, 0.0]], dtype=torch.float64), atol=1e-9)


@pytest.mark.parametrize("spec", [SubnetSpec(angle=17.3, scale=0.857), SubnetSpec(angle=-12.5)])
def test_rotation_matches_opencv_within_its_position_rounding(spec):
    """cv2.warpAffine quantises source positions to 1/32 px (rounding: <= 1/64 px per axis) and
    weights to 2**-15. On an image whose values change by at most 50/27 + 50/21 < 4.2 levels per
    pixel, that moves a result by < 4.2 * 2/64 < 0.14 levels, so after both round to uint8 they
    differ by at most 1 level wherever the 2x2 source neighbourhood lies inside the image (the
    pixels where a constant image stays constant in both). Near the rotated edges (zeros outside)
    the position error meets a 0..255 step, so there only the mean is bounded."""
    h, w = 64, 80
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    smooth = (128 + 50 * torch.sin(xs / 27.0) + 50 * torch.cos(ys / 21.0)).round().to(torch.uint8)
    img = torch.stack([smooth, smooth.flip(-1), smooth.flip(-2)])
    geo = SubnetGeometry(h, w, spec)
    ours, ref = geo.images(img[None])[0].int(), _d2_image(geo, img).int()
    assert ours.shape == ref.shape == (3,) + geo.size
    const = torch.full_like(img, 255)
    interior = (geo.images(const[None])[0] == 255) & (_d2_image(geo, const) == 255)
    assert interior.float().mean() > 0.5
    assert (ours - ref)[interior].abs().max() <= 1
    assert (ours - ref).abs().float().mean() < 0.5


def test_label_maps_nearest_equal_detectron2_and_new_pixels_ignored():
    g = torch.Generator().manual_seed(0)
    seg = torch.randint(0, 20, (96, 128), generator=g, dtype=torch.uint8)
    # the case: scale 0.857 -> image 82x110 and the map with it, PIL's nearest rule
    geo = SubnetGeometry(96, 128, SubnetSpec(scale=0.857))
    out = geo.label_map(seg.long(), 255)
    assert out.shape == (82, 110) and out.dtype == torch.long
    assert torch.equal(out, torch.from_numpy(geo.transform.apply_segmentation(seg.numpy().copy())).long())
    # hand: a 0.5 rescale takes the source pixel floor((i + 0.5) * 2) = 2i + 1
    half = SubnetGeometry(96, 128, SubnetSpec(scale=0.5)).label_map(seg, 255)
    assert torch.equal(half, seg[1::2, 1::2])
    # rotation: detectron2's cv2 nearest rule inside; pixels from outside get the ignore value
    geo = SubnetGeometry(96, 128, SubnetSpec(angle=90.0))
    rot = geo.label_map(seg, 255)
    ref = torch.from_numpy(geo.transform.apply_segmentation(seg.numpy().copy()))
    outside = rot == 255
    assert outside.sum() == 2 * 96 * 16  # a 96x128 turned a quarter about its centre leaves 2 side bands
    assert torch.equal(rot[~outside], ref[~outside]) and (ref[outside] == 0).all()


def _instances(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    inst = Instances((h, w))
    boxes = torch.tensor([[3.0, 4.0, 50.0, 60.0], [10.5, 20.25, 30.0, 31.0], [w - 6.0, 0.0, w, 5.0]])
    inst.gt_boxes = Boxes(boxes)
    inst.gt_classes = torch.tensor([0, 2, 1])
    inst.gt_masks = PolygonMasks([[b[[0, 1, 2, 1, 2, 3, 0, 3]].numpy().astype(np.float64)] for b in boxes])
    kp = torch.rand(3, 4, 3, generator=g) * torch.tensor([w, h, 0.0]) + torch.tensor([0.0, 0.0, 2.0])
    kp[0, 1] = 0  # an unlabelled point
    inst.gt_keypoints = Keypoints(kp)
    return inst


@pytest.mark.parametrize("spec", [SubnetSpec(scale=0.714), SubnetSpec(angle=33.0), SubnetSpec(scale=0.5, angle=-20.0)])
def test_boxes_polygons_keypoints_equal_detectron2(spec):
    h, w = 64, 96
    inst = _instances(h, w)
    img = _rand_image(3, h, w)
    (out,), _ = transform_detection_batch([{"image": img, "instances": inst}], spec)
    geo = SubnetGeometry(h, w, spec)
    tfm, size = geo.transform, geo.size
    boxes = Boxes(torch.as_tensor(tfm.apply_box(inst.gt_boxes.tensor.numpy().copy()), dtype=torch.float32))
    boxes.clip(size)
    keep = boxes.nonempty(1e-5)
    new = out["instances"]
    assert new.image_size == size == tuple(out["image"].shape[-2:])
    assert torch.allclose(new.gt_boxes.tensor, boxes.tensor[keep], atol=1e-4)  # float32 vs float64 corners
    assert torch.equal(new.gt_classes, inst.gt_classes[keep])
    polys = [[p.reshape(-1) for p in tfm.apply_polygons([q.reshape(-1, 2).copy() for q in obj])]
             for obj in inst.gt_masks.polygons]
    for a, b in zip(new.gt_masks.polygons, [p for p, k in zip(polys, keep) if k]):
        assert np.array_equal(a[0], b[0])  # the same detectron2 call
    kps = np.stack([utils.transform_keypoint_annotations(k.reshape(-1).tolist(), tfm, size)
                    for k in inst.gt_keypoints.tensor.double().numpy()])
    assert np.allclose(new.gt_keypoints.tensor.numpy(), kps[keep.numpy()], atol=1e-4)
    if spec.angle == 33.0:  # this turn moves some keypoints out: they become invisible (0, 0, 0)
        assert (kps[..., 2] == 0).sum() > 1


def test_instances_leaving_the_image_are_dropped_with_all_their_fields():
    h, w = 64, 64
    inst = _instances(h, w)
    inst.gt_boxes = Boxes(torch.tensor([[0.0, 0.0, 4.0, 4.0], [20.0, 20.0, 40.0, 40.0], [60.0, 0.0, 64.0, 4.0]]))
    inst.gt_masks = BitMasks(torch.zeros(3, h, w, dtype=torch.bool).index_fill_(1, torch.tensor([1, 2]), True))
    # 45 degrees about the centre turns the top-left corner box out of the image
    (out,), _ = transform_detection_batch([{"image": _rand_image(1, h, w), "instances": inst}], SubnetSpec(angle=45.0))
    new = out["instances"]
    assert len(new) == 1 and torch.equal(new.gt_classes, inst.gt_classes[1:2])
    geo = SubnetGeometry(h, w, SubnetSpec(angle=45.0))
    ref = geo.transform.apply_segmentation(inst.gt_masks.tensor[1].numpy().astype(np.uint8))
    assert torch.equal(new.gt_masks.tensor[0], torch.from_numpy(ref).bool())
    assert len(new.gt_keypoints) == 1


@pytest.mark.parametrize("spec", [SubnetSpec(scale=0.714), SubnetSpec(angle=33.0), SubnetSpec(scale=0.5, angle=-20.0)])
def test_pointsup_points_move_with_the_image_as_detectron2_moves_them(spec):
    """PointSup's point supervision (``gt_point_coords`` (N, P, 2) pixels, ``gt_point_labels``
    (N, P)): the points take the image's transform (detectron2's ``apply_coords``, as PointSup's
    mapper applies it); points that leave the image get label -1 (ignored by PointRend's
    ``roi_mask_point_loss``), the others keep theirs."""
    h, w = 64, 96
    inst = _instances(h, w)
    g = torch.Generator().manual_seed(3)
    coords = torch.rand(3, 5, 2, generator=g) * torch.tensor([w, h], dtype=torch.float32)
    coords[0, 0] = torch.tensor([1.0, 1.0])  # near a corner: a turn moves it out of the image
    labels = torch.randint(0, 2, (3, 5), generator=g)
    inst.gt_point_coords, inst.gt_point_labels = coords, labels
    (out,), _ = transform_detection_batch([{"image": _rand_image(3, h, w), "instances": inst}], spec)
    geo = SubnetGeometry(h, w, spec)
    ref = geo.transform.apply_coords(coords.reshape(-1, 2).double().numpy().copy()).reshape(3, 5, 2)
    oh, ow = geo.size
    inside = (ref[..., 0] >= 0) & (ref[..., 0] <= ow) & (ref[..., 1] >= 0) & (ref[..., 1] <= oh)
    boxes = Boxes(torch.as_tensor(geo.transform.apply_box(inst.gt_boxes.tensor.numpy().copy()), dtype=torch.float32))
    boxes.clip(geo.size)
    kept = boxes.nonempty(1e-5).numpy()  # instances left without area are dropped with their points
    new = out["instances"]
    assert new.gt_point_coords.dtype == torch.float32 and len(new) == kept.sum()
    assert np.allclose(new.gt_point_coords.numpy(), ref[kept], atol=1e-4)
    want = np.where(inside, labels.numpy(), -1)[kept]
    assert np.array_equal(new.gt_point_labels.numpy(), want)
    if spec.angle == 33.0:
        assert (want == -1).any() and (want != -1).any()  # the corner point left the image, others stayed


def test_plain_tensor_fields_without_known_geometry_are_refused_unless_declared(make_batch):
    batch = make_batch(1, 64)
    n = len(batch[0]["instances"])
    batch[0]["instances"].gt_centers = torch.zeros(n, 2)
    with pytest.raises(NotImplementedError, match=r"'gt_centers'.*keep_instance_field\('gt_centers'\)"):
        check_batch_fields(batch)
    from gradaug_det.gradaug import keep_instance_field
    from gradaug_det.gradaug import transforms as tr

    before = set(tr._INSTANCE_ATTRIBUTES)
    try:
        keep_instance_field("gt_centers")  # declared an attribute: kept as it is
        check_batch_fields(batch)
        (out,), _ = transform_detection_batch(batch, SubnetSpec(scale=0.5))
        assert torch.equal(out["instances"].gt_centers, torch.zeros(len(out["instances"]), 2))
        with pytest.raises(ValueError, match="'gt_point_coords' has geometry"):
            keep_instance_field("gt_point_coords")
    finally:
        tr._INSTANCE_ATTRIBUTES.clear()
        tr._INSTANCE_ATTRIBUTES.update(before)


def test_models_gradaug_cannot_feed_are_refused_before_any_data(make_rcnn_cfg):
    from gradaug_det.engine.checks import check_subnet_backbone

    cfg = make_rcnn_cfg()
    cfg.GRADAUG.ENABLED = True
    cfg.GRADAUG.SUBNET_LOSS = "gt"
    cfg.MODEL.META_ARCHITECTURE = "PanopticDeepLab"  # its mapper writes center / offset targets
    with pytest.raises(ValueError, match="MODEL.META_ARCHITECTURE='PanopticDeepLab' trains on center heat maps"):
        check_subnet_loss_support(cfg)
    cfg = make_rcnn_cfg()
    cfg.GRADAUG.ENABLED = True
    cfg.MODEL.BACKBONE.NAME = "build_resnet_deeplab_backbone"
    with pytest.raises(ValueError, match="'build_resnet_deeplab_backbone' has no slimmable twin") as err:
        check_subnet_backbone(cfg, torch.nn.Conv2d(3, 3, 1))
    assert "set MODEL.BACKBONE.NAME" not in str(err.value)  # no twin is suggested for it
    cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
    with pytest.raises(ValueError, match="set MODEL.BACKBONE.NAME='build_slimmable_resnet_fpn_backbone'"):
        check_subnet_backbone(cfg, torch.nn.Conv2d(3, 3, 1))


def test_proposals_match_detectron2_transform_proposals():
    h, w = 64, 96
    props = Instances((h, w))
    props.proposal_boxes = Boxes(torch.tensor([[0.0, 0.0, 3.0, 3.0], [10.0, 10.0, 50.0, 40.0], [80.0, 50.0, 96.0, 64.0]]))
    props.objectness_logits = torch.tensor([0.1, 0.7, -0.2])
    spec = SubnetSpec(scale=0.857, angle=40.0)
    (out,), _ = transform_detection_batch([{"image": _rand_image(3, h, w), "proposals": props}], spec)
    geo = SubnetGeometry(h, w, spec)
    d2 = {"proposal_boxes": props.proposal_boxes.tensor.numpy().copy(), "proposal_bbox_mode": 0,
          "proposal_objectness_logits": props.objectness_logits.numpy()}
    utils.transform_proposals(d2, geo.size, geo.transform, proposal_topk=10)  # fills d2["proposals"]
    ref = d2["proposals"]
    new = out["proposals"]
    assert len(new) == len(ref) < 3
    assert torch.allclose(new.proposal_boxes.tensor, ref.proposal_boxes.tensor, atol=1e-4)
    assert torch.equal(new.objectness_logits, ref.objectness_logits)


def test_teacher_rois_keep_their_rows_with_weights():
    h, w = 64, 64
    rois = torch.tensor([[0.0, 0.0, 4.0, 4.0], [20.0, 20.0, 40.0, 40.0]])
    logits = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    batch = [{"image": _rand_image(3, h, w)}]
    _, (t,) = transform_detection_batch(batch, SubnetSpec(angle=45.0), [{"boxes": rois, "logits": logits}])
    assert torch.equal(t["weights"], torch.tensor([0.0, 1.0])) and torch.equal(t["logits"], logits)
    geo = SubnetGeometry(h, w, SubnetSpec(angle=45.0))
    assert torch.allclose(t["boxes"][1], geo.boxes(rois[1:]).squeeze(0))
    student = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    # the weighted loss is the reference loss on the kept rows
    assert torch.allclose(soft_label_kl(student, logits, t["weights"]), soft_label_kl(student[1:], logits[1:]))
    assert torch.allclose(soft_label_kl(student, logits, torch.ones(2)), soft_label_kl(student, logits))


def test_unknown_fields_are_refused_before_any_pass(make_rcnn_cfg, make_batch):
    batch = make_batch(1, 64)
    batch[0]["depth"] = torch.zeros(64, 64)
    with pytest.raises(NotImplementedError, match="'depth'"):
        check_batch_fields(batch)
    model = build_model(make_rcnn_cfg())
    model.train()
    calls = []
    model.backbone.register_forward_hook(lambda *a: calls.append(1))
    with EventStorage(0), pytest.raises(NotImplementedError, match="'depth'"):
        gradaug_step(model, batch, SubnetSampler(seed=0), DetectionTask(model, GradAugOptions(subnet_loss="gt")))
    assert not calls  # refused before the full network's pass
    batch = make_batch(1, 64)
    batch[0]["instances"].gt_rotated = RotatedBoxes(torch.zeros(2, 5))
    with pytest.raises(NotImplementedError, match="'gt_rotated' \\(RotatedBoxes\\)"):
        check_batch_fields(batch)


def test_constructor_checks_name_the_key(make_rcnn_cfg):
    cfg = make_rcnn_cfg()
    cfg.GRADAUG.ENABLED = True
    check_subnet_loss_support(cfg)  # Mask R-CNN with "soft": fine
    c = cfg.clone()
    c.MODEL.META_ARCHITECTURE = "SemanticSegmentor"  # per-pixel soft labels
    check_subnet_loss_support(c)
    for key, value, match in (("META_ARCHITECTURE", "RetinaNet", "MODEL.META_ARCHITECTURE='RetinaNet'"),
                              ("META_ARCHITECTURE", "ProposalNetwork", "MODEL.META_ARCHITECTURE='ProposalNetwork'")):
        c = cfg.clone()
        c.MODEL[key] = value
        with pytest.raises(ValueError, match=match):
            check_subnet_loss_support(c)
        c.GRADAUG.SUBNET_LOSS = "gt"
        check_subnet_loss_support(c)
    for key, value in (("PROPOSAL_GENERATOR", "RRPN"), ("ROI_HEADS", "RROIHeads")):  # rotated boxes
        c = cfg.clone()
        c.GRADAUG.SUBNET_LOSS = "gt"
        c.MODEL[key].NAME = value
        with pytest.raises(ValueError, match=f"MODEL.{key}.NAME='{value}'"):
            check_subnet_loss_support(c)


def _semseg_cfg(cfg, arch):
    cfg.MODEL.META_ARCHITECTURE = arch
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 4
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 16
    cfg.MODEL.SEM_SEG_HEAD.NORM = ""
    return cfg


@pytest.mark.parametrize("arch, loss", [("SemanticSegmentor", "gt"), ("SemanticSegmentor", "soft"),
                                        ("SemanticSegmentor", "gt+soft"), ("PanopticFPN", "soft"), ("keypoints", "gt"),
                                        ("proposals", "soft"), ("proposals", "gt")])
def test_models_with_every_field_train_gradaug_steps(make_rcnn_cfg, make_batch, arch, loss):
    """The issue's failures: sem_seg left at the old size (silently shifted labels at 0.857, a
    size mismatch at 0.5), KeyError 'instances' for soft passes of PanopticFPN, keypoints
    refused in iteration 0, a 1-channel image under rotation."""
    cfg = make_rcnn_cfg()
    cfg.MODEL.MASK_ON = arch == "PanopticFPN"
    if arch == "proposals":  # Fast R-CNN on precomputed proposals
        cfg.MODEL.LOAD_PROPOSALS = True
        cfg.MODEL.PROPOSAL_GENERATOR.NAME = "PrecomputedProposals"
    elif arch == "keypoints":
        cfg.MODEL.KEYPOINT_ON = True
        cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS = 4
        cfg.MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS = (16,)
        cfg.MODEL.ROI_KEYPOINT_HEAD.POOLER_RESOLUTION = 7
    else:
        _semseg_cfg(cfg, arch)
    cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = [100.0], [50.0]
    cfg.INPUT.FORMAT = "L"
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    batch = make_batch(2, 64)
    g = torch.Generator().manual_seed(0)
    for d in batch:
        d["image"] = d["image"][:1]  # one channel
        d["sem_seg"] = torch.randint(0, 4, (64, 64), generator=g)
        d["instances"].gt_keypoints = Keypoints(torch.rand(2, 4, 3, generator=g) * torch.tensor([64, 64, 0]) + 2)
        if arch == "SemanticSegmentor":
            del d["instances"]
        if arch == "proposals":
            props = Instances((64, 64))
            xy = torch.rand(20, 2, generator=g) * 40
            props.proposal_boxes = Boxes(torch.cat([xy, xy + 8 + torch.rand(20, 2, generator=g) * 16], 1))
            props.objectness_logits = torch.randn(20, generator=g)
            d["proposals"] = props
    seen = []
    model.backbone.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape[-2:])))
    sampler = SubnetSampler(num_subnets=2, min_width=0.5, scales=(0.5,), transform="scale_rotate",
                            rotation=(10.0, 10.0), seed=0)
    with EventStorage(0):
        out = gradaug_step(model, batch, sampler, DetectionTask(model, GradAugOptions(subnet_loss=loss)))
    assert seen == [(64, 64), (32, 32), (32, 32)]
    expected = {"SemanticSegmentor": {"loss_sem_seg"}, "PanopticFPN": {"loss_soft_cls"},
                "keypoints": {"loss_keypoint"}, "proposals": {"loss_soft_cls" if loss == "soft" else "loss_cls"}}[arch]
    if arch == "SemanticSegmentor":
        expected = {"gt": {"loss_sem_seg"}, "soft": {"loss_soft_sem_seg"}, "gt+soft": {"loss_sem_seg", "loss_soft_sem_seg"}}[loss]
    for losses in out.subnet_losses:
        assert all(torch.isfinite(v) for v in losses.values())
        assert expected <= set(losses) and (loss != "soft" or set(losses) == expected)
        if "loss_soft_sem_seg" in losses:
            assert float(losses["loss_soft_sem_seg"]) > 0


@pytest.mark.parametrize("spec", [SubnetSpec(scale=0.5), SubnetSpec(scale=0.857, angle=45.0)])
def test_device_fields_are_never_read_on_the_host(spec):
    """Images, sem_seg, bitmasks and the teacher's RoIs live on PyTorch's "meta" device here,
    where any host read of a value (``.item()``, ``bool()``, ``.cpu()``, boolean indexing,
    ``nonzero``) raises: the transforms form the batch without a host synchronisation.
    Boxes stay on the host as detectron2's loaders leave them (one instance leaves the image
    at 45 degrees: dropped by a host-side decision, also from the device bitmasks)."""
    meta = torch.device("meta")
    inst = Instances((64, 80))
    inst.gt_boxes = Boxes(torch.tensor([[0.0, 0.0, 4.0, 4.0], [10.0, 10.0, 30.0, 30.0]]))
    inst.gt_classes = torch.tensor([1, 2])
    inst.gt_masks = BitMasks(torch.zeros(2, 64, 80, dtype=torch.bool, device=meta))
    batch = [{"image": torch.zeros(c, 64, 80, dtype=dtype, device=meta), "instances": inst,
              "sem_seg": torch.zeros(64, 80, dtype=torch.long, device=meta)}
             for c, dtype in ((3, torch.uint8), (1, torch.float32))]
    teacher = [{"boxes": torch.zeros(5, 4, device=meta), "logits": torch.zeros(5, 3, device=meta)}] * 2
    out, out_t = transform_detection_batch(batch, spec, teacher, device=meta)
    size = SubnetGeometry(64, 80, spec).size
    for d in out:
        assert d["image"].device == meta and d["image"].shape[-2:] == size and d["sem_seg"].shape == size
        assert d["instances"].gt_masks.tensor.shape == (len(d["instances"]),) + size
        assert len(d["instances"]) == (1 if spec.angle else 2)
    loss = soft_label_kl(torch.zeros(5, 3, device=meta), out_t[0]["logits"], out_t[0]["weights"])
    assert loss.device == meta


def _semseg_teacher(n=1, k=3, size=32, stride=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, size // stride, size // stride, generator=g) * 2
    return {"logits": logits, "sizes": [(size, size)] * n}, torch.softmax(logits, 1)


class _Head(torch.nn.Module):
    common_stride = 4

    def __init__(self):
        super().__init__()
        self.predictor = torch.nn.Identity()

    def layers(self, features):
        return self.predictor(features)


def _semseg_labels():
    from gradaug_det.gradaug.semseg_soft_labels import SemSegSoftLabels

    model = torch.nn.Module()
    model.sem_seg_head = _Head()
    return SemSegSoftLabels(model)


def test_semseg_soft_targets_by_hand():
    """The teacher's per-pixel distribution resampled to the sub-network's grid: at scale 0.5,
    student cell j (centre 4j + 2 of the 16 px image) comes from 8j + 4 of the 32 px image,
    halfway between teacher cells 2j and 2j + 1: the 2x2 average; a quarter turn turns the grid."""
    soft = _semseg_labels()
    teacher, probs = _semseg_teacher()
    geo = SubnetGeometry(32, 32, SubnetSpec(scale=0.5))
    target, weight = soft.targets(teacher, [geo], (4, 4))
    assert torch.allclose(target, F.avg_pool2d(probs, 2), atol=1e-6) and bool((weight == 1).all())
    target, weight = soft.targets(teacher, [SubnetGeometry(32, 32, SubnetSpec(angle=90.0))], (8, 8))
    assert torch.allclose(target, torch.rot90(probs, 1, (-2, -1)), atol=1e-6) and bool((weight == 1).all())
    # a 45 degree turn brings in corners from outside: weight 0 there; cells beyond the image (padding) too
    _, weight = soft.targets(teacher, [SubnetGeometry(32, 32, SubnetSpec(angle=45.0))], (10, 10))
    assert weight[0, 0, 0] == 0 and weight[0, 4, 4] == 1 and (weight[0, 8:] == 0).all() and (weight[0, :, 8:] == 0).all()
    # the loss: zero when the student predicts the resampled teacher, the reference KL otherwise
    out = {}
    with soft.teach(teacher, [geo], soft_only=True):
        out["loss"] = soft.head(torch.log(F.avg_pool2d(probs, 2)))[1]["loss_soft_sem_seg"]
    assert abs(float(out["loss"])) < 1e-6
    student = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    with soft.teach(teacher, [geo], soft_only=True):
        loss = soft.head(student)[1]["loss_soft_sem_seg"]
    ref = F.kl_div(F.log_softmax(student, 1).permute(0, 2, 3, 1).reshape(-1, 3),
                   F.avg_pool2d(probs, 2).permute(0, 2, 3, 1).reshape(-1, 3), reduction="batchmean")
    assert torch.allclose(loss, ref, atol=1e-6)
    assert "forward" not in vars(soft.head)


def test_transforms_are_exact_under_autocast():
    """Sub-network passes run under AMP (bf16 on CPU here, fp16/bf16 on GPUs): the batch is
    formed in full precision all the same."""
    h, w = 64, 96
    batch = [{"image": _rand_image(3, h, w, dtype=torch.float32), "instances": _instances(h, w),
              "sem_seg": torch.randint(0, 5, (h, w), generator=torch.Generator().manual_seed(0))}]
    teacher = [{"boxes": torch.tensor([[10.3, 8.1, 40.7, 30.2]]), "logits": torch.zeros(1, 3)}]
    spec = SubnetSpec(scale=0.857, angle=13.0)
    want, want_t = transform_detection_batch(batch, spec, teacher)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_t = transform_detection_batch(batch, spec, teacher)
    assert got[0]["image"].dtype == torch.float32 and torch.equal(got[0]["image"], want[0]["image"])
    assert torch.equal(got[0]["instances"].gt_boxes.tensor, want[0]["instances"].gt_boxes.tensor)
    assert torch.equal(got[0]["sem_seg"], want[0]["sem_seg"]) and torch.equal(got_t[0]["boxes"], want_t[0]["boxes"])
