"""``memtrack workers``: how many workers this machine (or container) can afford, and why
(the plan itself is :mod:`memtrack.sizing`'s)."""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from .. import _core
from ..limits import CpuLimit, SystemMemory, cpu_limit_info, system_memory
from ..sizing import build_plan, size_text


def add_workers_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``memtrack workers`` options; sets ``func`` to :func:`run_workers_command`.

    Takes either the object returned by ``ArgumentParser.add_subparsers()`` (a "workers"
    parser is created in it) or an ``ArgumentParser`` already made for the command (the
    options are added to it), so either style of CLI dispatcher can use it.
    """
    description = (
        "Print how many workers fit in the memory and CPUs this process may use "
        "(cgroup limits included), and why. Per-worker memory comes from --per-worker "
        "or from a profile (--from)."
    )
    if hasattr(subparsers, "add_parser"):
        parser = subparsers.add_parser(
            "workers", help="how many workers this machine (or container) can afford",
            description=description)
    else:
        parser = subparsers
        if parser.description is None:
            parser.description = description
    parser.add_argument("--per-worker", metavar="SIZE",
                        help="peak memory of one worker, e.g. '1.2 GB' or '900 MiB'")
    parser.add_argument("--main", metavar="SIZE",
                        help="memory of the main (coordinating) process, e.g. '500 MB'")
    parser.add_argument("--from", dest="profile", metavar="PROFILE",
                        help="a profile with worker data (memtrack record / dump)")
    parser.add_argument("--headroom", type=float, default=0.0, metavar="F",
                        help="fraction of available memory to keep free, in [0, 1)")
    parser.add_argument("--max-workers", type=int, metavar="N", help="never more than N")
    parser.add_argument("--min-workers", type=int, default=1, metavar="N",
                        help="never fewer than N (default 1; warns when memory is short)")
    parser.add_argument("--available", metavar="SIZE",
                        help="what if: size for this much memory instead of the detected")
    parser.add_argument("--cpus", type=int, metavar="N",
                        help="what if: size for N CPUs instead of the detected")
    parser.set_defaults(func=run_workers_command)
    return parser


def _print_detected(memory: SystemMemory, cpu: CpuLimit, out: TextIO) -> None:
    limit = "none" if memory.limit is None else size_text(memory.limit)
    rows = [
        ("memory limit", limit,
         f"from {memory.limit_source}" if memory.limit is not None
         else f"no cgroup memory limit; host figures from {memory.limit_source}"),
        ("memory total", size_text(memory.total), "min(MemTotal, limit)"),
        ("memory available", size_text(memory.available),
         "MemAvailable" if memory.limit is None
         else "min(MemAvailable, limit - cgroup usage without inactive file cache)"),
        ("memory used", size_text(memory.used),
         "MemTotal - MemAvailable" if memory.limit is None else "cgroup usage"),
        ("swap", f"{size_text(memory.swap_total)} total, {size_text(memory.swap_free)} free",
         "from /proc/meminfo"),
        ("cpus", str(cpu.cpus), f"from {cpu.source}"),
    ]
    print("Detected limits", file=out)
    for name, value, note in rows:
        print(f"  {name:<17} {value:<28} {note}", file=out)


def run_workers_command(
    args: argparse.Namespace, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """``memtrack workers``: print the detected limits and the plan; 0 on success, 2 on
    bad input (the message names it)."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    memory = system_memory()
    cpu = cpu_limit_info()
    try:
        plan = build_plan(
            getattr(args, "per_worker", None), getattr(args, "main", None),
            getattr(args, "available", None), getattr(args, "cpus", None),
            getattr(args, "headroom", 0.0), getattr(args, "min_workers", 1),
            getattr(args, "max_workers", None), None, getattr(args, "profile", None),
            lambda: memory, lambda: cpu,
        )
    except (ValueError, TypeError, OSError, _core.ProfileError) as exc:
        print(f"memtrack workers: error: {exc}", file=err)
        return 2
    _print_detected(memory, cpu, out)
    print("", file=out)
    print("Plan", file=out)
    for line in plan.explain().splitlines():
        print(f"  {line}", file=out)
    return 0
