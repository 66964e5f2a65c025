#!/usr/bin/env python3
"""Allocation tracking (issue 14): its cost against tracemalloc and memray, and its accuracy.

    python benchmarks/bench_alloc.py            # full run, ~5 minutes
    python benchmarks/bench_alloc.py --quick    # ~1.5 minutes: fewer rounds, no callgrind

Two workloads, each run in a fresh interpreter per measurement, four ways: plain,
``memtrack.allocations()`` at the default interval (512 KiB), ``tracemalloc`` (started
with its default of 1 frame) and ``memray.Tracker`` (Python allocators, to a file in a
temporary directory):

- demo: the worker function of ``memtrack demo`` (``analyze_batch``: read, ``ast.parse``
  and walk standard-library files, three phases per file), called in-process.
- micro: an allocation-heavy loop that builds and drops small dicts, lists and strings
  (the worst case for any allocator hook: almost nothing but allocations).

Wall time: every mode runs in its own process, in rounds whose order rotates; each
process times the workload after one warm-up run, and the median over the rounds is
compared with the plain median of the same run, as a ratio (1.03x = 3% slower). On a
shared machine a 3% difference can drown in noise, so the same comparison is made with
instruction counts under valgrind's callgrind (deterministic): the instructions of a
process that runs the workload once, minus those of one that only sets up, per mode.

Accuracy: a workload that keeps memory at known lines (small objects, medium and large
buffers), ~10 sites of which several hold >= 5% of the bytes; memtrack's ``retained`` by
innermost line against ``tracemalloc``'s snapshot by line (``'lineno'``), top 10 of each,
at the default interval and at 64 KiB.

It writes the "alloc" section of benchmarks/RESULTS.md and asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import Section, say, standalone_main, status  # noqa: E402
from _timing import table as md_table  # noqa: E402

MODES = ["plain", "memtrack", "tracemalloc", "memray"]

# The code each measuring process runs: SETUP, then (unless told to stop there) one
# warm-up and one timed run of WORK, printing the seconds as JSON.
PRELUDE = textwrap.dedent("""
    import json, os, sys, time, tempfile
    mode, workload, phase_only = sys.argv[1], sys.argv[2], sys.argv[3] == "setup"
    import memtrack
    from memtrack.cli.demo import analyze_batch
    from memtrack.cli.demo import _find_sources
    import sysconfig
    files = _find_sources(sysconfig.get_paths()["stdlib"])[:NFILES]

    def demo():
        analyze_batch(files)

    def micro():
        for r in range(ROUNDS):
            rows = []
            for i in range(20000):
                rows.append({"id": i, "name": "row-" + str(i), "tags": [i, i + 1, i + 2]})
            del rows

    work = demo if workload == "demo" else micro
    tmp = tempfile.mkdtemp()
    if mode == "memtrack":
        memtrack.allocations.start()
    elif mode == "tracemalloc":
        import tracemalloc
        tracemalloc.start()
    elif mode == "memray":
        import memray
        tracker = memray.Tracker(os.path.join(tmp, "m.bin"))
        tracker.__enter__()
    if not phase_only:
        work()
        t = time.perf_counter()
        work()
        print(json.dumps(time.perf_counter() - t))
    if mode == "memray":
        tracker.__exit__(None, None, None)
