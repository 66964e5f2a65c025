"""memtrack's pytest plugin: memory limits, leak checks and baselines that hold steady in CI.

Registered through the ``pytest11`` entry point. Installed but unused it only reads its
options: no table, no measurement, no change to the environment. A test is measured when
it uses the ``memtrack`` fixture, carries ``@pytest.mark.memtrack(...)``, or when
``--memtrack`` / ``--memtrack-baseline`` measure every test.

How a test is measured (in ``pytest_runtest_call``, around the test body only):

- **peak**: the exact RSS high-water mark over the RSS at the start. A peak watch
  (``_core.PeakWatch``) receives every high-water mark that a ``memtrack.phase`` of the
  test resets (the C core folds the mark into every open phase and watch before a reset),
  so phases inside the test do not hide the test's peak; the watch is never recorded and
  changes no phase path.
- **retained**: RSS after the body minus RSS before it. A test with a ``retained=`` limit,
  or that uses the ``memtrack`` fixture, gets ``gc.collect()`` and ``malloc_trim(0)`` before
  both readings. Every other test (``--memtrack`` over a whole suite) is read without a
  collection, which costs tens of milliseconds per test on a grown heap; only an increase
  of more than RETAINED_CONFIRM is confirmed by a collection and a second reading (the
  garbage of earlier tests that it frees counts against the increase, never for it).
- **phases**: the test's own phases (the records completed during the body).
- **workers**: when the fixture or a marker that needs them is used, a
  :class:`~memtrack.WorkerTable` is created for the test and named in ``MEMTRACK_TABLE``
  from setup to teardown, so pools started inside the test join it by themselves. The
  plugin's thread samples the table every 20 ms for the pool's summed memory.

Results travel on the call report (``report.memtrack``, plain JSON types), so pytest-xdist
carries them to the controller, which prints the summary and writes the baseline.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .. import _core
from .._files import write_atomically
from .._sizes import format_size, parse_size
from ..leaks import Growth, retained_rss
from ..leaks import assert_no_growth as _assert_no_growth
from ..pool.memory import PoolMemory
from ..pool.table import ENV_TABLE, WorkerTable
from ..profile import summarise_by_path
from . import allocations as _allocations

#: How often the pool's summed memory is sampled while a test with a table runs.
POOL_INTERVAL = 0.02
#: Heartbeat of the test's worker table: how often busy workers publish their rss.
TABLE_HEARTBEAT = 0.02
TABLE_CAPACITY = 128
BASELINE_FORMAT = "memtrack-baseline/1"
LIMITS = ("peak", "retained", "worker_peak", "pool_peak", "phases")
TOP_PHASES = 3
#: An uncollected rise of RSS over this is confirmed by gc.collect() + malloc_trim().
RETAINED_CONFIRM = 1024 * 1024

_STATE = pytest.StashKey["_TestState"]()
_PLUGIN = "memtrack-session"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """With allocation tracking on, a failing test shows its top allocation sites."""
    before = _allocations.totals()
    if before is None:
        return (yield)
    try:
        return (yield)
    except BaseException:
        text = _allocations.section(before)
        if text is not None:
            item.add_report_section("call", _allocations.SECTION, text)
        raise


# --------------------------------------------------------------------------------------
# Options

def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("memtrack", "memtrack: memory limits, leak checks and baselines")
    group.addoption("--memtrack", action="store_true", default=None, dest="memtrack",
                    help="measure every test and print the tests with the largest peaks "
                         "(ini: memtrack = true)")
    group.addoption("--memtrack-top", type=int, default=None, metavar="N",
                    help="how many tests the summary lists (default 10; ini: memtrack_top)")
    group.addoption("--memtrack-baseline", default=None, metavar="FILE",
                    help="compare each test's peak with this JSON baseline "
                         "(ini: memtrack_baseline)")
    group.addoption("--memtrack-update-baseline", action="store_true", default=None,
                    help="write the measured peaks of the passing tests into the baseline "
                         "(ini: memtrack_update_baseline)")
    group.addoption("--memtrack-tolerance", default=None, metavar="PERCENT",
                    help="how far over its baseline a test may go, e.g. 10%% "
                         "(default 10%%; ini: memtrack_tolerance)")
    group.addoption("--memtrack-floor", default=None, metavar="SIZE",
                    help="and by at least this much before it fails, e.g. '1 MB' "
                         "(default 1 MB; ini: memtrack_floor)")
    group.addoption("--memtrack-repeat", type=int, default=None, metavar="N",
                    help="run each measured test body N times and keep the median "
                         "(default 1; ini: memtrack_repeat)")
    parser.addini("memtrack", type="bool", default=False,
                  help="measure every test and print the largest peaks (as --memtrack)")
    parser.addini("memtrack_top", default="10", help="as --memtrack-top")
    parser.addini("memtrack_baseline", default="",
                  help="as --memtrack-baseline (relative to the ini file)")
    parser.addini("memtrack_update_baseline", type="bool", default=False,
                  help="as --memtrack-update-baseline")
    parser.addini("memtrack_tolerance", default="10%", help="as --memtrack-tolerance")
    parser.addini("memtrack_floor", default="1 MB", help="as --memtrack-floor")
    parser.addini("memtrack_repeat", default="1", help="as --memtrack-repeat")


@dataclass(frozen=True)
class Settings:
    report: bool            #: --memtrack: measure every test, print the summary
    top: int                #: tests in the summary
    baseline: Path | None   #: the baseline file
    update: bool            #: write the baseline
    tolerance: float        #: fraction over the baseline that is allowed
    floor: int              #: bytes over the baseline that are always allowed
    repeat: int             #: runs of each measured body; the median is kept

    @property
    def measure_all(self) -> bool:
        return self.report or self.baseline is not None


def _parse_percent(text: str) -> float:
    value = str(text).strip()
    number = value[:-1].strip() if value.endswith("%") else value
    try:
        fraction = float(number) / 100
    except ValueError:
        fraction = -1.0
    if not fraction >= 0:
        raise pytest.UsageError(
            f"--memtrack-tolerance: cannot read {text!r} as a percentage such as '10%'")
    return fraction


def _positive_int(value: Any, what: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise pytest.UsageError(f"{what} must be a whole number of at least 1, not {value!r}")
    return number


def _settings(config: pytest.Config) -> Settings:
    def pick(option: str, ini: str) -> Any:
        value = config.getoption(option)
        return config.getini(ini) if value is None else value

    baseline: Path | None = None
    if config.getoption("memtrack_baseline"):
        baseline = config.invocation_params.dir / config.getoption("memtrack_baseline")
    elif config.getini("memtrack_baseline"):
        anchor = config.inipath.parent if config.inipath else config.rootpath
        baseline = anchor / config.getini("memtrack_baseline")
    update = bool(pick("memtrack_update_baseline", "memtrack_update_baseline"))
    if update and baseline is None:
        raise pytest.UsageError("--memtrack-update-baseline needs --memtrack-baseline=FILE")
    try:
        floor = parse_size(pick("memtrack_floor", "memtrack_floor"), what="--memtrack-floor")
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    return Settings(
        report=bool(pick("memtrack", "memtrack")),
        top=_positive_int(pick("memtrack_top", "memtrack_top"), "--memtrack-top"),
        baseline=baseline,
        update=update,
        tolerance=_parse_percent(pick("memtrack_tolerance", "memtrack_tolerance")),
        floor=floor,
        repeat=_positive_int(pick("memtrack_repeat", "memtrack_repeat"), "--memtrack-repeat"),
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "memtrack(peak=None, retained=None, worker_peak=None, pool_peak=None, phases=None): "
        "fail the test when its memory goes over a limit; sizes are bytes or text such as "
        "'50 MB' (memtrack)")
    config.pluginmanager.register(MemtrackSession(config, _settings(config)), _PLUGIN)


# --------------------------------------------------------------------------------------
# Limits from the marker

@dataclass(frozen=True)
class Limits:
    """The limits of a test's ``@pytest.mark.memtrack(...)`` markers, merged key by key
    (a marker on the function overrides the same key on its class or module)."""

    sizes: dict[str, int]          #: peak, retained, worker_peak, pool_peak -> bytes
    phases: dict[str, int]         #: phase path -> bytes (its largest peak_delta)
    texts: dict[str, str]          #: how each limit was written, for messages

    @property
    def needs_table(self) -> bool:
        return bool(self.phases) or "worker_peak" in self.sizes or "pool_peak" in self.sizes


def _limits(item: pytest.Item) -> Limits | None:
    markers = list(item.iter_markers("memtrack"))
    if not markers:
        return None
    sizes: dict[str, int] = {}
    phases: dict[str, int] = {}
    texts: dict[str, str] = {}
    for marker in reversed(markers):  # farthest first, so the closest one wins
        if marker.args:
            raise _MarkerError(f"takes keyword arguments only ({', '.join(LIMITS)}), "
                               f"not {marker.args!r}")
        for key, value in marker.kwargs.items():
            if key not in LIMITS:
                raise _MarkerError(f"unknown limit {key}=; use {', '.join(LIMITS)}")
            if value is None:
                continue
            if key == "phases":
                if not isinstance(value, dict):
                    raise _MarkerError(f"phases= takes a dict {{path: size}}, "
                                       f"not {type(value).__name__}")
                for path, size in value.items():
                    if not isinstance(path, str) or not path:
                        raise _MarkerError(f"phases=: a phase path must be a str, not {path!r}")
                    phases[path] = _size(size, f"phases[{path!r}]")
                    texts[f"phases[{path!r}]"] = repr(size)
            else:
                sizes[key] = _size(value, key)
                texts[key] = repr(value)
    return Limits(sizes, phases, texts)


class _MarkerError(Exception):
    pass


def _size(value: Any, what: str) -> int:
    try:
        return parse_size(value, what=what)
    except (TypeError, ValueError) as e:
        raise _MarkerError(str(e)) from None


# --------------------------------------------------------------------------------------
# Measuring one run of a test body

@dataclass
class Measurement:
    """One test body, measured. Sizes in bytes; None where nothing could be seen."""

    peak: int                           #: exact RSS peak over the start (peak_delta)
    retained: int                       #: RSS after the body and gc minus before
    peak_rss: int                       #: the absolute RSS peak of the test process
    phases: dict[str, Any]              #: {path: PhaseSummary} of the test process
    workers: list[Any] = field(default_factory=list)  #: WorkerStats of this run's workers
    pool_peak: int | None = None        #: largest summed worker memory seen
    runs: int = 1

    @property
    def worker_peak(self) -> int | None:
        return max((w.peak_rss for w in self._readable_workers()), default=None)

    @property
    def peak_worker(self) -> Any | None:
        ws = self._readable_workers()
        return max(ws, key=lambda w: w.peak_rss) if ws else None

    def _readable_workers(self) -> list[Any]:
        return [w for w in self.workers if w.state != "corrupt"]

    def worker_phases(self) -> dict[str, Any]:
        """The phases of all the workers, each path with its largest peak."""
        merged: dict[str, Any] = {}
        for w in self._readable_workers():
            for path, s in w.phases.items():
                if path not in merged or s.max_peak_delta > merged[path].max_peak_delta:
                    merged[path] = s
        return merged

    def phase_peak(self, path: str) -> int | None:
        """The largest peak_delta of `path` in the test process or any of its workers."""
        found = [s.max_peak_delta for s in (self.phases.get(path), self.worker_phases().get(path))
                 if s is not None]
        return max(found) if found else None


@dataclass(frozen=True)
class _BodyPeak:
    rss_start: int
    rss_end: int
    peak_rss: int

    @property
    def peak_delta(self) -> int:
        return max(self.peak_rss - self.rss_start, 0)


class _Watch:
    """The exact peak of a test body, and (with a table) the pool's memory during it.

    A ``_core.PeakWatch`` receives every fold of the kernel's high-water mark, like an
    open phase, so the body's phases cannot hide its peak; but it is never recorded, is
    on no thread's stack and changes no phase path. With a table a thread samples the
    pool's summed memory every POOL_INTERVAL seconds.
    """

    def __init__(self, table: WorkerTable | None,
                 on_sample: Callable[[int | None], None]) -> None:
        self._table = table
        self._pool = PoolMemory(table) if table is not None else None
        self._on_sample = on_sample
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak = _core.PeakWatch()
        self.stats: _BodyPeak | None = None

    def __enter__(self) -> _Watch:
        self._peak.start()
        if self._table is not None:
            self._thread = threading.Thread(target=self._run, name="memtrack-pytest", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        rss_start, rss_end, peak_rss, _duration = self._peak.stop()
        self.stats = _BodyPeak(rss_start, rss_end, peak_rss)
        self.sample()  # the end: a pool may have grown since the last tick

    def sample(self) -> None:
        if self._pool is not None and self._table is not None and not self._table.closed:
            self._on_sample(self._pool.now())

    def _run(self) -> None:
        while not self._stop.wait(POOL_INTERVAL):
            self.sample()


def _phases_since(completed_before: int) -> dict[str, Any]:
    """{path: PhaseSummary} of the phases completed since the count `completed_before`
    (``counters()["completed"]``, which ``memtrack.reset()`` does not clear: after a reset
    in the test, every record left in the ring is the test's)."""
    new = _core.counters()["completed"] - completed_before
    if new <= 0:
        return {}  # no phase ran: skip copying the ring
    records, _dropped = _core.records()
    return summarise_by_path(records[-new:])


def _median_of(runs: list[Measurement]) -> Measurement:
    """Each number the median (low) of the runs, so that it is one that was measured."""
    if len(runs) == 1:
        return runs[0]
    last = runs[-1]
    phases = {}
    for path in {p for m in runs for p in m.phases}:
        present = [m.phases[path] for m in runs if path in m.phases]
        s = present[-1]
        phases[path] = _core.PhaseSummary((
            s.count, s.total_time,
            statistics.median_low([p.max_peak_rss for p in present]),
            statistics.median_low([p.max_peak_delta for p in present]),
            s.total_rss_delta, s.mean_rss_delta))
    pools = [m.pool_peak for m in runs if m.pool_peak is not None]
    by_worker_peak = sorted((m for m in runs if m.worker_peak is not None),
                            key=lambda m: m.worker_peak)
    return Measurement(
        peak=statistics.median_low([m.peak for m in runs]),
        retained=statistics.median_low([m.retained for m in runs]),
        peak_rss=statistics.median_low([m.peak_rss for m in runs]),
        phases=phases,
        workers=(by_worker_peak[(len(by_worker_peak) - 1) // 2].workers
                 if by_worker_peak else last.workers),
        pool_peak=statistics.median_low(pools) if pools else None,
        runs=len(runs),
    )


# --------------------------------------------------------------------------------------
# The per-test state and the fixture

class _TestState:
    """What the plugin knows about one measured test, from setup to teardown."""

    def __init__(self, item: pytest.Item, limits: Limits | None) -> None:
        self.item = item
        self.limits = limits
        self.table: WorkerTable | None = None
        self._saved_env: str | None = None
        self.result: Measurement | None = None
        self.pool_peak_seen: int | None = None
        self.running = False
        self.runs: list[Measurement] = []
        self.report: dict[str, Any] | None = None  #: the baseline comparison

    @property
    def collects(self) -> bool:
        """Whether retained memory is read after a full collection on both sides: for a
        ``retained=`` limit, and for the fixture (whose ``retained`` says so)."""
        return bool(self.limits and "retained" in self.limits.sizes) or \
            "memtrack" in getattr(self.item, "fixturenames", ())

    def open_table(self) -> WorkerTable:
        if self.table is None:
            self.table = WorkerTable(capacity=TABLE_CAPACITY, heartbeat=TABLE_HEARTBEAT)
            self._saved_env = os.environ.get(ENV_TABLE)
            os.environ[ENV_TABLE] = self.table.name
        return self.table

    def close_table(self) -> None:
        if self.table is None:
            return
        if os.environ.get(ENV_TABLE) == self.table.name:
            if self._saved_env is None:
                del os.environ[ENV_TABLE]
            else:
                os.environ[ENV_TABLE] = self._saved_env
        self.table.close()

    def saw_pool(self, total: int | None) -> None:
        if total is not None and (self.pool_peak_seen is None or total > self.pool_peak_seen):
            self.pool_peak_seen = total

    @contextmanager
    def measuring(self) -> Iterator[None]:
        """Measure one run of the test body; the measurement is appended to ``runs``."""
        self.pool_peak_seen = None
        completed_before = _core.counters()["completed"]
        started = time.monotonic()
        careful = self.collects
        before = retained_rss() if careful else 0
        watch = _Watch(self.table, self.saw_pool)
        self.running = True
        try:
            with watch:
                yield
        finally:
            self.running = False
            stats = watch.stats
            if careful:
                after = retained_rss()
            elif stats is None:  # the watch could not read: nothing to compare
                after = before = _core.rss()
            else:
                before, after = stats.rss_start, stats.rss_end
                if after - before > RETAINED_CONFIRM:  # a real increase, or garbage?
                    after = min(after, retained_rss())
            workers = []
            if self.table is not None:
                workers = [w for w in self.table.workers()
                           if w.state == "corrupt" or (w.joined or 0) >= started
                           or w.state in ("idle", "running")]
            self.runs.append(Measurement(
                peak=stats.peak_delta if stats is not None else 0,
                retained=after - before,
                peak_rss=stats.peak_rss if stats is not None else after,
                phases=_phases_since(completed_before),
                workers=workers,
                pool_peak=self.pool_peak_seen,
            ))
            self.result = _median_of(self.runs)


class MemtrackFixture:
    """The ``memtrack`` fixture: what one test's memory did.

    ``phase(name)`` measures a block; after the test body ``peak_delta``, ``retained``
    and ``phases`` hold the test's measurements. ``table`` is the test's
    :class:`~memtrack.WorkerTable` (named in ``MEMTRACK_TABLE`` until teardown, so pools
    started in the test join it); ``workers()`` reads it; ``pool_peak`` is the largest
    summed memory of its live workers seen so far.
    """

    def __init__(self, state: _TestState) -> None:
        self._state = state

    def phase(self, name: str) -> Any:
        from .._phase import phase
        return phase(name)

    def _measured(self, what: str) -> Measurement:
        result = self._state.result
        if result is None:
            when = "while the test body runs" if self._state.running else "for this test"
            raise RuntimeError(
                f"memtrack.{what} is not known {when}: it is measured when the body ends; "
                "read it in a fixture's teardown, or use `with memtrack.phase(name) as p:` "
                "and p.stats inside the test")
        return result

    @property
    def peak_delta(self) -> int:
        """The exact RSS peak of the test body over the RSS at its start, bytes."""
        return self._measured("peak_delta").peak

    @property
    def retained(self) -> int:
        """RSS after the body and ``gc.collect()`` minus RSS before it, bytes."""
        return self._measured("retained").retained

    @property
    def phases(self) -> dict[str, Any]:
        """{path: PhaseSummary} of the phases the test body ran in this process."""
        return self._measured("phases").phases

    @property
    def table(self) -> WorkerTable:
        """The test's worker table."""
        return self._state.open_table()

    def workers(self) -> list[Any]:
        """The workers that joined the test's table, dead ones included."""
        return self.table.workers()

    @property
    def pool_peak(self) -> int | None:
        """The largest sum of the live workers' memory seen (sampled every 20 ms; shared
        pages counted once, as pss does), bytes; None when no worker was seen alive."""
        if self._state.result is not None and not self._state.running:
            return self._state.result.pool_peak
        return self._state.pool_peak_seen

    def assert_no_growth(self, fn: Callable[..., Any], iterations: int = 50, warmup: int = 5,
                         tolerance: int | str = "1 MB", **kw: Any) -> Growth:
        """:func:`memtrack.leaks.assert_no_growth`."""
        return _assert_no_growth(fn, iterations, warmup, tolerance, **kw)

    def __repr__(self) -> str:
        r = self._state.result
        if r is None:
            return "<memtrack fixture (not measured yet)>"
        return (f"<memtrack fixture peak_delta={format_size(r.peak)} "
                f"retained={format_size(r.retained, signed=True)}>")


@pytest.fixture(name="memtrack")
def memtrack_fixture(request: pytest.FixtureRequest) -> MemtrackFixture:
    """Measure this test's memory; see :class:`MemtrackFixture`."""
    state = request.node.stash.get(_STATE, None)
    if state is None:  # asked for by getfixturevalue(): too late to measure the body
        state = _TestState(request.node, None)
        request.node.stash[_STATE] = state
        state.open_table()
    return MemtrackFixture(state)


# --------------------------------------------------------------------------------------
# Checks: limits and baseline

def _top_phases(phases: dict[str, Any]) -> str:
    if not phases:
        return "(no phases ran)"
    top = sorted(phases.items(), key=lambda kv: (-kv[1].max_peak_delta, kv[0]))[:TOP_PHASES]
    return ", ".join(f"{path} {format_size(s.max_peak_delta, signed=True)}" for path, s in top)


def _over_limits(m: Measurement, limits: Limits) -> list[str]:
    lines: list[str] = []

    def fail(text: str, key: str, phases: dict[str, Any], scope: str = "largest phases") -> None:
        lines.append(f"memtrack: {text} ({key}={limits.texts[key]})")
        lines.append(f"  {scope}: {_top_phases(phases)}")

    sizes = limits.sizes
    if "peak" in sizes and m.peak > sizes["peak"]:
        fail(f"peak {format_size(m.peak)} is over the limit {format_size(sizes['peak'])}",
             "peak", m.phases)
    if "retained" in sizes and m.retained > sizes["retained"]:
        fail(f"retained {format_size(m.retained)} is over the limit "
             f"{format_size(sizes['retained'])}", "retained", m.phases)
    no_workers = ("no worker joined the test's table: pools started inside the test join it "
                  "through MEMTRACK_TABLE (a forkserver started before the test does not)")
    for key in ("worker_peak", "pool_peak"):
        if key not in sizes:
            continue
        if m.worker_peak is None:  # no worker, or none whose slot could be read
            lines.append(f"memtrack: {key}={limits.texts[key]} is set, but {no_workers}")
            continue
        if key == "worker_peak" and m.worker_peak > sizes[key]:
            w = m.peak_worker
            fail(f"worker {w.pid} peaked at {format_size(w.peak_rss)}, over the limit "
                 f"{format_size(sizes[key])}", key, w.phases, f"largest phases of worker {w.pid}")
        if key == "pool_peak" and m.pool_peak is None:
            lines.append(f"memtrack: {key}={limits.texts[key]} is set, but no worker was seen "
                         f"alive (the table is sampled every {POOL_INTERVAL * 1000:g} ms)")
        elif key == "pool_peak" and m.pool_peak > sizes[key]:
            fail(f"pool peak {format_size(m.pool_peak)} is over the limit "
                 f"{format_size(sizes[key])}", key, m.worker_phases(), "largest worker phases")
    for path, limit in sorted(limits.phases.items()):
        key = f"phases[{path!r}]"
        seen = m.phase_peak(path)
        if seen is None:
            ran = sorted(set(m.phases) | set(m.worker_phases()))
            lines.append(f"memtrack: phase {path} never ran in this test (limit {key}="
                         f"{limits.texts[key]}); phases that ran: {', '.join(ran) or 'none'}")
        elif seen > limit:
            where = m.phases if path in m.phases else m.worker_phases()
            fail(f"phase {path} peaked at {format_size(seen, signed=True)}, over the limit "
                 f"{format_size(limit)}", key, where)
    return lines


def _baseline_entry(m: Measurement, limits: Limits | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"peak": m.peak}
    phases = {p: m.phase_peak(p) for p in sorted(limits.phases)} if limits else {}
    phases = {p: v for p, v in phases.items() if v is not None}
    if phases:
        entry["phases"] = phases
    return entry


def _compare(entry: dict[str, Any], old: dict[str, Any], settings: Settings
             ) -> tuple[str, list[str], list[str]]:
    """Status ("ok", "over", "improved"), the failure lines and the improvement lines."""
    over: list[str] = []
    better: list[str] = []
    pairs = [("peak", entry.get("peak"), old.get("peak"))]
    for path, value in entry.get("phases", {}).items():
        pairs.append((f"phase {path}", value, old.get("phases", {}).get(path)))
    for what, now, was in pairs:
        if now is None or was is None:  # a phase the baseline does not have yet
            continue
        change = f"{(now - was) / was:+.0%}" if was > 0 else "new"
        if now > was * (1 + settings.tolerance) and now - was > settings.floor:
            over.append(f"memtrack: {what} {format_size(now)} is {format_size(now - was)} over "
                        f"the baseline {format_size(was)} ({change}; allowed "
                        f"{settings.tolerance:.0%} and {format_size(settings.floor)})")
        elif now < was * (1 - settings.tolerance) and was - now > settings.floor:
            better.append(f"{what} {format_size(was)} -> {format_size(now)} ({change})")
    status = "over" if over else ("improved" if better else "ok")
    return status, over, better


#: The largest number of bytes a baseline may hold (a signed 64-bit count).
MAX_BYTES = 2**63 - 1
_TOP_FIELDS = {"format", "tests"}
_ENTRY_FIELDS = {"peak", "phases"}
_MISSING = object()  #: a field that is not there
_UNSET = object()    #: no value to show
_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean",
               int: "integer", float: "float", type(None): "null"}


def _baseline_error(path: Path, problem: str, nodeid: str | None = None,
                    field: str | None = None, value: Any = _UNSET) -> pytest.UsageError:
    """``memtrack: baseline FILE, entry 'NODEID', field 'peak': PROBLEM, got 1.5 (float)``:
    the one form of every complaint about a baseline file (entry, field and value where
    they apply)."""
    where = f"memtrack: baseline {path}"
    if nodeid is not None:
        where += f", entry {nodeid!r}"
    if field is not None:
        where += f", field {field!r}"
    if value is _MISSING:
        problem += ", but the field is missing"
    elif value is not _UNSET:
        try:
            shown = json.dumps(value)
        except RecursionError:  # nested almost as deep as json.loads allows
            shown = "[[[..." if isinstance(value, list) else "{...}"
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        kind = _JSON_TYPES.get(type(value), type(value).__name__)
        problem += f", got {shown}" + (f" ({kind})" if kind != shown else "")
    return pytest.UsageError(f"{where}: {problem}")


def _load_baseline(path: Path) -> dict[str, dict[str, Any]]:
    """The ``tests`` of the baseline at `path`, every entry checked; {} when there is no file.

    Anything else (unreadable, not UTF-8, not JSON, another format, an entry or a field of
    the wrong type, a peak that is not a whole number of bytes in 0..MAX_BYTES, a field
    this format does not have) is a pytest.UsageError that names the file, the entry and
    the field. It is raised at session start, before any test runs, so a gate never
    silently compares nothing, and --memtrack-update-baseline never overwrites a file it
    could not read. Unknown fields are rejected, not ignored: the writer would drop them,
    and a misspelt "phases" would otherwise turn its checks off without a word."""
    top = f'an object {{"format": "{BASELINE_FORMAT}", "tests": {{...}}}}'
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except UnicodeDecodeError as e:
        raise _baseline_error(path, f"not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                                    f"{e.start})") from None
    except OSError as e:
        raise _baseline_error(path, f"cannot read it: {e.strerror or e}") from None
    if not text.strip():
        raise _baseline_error(path, f"the file is empty; expected {top}")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:  # also too many digits, too deeply nested
        raise _baseline_error(path, f"cannot read it as JSON: {e}") from None
    if not isinstance(data, dict):
        raise _baseline_error(path, f"expected {top}", value=data)
    if data.get("format", _MISSING) != BASELINE_FORMAT:
        raise _baseline_error(path, f'expected "{BASELINE_FORMAT}"', field="format",
                              value=data.get("format", _MISSING))
    tests = data.get("tests", _MISSING)
    if not isinstance(tests, dict):
        raise _baseline_error(path, "expected an object {test id: entry}", field="tests",
                              value=tests)
    unknown = (f"unknown field; {BASELINE_FORMAT} has only 'format' and 'tests', an entry "
               "only 'peak' and 'phases' (remove it: an update would not keep it)")
    extra = sorted(data.keys() - _TOP_FIELDS)
    if extra:
        raise _baseline_error(path, unknown, field=extra[0])
    size = "a whole number of bytes (0 to 2**63 - 1)"
    for nodeid, entry in tests.items():
        if not isinstance(entry, dict):
            raise _baseline_error(path, 'expected an object such as {"peak": 1048576}',
                                  nodeid, value=entry)
        extra = sorted(entry.keys() - _ENTRY_FIELDS)
        if extra:
            raise _baseline_error(path, unknown, nodeid, extra[0])
        phases = entry.get("phases", {})
        if not isinstance(phases, dict):
            raise _baseline_error(path, "expected an object {phase path: bytes}", nodeid,
                                  "phases", phases)
        values = [("peak", entry.get("peak", _MISSING))]
        values += [(f"phases[{p!r}]", v) for p, v in phases.items()]
        for name, value in values:
            if type(value) is not int or not 0 <= value <= MAX_BYTES:  # bool is not a size
                raise _baseline_error(path, f"expected {size}", nodeid, name, value)
    return tests


def _write_baseline(path: Path, tests: dict[str, dict[str, Any]]) -> None:
    """Write atomically (a reader sees the old file or the new one, never a part); the
    file keeps its mode, a new one gets the umask's."""
    text = json.dumps({"format": BASELINE_FORMAT, "tests": tests}, indent=2, sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, [(text + "\n").encode("utf-8")])


# --------------------------------------------------------------------------------------
# The session plugin

def _report_data(m: Measurement, state: _TestState) -> dict[str, Any]:
    """What goes on the call report: plain JSON types, so that xdist can carry it."""
    w = m.peak_worker
    return {
        "peak": m.peak,
        "retained": m.retained,
        "peak_rss": m.peak_rss,
        "runs": m.runs,
        "phases": {p: s.max_peak_delta for p, s in m.phases.items()},
        "workers": len(m.workers),
        "worker_peak": m.worker_peak,
        "worker_pid": w.pid if w is not None else None,
        "pool_peak": m.pool_peak,
        "worker_phases": {p: s.max_peak_delta for p, s in m.worker_phases().items()},
        "baseline": state.report,
    }


class MemtrackSession:
    """The plugin's hooks for one session (registered by ``pytest_configure``)."""

    def __init__(self, config: pytest.Config, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        self.is_xdist_worker = hasattr(config, "workerinput")
        self.baseline: dict[str, dict[str, Any]] = {}
        self.baseline_found = False
        if settings.baseline is not None:
            self.baseline = _load_baseline(settings.baseline)
            self.baseline_found = settings.baseline.exists()
        self.results: dict[str, dict[str, Any]] = {}
        self.passed: set[str] = set()
        self.failed: set[str] = set()
        self.written: dict[str, int] = {}

    # which tests are measured -----------------------------------------------------

    def _wants(self, item: pytest.Item) -> bool:
        return (self.settings.measure_all or "memtrack" in getattr(item, "fixturenames", ())
                or item.get_closest_marker("memtrack") is not None)

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Iterator[None]:
        error = None
        if self._wants(item):
            try:
                limits = _limits(item)
            except _MarkerError as e:
                error = f"memtrack marker: {e}"
            else:
                state = _TestState(item, limits)
                item.stash[_STATE] = state
                if "memtrack" in getattr(item, "fixturenames", ()) or (
                        limits and limits.needs_table):
                    state.open_table()
        result = yield
        if error is not None:  # after the other plugins' setup, whose teardown will run
            pytest.fail(error, pytrace=False)
        return result

    @pytest.hookimpl(wrapper=True, trylast=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Iterator[None]:
        try:
            return (yield)
        finally:
            state = item.stash.get(_STATE, None)
            if state is not None:
                state.close_table()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Iterator[None]:
        state = item.stash.get(_STATE, None)
        if state is None:
            return (yield)
        if _core.is_disabled():
            item.warn(pytest.PytestWarning(
                "memtrack is disabled (MEMTRACK_DISABLE): this test's memory is not checked"))
            return (yield)
        for _ in range(self.settings.repeat - 1):
            with state.measuring():
                item.runtest()
        with state.measuring():
            result = yield
        problems = self._check(item, state)
        if problems:
            pytest.fail("\n".join(problems), pytrace=False)
        return result

    def _check(self, item: pytest.Item, state: _TestState) -> list[str]:
        """The lines of every limit and baseline the passed test went over."""
        m = state.result
        assert m is not None
        problems = _over_limits(m, state.limits) if state.limits else []
        if self.settings.baseline is None:
            return problems
        entry = _baseline_entry(m, state.limits)
        old = self.baseline.get(item.nodeid)
        if old is None:
            state.report = {"status": "new", "entry": entry}
            return problems
        status, over, better = _compare(entry, old, self.settings)
        state.report = {"status": status, "entry": entry, "old": old, "better": better,
                        "over": over}
        if over and not self.settings.update:
            problems += over
            problems.append(f"  largest phases: {_top_phases(m.phases)}")
        return problems

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]
                                  ) -> Iterator[pytest.TestReport]:
        report = yield
        state = item.stash.get(_STATE, None)
        if call.when == "call" and state is not None and state.result is not None:
            report.memtrack = _report_data(state.result, state)  # type: ignore[attr-defined]
        return report

    # the controller: collect, summarise, write -------------------------------------

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.failed:
            self.failed.add(report.nodeid)
        if report.when == "call":
            if report.passed:
                self.passed.add(report.nodeid)
            data = getattr(report, "memtrack", None)
            if isinstance(data, dict):
                self.results[report.nodeid] = data

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.settings.update and not self.is_xdist_worker:
            self.written = self._update_baseline()

    def _update_baseline(self) -> dict[str, int]:
        """Write the baseline: the old entries, with those of the tests that passed this
        time and went outside the tolerance (or are new) replaced by what they measured.
        An entry within the tolerance stays as it was, so that the file changes only where
        the memory did; a failing test keeps its old entry."""
        assert self.settings.baseline is not None
        tests = dict(self.baseline)
        counts = {"new": 0, "changed": 0, "failed": 0}
        for nodeid, data in self.results.items():
            compared = data.get("baseline")
            if nodeid in self.failed or nodeid not in self.passed or compared is None:
                counts["failed"] += nodeid in self.failed
                continue
            entry = compared["entry"]
            old = tests.get(nodeid)
            if compared["status"] == "ok" and old is not None and \
                    set(old.get("phases", {})) == set(entry.get("phases", {})):
                continue
            if old is None:
                counts["new"] += 1
            elif old != entry:
                counts["changed"] += 1
            tests[nodeid] = entry
        _write_baseline(self.settings.baseline, tests)
        counts["total"] = len(tests)
        return counts

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        s = self.settings
        if not s.measure_all:
            return []
        caps = _core.capabilities()
        method = ("exact (kernel high-water mark)" if caps["peak_method"] == "kernel"
                  else f"sampled every {caps['sampler_interval'] * 1000:g} ms")
        line = f"memtrack: peaks {method}"
        if s.repeat > 1:
            line += f", median of {s.repeat} runs"
        if s.baseline is not None:
            line += (f"; baseline {s.baseline} (tolerance {s.tolerance:.0%} and "
                     f"{format_size(s.floor)}{', updating' if s.update else ''})")
        return [line]

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.is_xdist_worker:
            return
        if self.settings.report:
            self._summary_top(terminalreporter)
        if self.settings.baseline is not None:
            self._summary_baseline(terminalreporter)

    def _summary_top(self, tr: Any) -> None:
        ranked = sorted(self.results.items(), key=lambda kv: (-kv[1]["peak"], kv[0]))
        shown = ranked[:self.settings.top]
        runs = max((d["runs"] for d in self.results.values()), default=1)
        title = f"memtrack: largest peaks ({len(shown)} of {len(ranked)} measured tests"
        title += f", median of {runs} runs)" if runs > 1 else ")"
        tr.write_sep("=", title)
        if not shown:
            tr.write_line("no test was measured")
            return
        tr.write_line(f"{'peak':>10}  {'retained':>10}  test")
        indent = " " * 24
        for nodeid, d in shown:
            tr.write_line(f"{format_size(d['peak']):>10}  "
                          f"{format_size(d['retained'], signed=True):>10}  {nodeid}")
            if d["phases"]:
                tr.write_line(f"{indent}phases: {_top_values(d['phases'])}")
            if d["workers"]:
                tr.write_line(f"{indent}workers: {d['workers']}, largest peak "
                              f"{format_size(d['worker_peak'])} (pid {d['worker_pid']}), "
                              f"pool peak {format_size(d['pool_peak'])}")
                if d["worker_phases"]:
                    tr.write_line(f"{indent}worker phases: {_top_values(d['worker_phases'])}")

    def _summary_baseline(self, tr: Any) -> None:
        path = self.settings.baseline
        compared = {n: d["baseline"] for n, d in self.results.items() if d.get("baseline")}
        by_status: dict[str, list[str]] = {}
        for nodeid, b in sorted(compared.items()):
            by_status.setdefault(b["status"], []).append(nodeid)
        tr.write_sep("-", "memtrack baseline")
        counts = ", ".join(f"{len(by_status.get(k, []))} {label}" for k, label in (
            ("ok", "within tolerance"), ("over", "over"), ("improved", "improved"),
            ("new", "not in the baseline")))
        tr.write_line(f"{path}: {counts}")
        for nodeid in by_status.get("improved", []):
            tr.write_line(f"  improved {nodeid}: {'; '.join(compared[nodeid]['better'])}")
        if self.settings.update:
            for nodeid in by_status.get("over", []):
                lines = [line.removeprefix("memtrack: ") for line in compared[nodeid]["over"]]
                tr.write_line(f"  accepted {nodeid}: {'; '.join(lines)}")
            w = self.written
            tr.write_line(f"wrote {path}: {w['total']} tests ({w['new']} new, {w['changed']} "
                          f"changed); {w['failed']} failing tests not written")
        elif by_status.get("improved") or (by_status.get("new") and self.baseline_found):
            tr.write_line("record the new numbers with --memtrack-update-baseline")
        elif not self.baseline_found:
            tr.write_line(f"no baseline at {path} yet: write it with --memtrack-update-baseline")


def _top_values(peaks: dict[str, int]) -> str:
    top = sorted(peaks.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_PHASES]
    return ", ".join(f"{path} {format_size(v, signed=True)}" for path, v in top)
