"""Run the training tools as one Slurm job with submitit: multi-node, preemption and requeue.

``tools/submit.py`` is the command line; this module is what runs inside the job:

* :class:`TrainingJob` — the submitit callable. Every Slurm task (one per GPU) runs it; it
  reads its rank, the world size and the rendezvous address from submitit's
  ``JobEnvironment`` (:func:`distributed_env`) and runs the tool's ``main`` in this process
  (no further process spawning, so the task itself receives Slurm's signals).
* Preemption and time limits: Slurm sends ``SIGUSR2`` (submitit's ``--signal=USR2@N``) to
  every task before it stops the job. Saving from a signal handler in the middle of a step
  is unsafe (half-applied optimizer step, ranks at different iterations, collectives
  interrupted), so while the training loop runs the handler only sets a flag.
  :class:`~gradaug_det.engine.preemption.PreemptionHook` (a detectron2 hook) agrees on the flag across ranks after every
  step (one all-reduce of one number), saves a checkpoint of that step — all ranks at the
  same iteration — and stops the loop. The task of rank 0 then calls submitit's own handler
  at this safe point, which calls :meth:`TrainingJob.checkpoint` (the same job with
  ``--resume``), stores it, and requeues the job (``scontrol requeue``). The requeued job
  resumes from the saved checkpoint with the tool's ``--resume`` (model, optimizer,
  scheduler, iteration, GradAug sampler state and data position, whatever the trainer's
  checkpointer records). Outside the training loop (building the model, final evaluation)
  the signal goes straight to submitit's handler: checkpoint and requeue at once.
  A job that ends normally does not requeue.

MMDetection's ``tools/mmdet_train.py`` runs with ``--launcher pytorch`` (the rendezvous
exported as ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) and
registers :class:`~gradaug_det.mmdet.preemption.MMEnginePreemptionHook`
(:func:`~gradaug_det.mmdet.preemption.mmengine_preemption_hook`), the same
protocol in mmengine's hooks: after the signal, the next iteration does not start; the
checkpoint of the iterations done (``iter_<n>.pth``, ``last_checkpoint``: model, optimizer,
schedulers, message hub, GradAug sampler state) also holds every rank's RNG states at that
point, which the resumed run restores at the same point (after mmengine has advanced the
data loader past the trained batches), so the resumed run ends at the weights of an
uninterrupted one.
"""
import dataclasses
import importlib.util
import logging
import os
import runpy
import shutil
import sys
from typing import List, Optional, Sequence

import torch.distributed as dist

from detectron2.engine import default_argument_parser
from detectron2.engine.launch import _distributed_worker  # launch()'s per-process entry

from ..config import merge_user_config
from ..engine.lazy import load_lazy_config
from ..engine.setup import check_config_inputs, get_gradaug_cfg
from ..utils.preemption import TrainingPreempted, install_signal_handler, preemption_state

__all__ = [
    "TOOLS",
    "DistributedEnv",
    "TrainingJob",
    "distributed_env",
    "make_executor",
    "tool_kind",
    "prepare_tool_args",
]

logger = logging.getLogger(__name__)

# Tools that can be submitted (file name -> how the job runs it).
TOOLS = {
    "train_net.py": "detectron2",
    "lazyconfig_train_net.py": "lazyconfig",
    "mmdet_train.py": "mmdet",
}

# detectron2 launch flags that the Slurm allocation decides; refused in the tool's arguments.
_LAUNCH_FLAGS = ("--num-gpus", "--num-machines", "--machine-rank", "--dist-url")


def tool_kind(tool: str) -> str:
    """Which kind of tool ``tool`` (a path) is: "detectron2", "lazyconfig" or "mmdet".

    Raises:
        ValueError: the file does not exist or is not one of :data:`TOOLS`.
    """
    name = os.path.basename(tool)
    if name not in TOOLS:
        raise ValueError(f"cannot submit {tool!r}: the tool must be one of {', '.join('tools/' + t for t in TOOLS)}")
    if not os.path.isfile(tool):
        raise ValueError(f"tool {tool!r} does not exist (run from the repository root, or give its path)")
    return TOOLS[name]


