"""Insights: what a profile says to do about memory, with the evidence and the bytes it saves.

:func:`insights` reads a :class:`memtrack.Profile` (a recording of a worker pool, or a
``dump()`` of one process) and returns a list of :class:`Insight`, most severe first:

=================  ========================================================================
``leak``           a worker whose memory after each task grows steadily
``duplicated_state`` workers that each retain about the same memory after their first phase
``worker_count``   the pool ran more (or far fewer) workers than this host affords
``transient_spike`` a phase whose peak is far above what it retains
``hot_phase``      the phase holding the largest share of the pool's peak
=================  ========================================================================

How each is computed, and which records it needs, is in ``docs/report.md``. The profile
comes from a file, so every field is checked: a record with a missing or ill-typed field
is left out of the analysis, never a crash.

:func:`digest` is the reduction the insights and the report share: per-worker rows, a
per-phase table, the pool timeline and its peak.
"""

from __future__ import annotations

import bisect
import math
import os
import socket
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .._series import evenly_spaced
from .._sizes import format_size, parse_size
from .._trend import kendall_tau, mann_kendall_z, theil_sen
from ..sizing import check_count, check_headroom
from .files import PhaseSummary, combine, summarise_by_path

__all__ = ["Insight", "Run", "SEVERITIES", "digest", "insights"]

#: From least to most severe.
SEVERITIES = ("info", "warning", "critical")

MiB = 1024 * 1024

# Thresholds. Each is documented in docs/report.md; tests pin the behaviour on both sides.

#: leak: tasks needed after the first one (the first often builds per-worker state).
LEAK_MIN_TASKS = 8
#: leak: the growth must be material: at least this many bytes over the run...
LEAK_MIN_GROWTH = 4 * MiB
#: ...and at least this share of the worker's memory (RSS moves by pages and arenas).
LEAK_MIN_SHARE = 0.05
#: leak: the growth must be significant: Mann-Kendall z of retained memory against task
#: order (with the correction for ties) at least this (one-sided p < 0.01).
LEAK_MIN_Z = 2.33
#: leak: each half of the run must grow at this fraction of the whole run's slope, so that
#: one jump (a cache filled once) is not a leak.
LEAK_HALF_SLOPE = 0.25
#: leak: at most this many points per worker enter the O(n^2) robust fit.
LEAK_MAX_POINTS = 200

#: duplicated_state: least memory a worker retains after its first phase, bytes.
DUP_MIN_RETAINED = 16 * MiB
#: duplicated_state: "about the same" = within this fraction of the median.
DUP_TOLERANCE = 0.2
#: duplicated_state: the share of workers that must agree.
DUP_MIN_AGREEING = 0.75

#: transient_spike: least transient memory (peak above start, minus retained), bytes.
SPIKE_MIN_TRANSIENT = 16 * MiB
#: transient_spike: the peak must be at least this many times what the phase retains.
SPIKE_MIN_RATIO = 3.0
#: transient_spike: a nested phase whose transient is this share of its parent's explains it.
SPIKE_CHILD_EXPLAINS = 0.8
#: transient_spike: at most this many phases are reported.
SPIKE_MAX_REPORTED = 3

#: worker_count: an under-sized pool is reported when the plan allows this many more
#: workers and at least this factor more.
UNDER_MIN_EXTRA = 2
UNDER_MIN_FACTOR = 1.25

#: hot_phase: least share of the pool peak that one phase adds (peak above its start, in
#: every worker running it at once), and least bytes it adds in one worker.
HOT_MIN_SHARE = 0.25
HOT_MIN_ADDED = 4 * MiB

#: severity: savings of at least these shares of the machine's memory (the cgroup limit
#: when there is one, else the host's total) are critical / a warning, else info.
CRITICAL_SHARE = 0.10
WARNING_SHARE = 0.01


@dataclass(frozen=True)
class Insight:
    """One finding: what, how bad, why we think so, and the bytes a fix would save."""

    #: "leak", "duplicated_state", "worker_count", "transient_spike" or "hot_phase".
    kind: str
    #: "info", "warning" or "critical" (see :data:`SEVERITIES`).
    severity: str
    #: One line, e.g. "Duplicated state after 'init' (Estimated Savings: ~6.0 GiB)".
    title: str
    #: What was seen and what to do, for a person.
    message: str
    #: The numbers behind it (JSON-friendly: str, int, float, bool, None, lists, dicts).
    evidence: dict[str, Any]
    #: Bytes a fix would save at the pool's peak (an estimate; 0 when not estimable).
    estimated_savings: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- field checks


def _int(value: Any) -> int | None:
    """An int field from a file, or None (bools are not ints here)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def _size(value: Any) -> int | None:
    """A size field: a non-negative int, or None."""
    value = _int(value)
    return value if value is not None and value >= 0 else None


def _num(value: Any) -> float | None:
    """A finite number from a file, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _top(path: str) -> bool:
    return "/" not in path


# --------------------------------------------------------------------------- the digest


@dataclass
class WorkerRow:
    """One worker: its final record when the recording has it, else what samples say."""

    pid: int
    state: str
    tasks: int | None
    rss: int | None
    peak_rss: int | None
    uss: int | None
    pss: int | None
    phase: str | None
    exit_code: int | None
    exit_signal: int | None
    first_seen: float | None  # seconds from the start of the run
    last_seen: float | None
    samples: int
    #: Peak over its samples and final record (the largest of peak_rss readings).
    max_peak_rss: int | None = None
    #: Its role (see :data:`ROLES`); Run.workers holds only "worker" rows.
    role: str = "worker"
    #: Killed by the kernel's OOM killer (its OOM counter rose when it died).
    oom: bool = False
    #: When its exit or death was seen (seconds from the start), None while it ran.
    ended: float | None = None


@dataclass
class DeathRow:
    """A worker that ended abnormally, and whether it was the first or a bystander."""

    pid: int
    time: float | None  # seconds from the start, when seen
    #: "oom" (the kernel OOM killer), "signal" or "exit code".
    how: str
    exit_signal: int | None
    exit_code: int | None
    phase: str | None
    rss: int | None
    peak_rss: int | None
    tasks: int | None
    #: The first worker to die: what broke the pool.
    culprit: bool = False
    #: Stopped by the pool after the culprit died (SIGTERM from the executor).
    stopped_by_pool: bool = False

    @property
    def description(self) -> str:
        from ..pool.forensics import describe_exit

        if self.how == "oom":
            return "killed by the kernel OOM killer (SIGKILL)"
        return describe_exit(self.exit_code, self.exit_signal, "killed")


