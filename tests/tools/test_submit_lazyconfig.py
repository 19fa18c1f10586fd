"""tools/submit.py with tools/lazyconfig_train_net.py: the shipped LazyConfig
(configs/lazy/mask_rcnn_gradaug_R_50_FPN_1x.py) as a 1-task submitit job (local executor).

The config is shrunk by the same command-line overrides as the lazy tool's own test
(tests/tools/test_lazyconfig_train_net_cli.py: R18, 32-channel FPN, 64 px) and reads its own
datasets (coco_2017_train/val) from the tiny generated root of tests/conftest.py's
``tiny_coco`` (4 training / 3 validation images), 2 iterations.
"""
import json
import os
import runpy
import sys

import pytest
import torch

from gradaug_det.launch import slurm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _submit_helpers import (REPO, assert_bit_equal, enter_job_env, job_env, job_log,  # noqa: E402
                             run_preempted_once, submit_and_wait, task_starts)

LAZY_TEST = os.path.join(REPO, "tests", "tools", "test_lazyconfig_train_net_cli.py")
MAX_ITER = 2
PREEMPT_AFTER = 0  # the signal reaches the task during iteration 0 of the first run
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def tool_args():
    """The lazy tool's arguments: the shipped config, the lazy tool test's tiny overrides
    (one home: that file), 2 iterations, no periodic checkpoint, a fixed seed (the data order)."""
    lazy = runpy.run_path(LAZY_TEST)
    return ["--config-file", lazy["LAZY"], *lazy["TINY"], f"train.max_iter={MAX_ITER}",
            "train.checkpointer.period=100", "train.seed=3"]


@pytest.fixture(scope="module")
def env(tiny_coco):
    return job_env(tiny_coco[0])


def loss_iterations(job_dir):
    with open(os.path.join(job_dir, "metrics.json")) as f:
        return [r["iteration"] for r in map(json.loads, f) if "total_loss" in r]


def final_checkpoint(job_dir):
    with open(os.path.join(job_dir, "last_checkpoint")) as f:
        assert f.read().strip() == "model_final.pth"
    return torch.load(os.path.join(job_dir, "model_final.pth"), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def submitted_run(env, tool_args, tmp_path_factory):
    """``tools/submit.py --cluster local --wait`` of the lazy tool, as a user runs it."""
    job_dir = str(tmp_path_factory.mktemp("lazy_submit") / "job")
    proc = submit_and_wait("tools/lazyconfig_train_net.py", tool_args, job_dir, tasks_per_node=1, env=env,
                           timeout_s=TIMEOUT_S)
    return job_dir, proc.stdout


def test_submit_lazyconfig_tool_trains_in_the_job_dir(submitted_run):
    job_dir, stdout = submitted_run
    assert "Submitted job" in stdout and "finished" in stdout
    # the tool's output is the job directory (train.output_dir=<job dir>)
    saved = final_checkpoint(job_dir)
    assert saved["iteration"] == MAX_ITER - 1 and "gradaug_sampler" in saved["trainer"]
    assert loss_iterations(job_dir) == list(range(MAX_ITER))
    log = job_log(job_dir)
    assert "Starting training from iteration 0" in log and "Received SIGUSR2" not in log
    assert os.path.isfile(os.path.join(job_dir, "config.yaml"))
    assert task_starts(job_dir) == 1  # ended normally: not requeued


def test_preempted_lazyconfig_job_checkpoints_requeues_and_resumes(env, tool_args, submitted_run, tmp_path,
                                                                   monkeypatch):
    enter_job_env(monkeypatch, env)
    job_dir = str(tmp_path / "job")
    tool = os.path.join(REPO, "tools", "lazyconfig_train_net.py")
    args = slurm.prepare_tool_args(tool, tool_args, job_dir)
    assert args[-1] == f"train.output_dir={job_dir}"
    run_preempted_once(tool, args, job_dir, tasks_per_node=1, preempt_after=PREEMPT_AFTER, timeout_s=TIMEOUT_S)

    assert task_starts(job_dir) == 2  # requeued once
    # the checkpoint of the preempted step; the requeued run (--resume) started after it
    early = torch.load(os.path.join(job_dir, f"model_{PREEMPT_AFTER:07d}.pth"), map_location="cpu",
                       weights_only=True)
    assert early["iteration"] == PREEMPT_AFTER
    log = job_log(job_dir)
    assert "Received SIGUSR2: saving a checkpoint after the current iteration" in log
    assert f"Starting training from iteration {PREEMPT_AFTER + 1}" in log
    assert loss_iterations(job_dir) == list(range(MAX_ITER))  # each iteration ran once over both runs
    # the resumed run continued GradAug's sub-network draws: the sampler ends where the
    # uninterrupted job's does
    saved, ref = final_checkpoint(job_dir), final_checkpoint(submitted_run[0])
    assert saved["iteration"] == ref["iteration"] == MAX_ITER - 1
    assert saved["trainer"]["gradaug_sampler"] == ref["trainer"]["gradaug_sampler"]
    assert saved["trainer"]["gradaug_sampler"] != early["trainer"]["gradaug_sampler"]
    # ... and, with the data position restored too, at the uninterrupted job's weights
    assert_bit_equal(saved["model"], ref["model"])
