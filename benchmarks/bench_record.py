#!/usr/bin/env python3
"""What recording costs (issue 6): ``memtrack.record()`` at its default interval.

1. The recorder thread's own CPU, as a share of one core, while it samples this process
   and a table of N idle workers every 50 ms (the parent pays this, not the workers).
2. A real pool job (2 fork workers ``ast.parse`` standard-library files, each file in a
   phase, workers joined to a table in both arms) with and without a recording of the
   pool running in the parent: alternating pairs, the median of the per-pair ratios.

Target: sampling overhead under 1% of a worker's time. Nothing here asserts speed.
"""

from __future__ import annotations

import argparse
import ast
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import Section, say, standalone_main, status
from _timing import table as md_table  # noqa: E402

import memtrack  # noqa: E402

INTERVAL = 0.05


def _sources(limit: int) -> list[str]:
    root = os.path.dirname(os.__file__)
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "test", "__pycache__"))
        files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".py")]
    return files[:limit]


def _parse_batch(paths: list[str]) -> float:
    t0 = time.process_time()
    for p in paths:
        with memtrack.phase("parse"):
            try:
                with open(p, "rb") as f:
                    ast.parse(f.read())
            except (SyntaxError, ValueError):
                pass
    return time.process_time() - t0


def _job(
    files: list[str], table: memtrack.WorkerTable, record_to: str | None
) -> tuple[float, float]:
    """(wall seconds, workers' CPU seconds) of one run of the job."""
    batches = [files[i::16] for i in range(16)]
    t0 = time.perf_counter()
    rec = memtrack.record(record_to, table=table) if record_to else None
    if rec:
        rec.start()
    try:
        with ProcessPoolExecutor(
            2,
            mp_context=mp.get_context("fork"),
            initializer=memtrack.init_worker,
            initargs=(table.name,),
        ) as ex:
            cpu = sum(ex.map(_parse_batch, batches))
    finally:
        if rec:
            rec.stop()
    return time.perf_counter() - t0, cpu


def recorder_cpu(workers: int, seconds: float) -> tuple[float, float]:
    """(share of one core with a recording, without) while the parent sleeps."""
    code = "import memtrack, time\nprint(1, flush=True)\ntime.sleep(600)"
    with memtrack.WorkerTable(capacity=max(workers, 1) + 2) as table:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code],
                env={**os.environ, **table.environ()},
                stdout=subprocess.PIPE,
            )
            for _ in range(workers)
        ]
        for p in procs:
            p.stdout.readline()
        try:

            def share(recording: bool) -> float:
                with tempfile.TemporaryDirectory() as tmp:
                    rec = memtrack.record(os.path.join(tmp, "r.mtp"), INTERVAL, table=table)
                    c0, w0 = time.process_time(), time.perf_counter()
                    if recording:
                        rec.start()
                    time.sleep(seconds)
                    if recording:
                        rec.stop()
                    return (time.process_time() - c0) / (time.perf_counter() - w0)

            idle = share(False)
            busy = share(True)
        finally:
            for p in procs:
                p.kill()
                p.wait()
    return busy, idle


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--record-pairs",
        type=int,
        default=None,
        help="job pairs with/without a recording (default 7, --quick 3)",
    )


def run(args: argparse.Namespace, command: str) -> Section:
    t0 = time.perf_counter()
    seconds = 2.0 if args.quick else 5.0
    rows = []
    shares = {}
    for n in (0, 8):
        say(f"recorder thread, {n} workers, {seconds:g} s")
        busy, idle = recorder_cpu(n, seconds)
        shares[n] = busy - idle
        rows.append(
            [str(n), f"{busy * 100:.2f}%", f"{idle * 100:.2f}%", f"{(busy - idle) * 100:.2f}%"]
        )

    pairs = args.record_pairs or (3 if args.quick else 7)
    files = _sources(150 if args.quick else 400)
    ratios, cpu_ratios, plain_walls = [], [], []
    with memtrack.WorkerTable(capacity=8) as table, tempfile.TemporaryDirectory() as tmp:
        _job(files, table, None)  # warm the page cache and the interpreter
        for i in range(pairs):
            say(f"job pair {i + 1}/{pairs}")
            order = [False, True] if i % 2 == 0 else [True, False]
            got = {}
            for recording in order:
                got[recording] = _job(
                    files, table, os.path.join(tmp, "j.mtp") if recording else None
                )
            ratios.append(got[True][0] / got[False][0] - 1)
            cpu_ratios.append(got[True][1] / got[False][1] - 1)
            plain_walls.append(got[False][0])
    wall = statistics.median(ratios)
    cpu = statistics.median(cpu_ratios)
    spread = (max(plain_walls) - min(plain_walls)) / statistics.median(plain_walls)
    worker_cost = shares[8] / 2  # the recorder is one thread; the job has 2 workers
    met = worker_cost < 0.01 and cpu < 0.01
    body = [
        "### Recorder thread",
        "",
        f"The parent sleeps for {seconds:g} s, once without and once with `memtrack.record()` at "
        f"the default {INTERVAL * 1000:g} ms interval sampling itself and a table of N idle "
        "workers; CPU time of the parent process over wall time:",
        "",
        *md_table(
            rows, ["workers in the table", "with recording", "without", "recorder thread"], "rrrr"
        ),
        "",
        "### A real pool job with and without a recording",
        "",
        f"2 fork workers parse {len(files)} standard-library files (`ast.parse`, one phase per "
        f"file), joined to a table in both arms; {pairs} alternating pairs. Median change with a "
        f"recording: wall {wall * 100:+.2f}%, workers' CPU {cpu * 100:+.2f}%. The plain runs "
        f"alone varied by {spread * 100:.0f}% (wall), so a change smaller than that is noise.",
        "",
        "### Target",
        "",
        *md_table(
            [
                [
                    "sampling overhead under 1% of a worker's time",
                    f"recorder thread {shares[8] * 100:.2f}% of one core with 8 workers "
                    f"(= {worker_cost * 100:.2f}% per worker of a 2-worker pool); workers' CPU "
                    f"{cpu * 100:+.2f}%",
                    status(met),
                ]
            ],
            ["target", "measured", "status"],
            "lll",
        ),
        "",
    ]
    return Section(
        key="record",
        title="Recording (issue 6)",
        command=command,
        elapsed=time.perf_counter() - t0,
        body=body,
        headline=[
            f"recorder thread: {shares[8] * 100:.2f}% of a core with 8 workers; "
            f"job with a recording: wall {wall * 100:+.2f}%, "
            f"CPU {cpu * 100:+.2f}%"
        ],
        targets=[["sampling < 1% of a worker", f"{worker_cost * 100:.2f}%", status(met)]],
    )


if __name__ == "__main__":
    sys.exit(standalone_main(sys.modules[__name__], "a shorter run (~15 s)"))
