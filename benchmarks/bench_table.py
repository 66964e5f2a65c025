#!/usr/bin/env python3
"""Benchmarks of memtrack's worker table (issue 3): what joining costs a worker, what
reading the table costs the parent, and what it all costs a real multi-process job.

    python benchmarks/bench_table.py            # full run, ~95 s, updates benchmarks/RESULTS.md
    python benchmarks/bench_table.py --quick    # ~30 s, fewer/shorter batches, fewer files
    python benchmarks/bench_table.py --output /tmp/RESULTS.md --no-perf

What is measured (one run, one machine), with bench_core.py's method (benchmarks/_timing.py):

1. a phase enter+exit (``with memtrack.phase("x"): pass``, outermost and nested) in a
   worker joined to a table (heartbeat on, and off) vs a process that did not join, each
   variant in its own child process (started alike, through a small launcher, same
   imports), and in one process that joins and leaves between its batches; plus a process
   started by a large parent (sticky ``ru_maxrss`` floor). The parent drives them in
   lock-step, one batch of each per round, the order rotated every round, so drift hits
   all alike. The added cost is reported as differences of medians and as the quartiles
   of the per-round differences, in wall time and in the children's CPU time.
2. ``table.workers()``, ``table._segment.read()`` (the C call it wraps), ``table.totals()``,
   ``workers()`` with GC on, and ``table.workers(check=True)`` over a table of capacity 256
   with 8, 64 and 256 occupied slots, whose workers have a few phase paths each (2) and
   full slots (48, all a slot holds). The slots have real owners: a small spawner process
   forks them with MEMTRACK_TABLE set, so each child joins at fork; they block on a pipe
   while measured. Where the time goes: the per-slot slope, small vs full slots, and a
   ``perf record`` of a reader process.
3. the overhead on a real job: a fork ProcessPoolExecutor with 2 workers parsing the
   standard library's .py files with ``ast.parse`` (one task per file), (i) plain, no table,
   (ii) every task in ``memtrack.phase("parse")``, workers joined to a table with the
   default 100 ms heartbeat. Runs alternate (ABBA), one warm-up run of each is dropped,
   medians of wall time and of the workers' CPU time (user+sys) are compared; two probe
   runs time each phase's enter and exit inside the workers.

The script asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import resource
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import (  # noqa: E402  (the shared measuring method and report helpers)
    Bench,
    Section,
    fmt_ns,
    perf_record,
    perf_self_by,
    perf_symbols,
    run_section,
    say,
    standalone_main,
    status,
    table,
)

import memtrack  # noqa: E402

HERE = Path(__file__).resolve().parent
SCRIPT = Path(__file__).resolve()

# Targets of issue 3.
TARGET_JOIN_ADD_NS = 500.0      # a phase in a joined worker: under 0.5 µs more
TARGET_READ_NS = 50_000.0       # workers() over 256 occupied slots: under 50 µs
TARGET_OVERHEAD_PCT = 1.0       # a real multi-process job: under 1% slower

READ_CAPACITY = 256
READ_LEVELS = (8, 64, 256)
SLOT_PHASES = 44                # entries of a slot's phase summary (csrc/table/layout.h)
SMALL_PATHS = ("index", "index/parse")
FULL_PATHS = tuple(f"phase_{i:02d}" for i in range(SLOT_PHASES))
POOL_WORKERS = 2
BIG_PARENT_MB = 256
POOL_CHUNKSIZE = 8


# --------------------------------------------------------------------------------------
# Child processes (this script runs itself with --child ROLE ...)


def _reply(value) -> None:
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


PHASE_BENCHES = [
    ("phase", '`with memtrack.phase("x"): pass` (outermost)', 'with memtrack.phase("x"):\n    pass',
     "pass", "pass"),
    ("phase_nested", '`with memtrack.phase("x"): pass` inside an open phase',
     'with memtrack.phase("x"):\n    pass',
     '_outer = memtrack.phase("outer")\n_outer.__enter__()',
     "_outer.__exit__(None, None, None)"),
]


def child_phase(argv: list[str]) -> int:
    """Serve timed batches of phases: joined to table argv[0] (``-``: not joined),
    with heartbeat argv[1] seconds (``-``: the table's)."""
    import multiprocessing.util  # noqa: F401  (a joined worker imports it: same heap)

    name, hb = argv
    if name != "-":
        index = memtrack.init_worker(name, heartbeat=None if hb == "-" else float(hb))
        if index < 0:
            print("phase child: the table is full", file=sys.stderr)
            return 1
    benches = {key: Bench(key, label, stmt, setup, teardown, namespace={"memtrack": memtrack})
               for key, label, stmt, setup, teardown in PHASE_BENCHES}
    while True:
        line = sys.stdin.readline()
        if not line:
            return 0
        cmd = json.loads(line)
        if cmd[0] == "calibrate":
            b = benches[cmd[1]]
            b.calibrate(cmd[2])
            _reply(b.n)
        elif cmd[0] == "batch":  # wall ns of the loop, and this thread's CPU ns around it
            c0 = time.thread_time_ns()
            wall = benches[cmd[1]].batch(cmd[2])
            _reply([wall, time.thread_time_ns() - c0])
        elif cmd[0] == "slot":
            _reply(memtrack.worker_slot())
        elif cmd[0] == "join":
            _reply(memtrack.init_worker(cmd[1]))
        elif cmd[0] == "leave":
            _reply(memtrack._core.leave())
        else:
            _reply(None)
            return 0


def child_phaseloop(argv: list[str]) -> int:
    """For perf: join table argv[0], run argv[1] outermost phases."""
    memtrack.init_worker(argv[0])
    for _ in range(int(argv[1])):
        with memtrack.phase("x"):
            pass
    return 0


def child_spawner(argv: list[str]) -> int:
    """Fork workers that hold real slots. Commands on stdin (JSON lines):
    ["grow", table, count, paths]: fork until `count` children live, each joined (at
    fork, through MEMTRACK_TABLE) and having run one phase per path of `paths` (a path
    "a/b" is phase "b" inside phase "a"); ["stop"]: release and reap them all."""
    children: list[int] = []
    release_r, release_w = os.pipe()
    while True:
        line = sys.stdin.readline()
        if not line:
            cmd = ["stop"]
        else:
            cmd = json.loads(line)
        if cmd[0] == "grow":
            _, name, count, paths = cmd
            os.environ[memtrack._table.ENV_TABLE] = name
            while len(children) < count:
                ready_r, ready_w = os.pipe()
                pid = os.fork()
                if pid == 0:  # the worker: joined by the after-fork hook
                    code = 1
                    try:
                        os.close(release_w)
                        os.close(ready_r)
                        if memtrack.worker_slot() is not None:
                            for path in paths:
                                _run_path(path)
                            code = 0
                        os.write(ready_w, b"1" if code == 0 else b"0")
                        os.close(ready_w)
                        os.read(release_r, 1)  # blocks until the spawner releases us
                        memtrack._core.leave()
                    finally:
                        os._exit(code)
                os.close(ready_w)
                ok = os.read(ready_r, 1)
                os.close(ready_r)
                children.append(pid)
                if ok != b"1":
                    _reply(["error", f"worker {pid} did not join {name}"])
                    break
            else:
                _reply(["ok", len(children)])
        else:
            os.close(release_w)
            for pid in children:
                os.waitpid(pid, 0)
            children.clear()
            release_r, release_w = os.pipe()
            os.environ.pop(memtrack._table.ENV_TABLE, None)
            if not line:
                return 0
            _reply(["ok", 0])
            if cmd[0] == "quit":
                return 0


def _run_path(path: str) -> None:
    first, _, rest = path.partition("/")
    with memtrack.phase(first):
        if rest:
            _run_path(rest)


def child_reader(argv: list[str]) -> int:
    """For perf: attach to table argv[0] and read it for argv[1] seconds."""
    import gc

    gc.disable()  # as in the timed batches
    table = memtrack.WorkerTable.attach(argv[0])
    until = time.perf_counter() + float(argv[1])
    n = 0
    while time.perf_counter() < until:
        for _ in range(10):
            table._segment.read()
        n += 10
    print(n)
    return 0


# --- the workload --------------------------------------------------------------------


def parse_plain(path: str) -> int:
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, ValueError):
        return 0
    return len(tree.body)


