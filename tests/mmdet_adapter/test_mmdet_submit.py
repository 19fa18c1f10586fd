"""tools/submit.py with tools/mmdet_train.py: the shipped mmdet quickstart config as a 1-task
submitit job (local executor), as a user submits it: it trains in the job directory (the
tool's --work-dir) and ends without requeueing.

The config is shrunk as in test_mmdet_runner.py, by conftest.py's options (its shapes data,
12 training / 4 validation images at 128 px, trained at 160 x 128), 2 iterations.
"""
import glob
import json
import math
import os
import subprocess
import sys

from gradaug_det.gradaug import SubnetSampler
from gradaug_det.mmdet.checkpoint import load_mmengine_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join("configs", "mmdet", "quickstart", "mask-rcnn_r18_fpn_gradaug_shapes.py")
MAX_ITERS = 2


def test_submit_mmdet_train_local_job(tmp_path, shapes_data_options, short_train_options):
    job_dir = tmp_path / "job"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "submit.py"), "--cluster", "local", "--gpus-per-node", "0",
           "--tasks-per-node", "1", "--timeout", "10", "--job-dir", str(job_dir), "--wait",
           "tools/mmdet_train.py", QUICKSTART, "--cfg-options", *shapes_data_options, *short_train_options(MAX_ITERS)]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Submitted job" in proc.stdout and "finished" in proc.stdout

    # the tool's --work-dir is the job directory: mmengine's checkpoint and logs are there
    ckpt_path = job_dir / f"iter_{MAX_ITERS}.pth"
    with open(job_dir / "last_checkpoint") as f:
        assert f.read().strip() == str(ckpt_path)
    ckpt = load_mmengine_checkpoint(str(ckpt_path))  # no full unpickling, even of our own files
    assert ckpt["meta"]["iter"] == MAX_ITERS
    sampler = SubnetSampler(seed=0)  # the config's GradAug seed: MAX_ITERS draws were made
    for _ in range(MAX_ITERS):
        sampler.sample()
    assert ckpt["gradaug_sampler"] == sampler.state_dict()
    scalars = glob.glob(str(job_dir / "*" / "vis_data" / "scalars.json"))
    assert len(scalars) == 1
    records = [json.loads(line) for line in open(scalars[0])]
    train = [r for r in records if "loss" in r]
    assert [r["iter"] for r in train] == list(range(1, MAX_ITERS + 1))
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in train)
    assert len([r for r in records if "coco/bbox_mAP" in r]) == 1  # the final validation ran

    # one start of the task: a job that ends normally is not requeued
    logs = glob.glob(str(job_dir / "submitit" / "*" / "*_0_log.out"))
    assert sum(open(p).read().count("Starting with JobEnvironment") for p in logs) == 1
