"""detectron2's ``launch`` for the tools, with a clean exit of CPU (gloo) worker processes."""
import logging
import os
import sys

import torch.distributed as dist
from detectron2.engine import launch
from detectron2.utils import comm

__all__ = ["launch_tool"]


def _run_and_exit(main, args):
    ret = main(args)
    if comm.get_world_size() > 1 and dist.get_backend() == "gloo":
        # torch's gloo run-loop thread can still be dropping its last work object (it holds a
        # Python reference) while the interpreter finalizes: std::terminate at exit, about one
        # run in ten on torch 2.14 (tests/slim/test_slim_syncbn_gloo.py). Everything is
        # written by now: synchronize, then leave without finalizing.
        comm.synchronize()
        dist.destroy_process_group()
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(0)
    return ret


def launch_tool(main, args):
    """``launch(main, args.num_gpus, ...)`` with the flags of detectron2's
    ``default_argument_parser``; with more than one CPU process (gloo), each worker leaves
    through ``os._exit(0)`` once ``main`` has returned on every process.

    Args:
        main: the tool's ``main(args)``; must be picklable (a module-level function).
        args: parsed arguments (``num_gpus``, ``num_machines``, ``machine_rank``, ``dist_url``).
    """
    launch(_run_and_exit, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(main, args))
