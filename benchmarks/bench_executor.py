#!/usr/bin/env python3
"""Benchmarks of MemoryAwareExecutor against ProcessPoolExecutor: start-up and per-task cost.

    python benchmarks/bench_executor.py            # ~1 minute, updates benchmarks/RESULTS.md
    python benchmarks/bench_executor.py --quick    # ~20 s, fewer rounds

What is measured (one run, one machine): each round runs every variant once, in a fresh
interpreter of its own (so a forkserver is started anew, as at a program's start), in an
order rotated every round. A variant is a pool of 2 workers: the standard library's
``ProcessPoolExecutor`` with fork and with forkserver, and ``MemoryAwareExecutor`` with an
explicit fork context and with its default (a forkserver, since issue 13). Three spans
are timed with ``time.perf_counter`` in the child: *start* (from constructing the pool to
the first result: processes, initializers, for memtrack the table and its joins; the first
``submit()`` of a MemoryAwareExecutor waits until every worker is up), *tasks* (then 200
tiny tasks, ``submit`` all and wait, on warm workers), and *shutdown*. Medians over the
rounds are reported, and each row as a ratio to the standard library's pool with the same
start method. The script asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import Section, fmt_ns, say, standalone_main  # noqa: E402
from _timing import table as md_table  # noqa: E402

WORKERS = 2
TASKS = 200
VARIANTS = {
    "ProcessPoolExecutor, fork": ("stdlib", "fork"),
    "ProcessPoolExecutor, forkserver": ("stdlib", "forkserver"),
    "MemoryAwareExecutor, fork": ("memtrack", "fork"),
    "MemoryAwareExecutor, default (forkserver)": ("memtrack", None),
}


def square(x: int) -> int:
    return x * x


def child(kind: str, method: str | None) -> dict[str, float]:
    """One variant in this (fresh) process: the three spans, in seconds."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, wait

    context = None if method is None else mp.get_context(method)
    t0 = time.perf_counter()
    if kind == "stdlib":
        pool = ProcessPoolExecutor(WORKERS, mp_context=context)
    else:
        import memtrack

        pool = memtrack.MemoryAwareExecutor(WORKERS, mp_context=context, pause_at=None)
    pool.submit(square, 1).result()
    t1 = time.perf_counter()
    wait([pool.submit(square, i) for i in range(TASKS)])
    t2 = time.perf_counter()
    pool.shutdown(wait=True)
    t3 = time.perf_counter()
    return {"start": t1 - t0, "tasks": t2 - t1, "shutdown": t3 - t2}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--executor-rounds", type=int, default=None,
                    help="rounds of every variant (default 9, 3 with --quick)")


def run(args: argparse.Namespace, command: str) -> Section:
    t0 = time.perf_counter()
    rounds = args.executor_rounds or (3 if args.quick else 9)
    names = list(VARIANTS)
    spans: dict[str, dict[str, list[float]]] = {
        n: {"start": [], "tasks": [], "shutdown": []} for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            kind, method = VARIANTS[name]
            out = subprocess.run(
                [sys.executable, __file__, "--child", kind, method or "default"],
                capture_output=True, text=True, check=True, timeout=300)
            for span, value in json.loads(out.stdout.splitlines()[-1]).items():
                spans[name][span].append(value)
        say(f"executor: round {r + 1}/{rounds}")

    def med(name: str, span: str) -> float:
        return statistics.median(spans[name][span])

    peer = {"fork": "ProcessPoolExecutor, fork",
            "forkserver": "ProcessPoolExecutor, forkserver"}
    rows = []
    for name in names:
        base = peer[VARIANTS[name][1] or "forkserver"]
        cells = [name]
        for span in ("start", "tasks", "shutdown"):
            cells.append(f"{fmt_ns(med(name, span) * 1e9)} ({med(name, span) / med(base, span):.2f}x)")
        cells.append(fmt_ns(med(name, "tasks") / TASKS * 1e9))
        rows.append(cells)
    ours = "MemoryAwareExecutor, default (forkserver)"
    body = [
        f"{WORKERS} workers; {rounds} rounds, every variant once per round in a fresh "
        "interpreter, the order rotated; medians, and in brackets the ratio to "
        "`ProcessPoolExecutor` with the same start method.",
        "",
        *md_table(rows, ["pool", "start (to the first result)", f"{TASKS} tiny tasks",
                         "shutdown", "per task"], "lrrrr"),
        "",
        "The default start method changed from fork to forkserver in issue 13 (fork from "
        "the executor's threaded process is unsafe and Python 3.12+ warns). Its start "
        f"includes launching the forkserver: {fmt_ns(med(ours, 'start') * 1e9)} against "
        f"{fmt_ns(med('MemoryAwareExecutor, fork', 'start') * 1e9)} with fork. Per task "
        "the executor pays a round trip through its dispatcher between two tasks of a "
        "worker (`ProcessPoolExecutor` queues a call ahead): that is what lets a pause "
        "really stop new work; `map(..., chunksize=n)` amortizes it.",
        "",
    ]
    return Section(
        key="executor", title="MemoryAwareExecutor vs ProcessPoolExecutor (issue 13)",
        command=command, elapsed=time.perf_counter() - t0, body=body,
        headline=[f"start {fmt_ns(med(ours, 'start') * 1e9)} "
                  f"({med(ours, 'start') / med(peer['forkserver'], 'start'):.2f}x the "
                  f"stdlib forkserver pool), per task "
                  f"{fmt_ns(med(ours, 'tasks') / TASKS * 1e9)} "
                  f"({med(ours, 'tasks') / med(peer['forkserver'], 'tasks'):.2f}x)"],
    )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        method = None if sys.argv[3] == "default" else sys.argv[3]
        print(json.dumps(child(sys.argv[2], method)))
        sys.exit(0)
    sys.exit(standalone_main(sys.modules[__name__], "fewer rounds (~20 s)"))