@dataclass
class PhaseRow:
    """One phase path, aggregated over every process that ran it."""

    path: str
    count: int
    total_time: float
    max_peak_rss: int
    max_peak_delta: int
    total_rss_delta: int
    #: How many processes ran it (workers, plus the recording process).
    processes: int

    @property
    def mean_rss_delta(self) -> float:
        return self.total_rss_delta / self.count if self.count else 0.0


@dataclass
class PoolPoint:
    """The pool at one moment: live workers and their summed memory."""

    time: float  # seconds from the start of the run
    live: int
    rss: int
    pss: int | None
    peak_rss: int | None = None
    #: Some worker's PSS in this sum is estimated from its RSS change since its last reading.
    pss_estimated: bool = False


@dataclass
class Interval:
    """A process was in ``phase`` from ``start`` to ``end`` (seconds from the start)."""

    pid: int
    phase: str
    start: float
    end: float


@dataclass
class Run:
    """A profile reduced to what reports and insights need (see :func:`digest`)."""

    header: dict[str, Any]
    kind: str
    #: The monotonic time taken as 0 (the earliest record); None without timed records.
    t0: float | None
    duration: float
    workers: list[WorkerRow]
    phases: list[PhaseRow]
    #: Pool totals over time, oldest first.
    pool: list[PoolPoint]
    #: "pool records", "worker samples" or None.
    pool_source: str | None
    #: The pool's peak (by PSS when known, else by RSS); None without a pool timeline.
    peak: PoolPoint | None
    #: The point with the largest RSS sum. PSS is read less often than RSS (a descendant's
    #: every few rounds), so a short rise can show in RSS and not yet in PSS.
    rss_peak: PoolPoint | None
    #: The most workers alive at once.
    max_live: int
    #: pid -> "main" (the recording process), "worker" or "process" (another one).
    roles: dict[int, str]
    #: pid -> its samples, oldest first, times from the start of the run.
    samples: dict[int, list[dict[str, Any]]]
    #: pid -> (time, retained) after each task, oldest first, and where they came from.
    tasks: dict[int, list[tuple[float, int]]]
    tasks_source: str | None
    task_phases: dict[int, list[str]]
    #: Phases on the time axis (for the HTML timeline).
    intervals: list[Interval]
    #: Largest memory of the non-worker processes (summed peak PSS, else RSS), or None.
    main_peak: int | None
    #: pid -> RSS when it joined the pool (join event, else its first sample).
    baselines: dict[int, int]
    truncated: str | None = None
    #: Records left out because a field was missing or of the wrong type.
    skipped: int = 0
    #: The processes that are not workers and not memtrack itself: root, helpers, others.
    processes: list[WorkerRow] = field(default_factory=list)
    #: Workers that ended abnormally, the culprit (the first to die) first.
    deaths: list[DeathRow] = field(default_factory=list)
    #: Task events the workers' rings overflowed before the recorder drained them.
    events_dropped: int = 0
    #: The phase table of the processes insights are about: the workers' phases, or in a
    #: profile without workers (a dump(), a one-process run) every phase.
    subject_phases: list[PhaseRow] = field(default_factory=list)
    #: The machine's memory that severity is a share of.
    machine_memory: int | None = None
    #: pid -> tasks a worker did (its record or its latest task event).
    task_counts: dict[int, int] = field(default_factory=dict)

    @property
    def peak_bytes(self) -> int | None:
        """The pool peak in bytes (PSS when known), else the largest process peak."""
        if self.peak is not None:
            return self.peak.pss if self.peak.pss is not None else self.peak.rss
        peaks = [p.max_peak_rss for p in self.phases]
        peaks += [w.max_peak_rss for w in self.workers if w.max_peak_rss is not None]
        return max(peaks) if peaks else None

    def at(self, time: float) -> dict[int, dict[str, Any]]:
        """The latest sample of each process at or before ``time`` that is still alive."""
        if not self._times:
            self._times.update(
                {pid: [r["time"] for r in rows] for pid, rows in self.samples.items()})
        out = {}
        for pid, rows in self.samples.items():
            i = bisect.bisect_right(self._times[pid], time + 1e-9) - 1
            if i < 0:
                continue
            end = self._ends.get(pid)
            if end is not None and end < time:
                continue
            out[pid] = rows[i]
        return out

    _ends: dict[int, float] = field(default_factory=dict)
    _times: dict[int, list[float]] = field(default_factory=dict)


def as_profile(profile: Any) -> Any:
    if isinstance(profile, (str, os.PathLike)):
        from .files import load

        return load(profile, partial=True)
    if not all(hasattr(profile, name) for name in ("header", "samples", "workers", "events")):
        raise TypeError(
            "profile must be a path or a memtrack.Profile (memtrack.load()), "
            f"not {type(profile).__name__}"
        )
    return profile


#: The roles a process can have (docs/report.md, "Roles"): decided by the recorder, once,
#: and written into the profile. ``tool`` (memtrack run's own process) is in no figure.
ROLES = ("tool", "root", "worker", "helper", "other")
#: What an older profile without roles says, mapped to a role: by the sample's source.
_LEGACY_ROLES = {"self": "root", "root": "root", "worker": "worker", "proc": "worker"}


