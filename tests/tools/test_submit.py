"""tools/submit.py: a 2-task submitit job (local executor, gloo) trains like a 2-process
``launch`` run, and a job preempted mid-run requeues, resumes and ends at the same weights.

The jobs are the quickstart config (configs/quickstart/mask_rcnn_gradaug.yaml) shrunk to 3
iterations at 64 px on its 8-image data twin; submitit's local executor runs the tasks as processes, with the same
signal handling and requeue path as on Slurm (requeue = exit status 144, the controller
starts the tasks again from the stored checkpoint() submission).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from gradaug_det.launch import slurm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _submit_helpers import (REPO, assert_bit_equal, enter_job_env, job_env, job_log,  # noqa: E402
                             run_preempted_once, submit_and_wait, task_starts)

CONFIG = os.path.join(REPO, "configs", "quickstart", "mask_rcnn_gradaug.yaml")
MAX_ITER = 3
PREEMPT_AFTER = 1  # the signal reaches every task during iteration 1 of the first run
TINY = ["SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16",
        "DATALOADER.NUM_WORKERS", "0", "DATASETS.TRAIN", "('gradaug_quickstart_tiny_train',)", "DATASETS.TEST", "()",
        "TEST.SLIM_WIDTHS", "[]"]
TIMEOUT_S = 400


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Environment of the jobs: the quickstart data's smoke-size twin (8 images) generated once,
    as the tools register it."""
    e = job_env(str(tmp_path_factory.mktemp("datasets")))
    subprocess.run([sys.executable, "-c", "import gradaug_det; from detectron2.data import DatasetCatalog; "
                    "DatasetCatalog.get('gradaug_quickstart_tiny_train')"], env=e, check=True, timeout=300,
                   capture_output=True)
    return e


@pytest.fixture(scope="module")
def launch_run(env, tmp_path_factory):
    """The reference: tools/train_net.py with detectron2's launch, 2 processes (gloo)."""
    out = str(tmp_path_factory.mktemp("launch"))
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--num-gpus", "2", "--dist-url",
                    "auto", "--config-file", CONFIG, *TINY, "OUTPUT_DIR", out], env=env, check=True,
                   timeout=TIMEOUT_S, capture_output=True)
    return out


def weights(run_dir):
    state = torch.load(os.path.join(run_dir, "model_final.pth"), map_location="cpu", weights_only=True)
    return state["model"], state["iteration"]


def last_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f][-1]


def assert_same_weights(run_dir, ref_dir):
    (got, it), (ref, ref_it) = weights(run_dir), weights(ref_dir)
    assert it == ref_it == MAX_ITER - 1
    assert got.keys() == ref.keys()
    assert_bit_equal(got, ref)  # the same computation in the same processes


def test_submit_local_job_equals_launch(env, launch_run, tmp_path):
    job_dir = str(tmp_path / "job")
    proc = submit_and_wait("tools/train_net.py", ["--config-file", CONFIG, *TINY], job_dir, tasks_per_node=2,
                           env=env, timeout_s=TIMEOUT_S)
    assert "Submitted job" in proc.stdout and "finished" in proc.stdout
    assert_same_weights(job_dir, launch_run)
    got, ref = last_metrics(job_dir), last_metrics(launch_run)
    assert got["iteration"] == ref["iteration"] == MAX_ITER - 1
    for key in ("total_loss", "loss_cls", "loss_mask", "gradaug/sub0/total_loss"):
        assert got[key] == ref[key], key
    assert task_starts(job_dir) == 1  # ended normally: not requeued
    assert os.path.isfile(os.path.join(job_dir, "log.txt")) and os.path.isfile(os.path.join(job_dir, "config.yaml"))


def test_preempted_job_checkpoints_requeues_and_resumes_to_same_weights(env, launch_run, tmp_path, monkeypatch):
    enter_job_env(monkeypatch, env)
    job_dir = str(tmp_path / "job")
    tool = os.path.join(REPO, "tools", "train_net.py")
    args = slurm.prepare_tool_args(tool, ["--config-file", CONFIG, *TINY], job_dir)
    run_preempted_once(tool, args, job_dir, tasks_per_node=2, preempt_after=PREEMPT_AFTER, timeout_s=TIMEOUT_S)

    assert task_starts(job_dir) == 2  # requeued once
    # the checkpoint of the preempted step, and the resumed run started after it
    assert os.path.isfile(os.path.join(job_dir, f"model_{PREEMPT_AFTER:07d}.pth"))
    log = job_log(job_dir)
    assert "Received SIGUSR2: saving a checkpoint after the current iteration" in log
    assert f"Starting training from iteration {PREEMPT_AFTER + 1}" in log
    assert_same_weights(job_dir, launch_run)


