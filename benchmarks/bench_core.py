#!/usr/bin/env python3
"""Benchmarks of memtrack's core (memtrack._core) against the tools users reach for.

    python benchmarks/bench_core.py            # full run, ~30-60 s
    python benchmarks/bench_core.py --quick    # ~10 s, fewer/shorter batches
    python benchmarks/bench_core.py --output /tmp/RESULTS.md --no-perf --no-syscalls

It writes (or refreshes) the core section of benchmarks/RESULTS.md and keeps the file's
other sections; ``python benchmarks/run.py`` runs this and bench_table.py together. The
measuring method and the report helpers live in benchmarks/_timing.py.

What is measured (all in one process, one run, on one machine):

1. readings: ``memtrack.rss()`` vs ``psutil.Process().memory_info().rss`` (Process made
   once) vs a plain-Python open/read/close of /proc/self/statm vs
   ``resource.getrusage(RUSAGE_SELF).ru_maxrss``; also ``peak_rss()``, ``reset_peak()``,
   ``snapshot()`` and ``footprint()`` vs ``psutil.Process().memory_full_info()``.
2. phases: ``with memtrack.phase("x"): pass`` (a new phase object each time, as users
   write it), a nested phase (entered inside an open phase: the fold path), the same
   with memtrack disabled (the interpreter's share), vs ``tracemalloc.reset_peak()`` +
   ``tracemalloc.get_traced_memory()`` with tracemalloc running, vs an empty ``with`` of
   a trivial Python context manager (the floor).
3. the hidden cost: a workload that builds 200 000 small dicts, plain, inside a
   memtrack phase, and with tracemalloc running (what each tool costs the code it
   measures).

How: each benchmark is a statement compiled into a loop ``for _ in itertools.repeat(None,
n): <stmt>`` (as ``timeit`` does: no per-call Python function call is added), timed as a
whole with ``time.perf_counter_ns``. ``n`` is calibrated so one batch lasts a fixed time;
the batches of all benchmarks of a section are interleaved round-robin (so drift and
noise hit all of them alike), and the median per-call time over the batches is reported
with min and max. The garbage collector is disabled during micro-benchmark batches (as
``timeit`` does) and enabled for the workload. Nothing is subtracted from any number; the
empty loop is reported on its own line. The script asserts nothing about speed.

It also compiles benchmarks/syscalls.c (cc -O2, in a temporary directory) to measure the
raw OS primitives in C, and, when ``perf`` works, samples a phase loop with ``perf record``
to show where a phase's time goes.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _timing  # noqa: E402  (the shared measuring method and report helpers)
from _timing import (  # noqa: E402
    Section,
    bench_rows,
    fmt_ns,
    git_commit,
    perf_record,
    perf_symbols,
    psutil,
    run_section,
    say,
    speed_words,
    standalone_main,
    status,
    table,
)

import memtrack  # noqa: E402

HERE = Path(__file__).resolve().parent
PAGESIZE = os.sysconf("SC_PAGE_SIZE")

# Targets of issue 2, requirement 10.
TARGET_RSS_SPEEDUP = 5.0  # memtrack.rss() at least 5x faster than psutil
TARGET_PHASE_NS = 2000.0  # a phase enter+exit under 2 us (median)

WORKLOAD_DICTS = 200_000


# --------------------------------------------------------------------------------------
# Helpers used by the benchmarked statements


class TrivialCM:
    """The floor: the cheapest context manager written in Python."""

    __slots__ = ()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        return False


def build_dicts(n: int = WORKLOAD_DICTS) -> int:
    """The allocation-heavy workload: n small dicts in a list, dropped on return."""
    items = [{"a": i, "b": i} for i in range(n)]
    return len(items)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]


def _libc():
    try:
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = _Mallinfo2
        libc.mallinfo2.argtypes = []
        libc.abs.restype = ctypes.c_int
        libc.abs.argtypes = [ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


LIBC = _libc()

NAMESPACE = {
    "memtrack": memtrack,
    "psutil": psutil,
    "tracemalloc": tracemalloc,
    "resource": resource,
    "PAGESIZE": PAGESIZE,
    "TrivialCM": TrivialCM,
    "build_dicts": build_dicts,
    "LIBC": LIBC,
    "os": os,
}


@dataclass
class Bench(_timing.Bench):
    """A benchmark whose statement sees this module's NAMESPACE."""

    namespace: dict | None = field(default_factory=lambda: NAMESPACE)


