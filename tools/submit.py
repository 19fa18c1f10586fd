#!/usr/bin/env python
"""Submit a training tool as one Slurm job of N nodes x G GPUs (submitit; ``pip install -e .[slurm]``).

    python tools/submit.py --nodes 2 --gpus-per-node 8 --partition learnfair --timeout 4320 \\
        --job-dir /checkpoint/$USER/mask_rcnn_gradaug \\
        tools/train_net.py --config-file configs/mask_rcnn_gradaug.yaml SOLVER.IMS_PER_BATCH 16

Everything after the tool is the tool's own arguments, as when running it by hand, without
the launch flags (--num-gpus, --num-machines, --machine-rank, --dist-url: the allocation
decides them). One task per GPU; each derives its rank, the world size and the rendezvous
address from submitit's job environment. The tool's output (OUTPUT_DIR, train.output_dir,
--work-dir) is the job directory; submitit's logs are in <job-dir>/submitit/<job id>/.

On preemption or near the time limit Slurm signals the job: it saves a checkpoint after the
current iteration and requeues itself; the requeued job continues with --resume
(gradaug_det.launch.slurm). ``--cluster local`` runs the same job on this machine.
"""
import argparse
import os
import sys

from gradaug_det.launch.slurm import TrainingJob, make_executor, prepare_tool_args
from gradaug_det.utils.cli import UserError


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--job-dir", required=True,
                   help="job directory: the tool's output (checkpoints, logs, metrics) and submitit's files")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (detectron2's --num-machines)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (detectron2's --num-gpus)")
    p.add_argument("--tasks-per-node", type=int, default=None,
                   help="processes per node (default: one per GPU; set it for CPU-only jobs)")
    p.add_argument("--cpus-per-task", type=int, default=10, help="CPU cores per task (data loading)")
    p.add_argument("--partition", default=None, help="Slurm partition")
    p.add_argument("--timeout", type=int, default=4320, help="time limit in minutes of each run (default 72 h)")
    p.add_argument("--mem", default=None, help="memory per node, Slurm syntax (e.g. 480G)")
    p.add_argument("--constraint", default=None, help="Slurm --constraint (e.g. volta32gb)")
    p.add_argument("--account", default=None, help="Slurm account")
    p.add_argument("--qos", default=None, help="Slurm quality of service")
    p.add_argument("--signal-delay", type=int, default=120,
                   help="seconds before the time limit at which Slurm signals the job to checkpoint: enough for "
                        "one iteration, a periodic evaluation if one may run then, and a checkpoint")
    p.add_argument("--max-requeues", type=int, default=3, help="how many time-outs may requeue the job")
    p.add_argument("--name", default=None, help="job name (default: gradaug-<tool>)")
    p.add_argument("--cluster", choices=["slurm", "local"], default="slurm",
                   help="'local' runs the job's tasks as processes on this machine (one node)")
    p.add_argument("--wait", action="store_true", help="wait for the job to end and print its result")
    p.add_argument("tool", help="tools/train_net.py, tools/lazyconfig_train_net.py or tools/mmdet_train.py")
    p.add_argument("tool_args", nargs=argparse.REMAINDER, help="the tool's arguments and overrides")
    return p


def build_executor(args, job_dir):
    """The submitit executor for the parsed options (``make_executor``)."""
    return make_executor(
        job_dir, cluster=args.cluster, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task, timeout_min=args.timeout,
        partition=args.partition, mem=args.mem, constraint=args.constraint, account=args.account,
        qos=args.qos, signal_delay_s=args.signal_delay, max_requeues=args.max_requeues,
        name=args.name or "gradaug-" + os.path.splitext(os.path.basename(args.tool))[0])


def main(argv=None):
    args = get_parser().parse_args(argv)
    job_dir = os.path.abspath(args.job_dir)
    try:
        tool_args = prepare_tool_args(args.tool, args.tool_args, job_dir)
        resume = "--resume" in args.tool_args
        if not resume and os.path.exists(os.path.join(job_dir, "last_checkpoint")):
            raise ValueError(f"{job_dir} already holds a run (last_checkpoint): pass the tool's --resume to "
                             "continue it, or choose another --job-dir")
        executor = build_executor(args, job_dir)
    except (ValueError, UserError) as e:  # before anything is submitted or written
        sys.exit(f"error: {e}")
    os.makedirs(job_dir, exist_ok=True)
    job = executor.submit(TrainingJob(os.path.abspath(args.tool), tool_args, job_dir))
    print(f"Submitted job {job.job_id}: {args.nodes} node(s) x {args.tasks_per_node or args.gpus_per_node} task(s); "
          f"output in {job_dir}, logs in {job.paths.folder}")
    if args.wait:
        results = job.results()  # one per task; raises with the job's traceback if it failed
        print(f"Job {job.job_id} finished: {results[0]}")
    return job


if __name__ == "__main__":
    from gradaug_det.utils.cli import run_tool

    run_tool(main)  # a mistake: one "error: ..." line, exit status 2
