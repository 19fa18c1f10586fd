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
from gradaug_det.gradaug.options import MMDET_KEYS, GradAugOptions
from gradaug_det.mmdet.checkpoint import load_mmengine_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join("configs", "mmdet", "quickstart", "mask-rcnn_r18_fpn_gradaug_shapes.py")
MAX_ITERS = 2


def _config_sampler():
    """A fresh sub-network sampler of the quickstart config's GradAug settings and seed."""
    from mmengine.config import Config

    gradaug = dict(Config.fromfile(os.path.join(ROOT, QUICKSTART)).model.gradaug)
    return SubnetSampler(GradAugOptions.from_dict(gradaug, "model.gradaug.", MMDET_KEYS))


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
    sampler = _config_sampler()  # MAX_ITERS draws were made
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


PREEMPTED_ITERS = 4
PREEMPT_AFTER = 2  # the signal comes during the first run's iteration 2


def test_preempted_mmdet_job_checkpoints_requeues_and_resumes_to_same_weights(
        tmp_path, monkeypatch, shapes_data_options, short_train_options):
    """tools/mmdet_train.py as a submitit job (local executor) that Slurm's signal reaches in
    iteration 2 of 4: it saves iter_2.pth (with the sampler and RNG states), requeues, resumes
    with --resume and ends at the weights of an uninterrupted tools/mmdet_train.py run."""
    import sys as _sys

    _sys.path.insert(0, os.path.join(ROOT, "tests", "tools"))
    from _submit_helpers import MMDetPreemptedOnce, assert_bit_equal, enter_job_env, run_preempted_once, task_starts

    from gradaug_det.mmdet import preemption as mmdet_preemption
    from gradaug_det.launch import slurm

    options = [*shapes_data_options, *short_train_options(PREEMPTED_ITERS),
               "val_dataloader=None", "val_cfg=None", "val_evaluator=None"]  # no evaluation: weights only
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    ref_dir = tmp_path / "ref"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "mmdet_train.py"), QUICKSTART,
                           "--work-dir", str(ref_dir), "--cfg-options", *options],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    enter_job_env(monkeypatch, env)
    job_dir = str(tmp_path / "job")
    tool = os.path.join(ROOT, "tools", "mmdet_train.py")
    args = slurm.prepare_tool_args(tool, [QUICKSTART, "--cfg-options", *options], job_dir)
    run_preempted_once(tool, args, job_dir, tasks_per_node=1, preempt_after=PREEMPT_AFTER, timeout_s=400,
                       job_class=MMDetPreemptedOnce)
    assert task_starts(job_dir) == 2  # requeued once

    # the checkpoint of the 2 iterations done, with the sampler's and the RNG's states
    stopped = load_mmengine_checkpoint(os.path.join(job_dir, f"iter_{PREEMPT_AFTER}.pth"))
    assert stopped["meta"]["iter"] == PREEMPT_AFTER
    sampler = _config_sampler()
    for _ in range(PREEMPT_AFTER):
        sampler.sample()
    assert stopped["gradaug_sampler"] == sampler.state_dict()
    assert len(stopped[mmdet_preemption.MMEnginePreemptionHook.RNG_KEY]) == 1
    logs = "".join(open(os.path.join(d, f)).read() for d, _, fs in os.walk(os.path.join(job_dir, "submitit"))
                   for f in fs if f.endswith(("_0_log.out", "_0_log.err")))
    assert "Received SIGUSR2: saving a checkpoint after the current iteration" in logs
    assert f"Advance dataloader {PREEMPT_AFTER} steps" in logs

    final = load_mmengine_checkpoint(os.path.join(job_dir, f"iter_{PREEMPTED_ITERS}.pth"))
    ref = load_mmengine_checkpoint(str(ref_dir / f"iter_{PREEMPTED_ITERS}.pth"))
    assert final["meta"]["iter"] == ref["meta"]["iter"] == PREEMPTED_ITERS
    assert final["state_dict"].keys() == ref["state_dict"].keys()
    assert_bit_equal(final["state_dict"], ref["state_dict"])