# --------------------------------------------------------------------------------------
# The benchmarks


def reading_benches() -> list[Bench]:
    return [
        Bench("loop", "empty loop (`pass`): the loop's own cost, for reference", "pass"),
        Bench("rss", "`memtrack.rss()`", "memtrack.rss()"),
        Bench(
            "psutil_rss",
            "`proc.memory_info().rss` (psutil; `proc = psutil.Process()` made once)",
            "proc.memory_info().rss",
            setup="proc = psutil.Process()",
        ),
        Bench(
            "py_statm",
            "plain Python: open/read/close `/proc/self/statm`, parse rss",
            'with open("/proc/self/statm") as f:\n    int(f.read().split()[1]) * PAGESIZE',
        ),
        Bench(
            "getrusage",
            "`resource.getrusage(RUSAGE_SELF).ru_maxrss`",
            "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss",
        ),
        Bench("peak_rss", "`memtrack.peak_rss()`", "memtrack.peak_rss()"),
        Bench("reset_peak", "`memtrack.reset_peak()`", "memtrack.reset_peak()"),
        Bench("snapshot", "`memtrack.snapshot()`", "memtrack.snapshot()"),
        Bench(
            "psutil_info",
            "`proc.memory_info()` (psutil, all fields)",
            "proc.memory_info()",
            setup="proc = psutil.Process()",
        ),
        Bench("footprint", "`memtrack.footprint()` (uss, pss, shared)", "memtrack.footprint()"),
        Bench(
            "psutil_full",
            "`proc.memory_full_info()` (psutil: uss, pss, swap)",
            "proc.memory_full_info()",
            setup="proc = psutil.Process()",
        ),
    ]


def phase_benches() -> list[Bench]:
    benches = [
        Bench(
            "phase",
            '`with memtrack.phase("x"): pass` (outermost; new object each time)',
            'with memtrack.phase("x"):\n    pass',
        ),
        Bench(
            "phase_nested",
            '`with memtrack.phase("x"): pass` inside an open phase (fold path)',
            'with memtrack.phase("x"):\n    pass',
            setup='_outer = memtrack.phase("outer")\n_outer.__enter__()',
            teardown="_outer.__exit__(None, None, None)",
        ),
        Bench(
            "phase_heap",
            "the same with `memtrack.configure(phase_heap=True)` (mallinfo2 at enter and exit, "
            "heap_delta; off by default)",
            'with memtrack.phase("x"):\n    pass',
            setup="memtrack.configure(phase_heap=True)",
            teardown="memtrack.configure(phase_heap=False)",
        ),
        Bench(
            "phase_disabled",
            "the same with memtrack disabled (`_core.set_disabled(True)`): "
            "interpreter + object only",
            'with memtrack.phase("x"):\n    pass',
            setup="memtrack._core.set_disabled(True)",
            teardown="memtrack._core.set_disabled(False)",
        ),
        Bench("phase_new", '`memtrack.phase("x")`: object creation only', 'memtrack.phase("x")'),
        Bench(
            "tracemalloc_pair",
            "`tracemalloc.reset_peak(); tracemalloc.get_traced_memory()` (tracemalloc running)",
            "tracemalloc.reset_peak()\ntracemalloc.get_traced_memory()",
            setup="tracemalloc.start()",
            teardown="tracemalloc.stop()",
        ),
        Bench(
            "trivial_cm",
            "`with TrivialCM(): pass` (a Python class with __enter__/__exit__): the floor",
            "with TrivialCM():\n    pass",
        ),
    ]
    if LIBC is not None:
        benches += [
            Bench("ctypes_mallinfo2", "`libc.mallinfo2()` via ctypes", "LIBC.mallinfo2()"),
            Bench("ctypes_abs", "`libc.abs(0)` via ctypes (the ctypes call floor)", "LIBC.abs(0)"),
        ]
    benches.append(Bench("os_getpid", "`os.getpid()` (a null system call, for the budget)",
                         "os.getpid()"))
    return benches


