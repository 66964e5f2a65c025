"""The measuring method and report helpers shared by the memtrack benchmarks.

Used by bench_core.py, bench_table.py and run.py (not a public module). The method:
each benchmark is a statement compiled into a loop ``for _ in itertools.repeat(None, n):
<stmt>`` (as ``timeit`` does: no per-call Python function call is added), timed as a
whole with ``time.perf_counter_ns``; ``n`` is calibrated so that one batch lasts a fixed
time; after a discarded warm-up batch, the batches of all benchmarks of a section are
interleaved round-robin, and the median per-call time over the batches is reported with
min and max. The garbage collector is off during micro-benchmark batches (as in
``timeit``) unless a benchmark asks for it. Nothing is subtracted.

The report helpers write benchmarks/RESULTS.md as: a title, the machine (once), then one
section per benchmark script between HTML comment markers, so that a script run on its
own refreshes its own section and keeps the others.
"""

from __future__ import annotations

import datetime
import gc
import itertools
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import memtrack

try:
    import psutil
except ImportError:  # pragma: no cover - the peer is required for the comparison
    sys.exit("the memtrack benchmarks need psutil (the peer they compare against): "
             "pip install psutil")

HERE = Path(__file__).resolve().parent

# --------------------------------------------------------------------------------------
# The runner

TEMPLATE = """
def inner(_it, _timer):
{setup}
    try:
        _t0 = _timer()
        for _ in _it:
{stmt}
        _t1 = _timer()
    finally:
{teardown}
    return _t1 - _t0
"""


def _indent(code: str, spaces: int) -> str:
    lines = [line for line in code.strip("\n").splitlines()] or ["pass"]
    return "\n".join(" " * spaces + line for line in lines)


@dataclass
class Bench:
    """One benchmarked statement, compiled into a timed loop in `namespace`."""

    key: str
    label: str
    stmt: str
    setup: str = "pass"
    teardown: str = "pass"
    gc_enabled: bool = False
    fixed_n: int | None = None  # no calibration: n calls per batch
    namespace: dict | None = None  # globals of the statement
    per_call_ns: list[float] = field(default_factory=list)
    n: int = 0

    def __post_init__(self) -> None:
        src = TEMPLATE.format(
            setup=_indent(self.setup, 4),
            stmt=_indent(self.stmt, 12),
            teardown=_indent(self.teardown, 8),
        )
        ns: dict = dict(self.namespace or {})
        exec(compile(src, f"<bench {self.key}>", "exec"), ns)
        self._inner = ns["inner"]

    def batch(self, n: int) -> int:
        """One batch of n calls; returns the elapsed ns of the loop."""
        was_enabled = gc.isenabled()
        if self.gc_enabled:
            gc.enable()
        else:
            gc.disable()
        try:
            return self._inner(itertools.repeat(None, n), time.perf_counter_ns)
        finally:
            if was_enabled:
                gc.enable()
            else:
                gc.disable()

    def calibrate(self, target_ns: float) -> None:
        if self.fixed_n is not None:
            self.n = self.fixed_n
            return
        n = 1
        while True:
            elapsed = self.batch(n)
            if elapsed >= target_ns / 4 or n >= 1 << 24:
                break
            n *= 2 if elapsed * 8 >= target_ns else 8
        self.n = max(1, int(n * target_ns / max(elapsed, 1)))

    @property
    def median(self) -> float:
        return statistics.median(self.per_call_ns)

    @property
    def low(self) -> float:
        return min(self.per_call_ns)

    @property
    def high(self) -> float:
        return max(self.per_call_ns)


def run_section(benches: list[Bench], repeats: int, target_ns: float, say) -> None:
    """Calibrate, warm up, then run `repeats` rounds, one batch of each bench per round."""
    for b in benches:
        b.calibrate(target_ns)
        b.batch(b.n)  # warm-up batch, discarded
    for r in range(repeats):
        for b in benches:
            b.per_call_ns.append(b.batch(b.n) / b.n)
        say(f"  round {r + 1}/{repeats}")


def say(msg: str) -> None:
    """Progress goes to stderr; the headline to stdout."""
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Machine description


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", str(HERE), *args], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def git_commit() -> str:
    return _git("rev-parse", "--short", "HEAD") or "unknown"


def git_words() -> str:
    """The commit, and whether csrc/ had uncommitted changes (the code measured)."""
    commit = git_commit()
    if _git("status", "--porcelain", "--", ":/csrc", ":/setup.py"):
        commit += " (csrc/ had uncommitted changes at run time)"
    return commit


def now_words() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def _loadavg() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return None


START_LOAD = _loadavg()  # when the benchmarks were imported, i.e. before the run


def load_words() -> str:
    """The load average before the run and when the report was written: other work
    running at the same time skews every number."""
    now = _loadavg()
    if now is None:
        return "unknown"
    text = ""
    if START_LOAD is not None:
        text = f"{START_LOAD[0]:.2f} (1 min) before the run; "
    return text + (f"{now[0]:.2f} (1 min), {now[1]:.2f} (5 min), {now[2]:.2f} (15 min) when "
                   "the report was written")


