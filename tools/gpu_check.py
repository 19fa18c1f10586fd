#!/usr/bin/env python
"""One command for every GPU fact the docs need, within a time budget (``--budget-min``, default 8).

Runs, within an overall time budget, each section of ``gradaug_det.benchmark.gpu_check``
(``env``, ``amp``, ``hostsync``, ``syncbn``, ``cudnn``, ``iteration``, ``backbone``: see that module) and
writes one JSON document and one Markdown table, both naming the GPU. A section that fails
is recorded (its error and traceback in the JSON) and the others still run; a section that
no longer fits the budget is skipped and says so. Without CUDA (or with ``--tiny``) every
section runs at tiny sizes on the CPU: the test suite runs this tool that way, so it keeps
working.

    python tools/gpu_check.py --output-dir output/gpu_check          # on a GPU machine (run time not yet measured)
    python tools/gpu_check.py --tiny --sections env amp iteration     # CPU smoke run, < 1 min
"""
import argparse
import os
import sys

import torch

import gradaug_det  # noqa: F401  (registers backbones)
from gradaug_det.benchmark.gpu_check import SECTIONS, CheckContext, markdown_report, run_sections
from gradaug_det.benchmark.report import device_name, write_json, write_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    """Command-line arguments; bad values exit with a message before any work."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="output/gpu_check", help="gpu_check.json and gpu_check.md go here")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), metavar="NAME",
                   help=f"sections to run, in this order (default: all of {' '.join(SECTIONS)})")
    p.add_argument("--skip", nargs="+", default=[], metavar="NAME", help="sections not to run")
    p.add_argument("--budget-min", type=float, default=8.0, help="overall time budget in minutes")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per mode of the iteration section")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations per mode first")
    p.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU (automatic without CUDA)")
    args = p.parse_args(argv)
    for name in args.sections + args.skip:
        if name not in SECTIONS:
            p.error(f"unknown section {name!r}; known: {', '.join(SECTIONS)}")
    if args.budget_min <= 0:
        p.error(f"--budget-min must be > 0, got {args.budget_min}")
    if args.iters < 1 or args.warmup < 0:
        p.error(f"--iters must be >= 1 and --warmup >= 0, got {args.iters} and {args.warmup}")
    return args


def main(argv=None):
    """Entry point: run the sections, write ``gpu_check.json`` / ``gpu_check.md``; returns the results."""
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    if not torch.cuda.is_available() and not args.tiny:
        print("gpu_check: no CUDA device: running every section at tiny sizes on the CPU "
              "(GPU numbers need a GPU)", file=sys.stderr)
    ctx = CheckContext(device="cuda" if cuda else "cpu", tiny=not cuda, repo=REPO, budget_s=args.budget_min * 60,
                       iters=args.iters, warmup=args.warmup,
                       progress=lambda msg: print(f"gpu_check: {msg}", file=sys.stderr, flush=True))
    sections = [s for s in args.sections if s not in args.skip]
    results = run_sections(ctx, sections)
    doc = {"device": device_name(ctx.device), "tiny": ctx.tiny, "budget_s": ctx.budget_s,
           "elapsed_s": ctx.elapsed(), "sections": results}
    text = markdown_report(ctx, results)
    os.makedirs(args.output_dir, exist_ok=True)
    write_json(os.path.join(args.output_dir, "gpu_check.json"), doc)
    write_text(os.path.join(args.output_dir, "gpu_check.md"), text)
    print(text)
    print(f"gpu_check: {ctx.elapsed():.0f} s; wrote {args.output_dir}/gpu_check.json and gpu_check.md", file=sys.stderr)
    return doc


if __name__ == "__main__":
    from gradaug_det.utils.cli import run_tool

    run_tool(main)  # a mistake: one "error: ..." line, exit status 2
