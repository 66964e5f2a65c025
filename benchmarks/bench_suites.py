#!/usr/bin/env python3
"""`pytest --memtrack` over real test suites (issue 12): CPU time against plain pytest and
pytest-memray, in the same run.

    python benchmarks/bench_suites.py                  # ~10 minutes (3 rounds)
    python benchmarks/bench_suites.py --quick          # ~4 minutes (1 round)
    python benchmarks/bench_suites.py --suites-venv /tmp/suites   # keep (and reuse) the venv

It makes a throwaway virtual environment (a temporary directory unless ``--suites-venv``
names one to keep), downloads the sdists of attrs and more-itertools from PyPI (their
sdists carry their tests), installs them there with their test dependencies (hypothesis,
pympler, cloudpickle, pytest) and pytest-memray, and runs each suite three ways: plain,
``--memtrack`` and ``--memray``. memtrack itself comes from this source tree (its build in
place) through ``PYTHONPATH``; ``--before DIR`` adds a fourth way, ``--memtrack`` with the
build in DIR. The order of the ways rotates every round. Each run's CPU time (user +
system, of pytest and its children) comes from ``wait4()``; the figures are medians over
the rounds and ratios to the plain run's median. Nothing here asserts anything about speed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import HERE, Section, say, standalone_main, status, table  # noqa: E402

ROOT = HERE.parent
TARGET = 1.5  # --memtrack over a whole suite <= 1.5x a plain run's CPU time
SUITES = {
    # name: (PyPI project, test directory inside the sdist, test dependencies)
    "attrs": ("attrs", "tests", ["hypothesis", "pympler", "cloudpickle"]),
    "more-itertools": ("more-itertools", "tests", []),
}
# sh forks the command (a command follows it, so no exec optimisation): a pytest exec'd
# straight from this process would start under this process's peak as its ru_maxrss floor.
LAUNCH = ["/bin/sh", "-c", '"$@"; exit $?', "sh"]


def pip(venv: Path, *args: str) -> None:
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "-q", *args], check=True,
                   stdout=subprocess.DEVNULL)


def prepare(venv: Path, work: Path) -> dict[str, Path]:
    """The venv with the suites and their test dependencies; {suite: its source dir}."""
    if not (venv / "bin" / "python").exists():
        say(f"making a virtual environment in {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    sdists = work / "sdist"
    sdists.mkdir(parents=True, exist_ok=True)
    sources: dict[str, Path] = {}
    deps = {"pytest", "pytest-memray"}
    for name, (project, _tests, extra) in SUITES.items():
        found = sorted(sdists.glob(f"{project.replace('-', '_')}-*.tar.gz")) or \
            sorted(sdists.glob(f"{project}-*.tar.gz"))
        if not found:
            say(f"downloading the sdist of {project}")
            pip(venv, "download", "--no-deps", "--no-binary", ":all:", "-d", str(sdists),
                project)
            found = sorted(sdists.glob(f"{project.replace('-', '_')}-*.tar.gz")) or \
                sorted(sdists.glob(f"{project}-*.tar.gz"))
        with tarfile.open(found[-1]) as tar:
            top = tar.getnames()[0].split("/")[0]
            if not (work / top).exists():
                tar.extractall(work, filter="data")
        sources[name] = work / top
        deps.update(extra)
    say("installing the suites and their test dependencies")
    pip(venv, "install", *[str(p) for p in sources.values()], *sorted(deps))
    return sources


def env_for(tree: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEMTRACK_", "PYTEST_"))}
    env["PYTHONPATH"] = str(tree)
    return env


def plugin_args(venv: Path, tree: Path) -> list[str]:
    """``-p memtrack.pytest_plugin`` unless the tree's egg-info already registers it."""
    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import importlib.metadata as m; print(any(e.name == 'memtrack' "
         "for e in m.entry_points(group='pytest11')))"],
        capture_output=True, text=True, env=env_for(tree), check=True)
    return [] if probe.stdout.strip() == "True" else ["-p", "memtrack.pytest_plugin"]