def warn_if_busy() -> None:
    """Say so when other work is running: every number would carry its noise."""
    try:
        one = os.getloadavg()[0]
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return
    if one > 0.5 * cpus:
        say(f"note: load average {one:.2f} on {cpus} CPUs before the run: other work is "
            "running, and the numbers will carry its noise")


def machine_info() -> list[tuple[str, str]]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION") or "unknown"
    except (ValueError, OSError):
        glibc = " ".join(platform.libc_ver()) or "unknown"
    so = Path(memtrack._core.__file__)
    built = datetime.datetime.fromtimestamp(so.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
    caps = memtrack.capabilities()
    return [
        ("CPU", f"{cpu} ({os.cpu_count()} logical CPUs, {usable} usable)"),
        ("RAM", ram),
        ("Kernel", f"{platform.system()} {platform.release()}"),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("glibc", glibc),
        ("psutil", psutil.__version__),
        ("memtrack", f"{memtrack.__version__}, git {git_words()}, `_core` built {built}"),
        ("peak method", f"{caps['peak_method']}"),
        ("load average", load_words()),
        ("date", now_words()),
    ]


# --------------------------------------------------------------------------------------
# Formatting


def fmt_ns(ns: float) -> str:
    if ns != ns:  # NaN
        return "n/a"
    if abs(ns) < 1000:
        return f"{ns:.0f} ns"
    if abs(ns) < 100_000:
        return f"{ns / 1000:.2f} µs"
    if abs(ns) < 10_000_000:
        return f"{ns / 1000:.0f} µs"
    return f"{ns / 1e6:.1f} ms"


def speed_words(ours: float, theirs: float) -> str:
    if ours <= 0 or theirs <= 0:
        return "n/a"
    r = theirs / ours
    return f"{r:.1f}x faster" if r >= 1 else f"{1 / r:.1f}x slower"


def table(rows: list[list[str]], header: list[str], align: str) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(
        "---:" if a == "r" else "---" for a in align) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def bench_rows(benches: list[Bench], peers: dict[str, tuple[str, str]]) -> list[list[str]]:
    by_key = {b.key: b for b in benches}
    rows = []
    for b in benches:
        vs = ""
        if b.key in peers:
            peer_key, peer_name = peers[b.key]
            if peer_key in by_key:
                vs = f"{speed_words(b.median, by_key[peer_key].median)} than {peer_name}"
        rows.append([b.label, fmt_ns(b.median), fmt_ns(b.low), fmt_ns(b.high), f"{b.n:,}", vs])
    return rows


def status(met: bool) -> str:
    return "**met**" if met else "**NOT met**"


# --------------------------------------------------------------------------------------
# perf


def perf_record(argv: list[str], data: Path, timeout: float = 120) -> str | None:
    """``perf record -g`` of a command; None on success, else why not."""
    perf = shutil.which("perf")
    if perf is None:
        return "`perf` not found"
    try:
        rec = subprocess.run(
            [perf, "record", "-q", "-g", "-F", "4999", "-o", str(data), "--", *argv],
            capture_output=True, text=True, timeout=timeout,
        )
    except (OSError, subprocess.SubprocessError) as e:
        return f"perf record failed: {e}"
    if rec.returncode != 0 or not data.exists():
        return f"perf record failed: {rec.stderr.strip()[:300]}"
    return None


def perf_report(data: Path, *args: str) -> tuple[str, str | None]:
    """``perf report --stdio`` text with extra `args`; (text, None) or ("", why not)."""
    perf = shutil.which("perf")
    if perf is None:
        return "", "`perf` not found"
    try:
        rep = subprocess.run([perf, "report", "-i", str(data), "--stdio", *args],
                             capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        return "", f"perf report failed: {e}"
    if rep.returncode != 0:
        return "", f"perf report failed: {rep.stderr.strip()[:300]}"
    return rep.stdout, None


def perf_symbols(data: Path) -> tuple[dict[str, tuple[float, float]], str | None]:
    """{symbol: (inclusive %, self %)} from ``perf report --children --sort sym``."""
    text, err = perf_report(data, "--children", "--sort", "sym", "-g", "none")
    if err:
        return {}, err
    found: dict[str, tuple[float, float]] = {}
    pattern = re.compile(r"^\s*([\d.]+)%\s+([\d.]+)%\s+\[[^\]]+\]\s+(\S+)")
    for line in text.splitlines():
        m = pattern.match(line)
        if m and m.group(3) not in found:
            found[m.group(3)] = (float(m.group(1)), float(m.group(2)))
    return found, None


def perf_self_by(data: Path, sort: str) -> tuple[list[tuple[float, str, str]], str | None]:
    """Self-time shares from ``perf report --no-children --sort dso,sym`` (or `sort`):
    rows of (%, dso, symbol), largest first."""
    text, err = perf_report(data, "--no-children", "--sort", sort, "-g", "none")
    if err:
        return [], err
    rows = []
    pattern = re.compile(r"^\s*([\d.]+)%\s+(\S+)\s+\[[^\]]+\]\s+(\S.*?)\s*$")
    for line in text.splitlines():
        m = pattern.match(line)
        if m:
            rows.append((float(m.group(1)), m.group(2), m.group(3)))
    return rows, None


# --------------------------------------------------------------------------------------
# RESULTS.md: a title, the machine once, then one section per script


@dataclass
class Section:
    """One script's part of RESULTS.md. `body` uses ``###`` and deeper headings."""

    key: str        # "core", "table": the marker, and the order in the file
    title: str      # the section's ``##`` heading
    command: str    # how it was produced, e.g. "python benchmarks/bench_core.py"
    elapsed: float  # seconds
    body: list[str]
    headline: list[str] = field(default_factory=list)  # printed at the end of a run
    targets: list[list[str]] = field(default_factory=list)  # [target, measured, status]

    def lines(self) -> list[str]:
        return [
            f"<!-- section: {self.key} -->",
            f"## {self.title}",
            "",
            f"Produced by `{self.command}` in {self.elapsed:.0f} s, {now_words()}, git "
            f"{git_words()}, on {dict(machine_info())['CPU']}, load average "
            f"{load_words()}.",
            "",
            *self.body,
            f"<!-- end section: {self.key} -->",
        ]


SECTION_ORDER = ["core", "table", "table_read", "record", "phase", "suites", "accounting", "alloc",
                 "executor"]
_SECTION_RE = re.compile(r"^<!-- section: (\w+) -->\n.*?^<!-- end section: \1 -->\n?",
                         re.S | re.M)


def existing_sections(path: Path) -> dict[str, str]:
    """The sections already in `path` (text between and including the markers)."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    return {m.group(1): m.group(0).rstrip("\n") for m in _SECTION_RE.finditer(text)}


def write_results(path: Path, sections: list[Section], command: str, elapsed: float) -> None:
    """Write `path`: title, machine, then every section, the new ones replacing their
    namesakes and the others kept from the file as it was."""
    new = {s.key: "\n".join(s.lines()) for s in sections}
    old = existing_sections(path)
    kept = [k for k in old if k not in new]
    merged = {**old, **new}
    order = [k for k in SECTION_ORDER if k in merged] + sorted(
        k for k in merged if k not in SECTION_ORDER)
    L = ["# memtrack benchmarks", ""]
    if kept:
        def names(keys: list[str]) -> str:
            return " and ".join(keys) + (" sections" if len(keys) > 1 else " section")

        L += [f"This file was last written by `{command}` ({elapsed:.0f} s), which refreshed "
              f"the {names([s.key for s in sections])}; the {names(kept)} "
              f"{'come' if len(kept) > 1 else 'comes'} from an earlier run (each section "
              "says by which command, when and at which commit). `python benchmarks/run.py` "
              "refreshes all of them in one run."]
    else:
        L += [f"Produced by `{command}` in {elapsed:.0f} s. Re-run it to refresh this file; "
              "numbers from other machines are not comparable, and on a shared or virtual "
              "machine compare ratios from one run rather than absolute numbers across runs."]
    L += ["", "## Machine", "",
          "The machine of the newest run; a section kept from an earlier run names its own "
          "CPU and load (sections written before 2026-12-08 ran on the machine their date "
          "and commit identify, an AMD EPYC with 2 usable CPUs).", ""]
    L += table([[k, v] for k, v in machine_info()], ["", ""], "ll")
    L += ["", "## Contents", ""]
    for k in order:
        m = re.search(r"^## (.+)$", merged[k], re.M)
        if m:
            title = m.group(1)
            anchor = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
            L.append(f"- [{title}](#{anchor})")
    for k in order:
        L += ["", merged[k]]
    path.write_text("\n".join(L) + "\n")


def print_section(section: Section) -> None:
    print(f"{section.title}:")
    print("\n".join(section.headline))
    print("\n".join(" | ".join(t) for t in section.targets))


def standalone_main(module, quick_help: str, argv: list[str] | None = None,
                    extra_arguments=None) -> int:
    """`python benchmarks/<script>.py [--quick] [--output F]`: run one script's section
    and write it into RESULTS.md, keeping the other sections."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(description=module.__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--output", type=Path, default=HERE / "RESULTS.md",
                    help="the report to write (default: benchmarks/RESULTS.md; its other "
                         "sections are kept)")
    if extra_arguments is not None:
        extra_arguments(ap)
    module.add_arguments(ap)
    args = ap.parse_args(argv)
    script = Path(module.__file__).name
    if sys.platform != "linux":
        print(f"{script} measures the Linux implementation; run it on Linux.", file=sys.stderr)
        return 2
    command = f"python benchmarks/{script}" + (" --quick" if args.quick else "")
    warn_if_busy()
    section = module.run(args, command)
    write_results(args.output, [section], command, section.elapsed)
    print_section(section)
    print(f"wrote the {section.key} section of {args.output} in {section.elapsed:.0f} s")
    return 0