def parse_phased(path: str) -> int:
    with memtrack.phase("parse"):
        try:
            with open(path, "rb") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, ValueError):
            return 0
        return len(tree.body)


def parse_probed(path: str) -> tuple[int, int, int, int, int]:
    """parse_phased with its phase's enter and exit timed, for the probe runs: wall time
    (perf_counter_ns) and the thread's CPU time (thread_time_ns, which leaves out time
    the worker spent preempted by other processes)."""
    p = memtrack.phase("parse")
    c0 = time.thread_time_ns()
    t0 = time.perf_counter_ns()
    p.__enter__()
    t1 = time.perf_counter_ns()
    c1 = time.thread_time_ns()
    try:
        with open(path, "rb") as f:
            items = len(ast.parse(f.read()).body)
    except (SyntaxError, ValueError):
        items = 0
    c2 = time.thread_time_ns()
    t2 = time.perf_counter_ns()
    p.__exit__(None, None, None)
    t3 = time.perf_counter_ns()
    c3 = time.thread_time_ns()
    return items, t1 - t0, t3 - t2, c1 - c0, c3 - c2


def clock_cost() -> tuple[float, float]:
    """Median ns of the probe's clock reads around an empty span: (wall, CPU)."""
    walls, cpus = [], []
    for _ in range(2000):
        c0 = time.thread_time_ns()
        t0 = time.perf_counter_ns()
        t1 = time.perf_counter_ns()
        c1 = time.thread_time_ns()
        walls.append(t1 - t0)
        cpus.append(c1 - c0)
    return statistics.median(walls), statistics.median(cpus)


def stdlib_files() -> list[str]:
    """The standard library's .py files, tests and site-packages left out, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test"}
    return sorted(str(p) for p in root.rglob("*.py") if not skip.intersection(p.parts))


def _one_run(files: list[str], mode: str) -> dict:
    """One pool run. mode: "plain" (no phases, no table), "phased" (a phase per task,
    workers joined), "probe_joined" / "probe_unjoined" (the phase's enter and exit timed
    in the workers, with and without a table)."""
    ctx = get_context("fork")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    view = None
    probe = None
    tbl = memtrack.WorkerTable() if mode in ("phased", "probe_joined") else None
    try:
        kw = {}
        if tbl is not None:  # default heartbeat: 100 ms
            kw = {"initializer": memtrack.init_worker, "initargs": (tbl.name,)}
        fn = {"plain": parse_plain, "phased": parse_phased}.get(mode, parse_probed)
        with ProcessPoolExecutor(POOL_WORKERS, mp_context=ctx, **kw) as ex:
            results = list(ex.map(fn, files, chunksize=POOL_CHUNKSIZE))
        t1 = time.perf_counter()
        if fn is parse_probed:
            probe = {k: [r[i] for r in results]
                     for i, k in enumerate(("items", "enter", "exit", "enter_cpu",
                                            "exit_cpu")) if i}
            results = [r[0] for r in results]
        if tbl is not None:
            ws = tbl.workers()
            view = {
                "workers": len(ws),
                "tasks": sum(w.tasks for w in ws),
                "parse_count": sum(w.phases["parse"].count for w in ws if "parse" in w.phases),
                "max_peak_rss": max((w.peak_rss for w in ws), default=0),
                "heartbeat_ms": tbl.header()["heartbeat_ms"],
            }
    finally:
        if tbl is not None:
            tbl.close()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": t1 - t0, "cpu": cpu, "items": sum(results), "view": view, "probe": probe}


def child_workload(argv: list[str]) -> int:
    """Run the alternating plain/phased runs, then the two probe runs; JSON on stdout."""
    pairs, stride = int(argv[0]), int(argv[1])
    warnings.simplefilter("ignore")  # SyntaxWarnings of old escapes in the stdlib
    files = stdlib_files()[::stride]
    out: dict = {"files": len(files), "bytes": sum(os.path.getsize(f) for f in files),
                 "plain": [], "phased": [], "order": []}
    print(f"  workload: {len(files)} files, {POOL_WORKERS} fork workers; warm-up",
          file=sys.stderr, flush=True)
    _one_run(files, "plain")
    _one_run(files, "phased")
    for i in range(pairs):
        order = ("plain", "phased") if i % 2 == 0 else ("phased", "plain")  # ABBA
        for mode in order:
            out[mode].append(_one_run(files, mode))
        out["order"].append(",".join(order))
        p, q = out["plain"][-1]["wall"], out["phased"][-1]["wall"]
        print(f"  pair {i + 1}/{pairs}: plain {p:.2f} s, phased {q:.2f} s",
              file=sys.stderr, flush=True)
    print("  probe runs: phase enter/exit timed inside the workers", file=sys.stderr,
          flush=True)
    for mode in ("probe_joined", "probe_unjoined"):
        out[mode] = _one_run(files, mode)
    out["clock_cost"] = clock_cost()
    _reply(out)
    return 0


CHILDREN = {
    "phase": child_phase,
    "phaseloop": child_phaseloop,
    "spawner": child_spawner,
    "reader": child_reader,
    "workload": child_workload,
}


# --------------------------------------------------------------------------------------
# The parent side


# A process started by a process that held much memory starts with that process's peak
# in its ru_maxrss (the kernel carries it across exec); memtrack then sees a sticky
# floor and reads the exact mark from /proc/self/status on every peak reading while the
# process stays below it. So the children that time phases are started by this small
# launcher (which forks, then execs them), holding `ballast` MiB when it forks: 0 for a
# clean start, more to measure that case on purpose.
LAUNCHER = """
import os, sys
ballast = bytearray(int(sys.argv[1]) << 20)
for i in range(0, len(ballast), 4096):
    ballast[i] = 1
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
del ballast
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