def workload_benches() -> list[Bench]:
    return [
        Bench("work_plain", "plain", "build_dicts()", gc_enabled=True, fixed_n=1),
        Bench(
            "work_phase",
            'inside `with memtrack.phase("work")`',
            'with memtrack.phase("work"):\n    build_dicts()',
            gc_enabled=True,
            fixed_n=1,
        ),
        Bench(
            "work_tracemalloc",
            "tracemalloc running, `reset_peak()` before and `get_traced_memory()` after",
            "tracemalloc.reset_peak()\nbuild_dicts()\ntracemalloc.get_traced_memory()",
            setup="tracemalloc.start()",
            teardown="tracemalloc.stop()",
            gc_enabled=True,
            fixed_n=1,
        ),
    ]


def workload_reports() -> dict[str, int]:
    """What each tool reports for one run of the workload (untimed)."""
    out = {}
    with memtrack.phase("work_report") as p:
        build_dicts()
    out["memtrack_peak_delta"] = p.stats.peak_delta
    out["memtrack_rss_delta"] = p.stats.rss_delta
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start, _ = tracemalloc.get_traced_memory()
        build_dicts()
        _, peak = tracemalloc.get_traced_memory()
        out["tracemalloc_peak_delta"] = peak - start
    finally:
        tracemalloc.stop()
    return out


# --------------------------------------------------------------------------------------
# Raw primitives in C, and perf


def run_syscalls_c(
    quick: bool, tmp: Path, say
) -> tuple[list[tuple[str, float, float, float]], str]:
    """Compile and run syscalls.c; rows of (name, median, min, max) ns, and a note."""
    src = HERE / "syscalls.c"
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None or not src.exists():
        return [], "not measured: no C compiler (set CC) or benchmarks/syscalls.c missing"
    exe = tmp / "syscalls"
    build = subprocess.run(
        [cc, "-O2", "-o", str(exe), str(src)], capture_output=True, text=True
    )
    if build.returncode != 0:
        return [], f"not measured: {cc} failed: {build.stderr.strip()[:300]}"
    n, batches = ("1000", "7") if quick else ("5000", "11")
    say(f"  syscalls.c: {n} calls x {batches} batches per primitive")
    run = subprocess.run([str(exe), n, batches], capture_output=True, text=True, timeout=120)
    if run.returncode != 0:
        return [], f"not measured: syscalls failed: {run.stderr.strip()[:300]}"
    rows = []
    for line in run.stdout.splitlines():
        parts = line.split("\t")
        if len(parts) == 4:
            rows.append((parts[0], float(parts[1]), float(parts[2]), float(parts[3])))
    return rows, f"`{Path(cc).name} -O2 benchmarks/syscalls.c`, {n} calls x {batches} batches"


PERF_CHILD = """
import memtrack
for _ in range({n}):
    with memtrack.phase("x"):
        pass
"""

# (label, symbol, column): column 0 = inclusive ("children"), 1 = self.
PERF_SYMBOLS = [
    ("all syscalls (kernel entry to exit)", "entry_SYSCALL_64_after_hwframe", 0),
    ("pread: 2x /proc/self/statm", "__x64_sys_pread64", 0),
    ("getrusage: 2x (1 on enter before the reset, 1 on exit)", "__do_sys_getrusage", 0),
    ("pwrite: 1x `5` to /proc/self/clear_refs", "__x64_sys_pwrite64", 0),
    ("glibc mallinfo2 (int_mallinfo), 2x", "int_mallinfo", 1),
    ("glibc sscanf of statm, 2x", "__vfscanf_internal", 1),
    ("vDSO clock_gettime, 2x", "__vdso_clock_gettime", 1),
    ("CPython eval loop", "_PyEval_EvalFrameDefault", 1),
    ("memtrack phase_enter + phase_exit (own code)", "phase_enter+phase_exit", 1),
]