""")


def _code(nfiles: int, rounds: int) -> str:
    return PRELUDE.replace("NFILES", str(nfiles)).replace("ROUNDS", str(rounds))


def _env() -> dict[str, str]:
    # A fixed hash seed: the same dict layouts in every process, so that instruction
    # counts repeat to well under 0.1%.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMTRACK_")}
    env["PYTHONHASHSEED"] = "0"
    return env


def wall_times(workload: str, rounds: int, code: str) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(rounds):
        order = MODES[r % len(MODES):] + MODES[:r % len(MODES)]
        for mode in order:
            out = subprocess.run([sys.executable, "-c", code, mode, workload, "run"],
                                 capture_output=True, text=True, env=_env(), check=True)
            times[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return times


def _instructions(mode: str, workload: str, stop: str, code: str, tmp: str) -> int:
    out = os.path.join(tmp, f"cg.{mode}.{workload}.{stop}")
    subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                    sys.executable, "-c", code, mode, workload, stop],
                   capture_output=True, text=True, env=_env(), check=True)
    with open(out) as f:
        for line in f:
            m = re.match(r"(?:summary|totals):\s+(\d+)", line)
            if m:
                return int(m.group(1))
    raise RuntimeError(f"no instruction total in {out}")


def instruction_counts(workload: str, code: str) -> dict[str, int]:
    """Instructions of the workload (one warm-up and one timed run) per mode."""
    counts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            say(f"callgrind: {workload}, {mode}")
            counts[mode] = (_instructions(mode, workload, "run", code, tmp)
                            - _instructions(mode, workload, "setup", code, tmp))
    return counts


# -- accuracy ------------------------------------------------------------------------------

ACCURACY = textwrap.dedent("""
    import json, sys, tracemalloc
    mode, interval = sys.argv[1], sys.argv[2]
    import memtrack
    kept = []
    def small_tuples(n):                # many 64-byte objects
        for i in range(n):
            kept.append((i, i + 1, i + 2))
    def strings(n):                     # ~100-byte str objects
        for i in range(n):
            kept.append("x" * 60 + str(i))
    def dicts(n):                       # dicts of a few keys
        for i in range(n):
            kept.append({"a": i, "b": i})
    def medium(n):                      # 4 KiB buffers
        for i in range(n):
            kept.append(bytearray(4096))
    def large(n):                       # 1 MiB buffers
        for i in range(n):
            kept.append(bytearray(1 << 20))
    def lists(n):                       # lists of 30 ints
        for i in range(n):
            kept.append(list(range(30)))
    def workload():
        small_tuples(1_500_000)
        strings(800_000)
        dicts(400_000)
        medium(30_000)
        large(80)
        lists(150_000)
        for i in range(20_000):
            kept.append(bytes(200))     # 200-byte bytes, inline
        kept.append(bytearray(12_000_000))  # one 12 MB block
    if mode == "tracemalloc":
        tracemalloc.start()
        workload()
        snap = tracemalloc.take_snapshot()
        stats = snap.statistics("lineno")
        out = [[s.traceback[0].filename, s.traceback[0].lineno, s.size] for s in stats]
    else:
        memtrack.allocations.start(interval=int(interval), seed=2024)
        workload()
        by = {}
        for s in memtrack.allocations.sites():
            if s.frames:
                key = (s.frames[0].filename, s.frames[0].line)
                by[key] = by.get(key, 0) + s.retained
        out = [[f, l, b] for (f, l), b in by.items()]
    print(json.dumps(out))