class Child:
    """A child process of this script, spoken to in JSON lines; with `ballast` (MiB), it
    is started through LAUNCHER by a small process holding that much memory."""

    def __init__(self, role: str, *args: str, ballast: int | None = None) -> None:
        argv = [sys.executable, str(SCRIPT), "--child", role, *args]
        if ballast is not None:
            argv = [sys.executable, "-S", "-c", LAUNCHER, str(ballast), *argv]
        self.role = role
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)

    def ask(self, *cmd):
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"child {self.role} exited ({self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.ask("quit")
        except (OSError, RuntimeError, ValueError):
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Series:
    """Per-call times of one benchmark measured in a child (same fields as Bench)."""

    key: str
    label: str
    n: int = 0
    per_call_ns: list[float] = field(default_factory=list)
    per_call_cpu_ns: list[float] = field(default_factory=list)  # the thread's CPU time

    @property
    def median(self) -> float:
        return statistics.median(self.per_call_ns)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.per_call_cpu_ns)

    @property
    def low(self) -> float:
        return min(self.per_call_ns)

    @property
    def high(self) -> float:
        return max(self.per_call_ns)


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return (xs[0], xs[0], xs[0]) if xs else (float("nan"),) * 3
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[1], q[2]


# --- 1. the phase in a joined worker -------------------------------------------------

VARIANTS = [
    ("plain", "not joined"),
    ("joined", "joined, heartbeat 100 ms (the default)"),
    ("joined_nohb", "joined, heartbeat off"),
    ("toggle_off", "a 4th process that joins and leaves between batches: left"),
    ("toggle_on", "the same 4th process: joined"),
    ("big_parent", f"not joined, started by a process holding {BIG_PARENT_MB} MiB "
     "(sticky `ru_maxrss` floor)"),
]
OWN_PROCESS = ("plain", "joined", "joined_nohb", "big_parent")