def test_bad_arguments_fail_before_submission(tmp_path, monkeypatch):
    import runpy

    monkeypatch.chdir(REPO)  # the tools are given as users give them, relative to the repository
    main = runpy.run_path(os.path.join(REPO, "tools", "submit.py"))["main"]
    job_dir = str(tmp_path / "j")
    cases = [
        (["tools/train_net.py", "--config-file", CONFIG, "--num-gpus", "8"], "--num-gpus is set by the Slurm"),
        (["tools/train_net.py", "--config-file", CONFIG, "OUTPUT_DIR", "x"], "OUTPUT_DIR is the job directory"),
        (["tools/train_net.py", "--config-file", "missing.yaml"], "config file 'missing.yaml' does not exist"),
        (["tools/train_net.py", "--config-file", CONFIG, "--eval-only"], "--eval-only is not a training job"),
        (["tools/train_net.py", "--config-file", CONFIG, "--trust-pickle"],  # removed: no file is fully unpickled
         f"the tool's arguments '--config-file {CONFIG} --trust-pickle' are invalid"),
        (["tools/demo.py", "--config-file", CONFIG], "the tool must be one of"),
        (["--nodes", "0", "tools/train_net.py", "--config-file", CONFIG], "nodes=0 is invalid"),
        # what the tool itself refuses before any work is refused before the job queues
        (["tools/train_net.py", "--config-file", CONFIG, "GRADAUG.NUM_SUBNET", "2"],
         "did you mean 'GRADAUG.NUM_SUBNETS'"),
        (["tools/train_net.py", "--config-file", CONFIG, "MODEL.WEIGHTS", "missing.pth"], "'missing.pth': no such file"),
        (["tools/train_net.py", "--config-file", CONFIG, "DATASETS.TRAIN", "('coco_2017_trian',)"],
         "did you mean 'coco_2017_train'"),
    ]
    for argv, message in cases:
        if argv[0] != "--nodes":
            argv = ["--cluster", "local"] + argv
        with pytest.raises(SystemExit) as e:
            main(["--job-dir", job_dir] + argv)
        assert message in str(e.value.code), (argv, e.value.code)
    os.makedirs(job_dir)
    open(os.path.join(job_dir, "last_checkpoint"), "w").write("model_0000001.pth")
    with pytest.raises(SystemExit, match="already holds a run"):
        main(["--cluster", "local", "--job-dir", job_dir, "tools/train_net.py", "--config-file", CONFIG])
    assert os.listdir(job_dir) == ["last_checkpoint"]  # nothing was submitted
    # a job directory holding this job's checkpoint: a run Slurm requeues by itself resumes
    job = slurm.TrainingJob(os.path.join(REPO, "tools", "train_net.py"), ["--config-file", CONFIG], job_dir)
    assert job.argv() == ["--resume", "--config-file", CONFIG]
    job = slurm.TrainingJob(job.tool, job.tool_args, str(tmp_path / "fresh"))
    assert job.argv() == ["--config-file", CONFIG] and job.checkpoint().function.argv()[0] == "--resume"
    # the tool's own flags pass through; the output goes to the job directory
    tool = os.path.join(REPO, "tools", "train_net.py")
    assert slurm.prepare_tool_args(tool, ["--config-file", CONFIG, "--resume", "SOLVER.MAX_ITER", "5"],
                                   "/jobs/1") == ["--config-file", CONFIG, "--resume", "SOLVER.MAX_ITER", "5",
                                                  "OUTPUT_DIR", "/jobs/1"]


def _slurm_task_env(monkeypatch, procid, nodeid, localid, ntasks=16, nodes=2):
    for k in [k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_")) or k == "MASTER_PORT"]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    for k, v in dict(SLURM_JOB_ID="4242", SLURM_NTASKS=ntasks, SLURM_JOB_NUM_NODES=nodes, SLURM_NODEID=nodeid,
                     SLURM_PROCID=procid, SLURM_LOCALID=localid,
                     SLURM_JOB_NODELIST="learnfair[0042-0043]").items():
        monkeypatch.setenv(k, str(v))


def test_slurm_task_environment_gives_rank_world_and_rendezvous(monkeypatch):
    """2 nodes x 8 tasks as Slurm describes them to task 11 (node 1, local rank 3)."""
    _slurm_task_env(monkeypatch, procid=11, nodeid=1, localid=3)
    env = slurm.distributed_env()
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.node, env.num_nodes) == \
        (11, 16, 3, 8, 1, 2)
    # rendezvous on the allocation's first node; the port comes from the job id: every task
    # (and the requeued job, same id) computes the same one
    assert env.dist_url.startswith("tcp://learnfair0042:") and 20000 <= env.master_port <= 60000
    _slurm_task_env(monkeypatch, procid=0, nodeid=0, localid=0)
    assert slurm.distributed_env().dist_url == env.dist_url
    # tasks not ranked node by node (e.g. srun --distribution=cyclic) are refused
    _slurm_task_env(monkeypatch, procid=1, nodeid=1, localid=0)
    with pytest.raises(RuntimeError, match="ranked node by node"):
        slurm.distributed_env()


def test_slurm_options_reach_the_sbatch_script(tmp_path, monkeypatch):
    """tools/submit.py's options as submitit writes them for Slurm (sbatch/srun faked on PATH)."""
    import runpy

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for exe in ("sbatch", "srun"):
        (bin_dir / exe).write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / exe).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    tool = runpy.run_path(os.path.join(REPO, "tools", "submit.py"))
    args = tool["get_parser"]().parse_args(["--nodes", "2", "--gpus-per-node", "8", "--partition", "learnfair", "--timeout",
                                "600", "--mem", "480G", "--constraint", "volta32gb", "--job-dir", str(tmp_path / "j"),
                                "tools/train_net.py", "--config-file", "c.yaml"])
    executor = tool["build_executor"](args, args.job_dir)
    script = executor._executor._make_submission_file_text("python -m submitit.core._submit", "uid")
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --cpus-per-task=10", "#SBATCH --partition=learnfair", "#SBATCH --mem=480G",
                 "#SBATCH --constraint=volta32gb", "#SBATCH --time=600", "#SBATCH --signal=USR2@120",
                 "#SBATCH --job-name=gradaug-train_net"):
        assert line in script, (line, script)