def cpu_run(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, int, str]:
    """(cpu seconds, wall seconds, exit status, last line) of one run."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen([*LAUNCH, *argv], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
        _pid, status_code, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status_code)
        out.seek(0)
        lines = [line for line in out.read().splitlines() if line.strip()]
    return (ru.ru_utime + ru.ru_stime, time.perf_counter() - t0, proc.returncode,
            lines[-1] if lines else "")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--suites-venv", type=Path, default=None, metavar="DIR",
                    help="make (or reuse) the suites' virtual environment in DIR and keep it")
    if not any(a.dest == "before" for a in ap._actions):
        ap.add_argument("--before", type=Path, default=None, metavar="DIR",
                        help="also run --memtrack with the build in DIR (built in place)")


def run(args, command: str) -> Section:
    t0 = time.perf_counter()
    rounds = 1 if args.quick else 3
    keep = getattr(args, "suites_venv", None)
    tmp = None if keep else tempfile.TemporaryDirectory(prefix="memtrack-bench-suites-")
    base = keep.resolve() if keep else Path(tmp.name)
    try:
        venv = base / "venv"
        sources = prepare(venv, base)
        python = str(venv / "bin" / "python")
        ways: list[tuple[str, Path, list[str]]] = [
            ("plain", ROOT, []),
            ("--memtrack", ROOT, [*plugin_args(venv, ROOT), "--memtrack"]),
            ("--memray", ROOT, ["--memray"]),
        ]
        before = getattr(args, "before", None)
        if before:
            before = before.resolve()
            ways.append(("--memtrack (before)", before,
                         [*plugin_args(venv, before), "--memtrack"]))
        results: dict[str, dict[str, list[tuple[float, float, int, str]]]] = {}
        for name, (_project, tests, _extra) in SUITES.items():
            results[name] = {w[0]: [] for w in ways}
            for r in range(rounds):
                order = ways[r % len(ways):] + ways[:r % len(ways)]
                for label, tree, extra in order:
                    say(f"{name}: round {r + 1}/{rounds}: {label}")
                    argv = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra,
                            tests]
                    results[name][label].append(cpu_run(argv, sources[name], env_for(tree)))
    finally:
        if tmp is not None:
            tmp.cleanup()
    elapsed = time.perf_counter() - t0
    return section(command, results, rounds, elapsed, {n: p.name for n, p in sources.items()})


def section(command: str, results: dict, rounds: int, elapsed: float,
            versions: dict[str, str]) -> Section:
    rows, targets, headline = [], [], []
    for name, by_way in results.items():
        plain = statistics.median(r[0] for r in by_way["plain"])
        for label, runs in by_way.items():
            cpu = statistics.median(r[0] for r in runs)
            wall = statistics.median(r[1] for r in runs)
            per_round = [r[0] / p[0] for r, p in zip(runs, by_way["plain"], strict=True)]
            rows.append([name, label, f"{cpu:.1f} s", f"{wall:.1f} s", f"{cpu / plain:.2f}x",
                         f"{min(per_round):.2f}-{max(per_round):.2f}x",
                         f"{runs[-1][2]}: {runs[-1][3][:70]}"])
            if label == "--memtrack":
                targets.append([f"`pytest --memtrack` on {name} within {TARGET}x of plain "
                                "(CPU)", f"{cpu / plain:.2f}x", status(cpu / plain <= TARGET)])
            if label == "--memray":
                headline.append(f"- {name}: pytest-memray {cpu / plain:.2f}x plain (CPU), "
                                "for comparison")
    headline = [f"- {t[0]}: {t[1]} ({t[2]})" for t in targets] + headline
    L = ["### Headline", ""] + headline + ["", "### Targets (issue 12, requirement 4)", ""]
    L += table(targets, ["target", "measured", "status"], "lrl")
    L += ["", "### CPU time per suite run", ""]
    L += table(rows, ["suite", "run", "CPU (median)", "wall (median)", "CPU vs plain",
                      "per-round ratio range", "exit status: last line (last round)"],
               "llrrrrl")
    L += [
        "",
        "### How it was measured",
        "",
        f"- The suites: {', '.join(versions.values())}, from their PyPI sdists, installed in "
        "a throwaway virtual environment with their test dependencies and pytest-memray; "
        "each suite runs from its unpacked sdist (`pytest -q -p no:cacheprovider tests`), "
        "with memtrack from this source tree through `PYTHONPATH`.",
        f"- {rounds} round(s); in each, every way once, the order rotated from round to round. "
        "CPU time is user + system of the pytest process and its children (`wait4()`), "
        "so other work on the machine does not count in it (it does in the wall column).",
        "- A run's exit status is its suite's own: a test that fails in every way (as one of "
        "attrs' does here) fails in the plain run too.",
        "",
    ]
    return Section("suites", "pytest --memtrack over real suites (issue 12)", command, elapsed,
                   L, headline, targets)


def main(argv: list[str] | None = None) -> int:
    return standalone_main(sys.modules[__name__], "one round instead of three", argv)


if __name__ == "__main__":
    sys.exit(main())
