"""tools/train_net.py killed with SIGKILL and resumed equals the uninterrupted run, step for step.

Also: ``last_checkpoint`` lost in the kill and a partial checkpoint beside the complete ones
(what a kill during a non-atomic save left) do not stop ``--resume``.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart", "mask_rcnn_gradaug.yaml")
CHEAP = ("MODEL.RPN.POST_NMS_TOPK_TRAIN", "100", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
         "MODEL.ROI_MASK_HEAD.NUM_CONV", "1", "MODEL.ROI_MASK_HEAD.CONV_DIM", "16", "MODEL.FPN.OUT_CHANNELS", "32",
         "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "GRADAUG.NUM_SUBNETS", "2")
MAX_ITER = 6


def _cmd(out, num_workers, *extra):
    return [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", QUICKSTART, *extra,
            "OUTPUT_DIR", str(out), "DATALOADER.NUM_WORKERS", str(num_workers), "INPUT.MIN_SIZE_TRAIN", "(96, 128)",
            "INPUT.MAX_SIZE_TRAIN", "160", "DATASETS.TEST", "()", "SOLVER.MAX_ITER", str(MAX_ITER),
            "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "0",
            "SOLVER.BASE_LR", "0.01", "SEED", "3", "TEST.SLIM_WIDTHS", "[]", "GRADAUG.SUBNET_LOSS", "gt+soft", *CHEAP]


def _env(data_root):
    return dict(os.environ, DETECTRON2_DATASETS=data_root, OMP_NUM_THREADS="1")


def _final(out):
    return torch.load(out / "model_final.pth", weights_only=True)


def _metrics(out):
    rows = {}
    with open(out / "metrics.json") as f:
        for line in f:
            r = json.loads(line)
            rows[r["iteration"]] = {k: v for k, v in r.items() if "time" not in k and k != "eta_seconds"}
    return rows


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("datasets"))


def test_killed_and_resumed_run_equals_the_uninterrupted_run(tmp_path, data_root, num_workers=2):
    """Two data-loading workers: items are mapped in other processes and prefetched."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    env = _env(data_root)
    subprocess.run([sys.executable, "-c", "import gradaug_det, detectron2.data as d; "
                    "d.DatasetCatalog.get('gradaug_quickstart_train')"], check=True, env=env, cwd=ROOT)
    uninterrupted = subprocess.Popen(_cmd(ref, num_workers), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
    proc = subprocess.Popen(_cmd(run, num_workers), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not (run / "model_0000003.pth").exists():  # iteration 3 saved: kill within iteration 4 or 5
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "model_final.pth").exists()
    # what kills during the old non-atomic writes left: an empty last_checkpoint, a partial file
    (run / "last_checkpoint").write_text("")
    (run / "model_0000099.pth").write_bytes((run / "model_0000003.pth").read_bytes()[:5000])
    assert not [f for f in os.listdir(run) if f.endswith(".pth") and f.startswith(".")]

    res = subprocess.run(_cmd(run, num_workers, "--resume"), env=env, cwd=ROOT, timeout=900,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    log = (run / "log.txt").read_text()
    assert "last_checkpoint is empty; resuming from the newest complete checkpoint" in log
    assert "Loading from " + str(run / "model_0000003.pth") in log

    assert uninterrupted.wait(timeout=900) == 0
    a, b = _final(ref), _final(run)
    assert a["iteration"] == b["iteration"] == MAX_ITER - 1
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["trainer"]["hooks"]["ResumableDataHook"] == b["trainer"]["hooks"]["ResumableDataHook"]
    assert a["trainer"]["_trainer"]["gradaug_sampler"] == b["trainer"]["_trainer"]["gradaug_sampler"]
    # metrics.json: the scalars detectron2 does not smooth over its 20-iteration window (the
    # resumed process's window starts at the resume) agree; the learning rate schedule too
    ma, mb = _metrics(ref)[MAX_ITER - 1], _metrics(run)[MAX_ITER - 1]
    assert ma["lr"] == mb["lr"]
    trained = torch.load(run / "model_0000003.pth", weights_only=True)["model"]
    assert any(not torch.equal(trained[k], v) for k, v in b["model"].items())  # iterations 4, 5 did train
