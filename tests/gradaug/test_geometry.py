"""The one sub-network geometry (gradaug/geometry.py) both frameworks use, and the RoI
teacher's shared core."""
import os
import random
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest
import torch

from gradaug_det.gradaug.geometry import (
    AffineGeometry, invert_affine, map_teacher_rois, rotation_matrix, scaled_size,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_matrices_are_opencvs_to_the_bit():
    """rotation_matrix / invert_affine are cv2.getRotationMatrix2D / cv2.invertAffineTransform
    exactly, for both centre conventions (detectron2's (w/2, h/2), mmdet's ((w-1)/2, (h-1)/2))."""
    rng = random.Random(0)
    for _ in range(2000):
        w, h = rng.randint(1, 2000), rng.randint(1, 2000)
        angle = rng.choice([rng.uniform(-180.0, 180.0), float(rng.randint(-360, 360))])
        for center in ((w / 2, h / 2), ((w - 1) / 2, (h - 1) / 2)):
            want = cv2.getRotationMatrix2D(center, angle, 1.0)
            assert np.array_equal(np.array(rotation_matrix(center, angle)), want)
            assert np.array_equal(np.array(invert_affine(tuple(map(tuple, want.tolist())))),
                                  cv2.invertAffineTransform(want))


def test_centre_conventions_and_region():
    """"edges" turns coordinates about (w/2, h/2) (detectron2's RotationTransform.rm_coords);
    "pixels" about ((w-1)/2, (h-1)/2) (mmdet's Rotate); images are resampled about
    ((w-1)/2, (h-1)/2) in both; ``region`` sets the centre and the clip inside a padded size."""
    from detectron2.data.transforms import RotationTransform

    d2 = AffineGeometry(40, 100, angle=30.0, center="edges")
    ref = RotationTransform(40, 100, 30.0, expand=False)
    assert np.array_equal(np.array(d2.rotation), ref.rm_coords)
    assert np.array_equal(np.array(d2.image_rotation), ref.rm_image)
    mm = AffineGeometry(64, 128, angle=-30.0, center="pixels", region=(40, 100))
    assert mm.size == (64, 128) and mm.region == (40, 100)
    assert np.array_equal(np.array(mm.rotation), cv2.getRotationMatrix2D((49.5, 19.5), -30.0, 1.0))
    assert np.array_equal(np.array(mm.image_rotation), np.array(mm.rotation))
    box = mm.boxes(torch.tensor([[0.0, 0.0, 100.0, 40.0]]))
    assert float(box[0, 2]) == 100.0 and float(box[0, 3]) == 40.0  # clipped to the region
    with pytest.raises(ValueError, match="center"):
        AffineGeometry(10, 10, angle=5.0, center="middle")


def test_rescale_then_rotate_points_and_inverse():
    geo = AffineGeometry(50, 70, scale=0.571, angle=17.0)
    assert geo.size == scaled_size(50, 70, 0.571) == (29, 40)
    xy = torch.tensor([[3.0, 4.0], [69.5, 0.25], [35.0, 25.0]], dtype=torch.float64)
    moved = geo.points(xy)
    x, y = geo.inverse_points(moved[:, 0], moved[:, 1])
    torch.testing.assert_close(torch.stack([x, y], -1), xy, rtol=0, atol=1e-12)
    assert AffineGeometry(50, 70).identity and AffineGeometry(50, 70, angle=360.0).identity


def test_teacher_rois_keep_every_row_with_weight_0_where_empty():
    """The RoI teacher's shared core: rows are never dropped; a RoI without area after the move
    (width or height <= 0, Boxes.nonempty()) weighs 0; prior weights multiply in."""
    # a 40 x 100 image turned a quarter counter-clockwise about (50, 20): (x, y) -> (y + 30, 70 - x);
    # the second box lands below the image (clipped to y = 40: no height), the third has no width
    boxes = torch.tensor([[40.0, 15.0, 60.0, 25.0], [0.0, 15.0, 10.0, 25.0], [5.0, 5.0, 5.0, 9.0]])
    geo = AffineGeometry(40, 100, angle=90.0)
    moved, w = map_teacher_rois(boxes, geo.boxes)
    assert moved.shape == boxes.shape and w.dtype == torch.float32 and w.tolist() == [1.0, 0.0, 0.0]
    torch.testing.assert_close(moved[:2], torch.tensor([[45.0, 10.0, 55.0, 30.0], [45.0, 40.0, 55.0, 40.0]]))
    _, w2 = map_teacher_rois(boxes, geo.boxes, torch.tensor([0.5, 1.0, 1.0], dtype=torch.float64), torch.float64)
    assert w2.dtype == torch.float64 and w2.tolist() == [0.5, 0.0, 0.0]
    meta = torch.zeros(4, 4, device="meta")  # no host read anywhere
    moved, w = map_teacher_rois(meta, AffineGeometry(30, 30, scale=0.5, angle=45.0).boxes)
    assert moved.device == w.device == torch.device("meta")


def test_geometry_needs_neither_detectron2_nor_opencv():
    script = textwrap.dedent("""
        import sys
        sys.modules["detectron2"] = None
        sys.modules["cv2"] = None
        from gradaug_det.gradaug.geometry import AffineGeometry, map_teacher_rois
        import torch
        map_teacher_rois(torch.rand(3, 4) * 10, AffineGeometry(20, 30, 0.5, 10.0, center="pixels").boxes)
        print("OK")
    """)
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
