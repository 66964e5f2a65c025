#!/usr/bin/env python3
"""Run every memtrack benchmark and write benchmarks/RESULTS.md in one go.

    python benchmarks/run.py            # core + worker table, ~2 minutes
    python benchmarks/run.py --quick    # ~30 s: fewer, shorter batches, no perf
    python benchmarks/run.py --only table --output /tmp/RESULTS.md

RESULTS.md gets the machine once, then one section per script: the core (bench_core.py,
issue 2), the worker table (bench_table.py, issue 3), its reader against the one before
issue 10 and psutil (bench_table_read.py), recording (bench_record.py, issue 6), the
pool figures of memtrack run against a psutil sampler (bench_accounting.py, issue 11) and
phases at the system-call floor (bench_phase.py, issue 12).
They use the measuring method in benchmarks/_timing.py. Nothing here asserts anything.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_accounting  # noqa: E402
import bench_alloc  # noqa: E402
import bench_core  # noqa: E402
import bench_executor  # noqa: E402
import bench_phase  # noqa: E402
import bench_record  # noqa: E402
import bench_serve  # noqa: E402
import bench_table  # noqa: E402
import bench_table_read  # noqa: E402
from _timing import HERE, print_section, say, warn_if_busy, write_results  # noqa: E402

SCRIPTS = {"core": bench_core, "table": bench_table, "table_read": bench_table_read,
           "record": bench_record, "serve": bench_serve, "accounting": bench_accounting,
           "alloc": bench_alloc, "phase": bench_phase, "executor": bench_executor}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer, shorter batches, no perf")
    ap.add_argument("--output", type=Path, default=HERE / "RESULTS.md",
                    help="the report to write (default: benchmarks/RESULTS.md)")
    ap.add_argument("--only", choices=sorted(SCRIPTS), action="append",
                    help="run only this part (repeatable); the file's other sections are kept")
    bench_core.add_arguments(ap)   # --no-syscalls, --no-perf (both parts)
    bench_table.add_arguments(ap)  # --pairs, --stride, --max-workers, --no-perf-table
    bench_table_read.add_arguments(ap)  # --old-tree, --read-rounds
    bench_record.add_arguments(ap)  # --record-pairs
    bench_serve.add_arguments(ap)  # --serve-rounds
    bench_accounting.add_arguments(ap)  # --programs, --methods
    bench_alloc.add_arguments(ap)  # --alloc-rounds, --no-callgrind
    bench_phase.add_arguments(ap)  # --before, --callgrind
    bench_executor.add_arguments(ap)  # --executor-rounds
    args = ap.parse_args(argv)
    if sys.platform != "linux":
        print("the benchmarks measure the Linux implementation; run them on Linux.",
              file=sys.stderr)
        return 2

    command = "python benchmarks/run.py" + (" --quick" if args.quick else "")
    if args.only:
        command += "".join(f" --only {k}" for k in args.only)
    warn_if_busy()
    t0 = time.perf_counter()
    sections = []
    for key, script in SCRIPTS.items():
        if args.only and key not in args.only:
            continue
        say(f"== {key} ({Path(script.__file__).name})")
        sections.append(script.run(args, command))
    elapsed = time.perf_counter() - t0
    write_results(args.output, sections, command, elapsed)
    for section in sections:
        print()
        print_section(section)
    print(f"\nwrote {args.output} in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