def prepare_tool_args(tool: str, tool_args: Sequence[str], job_dir: str) -> List[str]:
    """Check the tool's own arguments and point its output at ``job_dir``.

    The arguments are parsed with the tool's parser here, before anything is submitted, so
    a typo fails at once instead of in the queue. The output directory is the job directory:
    ``OUTPUT_DIR`` (yacs), ``train.output_dir`` (LazyConfig) or ``--work-dir`` (mmdet) is
    appended.

    Args:
        tool: path of the tool (:data:`TOOLS`).
        tool_args: the arguments the tool takes when run by hand (config, flags, overrides).
        job_dir: the job directory (absolute).

    Returns:
        The tool's argument list for the job.

    Raises:
        ValueError: an unknown tool, launch flags (the allocation sets them), an output
            directory of its own, a missing config file, or arguments the tool's parser rejects.
        UserError: what the tool itself would refuse before any work (unknown keys with the
            closest real one, bad values, unregistered datasets, missing weights), for the
            detectron2 and LazyConfig tools.
    """
    kind = tool_kind(tool)
    tool_args = list(tool_args)
    for flag in _LAUNCH_FLAGS + ("--launcher", "--work-dir"):
        if any(a == flag or a.startswith(flag + "=") for a in tool_args):
            raise ValueError(
                f"{flag} is set by the Slurm allocation (--nodes, --gpus-per-node, --job-dir of tools/submit.py); "
                "remove it from the tool's arguments")
    if kind == "mmdet":
        if importlib.util.find_spec("mmengine") is None:
            raise ValueError("tools/mmdet_train.py needs MMDetection: `make install-mmdet` or pip install -e .[mmdet]")

        parsed = _parse(_load_tool(tool)["parse_args"], tool_args)
        config = parsed.config
        argv = tool_args + ["--work-dir", job_dir]
    else:
        parsed = _parse(_tool_parser(_load_tool(tool)).parse_args, tool_args)
        if parsed.eval_only:
            raise ValueError("--eval-only is not a training job; run the tool directly or without --eval-only")
        config = parsed.config_file
        key = "OUTPUT_DIR" if kind == "detectron2" else "train.output_dir="
        if any(o == key or o.startswith(key) for o in parsed.opts or ()):
            raise ValueError(f"{key.rstrip('=')} is the job directory: give it as --job-dir, not as an override")
        argv = tool_args + (["OUTPUT_DIR", job_dir] if kind == "detectron2" else [f"train.output_dir={job_dir}"])
    if not config or not os.path.isfile(config):
        raise ValueError(f"config file {config!r} does not exist")
    if kind == "detectron2":  # the tool's own checks, here rather than in the queue: keys, datasets, weights
        cfg = merge_user_config(get_gradaug_cfg(), config, list(parsed.opts or ()))
        check_config_inputs(cfg, resume=parsed.resume)
    elif kind == "lazyconfig":
        load_lazy_config(config, list(parsed.opts or ()), resume=parsed.resume)
    return argv


def _parse(parse, argv):
    try:
        return parse(argv)
    except SystemExit as e:  # argparse already printed what is wrong
        raise ValueError(f"the tool's arguments {' '.join(argv)!r} are invalid (see above)") from e


def _load_tool(path: str) -> dict:
    """The globals of the tool script at ``path`` (tools are scripts, not a package)."""
    return runpy.run_path(path, run_name="gradaug_det_tool_" + os.path.splitext(os.path.basename(path))[0])


def _tool_parser(tool: dict):
    """The detectron2 tool's parser: its ``get_parser()``, else ``default_argument_parser()``."""
    return tool.get("get_parser", default_argument_parser)()


@dataclasses.dataclass(frozen=True)
class DistributedEnv:
    """Where this task sits in the job (from submitit's ``JobEnvironment``)."""

    rank: int  # global rank of the task
    world_size: int  # tasks in the job (nodes x tasks per node)
    local_rank: int  # rank on this node; the GPU index
    local_world_size: int  # tasks per node
    node: int  # node index (detectron2's machine rank)
    num_nodes: int
    master_addr: str  # first node of the allocation
    master_port: int  # derived from the job id: the same in every task and after requeue

    @property
    def dist_url(self) -> str:
        """detectron2's ``--dist-url``: ``tcp://<first node>:<port>``."""
        return f"tcp://{self.master_addr}:{self.master_port}"