def run_perf(quick: bool, tmp: Path, say) -> tuple[list[tuple[str, float]], str]:
    """perf record -g of a loop of outermost phases; (label, % of samples) rows and a note."""
    n = 100_000 if quick else 300_000
    child = tmp / "perf_child.py"
    child.write_text(PERF_CHILD.format(n=n))
    data = tmp / "perf.data"
    say(f"  perf record -g: {n} phases in a child process")
    err = perf_record([sys.executable, str(child)], data)
    if err:
        return [], f"not measured: {err}"
    found, err = perf_symbols(data)
    if err:
        return [], f"not measured: {err}"
    rows = []
    for label, sym, col in PERF_SYMBOLS:
        total = 0.0
        seen = False
        for part in sym.split("+"):
            if part in found:
                seen = True
                total += found[part][col]
        if seen:
            rows.append((label, total))
    if not rows:
        return [], "not measured: perf report had none of the expected symbols"
    return rows, (
        f"`perf record -g -F 4999` of a child process running {n:,} outermost phases "
        "(startup included, ~2% of samples); share of all samples, inclusive of callees "
        "for the kernel rows, own code only for the user-space rows"
    )


def noise_words(b: Bench, base: Bench) -> str:
    diff = b.median / base.median - 1
    spread = (base.high - base.low) / base.median
    if abs(diff) <= spread:
        return (f"its median differs from the plain run's by {diff * 100:+.1f}%, within the "
                f"plain runs' own spread (fastest to slowest: {spread * 100:.0f}%)")
    return (f"its median differs from the plain run's by {diff * 100:+.1f}%, more than the "
            f"plain runs' own spread ({spread * 100:.0f}%)")


def budget_words(measured: float, c_sum: float, in_sum: float) -> str:
    c_left = measured - c_sum
    text = (f"The parts measured in C add up to {fmt_ns(c_sum)}, {fmt_ns(abs(c_left))} "
            f"{'less' if c_left >= 0 else 'more'} than the measured phase")
    if c_left >= 0:
        text += (": the same system calls cost somewhat more inside the Python process "
                 "than in the small C process (bigger working set, colder caches), and the "
                 "phase's own C work (path interning, the record ring) is in the remainder")
    if in_sum >= measured:
        text += (f". The in-process column adds up to {fmt_ns(in_sum)}, above the measured "
                 "phase: it counts one Python call per reading, and its readings vary from "
                 "batch to batch on this machine (see their min and max above)")
    else:
        text += (f". The in-process column adds up to {fmt_ns(in_sum)}; the "
                 f"{fmt_ns(measured - in_sum)} left is the phase's own C work and noise")
    return text + "."