def _clean_samples(raw: Iterable[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The samples with every field checked (samples are most of a recording: inline)."""
    samples: list[dict[str, Any]] = []
    skipped = 0
    for r in raw:
        get = r.get
        time, pid, rss = get("time"), get("pid"), get("rss")
        if (type(time) not in (int, float) or not -math.inf < time < math.inf
                or type(pid) is not int or type(rss) is not int or rss < 0):
            skipped += 1
            continue
        peak, pss, uss = get("peak_rss"), get("pss"), get("uss")
        source, phase, role = get("source"), get("phase"), get("role")
        samples.append({
            "time": float(time), "pid": pid,
            "source": source if type(source) is str else "proc", "rss": rss,
            "role": role if role in ROLES else None,
            "peak_rss": peak if type(peak) is int and peak >= 0 else None,
            "pss": pss if type(pss) is int and pss >= 0 else None,
            "uss": uss if type(uss) is int and uss >= 0 else None,
            "pss_estimated": get("pss_estimated") is True,
            "phase": phase if type(phase) is str else None,
        })
    return samples, skipped


def _clean_events(raw: Iterable[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    events: list[dict[str, Any]] = []
    skipped = 0
    for r in raw:
        time, kind = _num(r.get("time")), _str(r.get("kind"))
        if time is None or kind is None:
            skipped += 1
            continue
        role = r.get("role")
        events.append({
            "time": time, "kind": kind, "pid": _int(r.get("pid")), "phase": _str(r.get("phase")),
            "rss": _size(r.get("rss")), "peak_rss": _size(r.get("peak_rss")),
            "retained": _size(r.get("retained")), "exit_code": _int(r.get("exit_code")),
            "exit_signal": _int(r.get("exit_signal")), "tasks": _size(r.get("tasks")),
            "state": _str(r.get("state")), "role": role if role in ROLES else None,
            "oom": r.get("oom") is True, "count": _size(r.get("count")),
        })
    return events, skipped


def _clean_pools(raw: Iterable[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    pools: list[dict[str, Any]] = []
    skipped = 0
    for r in raw:
        time, live, rss = _num(r.get("time")), _size(r.get("live")), _size(r.get("rss"))
        if time is None or live is None or rss is None:
            skipped += 1
            continue
        pools.append({"time": time, "live": live, "rss": rss, "pss": _size(r.get("pss")),
                      "peak_rss": _size(r.get("peak_rss")),
                      "pss_estimated": r.get("pss_estimated") is True,
                      "root_rss": _size(r.get("root_rss")), "root_pss": _size(r.get("root_pss")),
                      "others_pss": _size(r.get("others_pss"))})
    return pools, skipped


def _decide_roles(samples, events, records, header) -> dict[int, str]:
    """pid -> role. A recording says each process's role (the final records last, since
    a Manager is known for one only once it listens); an older profile's roles are
    inferred from where its samples came from and which processes had worker events."""
    roles: dict[int, str] = {}
    said: dict[int, str] = {}
    for row in (*samples, *events):
        if row["pid"] is not None and row["role"] is not None:
            said[row["pid"]] = row["role"]
    for w in records:
        pid, role = _int(w.get("pid")), w.get("role")
        if pid is not None and role in ROLES:
            said[pid] = role
    header_pid = _int(header.get("pid"))
    for s in samples:
        pid = s["pid"]
        if pid in said or roles.get(pid) == "worker":
            continue
        roles[pid] = _LEGACY_ROLES.get(s["source"], "other")
    for w in records:
        pid = _int(w.get("pid"))
        if pid is not None and pid not in said:
            roles[pid] = "worker"
    for e in events:
        # An older profile writes join/exit/death/task events for pool workers only.
        pid = e["pid"]
        if (pid is not None and pid not in said and pid != header_pid
                and roles.get(pid) != "root" and e["kind"] in ("join", "exit", "death", "task")):
            roles[pid] = "worker"
    roles.update(said)
    if header_pid is not None and header_pid not in roles:
        roles[header_pid] = "root"
    return roles


def _time_base(header, samples, events, pools, phase_records) -> tuple[float | None, float]:
    """The time taken as 0 (the earliest record) and the run's duration."""
    times = [s["time"] for s in samples] + [e["time"] for e in events] + [p["time"] for p in pools]
    times += [float(p.start) for p in phase_records]
    started = _num(header.get("started"))  # the recording's start, on the same clock
    if started is not None:
        times.append(started)
    t0 = min(times) if times else None
    end = max([*times, *(float(p.start + p.duration) for p in phase_records)], default=None)
    return t0, (end - t0) if t0 is not None and end is not None else 0.0


def _ends(events) -> tuple[dict[int, float], dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
    """When each process stopped (its exit or death event), that event, and its join."""
    ends: dict[int, float] = {}
    exits: dict[int, dict[str, Any]] = {}
    joins: dict[int, dict[str, Any]] = {}
    for e in events:
        if e["pid"] is None:
            continue
        if e["kind"] in ("exit", "death"):
            ends.setdefault(e["pid"], e["time"])
            exits.setdefault(e["pid"], e)
        elif e["kind"] == "join":
            joins.setdefault(e["pid"], e)
    return ends, exits, joins


def _baselines(roles, joins, by_pid) -> dict[int, int]:
    """pid -> a worker's RSS when it joined (its join event, else its first sample)."""
    baselines: dict[int, int] = {}
    for pid, role in roles.items():
        if role != "worker":
            continue
        if pid in joins and joins[pid]["rss"] is not None:
            baselines[pid] = joins[pid]["rss"]
        elif pid in by_pid:
            baselines[pid] = by_pid[pid][0]["rss"]
    return baselines


def _pool_peaks(pool: list[PoolPoint]) -> tuple[PoolPoint | None, PoolPoint | None]:
    """The pool's peak (by PSS when known, else by RSS) and the point of the largest RSS."""
    if not pool:
        return None, None
    if any(p.pss is not None for p in pool):
        peak = max((p for p in pool if p.pss is not None), key=lambda p: p.pss)
    else:
        peak = max(pool, key=lambda p: p.rss)
    return peak, max(pool, key=lambda p: (p.rss, p.pss or 0))


def _max_live(pool, pools, workers, ends) -> int:
    max_live = max((p.live for p in pool), default=0)
    max_live = max(max_live, _max_concurrent(workers, ends)) if not pools else max_live
    return max_live or len(workers)


def _root_peak(pools, by_pid, roles) -> int | None:
    """The root's largest PSS (fresh or estimated), else RSS: from the pool records when
    they carry it, else from its samples. The tool (memtrack run itself) is never in it."""
    values = [p["root_pss"] for p in pools if p["root_pss"]]
    if values:
        return max(values)
    peaks = [max(r["pss"] if r["pss"] is not None else r["rss"] for r in rows)
             for pid, rows in by_pid.items() if roles.get(pid) == "root" and rows]
    return sum(peaks) if peaks else None


def digest(profile: Any) -> Run:
    """Reduce a profile (a :class:`memtrack.Profile` or a path) to a :class:`Run`."""
    profile = as_profile(profile)
    header = dict(profile.header) if isinstance(profile.header, Mapping) else {}
    # Clean the timed records first: everything below trusts these.
    samples, skipped_samples = _clean_samples(profile.samples)
    events, skipped_events = _clean_events(profile.events)
    pools, skipped_pools = _clean_pools(getattr(profile, "pools", None) or ())
    raw_records = [*profile.workers, *(getattr(profile, "processes", None) or ())]
    records = [w for w in raw_records if isinstance(w, Mapping)]
    skipped = (skipped_samples + skipped_events + skipped_pools
               + len(raw_records) - len(records))
    phase_records = list(getattr(profile, "phases", None) or ())

    t0, duration = _time_base(header, samples, events, pools, phase_records)

    def rel(t: float) -> float:
        return t - t0 if t0 is not None else t

    for row in (*samples, *events, *pools):
        row["time"] = rel(row["time"])
    samples.sort(key=lambda s: s["time"])
    events.sort(key=lambda e: e["time"])
    pools.sort(key=lambda p: p["time"])

    roles = _decide_roles(samples, events, records, header)
    # The tool (memtrack run's own process) is in no figure: drop it here, once.
    samples = [s for s in samples if roles.get(s["pid"]) != "tool"]
    by_pid: dict[int, list[dict[str, Any]]] = {}
    for s in samples:
        by_pid.setdefault(s["pid"], []).append(s)
    ends, exits, joins = _ends(events)

    rows = _worker_rows(records, roles, by_pid, events, exits, t0)
    workers = [w for w in rows if w.role == "worker"]
    processes = [w for w in rows if w.role in ("root", "helper", "other")]
    phases = _phase_rows(records, profile)
    has_workers = any(role == "worker" for role in roles.values())
    subject_phases = _phase_rows(
        [w for w in records if roles.get(_int(w.get("pid")), "worker") == "worker"],
        profile, summary=False) if has_workers else phases
    # A process first seen between its fork and its exec (a resource tracker) counted as a
    # worker in the pool records of its first rounds: with the final roles, recount.
    recount = any(s["role"] is not None and s["role"] != roles.get(s["pid"]) for s in samples)
    pool, pool_source = _pool_timeline([] if recount else pools, samples, ends, roles)
    peak, rss_peak = _pool_peaks(pool)
    tasks, task_phases, tasks_source = _task_series(events, phase_records, roles, has_workers)
    root_peak = _root_peak(pools, by_pid, roles)
    run = Run(
        header=header, kind=_str(header.get("kind")) or "unknown", t0=t0, duration=duration,
        workers=workers, phases=phases, pool=pool, pool_source=pool_source, peak=peak,
        rss_peak=rss_peak, max_live=_max_live(pool, [] if recount else pools, workers, ends),
        roles=roles,
        samples=by_pid, tasks=tasks, tasks_source=tasks_source, task_phases=task_phases,
        intervals=_intervals(by_pid, events, phase_records, rel, duration),
        main_peak=root_peak, baselines=_baselines(roles, joins, by_pid),
        truncated=profile.truncated, skipped=skipped, processes=processes,
        deaths=_deaths(rows, exits), events_dropped=_events_dropped(events, records),
        subject_phases=subject_phases, machine_memory=_machine_memory(header),
        task_counts={w.pid: w.tasks for w in rows if w.tasks is not None},
    )
    run._ends = ends
    return run


def _worker_rows(records, roles, by_pid, events, exits, t0) -> list[WorkerRow]:
    """One row per process that is not memtrack's own: its final record when there is
    one (a slot's from the table, a descendant's from /proc), else what its samples and
    events say."""
    rows: dict[int, WorkerRow] = {}
    seen: dict[int, list[float]] = {}
    for s in (*(s for rows_ in by_pid.values() for s in rows_), *events):
        if s.get("pid") is not None:
            seen.setdefault(s["pid"], []).append(s["time"])
    tasks: dict[int, int] = {}
    for e in events:
        if e["kind"] == "task" and e["pid"] is not None:
            # A task event may stand for several tasks; it says how many so far.
            count = e["tasks"] if e["tasks"] is not None else tasks.get(e["pid"], 0) + 1
            tasks[e["pid"]] = max(tasks.get(e["pid"], 0), count)
    for w in records:
        pid = _int(w.get("pid"))
        if pid is None or roles.get(pid, "worker") == "tool":
            continue
        # A worker record says "" between phases and 0 for USS/PSS before its first reading.
        rows[pid] = WorkerRow(
            pid=pid, state=_str(w.get("state")) or "unknown", tasks=_size(w.get("tasks")),
            rss=_size(w.get("rss")), peak_rss=_size(w.get("peak_rss")),
            uss=_size(w.get("uss")) or None, pss=_size(w.get("pss")) or None,
            phase=_str(w.get("phase")) or None,
            exit_code=_int(w.get("exit_code")), exit_signal=_int(w.get("exit_signal")),
            first_seen=None, last_seen=None, samples=0, role=roles.get(pid, "worker"),
            oom=w.get("oom") is True,
        )
        for key in ("joined", "updated"):
            value = _num(w.get(key))
            if value is not None and t0 is not None:
                seen.setdefault(pid, []).append(value - t0)
    for pid, role in roles.items():
        if role == "tool" or pid in rows:
            continue
        last = by_pid[pid][-1] if pid in by_pid else None
        exit_event = exits.get(pid)
        if exit_event is None:
            state = "unknown" if role == "worker" else "running"
        elif exit_event["state"]:
            state = exit_event["state"]
        elif exit_event["kind"] == "death" or exit_event["exit_signal"]:
            state = "killed"
        else:
            state = "exited"
        rows[pid] = WorkerRow(
            pid=pid, state=state, tasks=tasks.get(pid),
            rss=last["rss"] if last else (exit_event or {}).get("rss"),
            peak_rss=last["peak_rss"] if last else (exit_event or {}).get("peak_rss"),
            uss=last["uss"] if last else None, pss=last["pss"] if last else None,
            phase=(last["phase"] if last else None) or (exit_event or {}).get("phase"),
            exit_code=(exit_event or {}).get("exit_code"),
            exit_signal=(exit_event or {}).get("exit_signal"),
            first_seen=None, last_seen=None, samples=0, role=role,
        )
    for pid, row in rows.items():
        times = seen.get(pid)
        if times:
            row.first_seen, row.last_seen = min(times), max(times)
        own = by_pid.get(pid, [])
        row.samples = len(own)
        peaks = [v for s in own for v in (s["peak_rss"], s["rss"]) if v is not None]
        peaks += [v for v in (row.peak_rss, row.rss) if v is not None]
        row.max_peak_rss = max(peaks) if peaks else None
        if row.tasks is None and pid in tasks:
            row.tasks = tasks[pid]
        exit_event = exits.get(pid)
        if exit_event is not None:
            row.ended = exit_event["time"]
            row.oom = row.oom or exit_event["oom"]
            if row.exit_signal is None and exit_event["exit_signal"] is not None:
                row.exit_signal = exit_event["exit_signal"]
    return sorted(rows.values(), key=lambda r: (r.first_seen is None, r.first_seen or 0, r.pid))


#: The signal a pool sends the workers it stops (ProcessPoolExecutor and Pool terminate()).
_SIGTERM = 15


def _deaths(rows: list[WorkerRow], exits) -> list[DeathRow]:
    """The workers that ended abnormally, the first to die (the culprit) first.

    When one worker dies, ProcessPoolExecutor (and Pool.terminate) stops the others with
    SIGTERM: those are bystanders, not what broke the pool. The culprit is the earliest
    abnormal end, SIGTERM last among ends seen in the same round.
    """
    found = []
    for w in rows:
        if w.role != "worker":
            continue
        abnormal = (w.state == "killed" or w.oom or w.exit_signal is not None
                    or (w.exit_code not in (None, 0)))
        if not abnormal:
            continue
        how = ("oom" if w.oom else "signal" if w.exit_signal is not None
               else "exit code" if w.exit_code not in (None, 0) else "signal")
        found.append(DeathRow(
            pid=w.pid, time=w.ended if w.ended is not None else w.last_seen, how=how,
            exit_signal=w.exit_signal, exit_code=w.exit_code, phase=w.phase, rss=w.rss,
            peak_rss=w.max_peak_rss, tasks=w.tasks))
    if not found:
        return []
    order = sorted(found, key=lambda d: (d.time if d.time is not None else math.inf,
                                          d.exit_signal == _SIGTERM, d.pid))
    first = order[0]
    first.culprit = True
    for d in order[1:]:
        d.stopped_by_pool = d.exit_signal in (_SIGTERM, None) and d.how != "oom" and (
            first.time is None or d.time is None or d.time >= first.time)
    return order


def _events_dropped(events, records) -> int:
    """Task events lost to a full ring (a "dropped" event, or a record's count)."""
    total = sum(e["count"] or 0 for e in events if e["kind"] == "dropped")
    return total + sum(_size(w.get("events_dropped")) or 0 for w in records)


def _machine_memory(header) -> int | None:
    """The memory the recording host (or its cgroup) has: the cgroup limit when set and
    below the host's total, else the host's total."""
    limits = header.get("limits") if isinstance(header.get("limits"), Mapping) else {}
    total, limit = _size(limits.get("total")), _size(limits.get("limit"))
    if limit and (total is None or limit < total):
        return limit
    return total or None


def _phase_rows(records, profile, *, summary: bool = True) -> list[PhaseRow]:
    rows: dict[str, PhaseRow] = {}

    def add(path, count, total_time, max_peak_rss, max_peak_delta, total_rss_delta):
        row = rows.get(path)
        if row is None:
            rows[path] = PhaseRow(path, count, total_time, max_peak_rss, max_peak_delta,
                                  total_rss_delta, 1)
            return
        merged = combine([row, PhaseSummary((count, total_time, max_peak_rss, max_peak_delta,
                                             total_rss_delta, 0.0))])
        row.count, row.total_time, row.total_rss_delta = (
            merged.count, merged.total_time, merged.total_rss_delta)
        row.max_peak_rss, row.max_peak_delta = merged.max_peak_rss, merged.max_peak_delta
        row.processes += 1

    for w in records:
        phases = w.get("phases")
        if not isinstance(phases, Mapping):
            continue
        for path, p in phases.items():
            if not isinstance(path, str) or not isinstance(p, Mapping):
                continue
            count, total_time = _size(p.get("count")), _num(p.get("total_time"))
            peak, delta = _size(p.get("max_peak_rss")), _size(p.get("max_peak_delta"))
            retained = _int(p.get("total_rss_delta"))
            if None in (count, total_time, peak, delta, retained) or count < 1:
                continue
            add(path, count, total_time, peak, delta, retained)
    # The recording process's own phases: its summary, else its phase records. The
    # workers' phase table (summary=False) leaves them out.
    summaries = (getattr(profile, "summary", None) or {}) if summary else None
    if summaries:
        for path, s in summaries.items():
            if isinstance(path, str):
                add(path, s.count, s.total_time, s.max_peak_rss, s.max_peak_delta,
                    s.total_rss_delta)
    elif summaries is not None:
        # Phase records without a summary: aggregate them, one process per pid.
        by_pid: dict[int, list[Any]] = {}
        for p in getattr(profile, "phases", None) or ():
            by_pid.setdefault(p.pid, []).append(p)
        for runs in by_pid.values():
            for path, s in summarise_by_path(runs).items():
                add(path, s.count, s.total_time, s.max_peak_rss, s.max_peak_delta,
                    s.total_rss_delta)
    return sorted(rows.values(), key=lambda r: r.path)


def _pool_timeline(pools, samples, ends, roles) -> tuple[list[PoolPoint], str | None]:
    if pools:
        return [PoolPoint(p["time"], p["live"], p["rss"], p["pss"], p["peak_rss"],
                          p["pss_estimated"]) for p in pools], "pool records"
    workers = [s for s in samples if roles.get(s["pid"]) == "worker"]
    if not workers:
        return [], None
    # Rebuild the totals: one point per sampling round (a round ends when a worker is
    # sampled again), summing every live worker's latest reading. A worker stops counting
    # at its exit/death event or after its last sample, whichever is first.
    expiry: dict[int, float] = {}
    for s in workers:
        expiry[s["pid"]] = min(ends.get(s["pid"], math.inf), s["time"])
    expiring = sorted(expiry.items(), key=lambda kv: kv[1])
    next_expiry = 0
    current: dict[int, dict[str, Any]] = {}
    rss = pss = missing_pss = 0
    round_pids: set[int] = set()
    points: list[PoolPoint] = []
    points_time = workers[0]["time"]

    def emit(time: float) -> None:
        point = PoolPoint(time, len(current), rss, None if missing_pss else pss)
        if points and points[-1].time == time:
            points[-1] = point
        else:
            points.append(point)

    for s in workers:
        now, pid = s["time"], s["pid"]
        if pid in round_pids:
            emit(points_time)
            round_pids.clear()
        while next_expiry < len(expiring) and expiring[next_expiry][1] < now:
            gone = current.pop(expiring[next_expiry][0], None)
            if gone is not None:
                rss -= gone["rss"]
                if gone["pss"] is None:
                    missing_pss -= 1
                else:
                    pss -= gone["pss"]
            next_expiry += 1
        old = current.get(pid)
        if old is not None:
            rss -= old["rss"]
            if old["pss"] is None:
                missing_pss -= 1
            else:
                pss -= old["pss"]
        current[pid] = s
        rss += s["rss"]
        if s["pss"] is None:
            missing_pss += 1
        else:
            pss += s["pss"]
        round_pids.add(pid)
        points_time = now
    emit(points_time)
    return points, "worker samples"


def _max_concurrent(workers: list[WorkerRow], ends: dict[int, float]) -> int:
    edges = []
    for w in workers:
        if w.first_seen is None:
            continue
        edges.append((w.first_seen, 1))
        edges.append((ends.get(w.pid, w.last_seen or w.first_seen), -1))
    live = best = 0
    for _, step in sorted(edges, key=lambda e: (e[0], -e[1])):
        live += step
        best = max(best, live)
    return best


def _task_series(events, phase_records, roles, has_workers=True):
    """Retained memory after each task, per worker (per process in a profile without
    workers), oldest first."""
    tasks: dict[int, list[tuple[float, int]]] = {}
    names: dict[int, list[str]] = {}
    for e in events:
        if (e["kind"] == "task" and e["pid"] is not None and e["retained"] is not None
                and (roles.get(e["pid"], "worker") == "worker" or not has_workers)):
            tasks.setdefault(e["pid"], []).append((e["time"], e["retained"]))
            names.setdefault(e["pid"], []).append(e["phase"])
    if tasks:
        return tasks, names, "task events"
    # A dump() has no task events; its outermost phases are the tasks.
    for p in sorted(phase_records, key=lambda p: (p.pid, p.start)):
        if _top(p.path) and not p.error:
            tasks.setdefault(p.pid, []).append((float(p.start + p.duration), int(p.rss_end)))
            names.setdefault(p.pid, []).append(p.path)
    return tasks, names, ("phase records" if tasks else None)


def _intervals(by_pid, events, phase_records, rel, duration) -> list[Interval]:
    out: list[Interval] = []
    recorded = set()
    for p in phase_records:
        if _top(p.path):
            recorded.add(p.pid)
            start = rel(float(p.start))
            out.append(Interval(p.pid, p.path, start, start + float(p.duration)))
    changes: dict[int, list[tuple[float, str | None]]] = {}
    for e in events:
        if e["kind"] == "phase" and e["pid"] is not None and e["pid"] not in recorded:
            changes.setdefault(e["pid"], []).append((e["time"], e["phase"]))
    for pid, rows in by_pid.items():
        if pid not in recorded and pid not in changes:
            changes[pid] = [(r["time"], r["phase"]) for r in rows]
            if rows:
                changes[pid].append((rows[-1]["time"], None))
    for pid, seq in changes.items():
        open_phase, since = None, 0.0
        for time, phase in seq:
            if phase != open_phase:
                if open_phase is not None and time > since:
                    out.append(Interval(pid, open_phase, since, time))
                open_phase, since = phase, time
        if open_phase is not None and duration > since:
            out.append(Interval(pid, open_phase, since, duration))
    return sorted(out, key=lambda i: (i.pid, i.start))


# --------------------------------------------------------------------------- insights


def _severity(savings: int, run: Run) -> str:
    """How bad: the share of the machine's memory (the cgroup's limit, else the host's
    total) a fix would give back. Without the machine's size, the share of the pool peak."""
    if savings <= 0:
        return "info"
    reference = run.machine_memory or run.peak_bytes
    if not reference:
        return "warning"
    share = savings / reference
    return "critical" if share >= CRITICAL_SHARE else "warning" if share >= WARNING_SHARE \
        else "info"


def _about(n: float) -> str:
    return f"~{format_size(n)}"


def _most_common(names: Iterable[str]) -> str | None:
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return max(counts, key=lambda k: counts[k]) if counts else None


def _leak_of(run: Run, pid: int, series: list[tuple[float, int]]) -> dict[str, Any] | None:
    """The evidence that one worker leaks, or None: growth after each task that is both
    significant (robust Theil-Sen slope, Mann-Kendall trend test, both halves growing)
    and material (at least LEAK_MIN_GROWTH and LEAK_MIN_SHARE of the worker's memory)."""
    values = [v for _, v in series][1:]  # the first task builds per-worker state
    if len(values) < LEAK_MIN_TASKS:
        return None
    points = evenly_spaced(values, LEAK_MAX_POINTS)
    per_point = (len(values) - 1) / (len(points) - 1)
    slope = theil_sen(points) / per_point
    growth = slope * (len(values) - 1)
    size = max(values)
    if growth < max(LEAK_MIN_GROWTH, LEAK_MIN_SHARE * size):
        return None
    z = mann_kendall_z(points)
    half = len(points) // 2
    halves = [theil_sen(points[:half + 1]) / per_point, theil_sen(points[half:]) / per_point]
    if z < LEAK_MIN_Z or min(halves) < LEAK_HALF_SLOPE * slope:
        return None
    return {
        "pid": pid, "tasks_measured": len(values) + 1, "tasks": run.task_counts.get(pid),
        "slope_per_task": round(slope), "growth": round(growth), "size": size,
        "first_retained": series[1][1], "last_retained": series[-1][1],
        "mann_kendall_z": round(z, 2), "kendall_tau": round(kendall_tau(points), 3),
        "half_slopes": [round(h) for h in halves], "phase": _task_phase(run, pid),
    }


def _task_phase(run: Run, pid: int) -> str | None:
    """What a worker's tasks are called in the phase table: the task events' phase when
    they name one, else the worker's outermost phase that ran most often (not its
    one-off init), else None (its tasks are not in a phase)."""
    named = _most_common(p for p in run.task_phases.get(pid, [])[1:] if p)
    if named:
        return named
    top = {row.path: row.count for row in run.subject_phases if _top(row.path)}
    repeated = [path for path, count in top.items() if count > 1]
    return max(repeated, key=lambda p: top[p]) if repeated else None


def _leaks(run: Run) -> list[Insight]:
    found = [f for pid, series in sorted(run.tasks.items())
             if (f := _leak_of(run, pid, series)) is not None]
    if not found:
        return []
    savings = sum(f["growth"] for f in found)
    worst = max(found, key=lambda f: f["growth"])
    phase = worst["phase"]
    unit = f"'{phase}'" if phase else "task"
    who = (f"Worker {worst['pid']}" if len(found) == 1 else
           f"{len(found)} workers (worst: {worst['pid']})")
    source = ("after each task" if run.tasks_source == "task events"
              else "at the end of each outermost phase")
    measured = worst["tasks_measured"]
    total = worst["tasks"]
    over = (f"{measured} tasks" if total in (None, measured)
            else f"{measured} of its {total} tasks")
    dropped = (f" ({run.events_dropped} task events were dropped)"
               if run.events_dropped else "")
    message = (
        f"{who} keep{'s' if len(found) == 1 else ''} more memory {source}: "
        f"+{format_size(worst['slope_per_task'])} per {unit} (robust Theil-Sen slope over "
        f"{over}{dropped}; Mann-Kendall z {worst['mann_kendall_z']:.1f}), "
        f"{format_size(worst['growth'])} by the end, "
        f"{worst['growth'] / worst['size'] * 100:.0f}% of its {format_size(worst['size'])}. "
        "Look for caches, module-level lists or dicts that every task appends to; bound or "
        "clear them, or recycle workers (max_tasks_per_child= / maxtasksperchild=)."
    )
    title = (f"Leak in '{phase}'" if phase else "Leak across tasks")
    return [Insight(
        kind="leak", severity=_severity(savings, run),
        title=f"{title} (Estimated Savings: {_about(savings)})",
        message=message,
        evidence={"phase": phase, "workers": found, "source": run.tasks_source,
                  "events_dropped": run.events_dropped,
                  "thresholds": {"min_tasks": LEAK_MIN_TASKS, "min_growth": LEAK_MIN_GROWTH,
                                 "min_share": LEAK_MIN_SHARE, "min_z": LEAK_MIN_Z}},
        estimated_savings=int(savings),
    )]


def _first_retained(run: Run, profile: Any) -> dict[int, tuple[int, str, str]]:
    """pid -> (bytes retained by its first phase, that phase, where it came from)."""
    out: dict[int, tuple[int, str, str]] = {}
    workers = {pid for pid, role in run.roles.items() if role == "worker"}
    firsts: dict[int, Any] = {}
    for p in getattr(profile, "phases", None) or ():
        if p.pid in workers and _top(p.path) and not p.error:
            if p.pid not in firsts or p.start < firsts[p.pid].start:
                firsts[p.pid] = p
    for pid, p in firsts.items():
        out[pid] = (int(p.rss_delta), p.path, "phase records")
    # A worker's summary: the one outermost phase it ran once (an initializer's "init").
    for w in getattr(profile, "workers", None) or ():
        pid = _int(w.get("pid")) if isinstance(w, Mapping) else None
        phases = w.get("phases") if isinstance(w, Mapping) else None
        if pid is None or pid in out or not isinstance(phases, Mapping):
            continue
        once = [(path, p) for path, p in phases.items()
                if isinstance(path, str) and _top(path) and isinstance(p, Mapping)
                and _int(p.get("count")) == 1 and _int(p.get("total_rss_delta")) is not None]
        if len(once) == 1:
            out[pid] = (once[0][1]["total_rss_delta"], once[0][0], "worker summaries")
    # Task events: what the first task left behind, above the worker's RSS when it joined.
    if run.tasks_source == "task events":
        for pid, series in run.tasks.items():
            if pid in workers and pid not in out and pid in run.baselines:
                name = (run.task_phases.get(pid) or [None])[0] or _task_phase(run, pid) \
                    or "task"
                out[pid] = (series[0][1] - run.baselines[pid], name, "task events")
    return out


def _duplicated_state(run: Run, profile: Any) -> list[Insight]:
    firsts = _first_retained(run, profile)
    if len(firsts) < 2:
        return []
    values = [v for v, _, _ in firsts.values()]
    median = statistics.median(values)
    if median < DUP_MIN_RETAINED:
        return []
    agreeing = {pid: v for pid, (v, _, _) in firsts.items()
                if abs(v - median) <= DUP_TOLERANCE * median}
    if len(agreeing) < 2 or len(agreeing) < DUP_MIN_AGREEING * len(firsts):
        return []
    concurrent = min(len(agreeing), run.max_live) if run.max_live else len(agreeing)
    if concurrent < 2:
        return []
    savings = int((concurrent - 1) * median)
    phase = _most_common(firsts[pid][1] for pid in agreeing) or "first phase"
    message = (
        f"Each of {len(agreeing)} workers retains about {format_size(median)} after its first "
        f"phase '{phase}' (within ±{DUP_TOLERANCE * 100:.0f}% of the median): the same "
        "state — a config, an index, parsed input, imported modules — is built once per "
        f"worker. With {concurrent} workers alive at once that is {concurrent} copies. Build "
        "it once in the parent before the pool starts, so forked workers share its pages "
        "copy-on-write (call gc.freeze() before forking to keep them shared), or put it in "
        "shared memory (multiprocessing.shared_memory, an mmap'd file, a Manager): "
        f"saves about ({concurrent} - 1) x {format_size(median)} = {format_size(savings)}."
    )
    return [Insight(
        kind="duplicated_state", severity=_severity(savings, run),
        title=f"Duplicated state after '{phase}' (Estimated Savings: {_about(savings)})",
        message=message,
        evidence={
            "phase": phase, "median_retained": int(median), "workers": len(agreeing),
            "workers_measured": len(firsts), "concurrent_workers": concurrent,
            "retained_by_worker": {str(pid): v for pid, v in sorted(agreeing.items())},
            "source": _most_common(firsts[pid][2] for pid in agreeing),
        },
        estimated_savings=savings,
    )]


def _worker_count(run: Run, profile: Any, available: Any, cpus: int | None,
                  headroom: float) -> list[Insight]:
    from ..sizing import plan_workers

    workers = [w for w in run.workers]
    if not workers or run.max_live < 1:
        return []
    header = run.header
    limits = header.get("limits") if isinstance(header.get("limits"), Mapping) else {}
    where = "given"
    if available is None and _size(limits.get("available")) is not None:
        available, where = limits["available"], "the recording's header (limits.available)"
    if cpus is None:
        cpus = _size(header.get("cpu_limit")) or _size(header.get("cpus")) or None
    if available is None:
        if _str(header.get("host")) != socket.gethostname():
            return []  # recorded elsewhere, and we do not know that host's memory
        where = "this host (system_memory())"
    main = _size(header.get("main_pss"))
    if main is None:
        main = run.main_peak
    records = [w for w in getattr(profile, "workers", None) or () if isinstance(w, Mapping)]
    kwargs: dict[str, Any] = {"available": available, "cpus": cpus, "headroom": headroom,
                              "main": main}
    if any(_size(w.get("peak_rss")) or _size(w.get("uss")) for w in records):
        kwargs["profile"] = profile
    else:
        # No final worker records (a run cut short): size from the samples' peaks.
        peaks = [w.max_peak_rss for w in workers if w.max_peak_rss]
        if not peaks:
            return []
        kwargs["per_worker"] = max(peaks)
    try:
        plan = plan_workers(**kwargs)
    except (TypeError, ValueError):
        return []
    used = run.max_live
    evidence = {
        "workers_used": used, "recommended": plan.workers, "limited_by": plan.limited_by,
        "per_worker": plan.per_worker, "main": plan.main, "available": plan.available,
        "available_from": where, "cpus": plan.cpus, "headroom": plan.headroom,
        "fit_by_memory": plan.fit_by_memory, "plan": plan.explain(),
    }
    host = (f"this host ({format_size(plan.available)} available, {plan.cpus} CPU"
            f"{'s' if plan.cpus != 1 else ''})")
    if used > plan.workers:
        # Fewer workers cannot save more than the workers use at their peak.
        savings = (used - plan.workers) * plan.per_worker
        if run.peak_bytes:
            savings = min(savings, run.peak_bytes)
        killed = [w.pid for w in workers if w.state == "killed" or w.exit_signal]
        over_memory = run.peak_bytes is not None and run.peak_bytes > plan.available
        severity = "critical" if killed or over_memory else _severity(savings, run)
        if severity == "info":
            severity = "warning"
        evidence["killed_workers"] = killed
        message = (
            f"The pool ran {used} workers at once; at {format_size(plan.per_worker)} of "
            f"private memory per worker (its measured peak), {host} affords {plan.workers} "
            f"(bound by {plan.limited_by}). Use max_workers={plan.workers}, or size it at run "
            "time with memtrack.calculate_max_workers()"
            + (f"; {len(killed)} worker(s) were killed" if killed else "") + "."
        )
        return [Insight(
            kind="worker_count", severity=severity,
            title=f"Too many workers: {used} -> {plan.workers} "
                  f"(Estimated Savings: {_about(savings)})",
            message=message, evidence=evidence, estimated_savings=int(savings),
        )]
    if plan.workers >= used + UNDER_MIN_EXTRA and plan.workers >= UNDER_MIN_FACTOR * used:
        message = (
            f"The pool ran {used} workers at most; {host} affords {plan.workers} at "
            f"{format_size(plan.per_worker)} per worker (bound by {plan.limited_by}). If the "
            f"work is CPU-bound, up to {plan.workers} workers would finish sooner within "
            "memory."
        )
        return [Insight(
            kind="worker_count", severity="info",
            title=f"Room for more workers: {used} -> {plan.workers}",
            message=message, evidence=evidence, estimated_savings=0,
        )]
    return []


def _spikes(run: Run) -> list[Insight]:
    candidates = {}
    for row in run.subject_phases:
        retained = max(row.mean_rss_delta, 0.0)
        transient = row.max_peak_delta - retained
        if transient >= SPIKE_MIN_TRANSIENT and row.max_peak_delta >= SPIKE_MIN_RATIO * max(
                retained, 1.0):
            candidates[row.path] = (row, retained, transient)
    # A nested phase that accounts for its parent's spike is the one to fix.
    keep = []
    for path, (row, retained, transient) in candidates.items():
        explained = any(
            other.startswith(path + "/") and t >= SPIKE_CHILD_EXPLAINS * transient
            for other, (_, _, t) in candidates.items())
        if not explained:
            keep.append((row, retained, transient))
    found = []
    for row, retained, transient in keep:
        worker_phase = row.processes > 1 or bool(run.workers)
        concurrent = min(row.processes, run.max_live) if worker_phase and run.max_live else 1
        concurrent = max(concurrent, 1)
        savings = int(transient * concurrent)
        across = (f" x {concurrent} processes running it at once" if concurrent > 1 else "")
        message = (
            f"'{row.path}' peaks {format_size(row.max_peak_delta)} above the memory it started "
            f"with but keeps only {format_size(retained)} on average ({row.count} run"
            f"{'s' if row.count != 1 else ''}): {format_size(transient)} is transient, a "
            "whole intermediate result held at once. Stream or chunk it (iterate instead of "
            "building lists, read and process input in pieces, send results back "
            f"incrementally): up to {format_size(transient)}{across} = {format_size(savings)}."
        )
        found.append(Insight(
            kind="transient_spike", severity=_severity(savings, run),
            title=f"Transient spike in '{row.path}' (Estimated Savings: {_about(savings)})",
            message=message,
            evidence={"phase": row.path, "max_peak_delta": row.max_peak_delta,
                      "mean_retained": int(retained), "transient": int(transient),
                      "runs": row.count, "processes": row.processes,
                      "concurrent": concurrent, "max_peak_rss": row.max_peak_rss},
            estimated_savings=savings,
        ))
    found.sort(key=lambda i: -i.estimated_savings)
    return found[:SPIKE_MAX_REPORTED]


def _hot_phase(run: Run) -> list[Insight]:
    """The phase that adds the most to the peak: its peak above its own start (what the
    phase itself allocates, not the memory the worker already had), in each worker
    running it at once, as a share of the pool peak. A nested phase that adds most of
    its parent's rise is the one named."""
    peak = run.peak_bytes
    rows = [r for r in run.subject_phases if r.max_peak_delta >= HOT_MIN_ADDED]
    if not peak or not rows:
        return []

    def concurrent(row: PhaseRow) -> int:
        return max(1, min(row.processes, run.max_live) if run.max_live else row.processes)

    def added(row: PhaseRow) -> int:
        return row.max_peak_delta * concurrent(row)

    best = max(rows, key=lambda r: (added(r), r.path.count("/")))
    deeper = [r for r in rows if r.path.startswith(best.path + "/")
              and r.max_peak_delta >= SPIKE_CHILD_EXPLAINS * best.max_peak_delta]
    if deeper:
        best = max(deeper, key=lambda r: (r.path.count("/"), r.max_peak_delta))
    total = min(added(best), peak)
    share = total / peak
    if share < HOT_MIN_SHARE:
        return []
    n = concurrent(best)
    measure = "PSS" if run.peak is not None and run.peak.pss is not None else "peak RSS"
    across = f" x {n} workers running it at once" if n > 1 else ""
    message = (
        f"'{best.path}' rises up to {format_size(best.max_peak_delta)} above the memory it "
        f"starts with{across} = {format_size(total)}, {share * 100:.0f}% of the "
        f"{format_size(peak)} pool peak ({measure}); it keeps "
        f"{format_size(max(best.mean_rss_delta, 0))} per run on average. Start there: what "
        "it allocates sets the peak."
    )
    return [Insight(
        kind="hot_phase", severity="info",
        title=f"Hot phase: '{best.path}' adds {share * 100:.0f}% of the peak",
        message=message,
        evidence={"phase": best.path, "share": round(share, 4), "bytes": total,
                  "max_peak_delta": best.max_peak_delta,
                  "mean_retained": int(best.mean_rss_delta), "concurrent": n,
                  "pool_peak": peak, "measure": measure.lower()},
        estimated_savings=0,
    )]


def insights(
    profile: Any,
    *,
    available: int | str | None = None,
    cpus: int | None = None,
    headroom: float = 0.0,
) -> list[Insight]:
    """What a profile says to do, most severe (then largest saving) first.

    ``profile`` is a :class:`memtrack.Profile` or a path. ``available``, ``cpus`` and
    ``headroom`` override the host the worker-count plan is made for; by default it is the
    recording host, from the header's ``limits`` and ``cpu_limit``.
    """
    # Bad options are the caller's to fix: say so, rather than drop the worker-count insight.
    if available is not None:
        available = parse_size(available, what="available")
    if cpus is not None:
        check_count("cpus", cpus, 1)
    check_headroom(headroom)
    profile = as_profile(profile)
    return find_insights(digest(profile), profile, available=available, cpus=cpus,
                         headroom=headroom)


def find_insights(run: Run, profile: Any, *, available: int | str | None = None,
          cpus: int | None = None, headroom: float = 0.0) -> list[Insight]:
    """:func:`insights` on a profile already digested (the report digests once)."""
    found = [
        *_leaks(run),
        *_duplicated_state(run, profile),
        *_worker_count(run, profile, available, cpus, headroom),
        *_spikes(run),
        *_hot_phase(run),
    ]
    found.sort(key=lambda i: (-SEVERITIES.index(i.severity), -i.estimated_savings))
    return found
