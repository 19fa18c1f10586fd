"""detectron2's ``launch`` for the tools, with a clean exit of CPU (gloo) worker processes,
and a user's mistake found inside the workers reported in one line."""
import logging
import os
import sys

import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch
from detectron2.utils import comm

from ..utils.cli import EXIT_USER_ERROR, UserError, debug_enabled

__all__ = ["launch_tool"]


def _run_and_exit(main, args):
    try:
        ret = main(args)
    except UserError as e:
        if comm.get_world_size() == 1:
            raise  # one process: the tool's run_tool prints it
        # a worker process: one line, then leave at once (torch's spawn ends the other workers)
        if debug_enabled():
            logging.getLogger(__name__).exception("refused")
        print(f"error: {e}" if comm.is_main_process() else f"error (rank {comm.get_rank()}): {e}",
              file=sys.stderr, flush=True)
        os._exit(EXIT_USER_ERROR)
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
    try:
        launch(_run_and_exit, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(main, args))
    except mp.ProcessExitedException as e:
        if e.exit_code != EXIT_USER_ERROR:
            raise
        sys.exit(EXIT_USER_ERROR)  # the worker printed the one-line message