def measure_join(repeats: int, target_ns: float) -> dict:
    """Three processes (not joined, joined, joined without heartbeat) and a fourth that
    joins and leaves between its batches, driven in lock-step, order rotated per round."""
    tbl = memtrack.WorkerTable(capacity=8)  # default heartbeat
    toggle_tbl = memtrack.WorkerTable(capacity=128)  # each join takes a fresh slot
    kids: dict[str, Child] = {}
    toggled = [False]

    def batch(v: str, key: str, n: int) -> list[int]:
        if v.startswith("toggle_") and toggled[0] != (v == "toggle_on"):
            if v == "toggle_on":
                if kids[v].ask("join", toggle_tbl.name) < 0:
                    raise RuntimeError("the toggling child found its table full")
            else:
                kids[v].ask("leave")
            toggled[0] = v == "toggle_on"
        return kids[v].ask("batch", key, n)

    try:
        kids["plain"] = Child("phase", "-", "-", ballast=0)
        kids["joined"] = Child("phase", tbl.name, "-", ballast=0)
        kids["joined_nohb"] = Child("phase", tbl.name, "0", ballast=0)
        kids["toggle_off"] = kids["toggle_on"] = Child("phase", "-", "-", ballast=0)
        kids["big_parent"] = Child("phase", "-", "-", ballast=BIG_PARENT_MB)
        slots = {v: kids[v].ask("slot") for v in OWN_PROCESS}
        series: dict[tuple[str, str], Series] = {}
        for key, label, *_ in PHASE_BENCHES:
            n = kids["plain"].ask("calibrate", key, target_ns)  # the same n for all
            for v, vlabel in VARIANTS:
                series[v, key] = Series(f"{v}:{key}", f"{label}, {vlabel}", n)
                batch(v, key, n)  # warm-up batch, discarded
        names = [v for v, _ in VARIANTS]
        for r in range(repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            for key, *_ in PHASE_BENCHES:
                for v in order:
                    s = series[v, key]
                    wall, cpu = batch(v, key, s.n)
                    s.per_call_ns.append(wall / s.n)
                    s.per_call_cpu_ns.append(cpu / s.n)
            say(f"  round {r + 1}/{repeats}")
        workers = tbl.workers()
    finally:
        for v in (*OWN_PROCESS, "toggle_on"):
            if v in kids:
                kids[v].close()
        tbl.close()
        toggle_tbl.close()
    return {"series": series, "slots": slots, "workers": workers}


def own_shares(data: Path) -> tuple[dict[str, float], list[tuple[float, str, str]], str | None]:
    """Self-time share per symbol (summed over binaries), and the raw rows."""
    selfs, err = perf_self_by(data, "dso,sym")
    own: dict[str, float] = {}
    for share, _dso, sym in selfs:
        own[sym] = own.get(sym, 0.0) + share
    return own, selfs, err


def perf_join(tmp: Path, quick: bool) -> tuple[list[tuple[str, float]], str]:
    """perf record of a joined worker running phases: the slot writes' share."""
    n = 100_000 if quick else 200_000
    tbl = memtrack.WorkerTable(capacity=4)
    data = tmp / "perf-join.data"
    try:
        say(f"  perf record -g: {n:,} phases in a joined child")
        err = perf_record([sys.executable, str(SCRIPT), "--child", "phaseloop", tbl.name,
                           str(n)], data)
    finally:
        tbl.close()
    if err:
        return [], f"not measured: {err}"
    own, _selfs, err = own_shares(data)
    if err:
        return [], f"not measured: {err}"
    wanted = [
        ("memtrack's phase code (`phase_enter` + `phase_exit`)", ["phase_enter", "phase_exit"]),
        ("the slot writes (`mt_worker_on_enter_locked` + `mt_worker_on_exit_locked`; their "
         "256-byte path copies run in glibc's memcpy/memset, not counted here)",
         ["mt_worker_on_enter_locked", "mt_worker_on_exit_locked"]),
        ("the heartbeat thread (`heartbeat_main`)", ["heartbeat_main"]),
    ]
    rows = []
    for label, syms in wanted:
        if any(s in own for s in syms):
            rows.append((label, sum(own.get(s, 0.0) for s in syms)))
    return rows, (f"`perf record -g -F 4999` of a child that joins a table and runs {n:,} "
                  "outermost phases (startup included); share of all samples in each "
                  "function's own code (self)")


# --- 2. reading the table ------------------------------------------------------------

READ_BENCHES = [
    ("workers", "`table.workers()`", "table.workers()", False),
    ("read", "`table._segment.read()` (the C call `workers()` wraps)", "table._segment.read()",
     False),
    ("totals", "`table.totals()` (one read, summed in C)", "table.totals()", False),
    ("workers_gc", "`table.workers()` with the garbage collector on", "table.workers()", True),
    ("check", "`table.workers(check=True)` (liveness asked of /proc afresh: what a new "
     "reader's first read does)", "table.workers(check=True)", False),
]


def measure_reads(repeats: int, target_ns: float, levels: tuple[int, ...],
                  perf_tmp: Path | None) -> dict:
    """For small and full slots, and each occupancy: a section of READ_BENCHES; with
    `perf_tmp`, also a perf profile of a reader at the highest occupancy."""
    results: dict[tuple[str, int], list[Bench]] = {}
    first_read: dict[tuple[str, int], float] = {}
    perf: dict[str, tuple[list, list, str]] = {}
    spawner = Child("spawner")
    try:
        for kind, paths in (("small", SMALL_PATHS), ("full", FULL_PATHS)):
            tbl = memtrack.WorkerTable(capacity=READ_CAPACITY)  # default heartbeat
            try:
                for level in levels:
                    t0 = time.perf_counter()
                    got = spawner.ask("grow", tbl.name, level, list(paths))
                    if got[0] != "ok":
                        raise RuntimeError(f"spawner: {got}")
                    ws = tbl.workers()
                    live = sum(1 for w in ws if w.state in ("idle", "running"))
                    say(f"  {kind} slots, {level} workers ({live} live in the table, forked "
                        f"in {time.perf_counter() - t0:.1f} s)")
                    if live != level or any(len(w.phases) != len(paths) for w in ws):
                        raise RuntimeError(f"expected {level} live workers with {len(paths)} "
                                           f"phase paths each, the table shows {live}")
                    # A new reader's first read: opens a pidfd per worker.
                    fresh = []
                    for _ in range(3):
                        other = memtrack.WorkerTable.attach(tbl.name)
                        t = time.perf_counter_ns()
                        other.workers()
                        fresh.append(time.perf_counter_ns() - t)
                        other.close()
                    first_read[kind, level] = statistics.median(fresh)
                    benches = [Bench(key, label, stmt, gc_enabled=gc_on,
                                     namespace={"table": tbl})
                               for key, label, stmt, gc_on in READ_BENCHES]
                    run_section(benches, repeats, target_ns, lambda _m: None)
                    results[kind, level] = benches
                    say(f"    workers(): {fmt_ns(benches[0].median)}")
                if perf_tmp is not None:
                    perf[kind] = perf_reader(tbl.name, perf_tmp / f"perf-read-{kind}.data")
            finally:
                spawner.ask("stop")
                tbl.close()
    finally:
        spawner.close()
    return {"benches": results, "first_read": first_read, "perf": perf}


def _python_group(sym: str) -> str:
    if any(s in sym for s in ("Malloc", "_Free", "pymalloc", "PyMem_", "GC_Del", "gc_alloc",
                              "_PyObject_GC_New", "PyObject_GC_Track", "PyObject_GC_UnTrack",
                              "_PyObject_GC_Link")):
        return "alloc"
    if sym in ("unicodekeys_lookup_unicode", "PyDict_GetItemWithError", "dict_lookup",
               "_Py_dict_lookup", "unicode_eq", "lookdict_unicode"):
        return "lookup"
    if "structseq" in sym or "StructSequence" in sym:
        return "structseq"
    if sym.startswith(("PyLong_", "PyFloat_", "PyUnicode_", "unicode_", "_PyLong_", "float_",
                       "long_", "PyBool_", "ascii_decode", "_PyUnicode")):
        return "values"
    if "dict" in sym.lower() or sym in ("insertdict", "PyDict_SetItem", "new_keys_object"):
        return "dicts"
    return "other"


READ_GROUPS = [
    ("kernel", "kernel, all of its own code (mostly the system calls: a `poll()` of each "
     "worker's pidfd; see the inclusive rows at the end)"),
    ("core", "memtrack `_core`: seqlock copies and checks of the slots (`segment_read`, "
     "`read_slot`, …)"),
    ("libc", "glibc: memcpy of the slots, the `poll()` wrapper, and the memcmp/memcpy "
     "CPython calls"),
    ("alloc", "CPython: object allocation and freeing (`_PyObject_Malloc`, `_PyObject_Free`, "
     "GC (un)tracking)"),
    ("lookup", "CPython: dict lookups (`unicodekeys_lookup_unicode`, "
     "`PyDict_GetItemWithError`: mostly CPython 3.11's `PyStructSequence_New` and "
     "`structseq_dealloc`, which look the type's field counts up in its dict on every call)"),
    ("structseq", "CPython: the rest of creating and freeing structseqs (`WorkerStats`, "
     "`PhaseSummary`)"),
    ("values", "CPython: the field values (ints, floats, strings)"),
    ("dicts", "CPython: the `phases` dicts"),
    ("other", "CPython: everything else (the loop, lists, reference counting)"),
    ("rest", "other binaries"),
]


def perf_reader(name: str, data: Path) -> tuple[list, list, str]:
    """perf record of a reader process reading a full table in a loop."""
    say("    perf record -g: a reader process, 3 s")
    err = perf_record([sys.executable, str(SCRIPT), "--child", "reader", name, "3"], data)
    if err:
        return [], [], f"not measured: {err}"
    found, err = perf_symbols(data)
    if err:
        return [], [], f"not measured: {err}"
    _own, selfs, err = own_shares(data)
    if err:
        return [], [], f"not measured: {err}"
    groups: dict[str, float] = {}
    for share, dso, sym in selfs:
        if dso == "[kernel.kallsyms]":
            g = "kernel"
        elif "_core" in dso:
            g = "core"
        elif dso.startswith("libc"):
            g = "libc"
        elif "python" in dso:
            g = _python_group(sym)
        else:
            g = "rest"
        groups[g] = groups.get(g, 0.0) + share
    rows = [(label, groups[g]) for g, label in READ_GROUPS if groups.get(g, 0.0) >= 0.05]
    kernel = []
    for label, sym in (("all system calls (kernel entry to exit, inclusive)",
                        "entry_SYSCALL_64_after_hwframe"),
                       ("… of which `poll()` (`__x64_sys_poll`, inclusive)", "__x64_sys_poll")):
        if sym in found:
            kernel.append((label, found[sym][0]))
    top = selfs[:8]
    return rows, [("kernel", kernel), ("top", top)], (
        "`perf record -g -F 4999` of a separate reader process: attach, then "
        "`table._segment.read()` in a loop for 3 s with the garbage collector off, as in the "
        "timed batches (startup included); share of all samples in each group's own code")


# --- 3. the workload -----------------------------------------------------------------


def measure_workload(pairs: int, stride: int) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--child", "workload", str(pairs),
                           str(stride)], stdout=subprocess.PIPE, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"workload child failed ({proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------
# Report


def sfmt(ns: float) -> str:
    """A signed difference of times."""
    return ("+" if ns >= 0 else "−") + fmt_ns(abs(ns))


def pct(x: float) -> str:
    return f"{x * 100:+.2f}%"


