#!/usr/bin/env python3
"""Are memtrack run's pool figures right (issue 11)? Checked against psutil, in the same run.

Each program (black, flake8, pylint, compileall: code nobody here wrote, each with a pool of
2 worker processes) runs under ``memtrack run`` once per start method. While it runs, this
script samples the same processes itself every 20 ms with psutil (``memory_full_info().pss``,
from ``/proc/<pid>/smaps_rollup``): it finds the command (the child of ``memtrack run``),
its workers and its helpers on its own, and keeps the largest sum of the workers' PSS and
the command's largest PSS. The table compares those with what the profile says:

- the pool peak (``Run.peak``: the workers' summed PSS, fresh or estimated between two
  readings from the RSS change),
- the root's peak (``Run.main_peak``, the command without memtrack's own process),
- the number of workers (helpers such as the resource tracker and the forkserver apart).

Target (issue 11, requirement 2): pool peak and root peak within 3% of psutil's.
Nothing here asserts anything.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import Section, say, standalone_main, status  # noqa: E402
from _timing import table as md_table  # noqa: E402

#: How each program is started: a ``python -c`` that sets the start method first, so the
#: program's own pool (made without a context) uses it. compileall picks forkserver by
#: itself when the default is fork.
PROGRAMS = {
    "black": ("from black import patched_main as main", ["--check", "-q", "-W", "2"]),
    "flake8": ("from flake8.main.cli import main", ["-j", "2", "--exit-zero"]),
    "pylint": ("from pylint import run_pylint as main",
               ["-j", "2", "--exit-zero", "--disable=all", "--enable=W,E", "-sn"]),
    "compileall": ("from compileall import main", ["-j", "2", "-f", "-q"]),
}
LAUNCH = ("import multiprocessing as mp, sys\n"
          "mp.set_start_method(sys.argv.pop(1))\n"
          "{entry}\n"
          "sys.argv[0] = {name!r}\n"
          "sys.exit(main())\n")
HELPER_MARKERS = ("multiprocessing.resource_tracker", "multiprocessing.semaphore_tracker")
INTERVAL = 0.02


def _sources(tmp: str, count: int) -> str:
    """A copy of `count` standard-library modules of 4-40 KB (compileall writes beside
    them): real code, small enough that a 2-core machine checks it in seconds."""
    lib = os.path.dirname(os.__file__)
    names = sorted(n for n in os.listdir(lib) if n.endswith(".py")
                   and 4096 <= os.path.getsize(os.path.join(lib, n)) <= 40960)[:count]
    out = os.path.join(tmp, f"src{count}")
    os.makedirs(out, exist_ok=True)
    for n in names:
        shutil.copy(os.path.join(lib, n), out)
    return out


class PsutilSampler(threading.Thread):
    """Every 20 ms: the command under `tool_pid`, its workers and helpers, their PSS."""

    def __init__(self, tool_pid: int) -> None:
        super().__init__(daemon=True)
        import psutil

        self.psutil = psutil
        self.tool = psutil.Process(tool_pid)
        self.stop = threading.Event()
        self.pool_peak = 0
        self.root_peak = 0
        self.workers: set[int] = set()
        self.helpers: set[int] = set()
        self.rounds = 0

    def _role(self, proc, root_pid: int, forkservers: set[int]) -> str:
        try:
            cmd = " ".join(proc.cmdline())
            parent = proc.ppid()
        except self.psutil.Error:
            return "gone"
        if any(m in cmd for m in HELPER_MARKERS):
            return "helper"
        if "multiprocessing.forkserver" in cmd and parent not in forkservers:
            forkservers.add(proc.pid)
            return "helper"
        if parent == root_pid or parent in forkservers:
            return "worker"
        return "other"

    def run(self) -> None:
        psutil = self.psutil
        while not self.stop.is_set():
            time.sleep(INTERVAL)
            try:
                children = self.tool.children()
            except psutil.Error:
                return
            if not children:
                continue
            root = children[0]
            forkservers: set[int] = set()
            pool = 0
            try:
                descendants = root.children(recursive=True)
                root_pss = root.memory_full_info().pss
            except psutil.Error:
                continue
            self.root_peak = max(self.root_peak, root_pss)
            for proc in sorted(descendants, key=lambda p: p.pid):
                role = self._role(proc, root.pid, forkservers)
                if role == "helper":
                    self.helpers.add(proc.pid)
                if role != "worker":
                    continue
                try:
                    pool += proc.memory_full_info().pss
                except psutil.Error:
                    continue
                self.workers.add(proc.pid)
            self.pool_peak = max(self.pool_peak, pool)
            self.rounds += 1


def measure(program: str, method: str, src: str, tmp: str) -> dict:
    import memtrack
    from memtrack.profile.insights import digest
    from memtrack.profile.insights import insights as find_insights

    entry, args = PROGRAMS[program]
    out = os.path.join(tmp, f"{program}-{method}.mtp")
    code = LAUNCH.format(entry=entry, name=program)
    cmd = [sys.executable, "-m", "memtrack", "run", "--quiet", "-o", out, "--",
           sys.executable, "-c", code, method, *args, src]
    started = time.perf_counter()
    tool = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sampler = PsutilSampler(tool.pid)
    sampler.start()
    _, err = tool.communicate(timeout=600)
    sampler.stop.set()
    sampler.join()
    if tool.returncode not in (0, 1):  # black --check says 1 when it would reformat
        raise RuntimeError(f"{program} ({method}) failed: {err.decode()[-2000:]}")
    run = digest(memtrack.load(out))
    pool = run.peak.pss if run.peak is not None and run.peak.pss is not None else 0
    return {
        "program": program, "method": method, "seconds": time.perf_counter() - started,
        "memtrack_pool": pool, "psutil_pool": sampler.pool_peak,
        "memtrack_root": run.main_peak or 0, "psutil_root": sampler.root_peak,
        "memtrack_workers": len(run.workers), "psutil_workers": len(sampler.workers),
        "helpers": sorted({w.pid for w in run.processes if w.role == "helper"}),
        "psutil_helpers": len(sampler.helpers), "rounds": sampler.rounds,
        "worker_count_insight": [i.title for i in find_insights(memtrack.load(out))
                                 if i.kind == "worker_count"],
    }


def _pct(ours: int, theirs: int) -> float:
    return (ours / theirs - 1) * 100 if theirs else float("nan")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--programs", default=",".join(PROGRAMS),
                    help="comma-separated subset of " + ", ".join(PROGRAMS))
    ap.add_argument("--methods", default="fork,spawn,forkserver",
                    help="start methods (default fork,spawn,forkserver)")


def run(args: argparse.Namespace, command: str) -> Section:
    from memtrack._sizes import format_size

    t0 = time.perf_counter()
    programs = [p for p in args.programs.split(",") if p]
    methods = [m for m in args.methods.split(",") if m]
    if args.quick:
        methods = methods[1:2] or methods
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        big = _sources(tmp, 40 if args.quick else 80)
        small = _sources(tmp, 8 if args.quick else 16)
        for program in programs:
            for method in methods:
                say(f"{program} under {method}")
                src = small if program in ("pylint", "black") else big
                results.append(measure(program, method, src, tmp))
    rows = []
    worst_pool = worst_root = 0.0
    for r in results:
        pool_err = _pct(r["memtrack_pool"], r["psutil_pool"])
        root_err = _pct(r["memtrack_root"], r["psutil_root"])
        worst_pool = max(worst_pool, abs(pool_err))
        worst_root = max(worst_root, abs(root_err))
        rows.append([
            r["program"], r["method"], f"{r['seconds']:.1f} s",
            format_size(r["memtrack_pool"]), format_size(r["psutil_pool"]), f"{pool_err:+.1f}%",
            format_size(r["memtrack_root"]), format_size(r["psutil_root"]), f"{root_err:+.1f}%",
            f"{r['memtrack_workers']} / {r['psutil_workers']}",
            f"{len(r['helpers'])} / {r['psutil_helpers']}",
            "; ".join(r["worker_count_insight"]) or "none",
        ])
    met = worst_pool <= 3 and worst_root <= 3
    body = [
        "### Pool and root peaks against psutil, same run",
        "",
        "Each program checks a copy of standard-library modules with 2 workers under "
        "`memtrack run` (default interval 50 ms, PSS read every 10th round and estimated "
        "from the RSS change in between); psutil samples the same processes every 20 ms. "
        "Workers and helpers: memtrack's count / psutil sampler's count.",
        "",
        *md_table(rows, ["program", "start method", "wall", "pool peak (memtrack)",
                         "(psutil)", "diff", "root peak (memtrack)", "(psutil)", "diff",
                         "workers", "helpers", "worker-count insight"], "lllrrrrrrlll"),
        "",
        "### Target",
        "",
        *md_table([["pool and root peak within 3% of a 20 ms psutil sampler",
                    f"worst pool {worst_pool:.1f}%, worst root {worst_root:.1f}%",
                    status(met)]], ["target", "measured", "status"], "lll"),
        "",
    ]
    return Section(
        key="accounting", title="Accounting against psutil (issue 11)", command=command,
        elapsed=time.perf_counter() - t0, body=body,
        headline=[f"worst pool peak difference {worst_pool:.1f}%, worst root {worst_root:.1f}%"],
        targets=[["within 3% of psutil", f"{worst_pool:.1f}% / {worst_root:.1f}%",
                  status(met)]],
    )


if __name__ == "__main__":
    sys.exit(standalone_main(sys.modules[__name__],
                             "one start method (spawn), fewer files"))
