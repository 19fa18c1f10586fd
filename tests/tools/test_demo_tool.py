"""tools/demo.py draws predictions of a random-init tiny model into image files."""
import os
import runpy

import cv2
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def demo():
    return runpy.run_path(os.path.join(REPO, "tools", "demo.py"))


def _images(tmp_path, n):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = tmp_path / f"img{i}.png"
        cv2.imwrite(str(path), rng.integers(0, 255, (64, 80, 3), dtype=np.uint8))
        paths.append(path)
    return paths


def test_demo_writes_drawn_images(tmp_path, make_rcnn_cfg, demo):
    cfg = make_rcnn_cfg()
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 96
    cfg.DATASETS.TEST = ("gradaug_quickstart_val",)  # class names from its metadata
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(cfg.dump())
    images = _images(tmp_path, 2)
    out_dir = tmp_path / "out"
    args = demo["get_parser"]().parse_args([
        "--config-file", str(cfg_file), "--input", str(tmp_path / "img*.png"), "--output", str(out_dir),
        "--width", "0.75", "--confidence-threshold", "0", "--opts", "MODEL.DEVICE", "cpu"])
    written = demo["main"](args)
    assert [os.path.basename(p) for p in written] == [p.name for p in images]
    for path, src in zip(written, images):
        drawn = cv2.imread(path)
        assert drawn is not None and drawn.shape[:2] == (64, 80)
        assert not np.array_equal(drawn, cv2.imread(str(src)))  # something was drawn

    single = tmp_path / "single.jpg"
    args = demo["get_parser"]().parse_args([
        "--config-file", str(cfg_file), "--input", str(images[0]), "--output", str(single),
        "--confidence-threshold", "0"])
    assert demo["main"](args) == [str(single)] and cv2.imread(str(single)) is not None


def test_demo_rejects_bad_width_and_missing_input(tmp_path, demo):
    parser = demo["get_parser"]()
    with pytest.raises(SystemExit, match="--width"):
        demo["main"](parser.parse_args(["--config-file", "x.yaml", "--input", "a.png", "--output", "o",
                                          "--width", "1.5"]))
    with pytest.raises(SystemExit, match="matches no file"):
        demo["expand_inputs"]([str(tmp_path / "none*.png")])
