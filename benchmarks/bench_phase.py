#!/usr/bin/env python3
"""Phases at the syscall floor (issue 12): every figure a ratio to its floor in the same run.

    python benchmarks/bench_phase.py                     # ~3 minutes
    python benchmarks/bench_phase.py --quick             # ~1 minute
    python benchmarks/bench_phase.py --before /tmp/old   # also an older build, side by side

``--before DIR`` names a source tree with its extension built in place (``python setup.py
build_ext --inplace``): its phases are measured by the same children, in the same rounds,
so that "before" and "after" share the machine's state.

What is measured, each in a fresh child process (so no heap or floor leaks between them):

1. **The floor.** A phase enter+exit, ``with memtrack.phase("x"): pass`` (a new object
   each time, as users write it), against the bare 5-system-call sequence it makes (getrusage,
   clear_refs, statm, getrusage, statm) replayed in C by ``syscalls.c --seq bare5``: the
   child alternates one Python batch and one C batch, round after round, so both see the
   same load. Likewise ``p.next(name)`` against its 3 calls (``--seq bare3``), and a phase
   pair with ``configure(phase_heap=True)`` (mallinfo2, opt-in).
2. **The heap.** The same phase pair in a clean heap, then after building 200 000 malloc'd
   blocks of 600-2600 bytes and freeing every other one (glibc keeps ~100 000 free
   fragments in its bins): the ratio fragmented / clean, per build.
3. **Spawn workers of a large parent.** A parent holding 256 MiB starts workers with
   ``spawn`` and with ``fork`` (alternately, several rounds); each worker times phase pairs.
   A spawned worker inherits the parent's peak as the kernel's ``ru_maxrss`` floor, so
   its marks come from /proc/self/status; the ratio spawn / fork.
4. **Instructions** (``--callgrind``, when valgrind is installed): user-space instructions
   per phase pair from callgrind, the difference of two loop lengths divided by the extra
   phases: noise-free, but blind to the kernel's share (the system calls themselves).

Nothing here asserts anything about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import (  # noqa: E402
    HERE,
    Section,
    fmt_ns,
    say,
    standalone_main,
    status,
    table,
)

ROOT = HERE.parent
TARGET_FLOOR = 1.25   # a phase pair within 1.25x of the bare 5-syscall sequence in C
TARGET_HEAP = 1.3     # a phase pair in a 200k-fragment heap within 1.3x of a clean heap
TARGET_SPAWN = 1.5    # a spawn worker of a large parent within 1.5x of a fork worker

CHILD = r'''
import gc, json, os, subprocess, sys, time
import memtrack

SYSCALLS, MODE, N, ROUNDS = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ph = memtrack.phase

def pairs(n):
    gc.disable()
    t = time.thread_time_ns()
    for _ in range(n):
        with ph("x"):
            pass
    t = time.thread_time_ns() - t
    gc.enable()
    return t / n

def nexts(n):
    gc.disable()
    with ph("a") as p:
        t = time.thread_time_ns()
        for _ in range(n // 2):
            p.next("b")
            p.next("a")
        t = time.thread_time_ns() - t
    gc.enable()
    return t / (n // 2 * 2)

def heap_pairs(n):
    old = memtrack.configure()["phase_heap"]
    memtrack.configure(phase_heap=True)
    try:
        return pairs(n)
    finally:
        memtrack.configure(phase_heap=old)

def c_floor(seq, n):
    out = subprocess.run([SYSCALLS, "--seq", seq, str(n), "1"], capture_output=True,
                         text=True, check=True).stdout
    return float(out.split("\t")[1])

def fragment():
    blocks = [bytes(600 + (i * 37) % 2000) for i in range(200_000)]
    del blocks[::2]
    return blocks

out = {}
if MODE == "floor":
    out = {"pair": [], "bare5": [], "next": [], "bare3": [], "heap_pair": []}
    for r in range(ROUNDS):
        out["pair"].append(pairs(N))
        out["bare5"].append(c_floor("bare5", N))
        if hasattr(ph, "next"):
            out["next"].append(nexts(N))
        out["bare3"].append(c_floor("bare3", N))
        out["heap_pair"].append(heap_pairs(N) if "phase_heap" in memtrack.configure()
                                else float("nan"))
elif MODE == "heap":
    clean = [pairs(N) for _ in range(ROUNDS)]
    keep = fragment()
    n = N if not memtrack.configure().get("phase_heap") else max(3, N // 500)
    out = {"clean": clean, "frag": [pairs(n) for _ in range(ROUNDS)], "frag_n": n,
           "default_heap": bool(memtrack.configure().get("phase_heap"))}
print(json.dumps(out))
'''

WORKERS = r'''
import json, multiprocessing as mp, os, sys, time

def worker(q, n, rounds):
    import gc, memtrack
    ph = memtrack.phase
    res = []
    for _ in range(rounds):
        gc.disable()
        t = time.thread_time_ns()
        for _ in range(n):
            with ph("x"):
                pass
        res.append((time.thread_time_ns() - t) / n)
        gc.enable()
    q.put(res)

if __name__ == "__main__":
    n, rounds, runs = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    big = bytearray(256 << 20)
    for i in range(0, len(big), 4096):
        big[i] = 1
    out = {"spawn": [], "fork": []}
    for run in range(runs):
        for method in (("spawn", "fork") if run % 2 == 0 else ("fork", "spawn")):
            ctx = mp.get_context(method)
            q = ctx.Queue()
            p = ctx.Process(target=worker, args=(q, n, rounds))
            p.start()
            out[method] += q.get()
            p.join()
    print(json.dumps(out))
'''

LOOP = r'''
import sys, memtrack
ph = memtrack.phase
for _ in range(int(sys.argv[1])):
    with ph("x"):
        pass
'''


# sh forks the command (a command follows it, so no exec optimisation): see run_child.
LAUNCH = ["/bin/sh", "-c", '"$@"; exit $?', "sh"]


def build_syscalls(tmp: Path) -> Path | None:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        return None
    exe = tmp / "syscalls"
    r = subprocess.run([cc, "-O2", "-o", str(exe), str(HERE / "syscalls.c")],
                       capture_output=True, text=True)
    return exe if r.returncode == 0 else None


def child_env(tree: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMTRACK_")}
    env["PYTHONPATH"] = str(tree)
    return env


def run_child(code: str, tree: Path, args: list[str], cwd: Path) -> dict:
    """Run `code` in a fresh Python that /bin/sh forks and execs: a process exec'd straight
    from this one (or by an `exec` in sh) would inherit this one's peak as its ru_maxrss
    floor (see section 3), which would put every child's phases on the slow path that only
    spawn workers should take; a fork starts the floor afresh."""
    script = cwd / "child.py"
    script.write_text(code)
    r = subprocess.run([*LAUNCH, sys.executable, str(script), *args],
                       capture_output=True, text=True, env=child_env(tree), cwd=cwd,
                       timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"benchmark child failed: {r.stderr.strip()[-800:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def callgrind_per_pair(tree: Path, tmp: Path, short: int, long: int) -> float | None:
    """User-space instructions per phase pair: (Ir(long) - Ir(short)) / (long - short)."""
    if shutil.which("valgrind") is None:
        return None
    script = tmp / "loop.py"
    script.write_text(LOOP)
    totals = []
    for n in (short, long):
        out = tmp / f"cg.{tree.name}.{n}"
        r = subprocess.run([*LAUNCH, "valgrind", "--tool=callgrind",
                            f"--callgrind-out-file={out}", sys.executable, str(script), str(n)],
                           capture_output=True, text=True, env=child_env(tree), timeout=900)
        if r.returncode != 0 or not out.exists():
            return None
        total = None
        for line in out.read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                total = int(line.split()[1])
        if total is None:
            return None
        totals.append(total)
    return (totals[1] - totals[0]) / (long - short)


def med(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if a == a and b == b and b > 0 else "n/a"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--before", type=Path, default=None, metavar="DIR",
                    help="also measure the build in DIR (a tree built in place) as 'before'")
    ap.add_argument("--callgrind", action="store_true",
                    help="also count user-space instructions per phase pair with callgrind")


def run(args, command: str) -> Section:
    t0 = time.perf_counter()
    quick = args.quick
    n, rounds = (2000, 7) if quick else (5000, 15)
    trees = [("after", ROOT)]
    if getattr(args, "before", None):
        trees.insert(0, ("before", args.before.resolve()))
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="memtrack-bench-phase-") as tmpdir:
        tmp = Path(tmpdir)
        exe = build_syscalls(tmp)
        if exe is None:
            raise SystemExit("bench_phase.py needs a C compiler (cc or $CC) for its floor")
        for label, tree in trees:
            say(f"{label}: floor ({rounds} rounds of {n} phases, C batches between)")
            floor = run_child(CHILD, tree, [str(exe), "floor", str(n), str(rounds)], tmp)
            say(f"{label}: clean vs fragmented heap")
            heap = run_child(CHILD, tree, [str(exe), "heap", str(n), str(rounds)], tmp)
            say(f"{label}: spawn vs fork workers of a 256 MiB parent")
            workers = run_child(WORKERS, tree, [str(n // 2), "3", "3" if quick else "5"], tmp)
            cg = None
            if getattr(args, "callgrind", False):
                say(f"{label}: callgrind")
                cg = callgrind_per_pair(tree, tmp, 1000, 6000 if quick else 11000)
            results[label] = {"floor": floor, "heap": heap, "workers": workers, "callgrind": cg}
    elapsed = time.perf_counter() - t0
    return section(command, results, n, rounds, elapsed)


def section(command: str, results: dict, n: int, rounds: int, elapsed: float) -> Section:
    L: list[str] = []
    labels = list(results)
    rows, targets, headline = [], [], []
    for label in labels:
        R = results[label]
        f, h, w = R["floor"], R["heap"], R["workers"]
        pair, bare5 = med(f["pair"]), med(f["bare5"])
        nxt, bare3 = med(f["next"]), med(f["bare3"])
        per_round = [p / b for p, b in zip(f["pair"], f["bare5"], strict=True)]
        rows.append([label, "phase enter+exit", fmt_ns(pair), "bare 5 syscalls in C",
                     fmt_ns(bare5), ratio(pair, bare5),
                     f"{min(per_round):.2f}-{max(per_round):.2f}x"])
        if f["next"]:
            per_round_n = [p / b for p, b in zip(f["next"], f["bare3"], strict=True)]
            rows.append([label, "`p.next(name)`", fmt_ns(nxt), "bare 3 syscalls in C",
                         fmt_ns(bare3), ratio(nxt, bare3),
                         f"{min(per_round_n):.2f}-{max(per_round_n):.2f}x"])
        heap_pair = med(f["heap_pair"])
        if heap_pair == heap_pair:
            rows.append([label, "phase enter+exit, `phase_heap=True`", fmt_ns(heap_pair),
                         "the same phase without", fmt_ns(pair), ratio(heap_pair, pair), ""])
        clean, frag = med(h["clean"]), med(h["frag"])
        rows.append([label, "phase pair, 200k-fragment heap"
                     + (" (mallinfo2 on by default)" if h["default_heap"] else ""),
                     fmt_ns(frag), "the same, clean heap", fmt_ns(clean), ratio(frag, clean),
                     f"{h['frag_n']} phases/batch"])
        spawn, fork = med(w["spawn"]), med(w["fork"])
        rows.append([label, "phase pair in a spawn worker of a 256 MiB parent", fmt_ns(spawn),
                     "the same in a fork worker", fmt_ns(fork), ratio(spawn, fork), ""])
        if label == "after":
            targets = [
                [f"phase pair within {TARGET_FLOOR}x of the bare 5-syscall sequence in C",
                 ratio(pair, bare5), status(pair / bare5 <= TARGET_FLOOR)],
                [f"phase pair in a 200k-fragment heap within {TARGET_HEAP}x of a clean heap",
                 ratio(frag, clean), status(frag / clean <= TARGET_HEAP)],
                [f"spawn worker of a large parent within {TARGET_SPAWN}x of a fork worker",
                 ratio(spawn, fork), status(spawn / fork <= TARGET_SPAWN)],
            ]
            if f["next"]:
                targets.append(["`p.next()` at its 3-syscall floor (no target given; for "
                                "reference)", ratio(nxt, bare3), ""])
            headline = [f"- {t[0]}: {t[1]} ({t[2]})" for t in targets]
    L += ["### Headline", ""] + headline
    L += ["", "### Targets (issue 12)", ""]
    L += table(targets, ["target", "measured (after)", "status"], "lrl")
    L += ["", "### Ratios to the floor, same run", ""]
    L += table(rows, ["build", "measured", "median", "floor / peer", "median", "ratio",
                      "per-round range / note"], "llrlrrl")
    cg_rows = [[label, f"{results[label]['callgrind']:,.0f}"] for label in labels
               if results[label]["callgrind"] is not None]
    if cg_rows:
        L += ["", "User-space instructions per phase pair (callgrind; the kernel's share, "
              "i.e. the system calls themselves, is not counted):", ""]
        L += table(cg_rows, ["build", "instructions / pair"], "lr")
    L += [
        "",
        "### How it was measured",
        "",
        f"- Floor: a child process alternates, {rounds} rounds, one batch of {n:,} phase "
        "pairs (`with memtrack.phase(\"x\"): pass`, a new object each time, gc off) and one "
        f"batch of {n:,} replays of the same system calls in C (`syscalls.c --seq bare5`: "
        "getrusage, clear_refs, pread statm, getrusage, pread statm; no parse, no lock, no "
        "clock). Medians of the batches; the ratio of medians, and the range of the "
        "per-round ratios. `p.next()` the same way against `--seq bare3`.",
        "- Heap: one child times phase pairs in its fresh heap, then builds 200 000 "
        "`bytes` of 600-2600 bytes (malloc'd, above pymalloc's 512-byte limit) and frees "
        "every other one, and times them again. A build that reads mallinfo2 by default "
        "runs far fewer phases per batch there (each costs milliseconds).",
        "- Workers: a parent touches 256 MiB and starts one `spawn` and one `fork` "
        "`multiprocessing.Process` per run, alternating which goes first; each worker times "
        "3 batches of phase pairs.",
        "- Every child gets `PYTHONPATH` set to its build, and no `MEMTRACK_*` variable, and is "
        "forked and exec'd by `/bin/sh`, so that it does not inherit this script's peak as its "
        "`ru_maxrss` floor (only the spawn workers of section 3 should).",
        "- Every batch is timed in CPU time (user + system: `time.thread_time_ns()` in "
        "Python, `CLOCK_PROCESS_CPUTIME_ID` in C), not wall time: on a shared machine the "
        "wall time of a batch counts other processes' time slices. The system calls' own "
        "kernel time is in both.",
        "- The machine is shared: absolute times move with the load (see the top of this "
        "file), the ratios of batches run side by side much less.",
        "",
    ]
    return Section("phase", "Phases at the floor (issue 12)", command, elapsed, L, headline,
                   targets)


def main(argv: list[str] | None = None) -> int:
    return standalone_main(sys.modules[__name__], "fewer, shorter batches (~1 min)", argv)


if __name__ == "__main__":
    sys.exit(main())