def read_words(small_hi: dict, full_hi: dict, reads: dict, level: int) -> str:
    """The summary of where a read's time goes, from the perf groups when measured."""
    read = small_hi["read"].median
    per = read / level
    budget = TARGET_READ_NS / level
    text = (f"one `read()` with {len(SMALL_PATHS)} phase paths per worker costs "
            f"{fmt_ns(read)}, ≈ {fmt_ns(per)} per worker; the {fmt_ns(TARGET_READ_NS)} "
            f"target leaves {fmt_ns(budget)} per worker. ")
    perf = reads["perf"].get("small")
    if perf and perf[0]:
        kernel = sum(s for lbl, s in perf[0] if lbl.startswith("kernel"))
        python = sum(s for lbl, s in perf[0] if lbl.startswith("CPython"))
        copy = sum(s for lbl, s in perf[0] if lbl.startswith(("memtrack", "glibc")))
        text += (f"By the perf profile, ≈ {fmt_ns(per * kernel / 100)} of each worker's share "
                 f"is the kernel ({kernel:.0f}%: the pass's `fstat` and `epoll_wait`, and "
                 f"page walks over the mapping), ≈ {fmt_ns(per * python / 100)} is CPython "
                 f"({python:.0f}%: the list and, for a slot that changed, a new view), and ≈ "
                 f"{fmt_ns(per * copy / 100)} is looking at and copying slots ({copy:.0f}%). ")
    text += ("Since issue 10 (the v2 reader) a pass copies only the slots whose counter "
             "moved, a view decodes its fields when they are read and is handed out again "
             "while its slot is unchanged, and liveness is one `epoll_wait` for all owners, "
             "so an idle worker costs two loads and a reference count per read. With full "
             f"slots: {fmt_ns(full_hi['read'].median)} per read. The v2 reader is compared "
             "with the one before it, side by side, in the next section.")
    return text


def probe_share(work: dict, mode: str) -> float | None:
    """The CPU time of all phase enters and exits of a probe run, as a share of the
    run's workers' CPU time."""
    pr = work.get(mode, {}).get("probe")
    if not pr:
        return None
    return (sum(pr["enter_cpu"]) + sum(pr["exit_cpu"])) / 1e9 / work[mode]["cpu"]


def estimate(on: Series, off: Series, cpu: bool) -> tuple[float, float, float, float]:
    """(difference of medians, and the quartiles q1, median, q3 of the per-round
    differences) of `on` minus `off`, in wall or CPU time per call."""
    a = on.per_call_cpu_ns if cpu else on.per_call_ns
    b = off.per_call_cpu_ns if cpu else off.per_call_ns
    q1, med, q3 = quartiles([x - y for x, y in zip(a, b, strict=True)])
    return statistics.median(a) - statistics.median(b), q1, med, q3


def _side(ests: list[tuple[float, float, float, float]],
          t: float = TARGET_JOIN_ADD_NS) -> str | None:
    """"below"/"above" the target `t` when every estimate (difference of medians, q1,
    median, q3 of the per-round differences) and the middle half of its per-round
    differences are on that side; None when not resolved."""
    if all(d < t and q3 < t for d, _q1, _m, q3 in ests):
        return "below"
    if all(d >= t and q1 >= t for d, q1, _m, _q3 in ests):
        return "above"
    return None


def verdict(wall: list, cpu: list, t: float = TARGET_JOIN_ADD_NS) -> str:
    """met / NOT met by wall time when resolved, else by CPU time, else not resolved."""
    side = _side(wall, t)
    if side:
        return status(side == "below")
    side = _side(cpu, t)
    if side:
        return (status(side == "below") + " in CPU time (wall time did not resolve it: "
                "other processes shared the CPUs)")
    return ("**not resolved**: the estimates and their per-round spread straddle the target; "
            "run on a quiet machine")