def distributed_env() -> DistributedEnv:
    """Rank, world size and rendezvous address of this submitit task.

    Uses ``submitit.helpers.TorchDistributedEnvironment`` (the first host of the node list,
    a port drawn from the job id unless ``MASTER_PORT`` is set).

    Raises:
        RuntimeError: outside a submitit job, or when the tasks are not laid out node by
            node (detectron2's rank = node x tasks per node + local rank).
    """
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    env, job = TorchDistributedEnvironment(), JobEnvironment()
    out = DistributedEnv(rank=env.rank, world_size=env.world_size, local_rank=env.local_rank,
                         local_world_size=env.local_world_size, node=job.node, num_nodes=job.num_nodes,
                         master_addr=env.master_addr, master_port=env.master_port)
    if out.world_size != out.num_nodes * out.local_world_size or \
            out.rank != out.node * out.local_world_size + out.local_rank:
        raise RuntimeError(f"unexpected task layout {job!r}: every node must run the same number of tasks, "
                           "ranked node by node (Slurm's default block distribution)")
    return out


# ----------------------------------------------------------------------------------------
# The submitit callable.
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainingJob:
    """One training run of a tool as a submitit job (pickled, run by every task).

    Args:
        tool: path of ``tools/train_net.py``, ``tools/lazyconfig_train_net.py`` or
            ``tools/mmdet_train.py``.
        tool_args: the tool's arguments, from :func:`prepare_tool_args`.
        job_dir: the job directory (the tool's output directory).
        resume: add the tool's ``--resume`` (set on the job that :meth:`checkpoint` requeues).
    """

    tool: str
    tool_args: List[str]
    job_dir: str
    resume: bool = False

    @property
    def kind(self) -> str:
        return tool_kind(self.tool)

    def argv(self) -> List[str]:
        """The tool's arguments for this run: with ``--resume`` when requeued by
        :meth:`checkpoint`, and also when the job directory holds a checkpoint (written by this
        job: ``tools/submit.py`` refuses a directory holding a run without ``--resume``), so a
        job that Slurm itself requeues (node failure, ``PreemptMode=REQUEUE``) continues too."""
        argv = list(self.tool_args)
        resume = self.resume or os.path.isfile(os.path.join(self.job_dir, "last_checkpoint"))
        if resume and "--resume" not in argv:
            argv.insert(0, "--resume")
        return argv

    def checkpoint(self, *args, **kwargs):
        """Called by submitit (rank 0) on preemption/time-out: the job to requeue, resuming."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(dataclasses.replace(self, resume=True))

    def __call__(self):
        env = distributed_env()
        install_signal_handler()
        logger.info("Task %d/%d (node %d/%d, local rank %d), rendezvous %s", env.rank, env.world_size, env.node,
                    env.num_nodes, env.local_rank, env.dist_url)
        try:
            if self.kind == "mmdet":
                return self._run_mmdet(env)
            return self._run_detectron2(env)
        except TrainingPreempted as e:
            outcome = self._requeue(e)
        finally:
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        if isinstance(outcome, SystemExit):
            # Leave without interpreter finalization: torch's gloo run-loop thread can still
            # drop its last work object then (std::terminate, changing the exit status the
            # local executor reads to requeue). Everything is written; flush the logs.
            logging.shutdown()
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os._exit(outcome.code if isinstance(outcome.code, int) else 1)
        raise outcome  # submitit records why the job was not requeued

    def _run_detectron2(self, env: DistributedEnv):
        tool = _load_tool(self.tool)
        args = _tool_parser(tool).parse_args(self.argv())
        args.num_gpus, args.num_machines = env.local_world_size, env.num_nodes
        args.machine_rank, args.dist_url = env.node, env.dist_url
        results = []

        def main(args):
            results.append(tool["main"](args))

        if env.world_size == 1:
            main(args)
        else:
            # detectron2's worker: process group (NCCL on GPUs, else gloo), local group, GPU
            _distributed_worker(env.local_rank, main, env.world_size, env.local_world_size, env.node,
                                env.dist_url, (args,))
        # evaluation results (a dict of numbers) come back with the job; a trainer does not
        return results[0] if results and isinstance(results[0], dict) else None

    def _run_mmdet(self, env: DistributedEnv):
        argv = self.argv()
        if env.world_size > 1:
            os.environ.update(MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port), RANK=str(env.rank),
                              WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                              LOCAL_WORLD_SIZE=str(env.local_world_size))
            argv += ["--launcher", "pytorch"]
        state = preemption_state()
        assert state is not None
        state.in_loop = False  # until the training loop starts (MMEnginePreemptionHook)
        return _load_tool(self.tool)["main"](argv)

    def _requeue(self, stop: TrainingPreempted) -> BaseException:
        """All ranks stopped after the same step and the checkpoint is written: requeue.

        Returns the exception this task ends with: submitit's ``SystemExit`` (after the
        requeue), or its ``UncompletedJobError`` saying why it did not requeue.
        """
        rank = dist.get_rank() if dist.is_initialized() else 0
        state = preemption_state()
        outcome: BaseException = SystemExit(-1)
        if rank == 0:
            logger.info("Checkpoint after iteration %d saved; requeueing the job", stop.iteration)
            try:
                if callable(state.submitit_handler):
                    # submitit's handler: checkpoint() -> store the resumed job, requeue, exit
                    state.submitit_handler(state.signum, None)
            except BaseException as e:  # noqa: B036  (its SystemExit, or why it did not requeue)
                outcome = e
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()  # the other tasks leave only once the requeue is issued
        return outcome


def make_executor(job_dir: str, *, cluster: str = "slurm", nodes: int = 1, gpus_per_node: int = 8,
                  tasks_per_node: Optional[int] = None, cpus_per_task: int = 10, timeout_min: int = 4320,
                  partition: Optional[str] = None, mem: Optional[str] = None, constraint: Optional[str] = None,
                  account: Optional[str] = None, qos: Optional[str] = None, signal_delay_s: int = 120,
                  max_requeues: int = 3, name: str = "gradaug-det"):
    """A submitit executor for one job of ``nodes`` x ``tasks_per_node`` tasks.

    Args:
        job_dir: the job directory; submitit's files go to ``<job_dir>/submitit``.
        cluster: "slurm", or "local" (this machine, tasks as processes; for trying a job).
        nodes: number of nodes.
        gpus_per_node: GPUs per node (``--gpus-per-node``).
        tasks_per_node: processes per node; default one per GPU (``gpus_per_node``).
        cpus_per_task: CPU cores per task (data loading workers).
        timeout_min: the job's time limit in minutes (each requeued run gets it again).
        partition, mem, constraint, account, qos: Slurm's ``--partition``, ``--mem``
            (e.g. "480G"), ``--constraint``, ``--account``, ``--qos``.
        signal_delay_s: seconds before the time limit at which Slurm sends the signal
            (enough for one iteration and a checkpoint).
        max_requeues: how many time-outs may requeue the job (preemptions always do).

    Raises:
        ValueError: a non-positive count, or no Slurm on this machine for cluster "slurm".
    """
    import submitit

    for key, value in (("nodes", nodes), ("tasks_per_node", tasks_per_node or gpus_per_node),
                       ("timeout_min", timeout_min)):
        if value < 1:
            raise ValueError(f"{key}={value} is invalid: must be >= 1")
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise ValueError("Slurm's sbatch is not on this machine: submit from a Slurm login node, "
                         "or run the job here with --cluster local")
    executor = submitit.AutoExecutor(folder=os.path.join(job_dir, "submitit", "%j"), cluster=cluster,
                                     slurm_max_num_timeout=max_requeues, local_max_num_timeout=max_requeues)
    params = dict(nodes=nodes, gpus_per_node=gpus_per_node, tasks_per_node=tasks_per_node or gpus_per_node,
                  cpus_per_task=cpus_per_task, timeout_min=timeout_min, name=name,
                  slurm_signal_delay_s=signal_delay_s)
    slurm = dict(partition=partition, mem=mem, constraint=constraint, account=account, qos=qos)
    params.update({f"slurm_{k}": v for k, v in slurm.items() if v})
    executor.update_parameters(**params)
    return executor
