"""tools/lazyconfig_train_net.py with the shipped LazyConfig, as users run it: train, --resume,
--eval-only at extra widths (test.slim_widths), in one process and in two gloo processes.

The shipped config stays detectron2's COCO R50 recipe; the command-line overrides below make
it a small R18 model on tiny generated data."""
import json
import math
import os
import runpy
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "lazyconfig_train_net.py")
LAZY = os.path.join(REPO, "configs", "lazy", "mask_rcnn_gradaug_R_50_FPN_1x.py")

#: Overrides that make the shipped R50 Mask R-CNN a small CPU model (R18, 32-channel FPN,
#: 64-unit box head, few RoIs, trainable BN for the random init) at 64 px.
TINY = [
    "train.device=cpu", "train.init_checkpoint=", "train.log_period=1", "optimizer.lr=0.002",
    "model.backbone.bottom_up.stages.depth=18", "model.backbone.bottom_up.freeze_at=0",
    "model.backbone.bottom_up.stem.norm=BN", "model.backbone.bottom_up.stages.norm=BN",  # random init: not frozen
    "model.backbone.out_channels=32", "model.proposal_generator.head.in_channels=32",
    "model.proposal_generator.pre_nms_topk=[200,100]", "model.proposal_generator.post_nms_topk=[64,32]",
    "model.roi_heads.batch_size_per_image=32",
    "model.roi_heads.box_head.input_shape.channels=32", "model.roi_heads.box_head.fc_dims=[64,64]",
    "model.roi_heads.box_predictor.input_shape.channels=64", "model.roi_heads.box_predictor.test_score_thresh=0.0",
    "model.roi_heads.mask_head.input_shape.channels=32", "model.roi_heads.mask_head.conv_dims=[16,16]",
    "dataloader.train.num_workers=0", "dataloader.test.num_workers=0", "dataloader.train.total_batch_size=2",
    "dataloader.train.mapper.augmentations.0.short_edge_length=[64]",
    "dataloader.train.mapper.augmentations.0.max_size=96",
    "dataloader.test.mapper.augmentations.0.short_edge_length=64",
    "dataloader.test.mapper.augmentations.0.max_size=96",
]


@pytest.fixture(scope="module")
def tool():
    return runpy.run_path(TOOL)


def _rows(out_dir):
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f]


def _run(tool, *argv):
    args = tool["get_parser"]().parse_args(["--config-file", LAZY, *argv])
    return tool["main"](args)


def test_lazy_tool_trains_resumes_and_evaluates_at_widths(tmp_path, tiny_coco, tool):
    _, train_name, val_name = tiny_coco
    out = str(tmp_path / "out")
    data = [f"dataloader.train.dataset.names={train_name}", f"dataloader.test.dataset.names={val_name}",
            "test.slim_widths=[0.5]", f"train.output_dir={out}", "train.checkpointer.period=100"]
    trainer = _run(tool, *TINY, *data, "train.max_iter=2")
    assert type(trainer).__name__ == "GradAugSimpleTrainer" and trainer.iter == 2  # max_iter once done
    rows = _rows(out)
    losses = [r for r in rows if "total_loss" in r]
    assert [r["iteration"] for r in losses] == [0, 1]
    for r in losses:
        assert math.isfinite(r["total_loss"]) and math.isfinite(r["gradaug/sub2/loss_soft_cls"])
    # the final evaluation (EvalHook) ran at width 1.0 and at test.slim_widths
    ap = [r for r in rows if "bbox/AP" in r][-1]
    assert {"segm/AP", "bbox@w0.5/AP", "segm@w0.5/AP"} <= ap.keys()
    assert math.isfinite(ap["bbox/AP"]) and math.isfinite(ap["bbox@w0.5/AP"])

    # --resume continues from model_final (iteration 1) with the sampler's state
    saved = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=True)
    assert saved["iteration"] == 1 and "gradaug_sampler" in saved["trainer"]
    trainer = _run(tool, "--resume", *TINY, *data, "train.max_iter=3")
    assert trainer.start_iter == 2 and trainer.iter == 3
    assert [r["iteration"] for r in _rows(out) if "total_loss" in r] == [0, 1, 2]
    final_ap = [r for r in _rows(out) if "bbox/AP" in r][-1]

    # --eval-only on the final checkpoint reproduces the training run's last evaluation
    res = _run(tool, "--eval-only", *TINY, *data, f"train.output_dir={tmp_path / 'eval'}",
               f"train.init_checkpoint={os.path.join(out, 'model_final.pth')}")
    assert list(res) == ["bbox", "segm", "bbox@w0.5", "segm@w0.5"]
    for task in res:
        assert res[task]["AP"] == pytest.approx(final_ap[f"{task}/AP"], abs=1e-9), task


def test_lazy_tool_resume_equals_the_uninterrupted_run(tmp_path, tiny_coco, tool):
    """detectron2's build_detection_train_loader in the LazyConfig becomes the resumable loader:
    resumed from the iteration-2 checkpoint, the run ends with the uninterrupted run's weights."""
    _, train_name, val_name = tiny_coco

    def train(out, *extra):
        _run(tool, *extra, *TINY, f"dataloader.train.dataset.names={train_name}",
             f"dataloader.test.dataset.names={val_name}", f"train.output_dir={out}", "train.checkpointer.period=2",
             "train.max_iter=4", "train.seed=3")
        return torch.load(out / "model_final.pth", weights_only=True)["model"]

    def resume(out, state):
        os.makedirs(out)
        torch.save(state, out / "model_0000001.pth")
        (out / "last_checkpoint").write_text("model_0000001.pth")
        return train(out, "--resume")

    def equal(a, b):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    ref = train(tmp_path / "ref")
    state = torch.load(tmp_path / "ref" / "model_0000001.pth", weights_only=True)
    (order,) = state["trainer"]["hooks"]["ResumableDataHook"]["ranks"]  # 2 iterations x 2 images used, or waiting
    assert state["iteration"] == 1 and order["next_position"] == 4 + sum(len(b) for b in order["waiting"])
    assert not equal(state["model"], ref)
    assert equal(resume(tmp_path / "resumed", state), ref)
    # control: restarting the data stream (detectron2's loader on --resume) gives other weights
    del state["trainer"]["hooks"]["ResumableDataHook"]
    assert not equal(resume(tmp_path / "restarted", state), ref)