def table_section(command: str, args, repeats: int, target_ns: float, join: dict,
                  join_perf: tuple[list, str], reads: dict, work: dict,
                  elapsed: float) -> Section:
    S = join["series"]
    L: list[str] = []

    # --- numbers used in several places
    plain, joined = S["plain", "phase"], S["joined", "phase"]
    t_off, t_on = S["toggle_off", "phase"], S["toggle_on", "phase"]
    two_wall, one_wall = estimate(joined, plain, False), estimate(t_on, t_off, False)
    two_cpu, one_cpu = estimate(joined, plain, True), estimate(t_on, t_off, True)
    added, t_added = two_wall[0], one_wall[0]
    nested_added = S["joined", "phase_nested"].median - S["plain", "phase_nested"].median
    nohb_added = S["joined_nohb", "phase"].median - plain.median
    t_nested = S["toggle_on", "phase_nested"].median - S["toggle_off", "phase_nested"].median

    B = reads["benches"]
    top_level = max(lvl for _, lvl in B)
    small_top = {b.key: b for b in B["small", top_level]}
    full_top = {b.key: b for b in B["full", top_level]}

    wp = [r["wall"] for r in work["plain"]]
    wq = [r["wall"] for r in work["phased"]]
    cp = [r["cpu"] for r in work["plain"]]
    cq = [r["cpu"] for r in work["phased"]]
    wall_over = statistics.median(wq) / statistics.median(wp) - 1
    cpu_over = statistics.median(cq) / statistics.median(cp) - 1
    pair_over = [q / p - 1 for p, q in zip(wp, wq, strict=True)]
    pair_cpu_over = [q / p - 1 for p, q in zip(cp, cq, strict=True)]
    spread = (max(wp) - min(wp)) / statistics.median(wp)
    view = work["phased"][-1]["view"]
    files = work["files"]
    phase_cost = joined.cpu_median  # a whole joined phase, per task, in CPU time
    expected = files * phase_cost / 1e9 / statistics.median(cp)

    # --- headline and targets
    headline = [
        f"- a phase enter+exit in a worker joined to a table: **{fmt_ns(joined.median)}** "
        f"median vs {fmt_ns(plain.median)} in a process that did not join → difference "
        f"**{sfmt(added)}**; the same process joined vs left: **{sfmt(t_added)}**. In the "
        f"threads' CPU time: {sfmt(two_cpu[0])} and {sfmt(one_cpu[0])}.",
        f"- `table.workers()` over {top_level} occupied slots (capacity {READ_CAPACITY}): "
        f"**{fmt_ns(small_top['workers'].median)}** with {len(SMALL_PATHS)} phase paths per "
        f"worker, **{fmt_ns(full_top['workers'].median)}** with full slots "
        f"({SLOT_PHASES} paths each); `totals()` {fmt_ns(small_top['totals'].median)} / "
        f"{fmt_ns(full_top['totals'].median)}.",
        f"- {POOL_WORKERS} fork workers parsing {files} stdlib files with `ast.parse`: plain "
        f"{statistics.median(wp):.2f} s, with a phase per task and a joined table "
        f"{statistics.median(wq):.2f} s → **{pct(wall_over)}** wall time "
        f"({pct(cpu_over)} workers' CPU time); the plain runs alone spread by "
        f"{spread * 100:.1f}%"
        + (f"; the phases' own CPU time, measured inside the workers: "
           f"{probe_share(work, 'probe_joined') * 100:.2f}% of theirs."
           if probe_share(work, "probe_joined") is not None else "."),
    ]
    join_status = verdict([two_wall, one_wall], [two_cpu, one_cpu])
    met_read = small_top["workers"].median < TARGET_READ_NS
    met_read_full = full_top["workers"].median < TARGET_READ_NS
    lim = TARGET_OVERHEAD_PCT / 100
    work_status = verdict([(wall_over, *quartiles(pair_over))],
                          [(cpu_over, *quartiles(pair_cpu_over))], lim)
    direct = probe_share(work, "probe_joined")  # the phases' own CPU, measured in workers
    if work_status.startswith("**not resolved") and direct is not None and direct >= lim:
        work_status = (f"**NOT met**: the phases' own CPU time in the workers is already "
                       f"{direct * 100:.2f}% (the runs themselves did not resolve it)")
    targets = [
        [f"a phase in a joined worker: under {fmt_ns(TARGET_JOIN_ADD_NS)} added (differences "
         "of medians: two processes; one process joined vs left)",
         f"wall {sfmt(added)}, {sfmt(t_added)}; CPU {sfmt(two_cpu[0])}, {sfmt(one_cpu[0])}",
         join_status],
        [f"`workers()` over {READ_CAPACITY} occupied slots: under {fmt_ns(TARGET_READ_NS)} "
         f"— {len(SMALL_PATHS)} phase paths per worker", fmt_ns(small_top["workers"].median),
         status(met_read)],
        [f"the same with full slots ({SLOT_PHASES} phase paths per worker)",
         fmt_ns(full_top["workers"].median), status(met_read_full)],
        [f"a real multi-process job: under {TARGET_OVERHEAD_PCT:.0f}% slower (medians of wall "
         "time and of the workers' CPU time)",
         f"wall {pct(wall_over)}, CPU {pct(cpu_over)} (plain runs' own spread: "
         f"{spread * 100:.1f}%)", work_status],
    ]
    L += ["### Headline", ""] + headline
    L += ["", "### Targets (issue 3)", ""]
    L += table(targets, ["target", "measured", "status"], "lrl")
    if top_level != READ_CAPACITY:
        L += ["", f"(`--max-workers` limited the table to {top_level} occupied slots: the "
              f"{READ_CAPACITY}-slot target was not measured as stated.)"]

    # --- how
    L += [
        "",
        "### How it was measured",
        "",
        "- The method of the core section (benchmarks/_timing.py): a statement compiled "
        "into a loop, timed as a whole with `time.perf_counter_ns`; `n` calibrated so a "
        f"batch lasts about {target_ns / 1e6:.0f} ms; one warm-up batch dropped; {repeats} "
        f"rounds ({len(S['plain', 'phase'].per_call_ns)} in section 1, whose differences are "
        "small), one batch of every benchmark of a section per round, interleaved; the "
        "median per-call time over the batches, with the fastest and slowest batch; GC off "
        "during the batches. Nothing is subtracted, except where a row says \"added\" or "
        "\"difference\".",
        "- Phases (section 1): each variant is a child process of this script, started the "
        "same way (through a small launcher process, see below) and with the same imports; "
        "the joined ones call "
        "`memtrack.init_worker(name)` first, the 4th joins and leaves between its batches. "
        "The parent drives them in lock-step over pipes "
        "(a batch runs while the others wait), rotating their order every round; `n` is "
        "calibrated once (in the process that did not join) and used by all. The processes "
        "do not share a heap, so heap-dependent costs (mallinfo2) can differ by a little "
        "between them.",
        f"- Reading (section 2): a table of capacity {READ_CAPACITY} (default heartbeat: "
        "100 ms) is filled by a small spawner process that sets MEMTRACK_TABLE and forks "
        "workers; each joins at fork (its own slot), runs its phases, then blocks on a pipe "
        "with its heartbeat thread running, as an idle pool worker does. The reader is this "
        "process (it owns the table, and keeps one pidfd per worker between reads).",
        f"- Workload (section 3): in a fresh child process, each run creates a fork "
        f"`ProcessPoolExecutor({POOL_WORKERS})`, maps the files (`chunksize="
        f"{POOL_CHUNKSIZE}`, one task per file: read the file, `ast.parse` it), and shuts "
        "the pool down; the timed span includes starting and stopping the pool and, for "
        "the phased runs, creating the table. CPU time is the workers' user+sys "
        "(`RUSAGE_CHILDREN` of the reaped workers). One warm-up run of each kind is "
        "dropped; then runs alternate plain/phased, phased/plain, ...; GC on.",
    ]

    # --- 1. phases
    L += ["", "### 1. A phase in a worker joined to a table", ""]
    rows = []
    for key, *_ in PHASE_BENCHES:
        for v, _ in VARIANTS:
            s = S[v, key]
            base = "toggle_off" if v == "toggle_on" else "plain"
            vs = ""
            if v not in ("plain", "toggle_off"):
                b = S[base, key]
                vs = (f"{sfmt(s.median - b.median)} ({sfmt(s.cpu_median - b.cpu_median)} "
                      f"CPU) vs {'not joined' if base == 'plain' else 'left'}")
            rows.append([s.label, fmt_ns(s.median), fmt_ns(s.low), fmt_ns(s.high),
                         fmt_ns(s.cpu_median), f"{s.n:,}", vs])
    L += table(rows, ["operation", "median / call", "min", "max", "CPU median / call",
                      "calls / batch", "difference of medians"], "lrrrrrl")

    def est_words(e: tuple[float, float, float, float]) -> str:
        return (f"{sfmt(e[0])} (per round: median {sfmt(e[2])}, quartiles {sfmt(e[1])} … "
                f"{sfmt(e[3])})")

    noise = plain.high - plain.low
    L += [
        "",
        "- CPU time is the child's main thread's (`time.thread_time_ns()` read around each "
        "batch, outside the timed loop): unlike wall time it leaves out the time a child "
        "waited while other processes had the CPUs, and it leaves out the heartbeat "
        "thread's own work.",
        f"- Two processes, joined − not joined, outermost phase: wall {est_words(two_wall)}; "
        f"CPU {est_words(two_cpu)}; over {len(plain.per_call_ns)} rounds. Nested phase: "
        f"{sfmt(nested_added)} (wall). Heartbeat off instead of 100 ms: {sfmt(nohb_added)} "
        "vs not joined (wall).",
        "- One process joined vs left (it calls `memtrack.init_worker(name)` and "
        "`memtrack._core.leave()` between its batches: same process, same heap): wall "
        f"{est_words(one_wall)}; CPU {est_words(one_cpu)}. Nested phase: {sfmt(t_nested)} "
        "(wall).",
        f"- Started by a process that held {BIG_PARENT_MB} MiB (as a `spawn` pool worker of a "
        f"large parent is, or any program it runs): {fmt_ns(S['big_parent', 'phase'].median)} "
        f"per outermost phase vs {fmt_ns(plain.median)}, whether joined or not. Its "
        "`ru_maxrss` starts at that process's peak (the kernel carries it across exec), so "
        "memtrack sets its sticky floor (csrc/peak.c) and, while the process's RSS stays "
        "below it, every peak reading also reads /proc/self/status: twice per phase. The "
        "other processes of this section are started by a small launcher (fork, then exec) "
        "so that they do not pay it; pool workers forked without exec do not either.",
        f"- Noise: the not-joined phase's batches range from {fmt_ns(plain.low)} to "
        f"{fmt_ns(plain.high)} in wall time ({fmt_ns(noise)} wide); the target is decided "
        f"only when both estimates and the middle half of their per-round differences are "
        f"on the same side of {fmt_ns(TARGET_JOIN_ADD_NS)} (wall time first, else CPU time).",
        "- What a joined phase does in addition (csrc/table/worker.c): on enter and on exit, "
        "one seqlock write of the worker's slot — state, the current phase path (a 256-byte "
        "copy), depth, rss, peak, and a `clock_gettime` for `updated`; on exit also the "
        "slot's per-path summary (count, time, peaks), whose entry is cached per path. No "
        "system call is added: the slot is shared memory.",
    ]
    jrows, jnote = join_perf
    if jrows:
        L += ["", f"Sampled with perf ({jnote}):", ""]
        L += table([[label, f"{share:.1f}%", fmt_ns(joined.cpu_median * share / 100)]
                    for label, share in jrows],
                   ["where", "share of samples", "≈ per phase (share x joined CPU median)"],
                   "lrr")
        slot = next((p for lbl, p in jrows if lbl.startswith("the slot writes")), None)
        if slot is not None:
            L += ["", f"- The slot writes' own code is ≈ {fmt_ns(joined.cpu_median * slot / 100)} "
                  "per enter+exit by this estimate (a lower bound: the path copies in glibc "
                  "are not in it), independent of the run-to-run noise above."]
    elif jnote:
        L += ["", f"perf: {jnote}."]
    ws = join["workers"]
    L += ["", f"The table of the two joined processes showed {len(ws)} workers and "
          f"{sum(w.tasks for w in ws):,} outermost phases counted as tasks after the run."]

    # --- 2. reads
    L += ["", f"### 2. Reading a table of capacity {READ_CAPACITY}", ""]
    rows = []
    for (kind, level), benches in sorted(B.items(), key=lambda kv: (kv[0][0] != "small",
                                                                     kv[0][1])):
        paths = len(SMALL_PATHS) if kind == "small" else SLOT_PHASES
        for b in benches:
            rows.append([f"{level}", f"{paths}", b.label, fmt_ns(b.median), fmt_ns(b.low),
                         fmt_ns(b.high), f"{b.n:,}"])
    L += table(rows, ["occupied slots", "phase paths per worker", "operation",
                      "median / call", "min", "max", "calls / batch"], "rrlrrrr")
    lvls = sorted({lvl for _, lvl in B})
    lo_lvl, hi_lvl = lvls[0], lvls[-1]
    lines = []
    for kind in ("small", "full"):
        lo = {b.key: b for b in B[kind, lo_lvl]}
        hi = {b.key: b for b in B[kind, hi_lvl]}
        if hi_lvl > lo_lvl:
            slope = (hi["workers"].median - lo["workers"].median) / (hi_lvl - lo_lvl)
            paths = len(SMALL_PATHS) if kind == "small" else SLOT_PHASES
            lines.append(
                f"- {paths} phase paths per worker: each occupied slot costs ≈ "
                f"{fmt_ns(slope)} per `workers()` (slope from {lo_lvl} to {hi_lvl} slots); "
                f"a new reader's first read of {hi_lvl} slots took "
                f"{fmt_ns(reads['first_read'][kind, hi_lvl])} (median of 3: it checks "
                "/proc/<pid>/stat and opens a pidfd per worker).")
    small_hi = {b.key: b for b in B["small", hi_lvl]}
    full_hi = {b.key: b for b in B["full", hi_lvl]}
    per_entry = ((full_hi["workers"].median - small_hi["workers"].median)
                 / (hi_lvl * (SLOT_PHASES - len(SMALL_PATHS))))
    L += [""] + lines + [
        f"- Full slots vs small ones at {hi_lvl} workers: "
        f"{fmt_ns(full_hi['workers'].median)} vs {fmt_ns(small_hi['workers'].median)}, "
        f"≈ {fmt_ns(per_entry)} per extra phase path and worker (160 more bytes copied "
        "when a slot changed; the `phases` dict is built only when a caller reads it).",
        f"- `workers()` vs the C call it wraps: {fmt_ns(small_hi['workers'].median)} vs "
        f"{fmt_ns(small_hi['read'].median)}: the Python wrapper is one method call, so all "
        f"the time is in `Segment.read()`. `totals()`: {fmt_ns(small_hi['totals'].median)} "
        "(the same pass, summed in C from a compact per-slot array). With the garbage "
        f"collector on (as in users' code): {fmt_ns(small_hi['workers_gc'].median)} / "
        f"{fmt_ns(full_hi['workers_gc'].median)} (small / full slots): views are not "
        "GC-tracked, and unchanged ones are reused, so a read allocates little.",
    ]
    for kind in ("small", "full"):
        if kind not in reads["perf"]:
            continue
        prow, extra, pnote = reads["perf"][kind]
        hi = small_hi if kind == "small" else full_hi
        paths = len(SMALL_PATHS) if kind == "small" else SLOT_PHASES
        if not prow:
            L += ["", f"perf ({kind} slots): {pnote}."]
            continue
        L += ["", f"Where a read of {hi_lvl} slots with {paths} phase paths per worker "
              f"spends its time, sampled with perf ({pnote}):", ""]
        extras = dict(extra)
        krows = [[label, f"{share:.1f}%", fmt_ns(hi["read"].median * share / 100)]
                 for label, share in extras.get("kernel", [])]
        L += table([[label, f"{share:.1f}%", fmt_ns(hi["read"].median * share / 100)]
                    for label, share in prow] + krows,
                   ["where", "share of samples", "≈ per read (share x `read()` median)"],
                   "lrr")
        if extras.get("top"):
            L += ["", "Hottest functions (own code): " + "; ".join(
                f"`{sym}` ({dso}) {share:.1f}%" for share, dso, sym in extras["top"]) + "."]
    L += ["", f"So, at {hi_lvl} workers: " + read_words(small_hi, full_hi, reads, hi_lvl)]


    # --- 3. workload
    L += ["", "### 3. Overhead on a real multi-process job", ""]
    L += [f"Workload: {files} .py files of the standard library ({work['bytes'] / 1e6:.1f} "
          f"MB; tests and site-packages left out"
          f"{'; every ' + str(args.stride) + 'th file' if args.stride > 1 else ''}), "
          f"parsed with `ast.parse` by a fork `ProcessPoolExecutor({POOL_WORKERS})`, one "
          f"task per file; {len(wp)} runs of each kind.", ""]
    wrows = [
        ["(i) plain: no phases, no table", f"{statistics.median(wp):.3f} s",
         f"{min(wp):.3f} s", f"{max(wp):.3f} s", f"{statistics.median(cp):.3f} s", "", ""],
        ["(ii) `memtrack.phase(\"parse\")` per task, workers joined (heartbeat "
         f"{view['heartbeat_ms'] if view else 100} ms)", f"{statistics.median(wq):.3f} s",
         f"{min(wq):.3f} s", f"{max(wq):.3f} s", f"{statistics.median(cq):.3f} s",
         pct(wall_over), pct(cpu_over)],
    ]
    L += table(wrows, ["run", "wall median", "wall min", "wall max", "workers' CPU median",
                       "wall vs plain", "CPU vs plain"], "lrrrrrr")
    pq1, pmed, pq3 = quartiles(pair_over)
    cq1, cmed, cq3 = quartiles(pair_cpu_over)
    L += [
        "",
        f"- Per pair (phased / plain − 1, the two runs of a pair back to back): wall median "
        f"{pct(pmed)} (quartiles {pct(pq1)} … {pct(pq3)}), CPU median {pct(cmed)} "
        f"(quartiles {pct(cq1)} … {pct(cq3)}). The plain runs alone spread by "
        f"{spread * 100:.1f}% (fastest to slowest): differences smaller than that are "
        "within this machine's noise.",
        f"- Expected from the micro-benchmark: {files} phases × {fmt_ns(phase_cost)} (a "
        f"joined phase's CPU time, section 1) = {fmt_ns(files * phase_cost)} of the workers' "
        f"{statistics.median(cp):.2f} s CPU, i.e. {expected * 100:.2f}%, plus the heartbeat "
        "(10 slot refreshes a second per worker, and a smaps_rollup read every second).",
    ]
    probe_rows = []
    for mode, label in (("probe_unjoined", "phases, workers not joined"),
                        ("probe_joined", "phases, workers joined (as in ii)")):
        pr = work.get(mode, {}).get("probe")
        if not pr:
            continue
        cpu_total = sum(pr["enter_cpu"]) + sum(pr["exit_cpu"])
        probe_rows.append([label, fmt_ns(statistics.median(pr["enter"])),
                           fmt_ns(statistics.median(pr["exit"])),
                           fmt_ns(statistics.median(pr["enter_cpu"])),
                           fmt_ns(statistics.median(pr["exit_cpu"])),
                           fmt_ns(cpu_total),
                           f"{cpu_total / 1e9 / work[mode]['cpu'] * 100:.2f}%"])
    if probe_rows:
        wall_clk, cpu_clk = work.get("clock_cost", (float("nan"), float("nan")))
        L += ["", "Inside the workers, measured: two more runs (not in the table above) time "
              "each task's `phase.__enter__()` and `__exit__()` in the real workers, between "
              "real parses, in wall time (`perf_counter_ns`) and in the worker thread's CPU "
              "time (`thread_time_ns`, which leaves out time spent preempted by other "
              "processes):", ""]
        L += table(probe_rows, ["run", "enter, wall (median)", "exit, wall (median)",
                                "enter, CPU (median)", "exit, CPU (median)",
                                "CPU of all enters and exits", "of the run's workers' CPU"],
                   "lrrrrrr")
        L += ["", f"- Nothing subtracted: each wall interval includes a `perf_counter_ns` "
              f"read (an empty interval measures {fmt_ns(wall_clk)}), each CPU interval two "
              f"clock reads of each kind (an empty one measures {fmt_ns(cpu_clk)}; "
              "`thread_time_ns` is a real system call)."]
        pj = work.get("probe_joined", {}).get("probe")
        if pj:
            per = statistics.median(pj["enter_cpu"]) + statistics.median(pj["exit_cpu"])
            L += [f"- A phase in a real worker costs ≈ {fmt_ns(per)} of CPU (median enter + "
                  f"median exit), {per / phase_cost:.1f}x the micro-benchmark's "
                  f"{fmt_ns(phase_cost)} (CPU), likely because after a parse the heap is "
                  "larger and the caches are cold, so the phase's system calls and its two "
                  "`mallinfo2()` heap walks cost more (not broken down here; see the core "
                  "section for mallinfo2 in a fragmented heap)."]
    direct = probe_share(work, "probe_joined")
    if direct is not None:
        measured = min(wall_over, cpu_over)
        if measured > 2 * direct + 0.005:
            L += [f"- The runs measured {pct(wall_over)} (wall) and {pct(cpu_over)} (CPU), "
                  f"well above the phases' own cost inside the workers ({direct * 100:.2f}% "
                  "of their CPU, joined). The rest is either indirect (the phase's heap "
                  "walks and system calls evicting the parser's data from the caches; "
                  "glibc's malloc taking its locked path once the heartbeat thread exists) "
                  "or this machine's noise; the load average in the machine table says how "
                  "busy it was. Only a quiet machine can tell them apart."]
        else:
            L += [f"- The phases' own cost inside the workers ({direct * 100:.2f}% of their "
                  f"CPU, joined) is a lower bound of the overhead, free of the runs' noise."]
    if view:
        L += [f"- What the table showed after a phased run: {view['workers']} workers, "
              f"{view['tasks']:,} tasks, `parse` counted {view['parse_count']:,} times, the "
              f"largest worker peak {memtrack.format_size(view['max_peak_rss'])}."]
    L.append("")
    return Section("table", "Worker table (issue 3)", command, elapsed, L, headline,
                   [[t[0], t[1], t[2]] for t in targets])