""")


def accuracy(interval: int) -> tuple[list[list[str]], dict[str, float | int | bool]]:
    def run(mode: str) -> dict[tuple[str, int], int]:
        out = subprocess.run([sys.executable, "-c", ACCURACY, mode, str(interval)],
                             capture_output=True, text=True, env=_env(), check=True)
        return {(f, line): b for f, line, b in json.loads(out.stdout.strip().splitlines()[-1])
                if f == "<string>"}

    truth = run("tracemalloc")
    ours = run("memtrack")
    total = sum(truth.values())
    top_truth = sorted(truth, key=lambda k: -truth[k])[:10]
    top_ours = sorted(ours, key=lambda k: -ours[k])[:10]
    rows, worst = [], 0.0
    for key in top_truth:
        share = truth[key] / total
        est = ours.get(key, 0)
        err = est / truth[key] - 1
        big = share >= 0.05
        if big:
            worst = max(worst, abs(err))
        rows.append([f"line {key[1]}", f"{truth[key] / 1e6:.1f} MB", f"{share * 100:.1f}%",
                     f"{est / 1e6:.1f} MB", f"{err * 100:+.1f}%" + (" (>= 5%)" if big else "")])
    same = len(set(top_truth) & set(top_ours))
    return rows, {"same": same, "worst": worst, "total": total}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--alloc-rounds", type=int, default=None,
                    help="wall-time rounds per mode (default 9, --quick 3)")
    ap.add_argument("--no-callgrind", action="store_true", help="skip the instruction counts")


def _ratio(x: float, base: float) -> str:
    return f"{x / base:.3f}x"


def run(args: argparse.Namespace, command: str) -> Section:
    t0 = time.perf_counter()
    rounds = args.alloc_rounds or (3 if args.quick else 7)
    use_callgrind = not (args.no_callgrind or args.quick) and shutil.which("valgrind")
    body = ["### Overhead", ""]
    headline, targets = [], []
    wall_rows, cg_rows = [], []
    sizes = {"demo": (60, 1), "micro": (0, 15)}
    cg_sizes = {"demo": (6, 1), "micro": (0, 1)}
    wall: dict[str, dict[str, float]] = {}
    cg: dict[str, dict[str, int]] = {}
    for workload, (nfiles, reps) in sizes.items():
        say(f"wall time: {workload}, {rounds} rounds of {len(MODES)} modes")
        times = wall_times(workload, rounds, _code(nfiles, reps))
        med = {m: statistics.median(v) for m, v in times.items()}
        spread = (max(times["plain"]) - min(times["plain"])) / med["plain"]
        wall[workload] = med
        wall_rows.append([workload, f"{med['plain'] * 1000:.0f} ms"]
                         + [_ratio(med[m], med["plain"]) for m in MODES[1:]]
                         + [f"{spread * 100:.0f}%"])
        if use_callgrind:
            counts = instruction_counts(workload, _code(*cg_sizes[workload]))
            cg[workload] = counts
            cg_rows.append([workload, f"{counts['plain'] / 1e6:.0f} M"]
                           + [_ratio(counts[m], counts["plain"]) for m in MODES[1:]])
    body += [
        f"Wall time, median of {rounds} rounds (each mode in its own process per round, the "
        "order rotating), as a ratio to plain; the last column is how much the plain runs "
        "alone varied (max - min over median), the noise floor of the wall-time ratios:",
        "",
        *md_table(wall_rows, ["workload", "plain", "memtrack (512 KiB)", "tracemalloc",
                              "memray", "plain spread"], "lrrrrr"),
        "",
    ]
    if cg_rows:
        body += [
            "Instructions (valgrind callgrind; the workload's own, setup subtracted; "
            "deterministic, so a 3% difference shows even on a busy machine; smaller inputs "
            "than the wall-time runs):",
            "",
            *md_table(cg_rows, ["workload", "plain", "memtrack (512 KiB)", "tracemalloc",
                                "memray"], "lrrrr"),
            "",
        ]
    ref = cg if cg else {w: {m: v for m, v in d.items()} for w, d in wall.items()}
    basis = "instructions" if cg else "wall time"
    demo_ratio = ref["demo"]["memtrack"] / ref["demo"]["plain"]
    micro_ratio = ref["micro"]["memtrack"] / ref["micro"]["plain"]
    targets.append(["<= 3% slowdown at the default rate (demo workload)",
                    f"{demo_ratio:.3f}x ({basis})", status(demo_ratio <= 1.03)])
    targets.append(["(micro workload, allocation-heavy)", f"{micro_ratio:.3f}x ({basis})",
                    status(micro_ratio <= 1.03)])
    headline.append(f"demo: memtrack {demo_ratio:.3f}x, tracemalloc "
                    f"{ref['demo']['tracemalloc'] / ref['demo']['plain']:.2f}x, memray "
                    f"{ref['demo']['memray'] / ref['demo']['plain']:.2f}x ({basis})")
    headline.append(f"micro: memtrack {micro_ratio:.3f}x, tracemalloc "
                    f"{ref['micro']['tracemalloc'] / ref['micro']['plain']:.2f}x, memray "
                    f"{ref['micro']['memray'] / ref['micro']['plain']:.2f}x ({basis})")

    body += ["### Accuracy against tracemalloc", ""]
    for interval, label in ((512 * 1024, "512 KiB (default)"), (64 * 1024, "64 KiB")):
        say(f"accuracy at {label}")
        rows, facts = accuracy(interval)
        ok = facts["same"] >= 9 and facts["worst"] <= 0.15
        body += [
            f"Interval {label}: {facts['total'] / 1e6:.0f} MB live at the end; memtrack's "
            f"retained bytes by line vs tracemalloc's snapshot (the truth). Top 10 in "
            f"common: {facts['same']}/10; worst error of a site with >= 5% of the bytes: "
            f"{facts['worst'] * 100:.1f}%.",
            "",
            *md_table(rows, ["site", "tracemalloc", "share", "memtrack", "error"], "lrrrr"),
            "",
        ]
        targets.append([f"top-10 sites agree, >= 5% sites within 15% ({label})",
                        f"{facts['same']}/10 common, worst {facts['worst'] * 100:.1f}%",
                        status(ok)])
        headline.append(f"accuracy {label}: {facts['same']}/10 common, worst "
                        f"{facts['worst'] * 100:.1f}%")
    body += ["### Targets", "", *md_table(targets, ["target", "measured", "status"], "lll"), ""]
    return Section(key="alloc", title="Allocation tracking (issue 14)", command=command,
                   elapsed=time.perf_counter() - t0, body=body, headline=headline,
                   targets=targets)


if __name__ == "__main__":
    sys.exit(standalone_main(sys.modules[__name__], "fewer rounds, no callgrind (~1.5 min)"))