def core_section(
    command: str,
    repeats: int,
    target_ns: float,
    reading: list[Bench],
    phases: list[Bench],
    work: list[Bench],
    work_reports: dict[str, int],
    syscalls: tuple[list, str],
    perf: tuple[list, str],
    elapsed: float,
) -> Section:
    """The core's part of RESULTS.md (headings from ``###`` down)."""
    R = {b.key: b for b in reading + phases + work}
    L: list[str] = []

    # Headline
    rss, ps = R["rss"].median, R["psutil_rss"].median
    ph = R["phase"].median
    rss_ratio = ps / rss
    headline = [
        f"- `memtrack.rss()`: **{fmt_ns(rss)}** median; psutil `memory_info().rss`: "
        f"{fmt_ns(ps)} → memtrack.rss() is **{rss_ratio:.1f}x faster than psutil**; "
        f"{speed_words(rss, R['py_statm'].median)} than a plain-Python read of "
        "/proc/self/statm.",
        f"- phase enter+exit (`with memtrack.phase(\"x\"): pass`): **{fmt_ns(ph)}** median "
        f"(nested: {fmt_ns(R['phase_nested'].median)}; with the opt-in heap reading, "
        f"`configure(phase_heap=True)`: {fmt_ns(R['phase_heap'].median)}); tracemalloc's "
        f"`reset_peak()+get_traced_memory()`: {fmt_ns(R['tracemalloc_pair'].median)}; "
        f"empty `with` of a trivial Python context manager: "
        f"{fmt_ns(R['trivial_cm'].median)}.",
        f"- the workload ({WORKLOAD_DICTS:,} small dicts): plain "
        f"{fmt_ns(R['work_plain'].median)}, inside a memtrack phase "
        f"{fmt_ns(R['work_phase'].median)} "
        f"({(R['work_phase'].median / R['work_plain'].median - 1) * 100:+.1f}%), with "
        f"tracemalloc running {fmt_ns(R['work_tracemalloc'].median)} "
        f"({R['work_tracemalloc'].median / R['work_plain'].median:.1f}x the plain time).",
    ]
    met_rss = rss_ratio >= TARGET_RSS_SPEEDUP
    met_phase = ph < TARGET_PHASE_NS
    targets = [
        [f"`rss()` at least {TARGET_RSS_SPEEDUP:.0f}x faster than psutil `memory_info().rss`",
         f"{rss_ratio:.1f}x", status(met_rss)],
        [f"a phase enter+exit under {TARGET_PHASE_NS / 1000:.0f} µs (median)", fmt_ns(ph),
         status(met_phase)],
    ]
    L += ["### Headline", ""] + headline
    L += ["", "### Targets (issue 2, requirement 10)", ""]
    L += table(targets, ["target", "measured", "status"], "lrl")

    # How
    L += [
        "",
        "### How it was measured",
        "",
        "- Each benchmark is a statement compiled into a loop `for _ in itertools.repeat(None, "
        "n): <statement>` (as `timeit` does: no extra Python function call per iteration), "
        "timed as a whole with `time.perf_counter_ns`. Per-call time = batch time / n.",
        f"- `n` is calibrated per benchmark so that one batch lasts about "
        f"{target_ns / 1e6:.0f} ms; one warm-up batch is discarded; then {repeats} rounds run, "
        "each round one batch of every benchmark of the section, interleaved round-robin so "
        "that drift and noise from other processes hit all of them alike.",
        "- Reported: the **median** per-call time over the batches, with the fastest and "
        "slowest batch. Ratios are of medians.",
        "- The garbage collector is disabled during micro-benchmark batches (as `timeit` does); "
        "it is enabled for the workload. tracemalloc runs only during its own batches "
        "(started and stopped outside the timed loop).",
        "- **Nothing is subtracted.** Every per-call time includes its share of the loop; the "
        f"empty loop costs {fmt_ns(R['loop'].median)} per iteration and is shown on its own "
        "line. The few derived numbers (mallinfo2's own cost, the in-process clear_refs "
        "write) are labelled as differences where they appear.",
        "- Statements are written the way users write them: `memtrack.rss()` looks up the "
        "module attribute each call; psutil's `Process` object is made once, outside the loop; "
        "the plain-Python statm read opens, reads, parses and closes each time; a phase object "
        "is created for every `with`.",
    ]

    # Readings
    L += ["", "### 1. Readings", ""]
    peers = {
        "rss": ("psutil_rss", "psutil"),
        "py_statm": ("psutil_rss", "psutil"),
        "peak_rss": ("getrusage", "`resource.getrusage`"),
        "snapshot": ("psutil_info", "psutil `memory_info()`"),
        "footprint": ("psutil_full", "psutil `memory_full_info()`"),
    }
    L += table(bench_rows(reading, peers),
               ["operation", "median / call", "min", "max", "calls / batch", "vs peer"],
               "lrrrrl")
    L += [
        "",
        f"- `memtrack.rss()` is {speed_words(rss, ps)} than psutil "
        f"(`memory_info().rss`), {speed_words(rss, R['py_statm'].median)} than a plain-Python "
        f"open/read/close of /proc/self/statm, and "
        f"{speed_words(rss, R['getrusage'].median)} than `resource.getrusage()` "
        "(which gives only the peak, not the current RSS).",
        "- `snapshot()` reads /proc/self/status , getrusage and mallinfo2 "
        "and returns 12 fields; psutil's `memory_info()` reads statm only (7 fields). "
        "`footprint()` and psutil's `memory_full_info()` both read /proc/self/smaps_rollup, "
        "whose cost grows with the number of mappings.",
    ]

    # Phases
    L += ["", "### 2. Phases", ""]
    ppeers = {
        "phase": ("tracemalloc_pair", "tracemalloc's pair"),
        "phase_nested": ("tracemalloc_pair", "tracemalloc's pair"),
    }
    L += table(bench_rows(phases, ppeers),
               ["operation", "median / call", "min", "max", "calls / batch", "vs peer"],
               "lrrrrl")
    mall_line = []
    if "ctypes_mallinfo2" in R:
        info = LIBC.mallinfo2()
        own = R["ctypes_mallinfo2"].median - R["ctypes_abs"].median
        R_own_mallinfo = own
        mall_line = [
            f"- mallinfo2's own cost in this process ≈ {fmt_ns(own)} (ctypes call of "
            f"`mallinfo2` minus ctypes call of `abs`: a documented subtraction); glibc walks "
            f"every free chunk, and this heap has {info.ordblks} free chunks in bins and "
            f"{info.smblks} in fastbins.",
        ]
    else:
        R_own_mallinfo = float("nan")
    L += [""] + mall_line + [
        f"- A phase costs {ph / R['tracemalloc_pair'].median:.0f}x tracemalloc's per-block "
        "pair — but tracemalloc must be running, and then it taxes every allocation of the "
        "measured code (section 3); a phase costs nothing between its enter and exit.",
        f"- The interpreter's share of a phase (memtrack disabled: object creation, "
        f"`__init__`, `__enter__`/`__exit__` dispatch) is {fmt_ns(R['phase_disabled'].median)}"
        f"; the rest, {fmt_ns(ph - R['phase_disabled'].median)}, is the C work and its "
        "system calls (next section).",
    ]

    # Where the time goes
    sys_rows, sys_note = syscalls
    perf_rows, perf_note = perf
    S = {name: med for name, med, _, _ in sys_rows}
    L += ["", "#### Where a phase's enter+exit time goes", ""]
    L += [
        "An outermost phase does, in C (csrc/phase.c, peak.c, platform/linux/linux.c as of "
        f"git {git_commit()}):",
        "",
        "- enter: lock; `getrusage` (the high-water mark about to be lost, folded into the "
        "open phases and the lifetime peak); `pwrite(\"5\")` to /proc/self/clear_refs (reset "
        "the kernel high-water mark); `pread` /proc/self/statm, parsed by hand (RSS at "
        "start); unlock; `clock_gettime` (vDSO).",
        "- exit: `clock_gettime`; lock; `getrusage` (the peak); `pread` "
        "/proc/self/statm (RSS at end); record (the pid is cached: no `getpid`); unlock.",
        "- a nested phase makes the same system calls; it also folds the mark into the open "
        "phases (memory only).",
        "",
        "So: 5 system calls that reach /proc or the rusage code and 2 vDSO clock reads per "
        "enter+exit; `configure(phase_heap=True)` adds 2 mallinfo2 walks. "
        "benchmarks/bench_phase.py compares the whole with the bare system calls in C.",
    ]
    if sys_rows:
        def s(name: str) -> float:
            return S.get(name, float("nan"))

        pread = s("pread /proc/self/statm +parse")
        getr = s("getrusage(RUSAGE_SELF)")
        clear = s("pwrite 5 > /proc/self/clear_refs")
        gpid = s("getpid() (a null syscall)")
        clk = s("clock_gettime(MONOTONIC)")
        mtx = s("mutex lock+unlock")
        # In this process: each reading through its Python call (an upper bound: includes
        # one Python-to-C call each); clear_refs derived as reset_peak - rss - getrusage.
        in_rss = R["rss"].median
        # peak_rss() also reads statm now, so getrusage through Python is
        # resource.getrusage(); reset_peak() is getrusage + the clear_refs write + statm.
        in_getr = R["getrusage"].median
        in_clear = R["reset_peak"].median - in_rss - in_getr
        interp = R["phase_disabled"].median
        mall2 = 2 * R_own_mallinfo if R_own_mallinfo == R_own_mallinfo else float("nan")
        budget = [
            ["interpreter + object (memtrack disabled, measured above)", fmt_ns(interp),
             fmt_ns(interp)],
            ["2x pread /proc/self/statm + parse", fmt_ns(2 * pread), fmt_ns(2 * in_rss)],
            ["2x getrusage", fmt_ns(2 * getr), fmt_ns(2 * in_getr)],
            ["1x pwrite `5` to /proc/self/clear_refs", fmt_ns(clear), fmt_ns(in_clear)],
            ["(2x mallinfo2: only with `phase_heap=True`, not summed)", "(heap-dependent)",
             fmt_ns(mall2)],
            ["2x clock_gettime + 2x mutex", fmt_ns(2 * clk + 2 * mtx), fmt_ns(2 * clk + 2 * mtx)],
        ]
        c_sum = interp + 2 * pread + 2 * getr + clear + 2 * clk + 2 * mtx
        in_sum = interp + 2 * in_rss + 2 * in_getr + in_clear + 2 * clk + 2 * mtx
        budget.append(["**sum of the parts**",
                       f"**{fmt_ns(c_sum)}**", f"**{fmt_ns(in_sum)}**"])
        budget.append(["measured phase enter+exit (median)", f"**{fmt_ns(ph)}**",
                       f"**{fmt_ns(ph)}**"])
        L += ["", "Budget of one outermost phase, from parts measured separately:", ""]
        L += table(budget, ["part", "primitive in C (separate process)",
                            "in this process (through Python)"], "lrr")
        floor = 2 * pread + 2 * getr + clear
        minimal = clear + getr + interp
        L += [
            "",
            "The in-process column times each reading through its Python call "
            "(`memtrack.rss()`, `resource.getrusage()`: an upper bound, one "
            "Python-to-C call each); the clear_refs write there is derived as "
            "`reset_peak() − rss() − resource.getrusage()` (`reset_peak()` reads the mark, "
            "writes clear_refs and reads statm; a documented subtraction). "
            + budget_words(ph, c_sum, in_sum),
            "",
            f"The five /proc and rusage system calls alone cost {fmt_ns(floor)} in C on this "
            f"machine — {'more' if floor >= TARGET_PHASE_NS else 'less'} than the "
            f"{TARGET_PHASE_NS / 1000:.0f} µs target by themselves. One `pread` of "
            f"/proc/self/statm costs {fmt_ns(pread)} here (DESIGN.md assumed ~0.35 µs), and "
            f"even a null system call (`getpid`) costs {fmt_ns(gpid)}: system calls are "
            "expensive on this virtual machine, and a phase's cost is dominated by them. "
            "The fewest calls an exact kernel peak needs are one reset on enter (pwrite) "
            f"and one mark read on exit (getrusage): {fmt_ns(clear)} + {fmt_ns(getr)}, plus "
            f"the interpreter's {fmt_ns(interp)} = {fmt_ns(minimal)}; every further /proc "
            f"read adds about {fmt_ns(pread)} and each mallinfo2 "
            f"{fmt_ns(R_own_mallinfo)} here (more in a fragmented heap, see below).",
        ]
    if perf_rows:
        L += ["", f"Sampled with perf ({perf_note}):", ""]
        L += table([[label, f"{pct:.1f}%", fmt_ns(ph * pct / 100)] for label, pct in perf_rows],
                   ["where", "share of samples", "≈ per phase (share x median)"], "lrr")
    elif perf_note:
        L += ["", f"perf: {perf_note}."]

    if sys_rows:
        L += ["", "#### The raw primitives, in C", "",
              f"Measured by {sys_note} (a separate small process; nothing subtracted):", ""]
        L += table([[name, fmt_ns(med), fmt_ns(lo), fmt_ns(hi)] for name, med, lo, hi in
                    sys_rows], ["primitive", "median / call", "min", "max"], "lrrr")
        L += [
            "",
            "The mallinfo2 rows show that its cost grows with the number of free chunks in "
            "glibc's bins: cheap in a fresh heap, several µs in a fragmented one. The SEQUENCE "
            "row is the system calls of one phase replayed in C (in the small, unfragmented "
            "heap): the floor a C implementation with these system calls can reach here.",
        ]
    elif sys_note:
        L += ["", f"Raw primitives in C: {sys_note}."]

    # Workload
    base = R["work_plain"].median
    wrows = []
    for b in work:
        wrows.append([b.label, fmt_ns(b.median), fmt_ns(b.low), fmt_ns(b.high),
                      f"{len(b.per_call_ns)}", f"{(b.median / base - 1) * 100:+.1f}%",
                      f"{(b.low / R['work_plain'].low - 1) * 100:+.1f}%"])
    L += ["", "### 3. The hidden cost: what each tool costs the code it measures", "",
          f"Workload: `[{{\"a\": i, \"b\": i}} for i in range({WORKLOAD_DICTS:,})]`, "
          "dropped at the end; one run per batch; GC enabled.", ""]
    L += table(wrows, ["workload", "median / run", "min", "max", "runs", "vs plain (medians)",
                       "vs plain (fastest runs)"], "lrrrrrr")
    L += [
        "",
        f"- What they report for one run: memtrack peak_delta "
        f"{memtrack.format_size(work_reports['memtrack_peak_delta'])} (RSS: everything the "
        f"process touched), tracemalloc peak − start "
        f"{memtrack.format_size(work_reports['tracemalloc_peak_delta'])} (Python allocations "
        "only).",
        f"- A memtrack phase costs the measured code its enter+exit ({fmt_ns(ph)}) once, "
        "and nothing per allocation: " + noise_words(R["work_phase"], R["work_plain"]) + ". "
        f"tracemalloc makes the same code {R['work_tracemalloc'].median / base:.1f}x "
        f"slower while it runs ({R['work_tracemalloc'].low / R['work_plain'].low:.1f}x "
        "comparing the fastest runs), because it hooks every allocation and records its "
        "traceback.",
    ]

    L.append("")
    return Section("core", "Core: readings and phases (issue 2)", command, elapsed, L,
                   headline, targets)


