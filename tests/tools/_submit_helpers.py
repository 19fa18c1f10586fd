"""Shared pieces of the tools/submit.py tests (test_submit.py, test_submit_lazyconfig.py).

They run a tool through ``tools/submit.py --cluster local --wait`` as a user does, or submit
a job that Slurm's preemption signal reaches once (:class:`PreemptedOnce`) to submitit's
local executor, and read what the job left in its directory.
"""
import dataclasses
import os
import signal
import subprocess
import sys
import time

import cloudpickle
import pytest

from gradaug_det.engine import preemption
from gradaug_det.launch import slurm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def job_env(datasets_root):
    """The jobs' environment: the data under ``datasets_root``, one thread, unbuffered output."""
    return dict(os.environ, DETECTRON2_DATASETS=datasets_root, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def submit_and_wait(tool, tool_args, job_dir, tasks_per_node, env, timeout_s):
    """Runs ``tools/submit.py --cluster local --wait`` from the repository, as a user does.

    Args:
        tool: the tool to submit, relative to the repository (``tools/train_net.py``).
        tool_args: the tool's arguments.
        job_dir: the job directory.
        tasks_per_node: the job's tasks (processes, CPU only).
        env: the environment of ``tools/submit.py`` and its job.
        timeout_s: how long it may take.

    Returns:
        The finished process (text output); it exited with status 0.
    """
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "submit.py"), "--cluster", "local",
                           "--gpus-per-node", "0", "--tasks-per-node", str(tasks_per_node), "--timeout", "10",
                           "--job-dir", job_dir, "--wait", tool, *tool_args],
                          env=env, cwd=REPO, timeout=timeout_s, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@dataclasses.dataclass
class PreemptedOnce(slurm.TrainingJob):
    """The job, but in its first run every task gets Slurm's preemption signal during
    iteration ``preempt_after`` (as when Slurm preempts it); the requeued run gets none."""

    preempt_after: int = 0

    def __call__(self):
        if not self.resume:
            after_step = preemption.PreemptionHook.after_step

            def signalled_after_step(hook):
                if hook.trainer.iter == self.preempt_after:
                    os.kill(os.getpid(), signal.SIGUSR2)
                after_step(hook)

            preemption.PreemptionHook.after_step = signalled_after_step
        return super().__call__()


@dataclasses.dataclass
class MMDetPreemptedOnce(slurm.TrainingJob):
    """:class:`PreemptedOnce` for ``tools/mmdet_train.py``: in the first run every task gets
    the signal at the end of iteration ``preempt_after`` (1-based: that many iterations are
    done), through mmengine's ``after_train_iter``."""

    preempt_after: int = 0

    def __call__(self):
        if not self.resume:
            from gradaug_det.mmdet import preemption as mmdet_preemption  # mmdet tests only

            def signalled_after_iter(hook, runner, batch_idx, data_batch=None, outputs=None):
                if batch_idx + 1 == self.preempt_after:
                    os.kill(os.getpid(), signal.SIGUSR2)

            mmdet_preemption.MMEnginePreemptionHook.after_train_iter = signalled_after_iter
        return super().__call__()


def enter_job_env(monkeypatch, env):
    """Makes ``env`` this process's environment and the repository its directory, as for
    ``tools/submit.py``: the local executor's tasks inherit both."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(REPO)


def run_preempted_once(tool, tool_args, job_dir, tasks_per_node, preempt_after, timeout_s, job_class=None):
    """Submits :class:`PreemptedOnce` to submitit's local executor and waits for it to end.

    Args:
        tool: the tool's path.
        tool_args: the tool's arguments, from ``slurm.prepare_tool_args``.
        job_dir: the job directory.
        tasks_per_node: the job's tasks (processes, CPU only).
        preempt_after: the iteration of the first run during which the signal comes.
        timeout_s: how long it may take; the test fails after that.
        job_class: the job (default :class:`PreemptedOnce`; :class:`MMDetPreemptedOnce` for
            ``tools/mmdet_train.py``).
    """
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the job imports nothing from tests/
    executor = slurm.make_executor(job_dir, cluster="local", gpus_per_node=0, tasks_per_node=tasks_per_node,
                                   timeout_min=10)
    job = executor.submit((job_class or PreemptedOnce)(tool, tool_args, job_dir, preempt_after=preempt_after))
    deadline = time.time() + timeout_s
    while not job.done():
        if time.time() > deadline:
            job.cancel()
            pytest.fail(f"job did not end in {timeout_s} s; logs in {job.paths.folder}")
        time.sleep(1)
    job.results()  # raises with the tasks' traceback if they failed


def task_starts(job_dir):
    """How many times task 0 was started (1 + number of requeues), from submitit's log."""
    logs = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(job_dir, "submitit")) for f in fs
            if f.endswith("_0_log.out")]
    return sum(open(p).read().count("Starting with JobEnvironment") for p in logs)


def job_log(job_dir):
    """The text of the job's ``log.txt`` (the tool's log)."""
    with open(os.path.join(job_dir, "log.txt")) as f:
        return f.read()


def assert_bit_equal(got, ref):
    """Asserts that the state dict ``got`` equals ``ref`` bit for bit (tensors with elements)."""
    diff = {k: (got[k].double() - ref[k].double()).abs().max().item() for k in ref if ref[k].numel()}
    worst = max(diff, key=diff.get)
    assert diff[worst] == 0, f"{worst} differs by {diff[worst]}"