def test_lazy_tool_rejects_bad_widths_before_work(tmp_path, tool):
    with pytest.raises(ValueError, match=r"test\.slim_widths holds width 1\.5"):
        _run(tool, "--eval-only", *TINY, "test.slim_widths=[1.5]", f"train.output_dir={tmp_path}")
    missing = str(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match=r"train\.init_checkpoint '.*missing\.pth': no such file"):
        _run(tool, "--eval-only", *TINY, f"train.output_dir={tmp_path}", f"train.init_checkpoint={missing}")
    # TINY ends with train.init_checkpoint= (random init): --eval-only of random weights is refused
    with pytest.raises(FileNotFoundError, match=r"would evaluate random weights"):
        _run(tool, "--eval-only", f"train.output_dir={tmp_path}", *TINY)
    assert not os.listdir(tmp_path)  # no log or config written


def test_lazy_tool_two_gloo_processes(tmp_path, tiny_coco):
    """``--num-gpus 2`` on a CPU machine: detectron2's launch starts two gloo processes,
    reading the config's own datasets (coco_2017_train/val) from a tiny generated root:
    train, --resume, --eval-only at test.slim_widths."""
    out = tmp_path / "out"
    env = dict(os.environ, DETECTRON2_DATASETS=tiny_coco[0], OMP_NUM_THREADS="1")
    # BN statistics all-reduced (detectron2's naiveSyncBN): with plain BN each process keeps
    # its own running statistics after its last step, so the end-of-training evaluation
    # (each process its own) and --eval-only of the saved (rank 0) weights could differ
    sync_bn = ["model.backbone.bottom_up.stem.norm=naiveSyncBN", "model.backbone.bottom_up.stages.norm=naiveSyncBN"]

    def run(*argv):
        # the overrides of argv last: TINY sets train.init_checkpoint= (random init), and the last one wins
        flags, overrides = [a for a in argv if a.startswith("--")], [a for a in argv if not a.startswith("--")]
        cmd = [sys.executable, TOOL, "--config-file", LAZY, "--num-gpus", "2", "--dist-url", "auto", *flags, *TINY,
               *sync_bn, "train.checkpointer.period=100", "train.ddp.fp16_compression=True", "test.slim_widths=[0.5]",
               *overrides]
        proc = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    run(f"train.output_dir={out}", "train.max_iter=2")
    log = (out / "log.txt").read_text()
    assert "Rank of current process: 0. World size: 2" in log
    # train.ddp honoured: the soft sub-network loss needs find_unused_parameters (one line says why);
    # fp16_compression is a GPU option, skipped on CPU with one line
    assert log.count("find_unused_parameters=True (instead of False) because GradAug's sub-network loss 'soft'") == 1
    assert log.count("fp16_compression ignored for a CPU model") == 1
    assert [r["iteration"] for r in _rows(out) if "total_loss" in r] == [0, 1]
    assert (out / "model_final.pth").is_file()

    # the evaluator keeps the predictions it gathered from both processes (of the last width evaluated)
    run("--resume", f"train.output_dir={out}", "train.max_iter=3", f"dataloader.evaluator.output_dir={out / 'inf'}")
    rows = _rows(out)
    assert [r["iteration"] for r in rows if "total_loss" in r] == [0, 1, 2]
    final_ap = [r for r in rows if "bbox/AP" in r][-1]
    assert math.isfinite(final_ap["bbox/AP"]) and math.isfinite(final_ap["segm@w0.5/AP"])

    # --eval-only of the saved weights on two processes gives, image for image on both processes'
    # shards, the predictions of the resumed run's final (distributed) evaluation, and its AP
    proc = run("--eval-only", f"train.output_dir={tmp_path / 'eval'}",
               f"train.init_checkpoint={out / 'model_final.pth'}", f"dataloader.evaluator.output_dir={tmp_path / 'inf'}")
    eval_log = (tmp_path / "eval" / "log.txt").read_text()
    assert "Rank of current process: 0. World size: 2" in eval_log
    assert f"Loading from {out / 'model_final.pth'}" in eval_log
    train_pred, eval_pred = (torch.load(d / "instances_predictions.pth", weights_only=True)
                             for d in (out / "inf", tmp_path / "inf"))
    assert len(train_pred) == 3 and sorted(p["image_id"] for p in train_pred) == sorted(p["image_id"] for p in eval_pred)
    by_id = {p["image_id"]: p["instances"] for p in eval_pred}
    for p in train_pred:
        assert len(p["instances"]) > 0 and p["instances"] == by_id[p["image_id"]], p["image_id"]
    for task in ("bbox", "segm", "bbox@w0.5", "segm@w0.5"):
        assert f"copypaste: Task: {task}\n" in proc.stdout
        row = proc.stdout.split(f"copypaste: Task: {task}\n", 1)[1].splitlines()[1]
        assert float(row.split("copypaste: ")[1].split(",")[0]) == final_ap[f"{task}/AP"], task


def test_every_shipped_lazy_config_is_run_here():
    """A new configs/lazy/*.py needs its own run through the tool in this file."""
    import glob

    assert sorted(glob.glob(os.path.join(REPO, "configs", "lazy", "*.py"))) == [LAZY]
