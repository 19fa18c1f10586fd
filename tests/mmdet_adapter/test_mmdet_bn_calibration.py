"""tools/mmdet_test.py --bn-calibration-batches: every sub-width is evaluated a second time
with BN statistics recomputed at that width from the config's training batches
(gradaug_det.slim.calibration, the detectron2 side's estimator), rows ``<width>+bncal``.

Run as a user runs it (``main(argv)``, the quickstart config on conftest.py's shapes data);
the BN statistics the model holds during each evaluation are recorded and compared with
an independent calibrate_bn on the same batches and, for the stem's BN, with the population
mean / variance computed by hand.
"""
import json

import pytest
import torch
from mmengine.runner import Runner

from gradaug_det.mmdet.calibration import calibration_forward
from gradaug_det.mmdet.config import load_runner_config
from gradaug_det.slim import get_width
from gradaug_det.slim.channels import slim_channels
from gradaug_det.slim.calibration import batch_norm_layers, calibrate_bn
from gradaug_det.slim.settings import RECORD_KEY, model_slimmable_settings

from .conftest import QUICKSTART, build_detector, small_mask_rcnn_cfg

NUM_BATCHES = 2
SUB = 0.75


def _bn_buffers(model):
    names = {m: n for n, m in model.named_modules()}
    return {names[m]: (m.running_mean.clone(), m.running_var.clone()) for m in batch_norm_layers(model)}


def test_bad_calibration_batches_refused_first(load_tool, tmp_path):
    with pytest.raises(SystemExit, match=r"--bn-calibration-batches=-1 is invalid"):
        load_tool("mmdet_test").main([QUICKSTART, str(tmp_path / "missing.pth"), "--bn-calibration-batches", "-1"])


def test_calibrated_widths_through_the_tool(load_tool, tmp_path, shapes_data_options, monkeypatch, capsys):
    # a checkpoint of the quickstart model as initialised (BN running statistics 0 / 1)
    model = build_detector(small_mask_rcnn_cfg())
    ckpt = tmp_path / "init.pth"
    torch.save({"meta": {}, "state_dict": model.state_dict(), RECORD_KEY: model_slimmable_settings(model)}, ckpt)
    original = _bn_buffers(model)

    # deterministic training batches: one scale, no flip; the sampler's order is the seed's
    options = [*shapes_data_options, "randomness.seed=0", "train_dataloader.dataset.pipeline.2.scales=[(160,128)]",
               "train_dataloader.dataset.pipeline.3.prob=0.0"]
    seen = []  # (width, BN buffers) at every evaluation the tool runs
    test = Runner.test

    def recording_test(runner):
        net = runner.model
        seen.append((get_width(net), _bn_buffers(net)))
        return test(runner)

    monkeypatch.setattr(Runner, "test", recording_test)
    out = tmp_path / "widths.json"
    argv = [QUICKSTART, str(ckpt), "--widths", "1.0", str(SUB), "--bn-calibration-batches", str(NUM_BATCHES),
            "--work-dir", str(tmp_path / "work"), "--out", str(out), "--cfg-options", *options]
    load_tool("mmdet_test").main(argv)
    printed = capsys.readouterr().out

    # three evaluations: 1.0 and 0.75 with the checkpoint's statistics, then 0.75 calibrated
    assert [w for w, _ in seen] == [1.0, SUB, SUB]
    # (the first is recorded before runner.test() loads the checkpoint)
    for name, (mean, var) in seen[1][1].items():
        assert torch.equal(mean, original[name][0]) and torch.equal(var, original[name][1]), name
    calibrated = seen[2][1]

    # independent: the same 2 batches of the config's train loader (built as training builds
    # it, seed 0), calibrate_bn at 0.75 on the checkpoint's model
    cfg = load_runner_config(QUICKSTART, _as_dict(options))
    loader = Runner.build_dataloader(cfg.train_dataloader, seed=0)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == NUM_BATCHES:
            break
    reference = build_detector(small_mask_rcnn_cfg(), seed=1)
    reference.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    assert calibrate_bn(reference, SUB, batches, NUM_BATCHES, calibration_forward) == len(original)
    expected = _bn_buffers(reference)
    assert calibrated.keys() == expected.keys()
    changed = 0
    for name, (mean, var) in calibrated.items():
        assert torch.equal(mean, expected[name][0]) and torch.equal(var, expected[name][1]), name
        changed += not torch.equal(mean, original[name][0])
    assert changed == len(original)  # every BN layer got calibrated statistics

    # by hand, the stem's BN: population mean / biased variance of the leading k channels of
    # conv1's output (the sub-network's: the full convolution's leading filters on the image)
    # over both batches (N*H*W values per channel), the other channels left as they were
    backbone = reference.backbone
    k = slim_channels(backbone.conv1.out_channels, SUB, backbone.divisor, backbone.rule, backbone.ratios["stem"])
    assert 0 < k < backbone.conv1.out_channels
    sums, sqs, count = 0.0, 0.0, 0
    with torch.no_grad():
        for batch in batches:
            y = backbone.conv1(reference.data_preprocessor(batch, True)["inputs"])[:, :k].double()
            sums = sums + y.sum(dim=(0, 2, 3))
            sqs = sqs + (y * y).sum(dim=(0, 2, 3))
            count += y.numel() // k
    mean, var = calibrated["backbone.bn1"]
    torch.testing.assert_close(mean[:k].double(), sums / count, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var[:k].double(), sqs / count - (sums / count) ** 2, rtol=1e-4, atol=1e-5)
    assert torch.equal(mean[k:], original["backbone.bn1"][0][k:]) and torch.equal(var[k:], original["backbone.bn1"][1][k:])

    # the tool restored the checkpoint's statistics after the calibrated evaluation
    # and reports each row, printed and in --out
    rows = json.loads(out.read_text())
    assert list(rows) == ["1.0", "0.75", "0.75+bncal"]
    for row in rows.values():
        assert 0.0 <= row["coco/bbox_mAP"] <= 1.0 and "coco/segm_mAP" in row
    lines = printed.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("width"))
    assert "coco/bbox_mAP" in lines[header]
    assert [line.split()[0] for line in lines[header + 1:header + 4]] == ["1.0", "0.75", "0.75+bncal"]


def _as_dict(options):
    from mmengine.config import DictAction
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--cfg-options", nargs="+", action=DictAction)
    return p.parse_args(["--cfg-options", *options]).cfg_options
