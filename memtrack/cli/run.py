"""``memtrack run [-o FILE] [--interval S] -- CMD ARGS...``: measure any command.

The command runs with a worker table exported in ``MEMTRACK_TABLE`` (so memtrack-aware
Python children join it by themselves) while every descendant process is also sampled
through ``/proc`` (so programs that never import memtrack are measured too). A one-line
status shows on a terminal; at the end the summary and the insights are printed and the
profile is written. The exit code is the command's; Ctrl-C stops the command and still
writes the profile.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time

from .._sizes import format_size
from ..pool.table import MAX_CAPACITY, WorkerTable
from ..profile.recording import default_interval, record
from ._status import StatusRegion


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", default="memtrack-run.mtp",
                        help="profile to write (default: memtrack-run.mtp)")
    parser.add_argument("--interval", type=float, default=None,
                        help="seconds between samples (default: MEMTRACK_INTERVAL or 0.05)")
    parser.add_argument("--capacity", type=int, default=256,
                        help="worker table slots for memtrack-aware children (default 256)")
    parser.add_argument("--quiet", action="store_true", help="no status line and no summary")
    parser.add_argument("--serve", metavar="HOST:PORT", default=None,
                        help="serve the run live over HTTP while it runs (memtrack serve)")
    from .serve import add_address_arguments

    add_address_arguments(parser, option="--serve")
    parser.add_argument("--allocations", action="store_true",
                        help="track allocations in memtrack-aware children and record their "
                             "sites (MEMTRACK_ALLOCATIONS=1 for them)")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="the command and its arguments, after --")


def _status_line(rec: record, started: float, *, final: bool = False) -> str:
    s = rec.live_status()
    state = "done" if final else f"{s.get('live', 0)} workers"
    return (f"[memtrack] {time.monotonic() - started:6.1f}s  {state}  "
            f"pool pss {format_size(s.get('pool_pss', 0))}  "
            f"pool peak {format_size(s.get('max_pool_pss', 0))}  "
            f"root peak {format_size(s.get('max_root_pss', 0))}")


def _show_status(rec: record, started: float, done: threading.Event,
                 region: StatusRegion) -> None:
    while not done.wait(0.5):
        region.update(_status_line(rec, started))


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def run_command(command: list[str], output: str, *, interval: float | None = None,
                capacity: int = 256, quiet: bool = False, serve: str | None = None,
                public: bool = False, token: str | None = None,
                allocations: bool = False) -> int:
    """Run `command` under measurement; returns its exit code (128+N when killed by N)."""
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ValueError("no command to run: memtrack run [-o FILE] -- CMD ARGS...")
    interval = default_interval() if interval is None else interval
    if (isinstance(capacity, bool) or not isinstance(capacity, int)
            or not 1 <= capacity <= MAX_CAPACITY):
        raise ValueError(f"--capacity must be between 1 and {MAX_CAPACITY}, not {capacity!r}")
    with WorkerTable(capacity=capacity) as table:
        env = {**os.environ, **table.environ()}
        env.pop("MEMTRACK_PROFILE", None)
        # Everything that can fail on bad options fails before the command starts.
        rec = record(output, interval, table=table, command=command,
                     allocations=allocations)
        if allocations:
            rec.share_sites()
            env.update(rec.allocation_environ())
        server = None
        if serve is not None:
            from .serve import start_for_run

            server = start_for_run(table, serve, public=public, token=token)
        try:
            child = subprocess.Popen(command, env=env)
        except (FileNotFoundError, PermissionError) as e:
            if server is not None:
                server.close()
            found = isinstance(e, FileNotFoundError)
            print(f"memtrack run: {'command not found' if found else 'cannot execute'}: "
                  f"{command[0]}", file=sys.stderr)
            rec.discard_sites()
            return 127 if found else 126
        interrupted = False
        done = threading.Event()
        status = None
        try:
            rec.root_pid = child.pid
            rec.start()
            started = time.monotonic()
            region = StatusRegion(sys.stderr)
            if not quiet:
                status = threading.Thread(target=_show_status,
                                          args=(rec, started, done, region), daemon=True)
                status.start()
            while True:
                try:
                    returncode = child.wait()
                    break
                except KeyboardInterrupt:
                    # The terminal sent SIGINT to the command too; give it time to stop.
                    interrupted = True
                    try:
                        returncode = child.wait(timeout=5)
                        break
                    except subprocess.TimeoutExpired:
                        child.send_signal(signal.SIGKILL)
        finally:
            if child.poll() is None:  # an error (or a second Ctrl-C) got us here
                child.kill()
                child.wait()
            done.set()
            if status is not None:
                status.join()
            rec.stop()
            if status is not None:
                region.close(_status_line(rec, started, final=True))
            if server is not None:
                server.close()
    if not quiet:
        _print_summary(output, interrupted)
    return 130 if interrupted and returncode == 0 else _exit_code(returncode)


def _print_summary(output: str, interrupted: bool) -> None:
    from ..profile import load
    from ..report import render

    text = render(load(output, partial=True), "text")
    if interrupted:
        print("memtrack run: interrupted; the profile holds the run up to here", file=sys.stderr)
    print(text)
    print(f"profile: {output}  (memtrack report {output} --format html -o report.html)")


def run_run_command(args: argparse.Namespace) -> int:
    return run_command(list(args.command), args.output, interval=args.interval,
                       capacity=args.capacity, quiet=args.quiet, serve=args.serve,
                       public=args.public, token=args.token, allocations=args.allocations)