# --------------------------------------------------------------------------------------


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--no-syscalls", action="store_true",
                    help="skip compiling and running syscalls.c")
    ap.add_argument("--no-perf", action="store_true", help="skip the perf record breakdowns")


def run(args, command: str) -> Section:
    """Run every core benchmark; the RESULTS.md section (run.py calls this too)."""
    t0 = time.perf_counter()
    repeats = 7 if args.quick else 15
    target_ns = 8e6 if args.quick else 40e6
    work_repeats = 7 if args.quick else 15

    reading, phases, work = reading_benches(), phase_benches(), workload_benches()
    say(f"readings: {len(reading)} benchmarks")
    run_section(reading, repeats, target_ns, say)
    say(f"phases: {len(phases)} benchmarks")
    run_section(phases, repeats, target_ns, say)
    say(f"workload: {len(work)} variants")
    run_section(work, work_repeats, target_ns, say)
    reports = workload_reports()

    with tempfile.TemporaryDirectory(prefix="memtrack-bench-") as tmpdir:
        tmp = Path(tmpdir)
        syscalls: tuple[list, str] = ([], "")
        perf: tuple[list, str] = ([], "")
        if not args.no_syscalls:
            say("raw primitives in C")
            syscalls = run_syscalls_c(args.quick, tmp, say)
        if not args.no_perf and not args.quick:
            say("perf breakdown")
            try:
                perf = run_perf(args.quick, tmp, say)
            except (OSError, subprocess.SubprocessError) as e:
                perf = ([], f"not measured: {e}")

    elapsed = time.perf_counter() - t0
    return core_section(command, repeats, target_ns, reading, phases, work, reports,
                        syscalls, perf, elapsed)


def main(argv: list[str] | None = None) -> int:
    return standalone_main(sys.modules[__name__], "fewer, shorter batches (~10 s)", argv)


if __name__ == "__main__":
    sys.exit(main())