# --------------------------------------------------------------------------------------


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--no-perf-table", action="store_true",
                    help="skip the perf breakdowns of the table benchmarks")
    ap.add_argument("--pairs", type=int, default=None,
                    help="workload: plain/phased run pairs (default 7, --quick 3)")
    ap.add_argument("--stride", type=int, default=None,
                    help="workload: take every STRIDE-th stdlib file (default 1, --quick 4)")
    ap.add_argument("--max-workers", type=int, default=READ_CAPACITY,
                    help=f"most occupied slots to measure (default {READ_CAPACITY})")


def run(args, command: str) -> Section:
    """Run every table benchmark; the RESULTS.md section (run.py calls this too)."""
    t0 = time.perf_counter()
    repeats = 7 if args.quick else 15
    join_repeats = 9 if args.quick else 25  # the differences sought there are small
    target_ns = 8e6 if args.quick else 40e6
    if args.pairs is None:
        args.pairs = 3 if args.quick else 7
    if args.stride is None:
        args.stride = 4 if args.quick else 1
    levels = tuple(lvl for lvl in READ_LEVELS if lvl < args.max_workers) + (
        min(args.max_workers, READ_CAPACITY),)
    want_perf = not (args.quick or getattr(args, "no_perf", False) or args.no_perf_table)

    with tempfile.TemporaryDirectory(prefix="memtrack-bench-table-") as tmpdir:
        tmp = Path(tmpdir)
        say(f"1. phase in a joined worker vs not: 4 child processes, {join_repeats} rounds")
        join = measure_join(join_repeats, target_ns)
        join_perf: tuple[list, str] = ([], "")
        if want_perf:
            join_perf = perf_join(tmp, args.quick)
        say(f"2. reading the table: {READ_CAPACITY} slots, {', '.join(map(str, levels))} "
            "workers, small and full slots")
        reads = measure_reads(repeats, target_ns, levels, tmp if want_perf else None)
    say(f"3. workload: {args.pairs} pairs of runs")
    work = measure_workload(args.pairs, args.stride)
    elapsed = time.perf_counter() - t0
    return table_section(command, args, repeats, target_ns, join, join_perf, reads, work,
                         elapsed)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return CHILDREN[argv[1]](argv[2:])
    return standalone_main(
        sys.modules[__name__], "fewer, shorter batches (~30 s)", argv,
        lambda ap: ap.add_argument("--no-perf", action="store_true",
                                   help="skip the perf breakdowns"))


if __name__ == "__main__":
    sys.exit(main())
