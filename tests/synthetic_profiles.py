"""Synthetic profiles for the insight and report tests.

A profile is written record by record with ``memtrack._core.pack()`` (the same msgpack the
recorder writes) and read back with ``memtrack.profile.parse``, so every test goes through
the real reader. :func:`pool_recording` simulates a worker pool whose shape the test picks:
how much each worker keeps after ``init``, how far ``task/parse`` spikes, how much every
task leaks, how many workers and how much memory the host had.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memtrack import _core
from memtrack.profile import FORMAT_VERSION, MAGIC, Profile, parse

MiB = 1024 * 1024
GiB = 1024 * MiB
T0 = 5000.0  # monotonic seconds at the start of the synthetic run
MAIN_PID = 100
HOST = "synthetic-host"


def header(kind: str = "recording", **extra: Any) -> dict[str, Any]:
    h = {
        "t": "header", "magic": MAGIC, "format": FORMAT_VERSION, "kind": kind,
        "memtrack": "0.1.0", "created": 1_767_000_000.0, "host": HOST, "pid": MAIN_PID,
        "cpus": 8, "peak_method": "kernel",
    }
    if kind == "recording":
        h.update({
            "interval": 0.25, "cpu_limit": 8, "table": "/memtrack-test", "command": None,
            "limits": {"total": 16 * GiB, "available": 12 * GiB, "limit": None,
                       "limit_source": "/proc/meminfo", "used": 4 * GiB,
                       "swap_total": 0, "swap_free": 0},
        })
    h.update(extra)
    return h


def to_bytes(records: list[dict[str, Any]], *, end: bool = True) -> bytes:
    return b"".join(_core.pack(r) for r in [*records, *([{"t": "end"}] if end else [])])


def write(path: Path, records: list[dict[str, Any]], *, end: bool = True) -> Path:
    path.write_bytes(to_bytes(records, end=end))
    return path


def load(records: list[dict[str, Any]], *, end: bool = True) -> Profile:
    return parse(to_bytes(records, end=end), name="synthetic", partial=not end)


@dataclass
class Pool:
    """The knobs of a simulated pool run."""

    workers: int = 4
    tasks: int = 12
    #: RSS of a fresh worker, and what its `init` phase keeps (per worker, by pid order).
    base: int = 30 * MiB
    init_retained: int | list[int] = 200 * MiB
    #: How far `task/parse` rises above the task's starting memory, and for how long.
    spike: int = 8 * MiB
    #: What each task keeps for good (a leak); a list gives one value per worker.
    leak: int | list[int] = 0
    #: A one-off jump: (task index, bytes) kept after that task (e.g. a cache filled once).
    jump: tuple[int, int] | None = None
    task_time: float = 1.0
    init_time: float = 1.0
    interval: float = 0.25
    #: The header: what the host had.
    available: int = 12 * GiB
    cpus: int = 8
    #: Pages shared between workers (counted once in PSS).
    shared: int = 10 * MiB
    main_rss: int = 60 * MiB
    #: Worker indexes killed by SIGKILL half-way.
    killed: list[int] = field(default_factory=list)
    pool_records: bool = True
    task_events: bool = True
    worker_records: bool = True
    header_extra: dict[str, Any] = field(default_factory=dict)


def _per_worker(value: int | list[int], i: int) -> int:
    return value[i] if isinstance(value, list) else value


def pool_recording(pool: Pool | None = None, **knobs: Any) -> list[dict[str, Any]]:
    """The records of a recording of `pool` (or of Pool(**knobs))."""
    pool = pool or Pool(**knobs)
    records: list[dict[str, Any]] = [header(
        "recording", cpus=pool.cpus, cpu_limit=pool.cpus, interval=pool.interval,
        limits={"total": 16 * GiB, "available": pool.available, "limit": None,
                "limit_source": "/proc/meminfo", "used": 4 * GiB, "swap_total": 0,
                "swap_free": 0}, **pool.header_extra)]
    events: list[dict[str, Any]] = []
    timelines: dict[int, list[tuple[float, int, str | None]]] = {}
    finals: list[dict[str, Any]] = []
    end_time = T0
    for i in range(pool.workers):
        pid = 201 + i
        t = T0 + 0.05 * i
        rss = pool.base
        steps: list[tuple[float, int, str | None]] = [(t, rss, None)]
        events.append({"t": "event", "time": t, "kind": "join", "pid": pid, "slot": i,
                       "phase": None, "rss": rss, "peak_rss": rss, "exit_code": None,
                       "exit_signal": None})
        init = _per_worker(pool.init_retained, i)
        steps.append((t, rss + init // 2, "init"))
        rss += init
        steps.append((t + pool.init_time / 2, rss, "init"))
        t += pool.init_time
        steps.append((t, rss, None))
        phases = {"init": {"count": 1, "total_time": pool.init_time, "max_peak_rss": rss,
                           "max_peak_delta": init, "total_rss_delta": init}}
        task_peak = parse_peak = 0
        task_delta = 0
        leak = _per_worker(pool.leak, i)
        done = 0
        killed = i in pool.killed
        for k in range(pool.tasks):
            if killed and k == pool.tasks // 2:
                break
            start = rss
            steps.append((t, rss, "task"))
            steps.append((t + 0.25 * pool.task_time, rss + pool.spike, "task/parse"))
            steps.append((t + 0.75 * pool.task_time, rss + leak, "task"))
            kept = leak + (pool.jump[1] if pool.jump and pool.jump[0] == k else 0)
            rss += kept
            t += pool.task_time
            steps.append((t, rss, None))
            task_peak = max(task_peak, start + pool.spike)
            parse_peak = max(parse_peak, start + pool.spike)
            task_delta += kept
            done += 1
            if pool.task_events:
                events.append({"t": "event", "time": t, "kind": "task", "pid": pid,
                               "retained": rss, "phase": "task"})
        if done:
            phases["task"] = {"count": done, "total_time": done * pool.task_time,
                              "max_peak_rss": task_peak, "max_peak_delta": pool.spike,
                              "total_rss_delta": task_delta}
            phases["task/parse"] = {"count": done, "total_time": done * pool.task_time / 2,
                                    "max_peak_rss": parse_peak, "max_peak_delta": pool.spike,
                                    "total_rss_delta": task_delta}
        events.append({"t": "event", "time": t, "kind": "death" if killed else "exit",
                       "pid": pid, "slot": i, "phase": "task/parse" if killed else None,
                       "rss": rss, "peak_rss": max(task_peak, rss),
                       "exit_code": None if killed else 0, "exit_signal": 9 if killed else None})
        timelines[pid] = steps
        end_time = max(end_time, t)
        finals.append({
            "t": "worker", "pid": pid, "state": "killed" if killed else "exited",
            "tasks": done, "rss": rss, "peak_rss": max(task_peak, rss),
            "uss": rss - pool.shared, "pss": rss - pool.shared + pool.shared // pool.workers,
            "phase": "task/parse" if killed else None, "exit_code": None if killed else 0,
            "exit_signal": 9 if killed else None, "phases": phases,
        })

    # Sample every process on a regular grid, and the pool totals with it.
    samples: list[dict[str, Any]] = []
    pools: list[dict[str, Any]] = []
    t = T0
    while t <= end_time + 1e-9:
        samples.append({"t": "sample", "time": t, "pid": MAIN_PID, "source": "self",
                        "rss": pool.main_rss, "peak_rss": pool.main_rss,
                        "pss": pool.main_rss, "uss": pool.main_rss, "phase": "dispatch"})
        live = rss_sum = pss_sum = 0
        for pid, steps in timelines.items():
            if t < steps[0][0] or t > steps[-1][0]:
                continue
            j = bisect.bisect_right([s[0] for s in steps], t) - 1
            _, value, phase = steps[j]
            pss = value - pool.shared + pool.shared // pool.workers
            samples.append({"t": "sample", "time": t, "pid": pid, "source": "worker",
                            "rss": value, "peak_rss": value, "pss": pss,
                            "uss": value - pool.shared, "phase": phase})
            live += 1
            rss_sum += value
            pss_sum += pss
        pools.append({"t": "pool", "time": t, "live": live, "rss": rss_sum, "pss": pss_sum,
                      "peak_rss": rss_sum})
        t += pool.interval
    merged = sorted([*samples, *(pools if pool.pool_records else []),
                     *(e for e in events if pool.task_events or e["kind"] != "task")],
                    key=lambda r: r["time"])
    records += merged
    if pool.worker_records:
        records += finals
    return records


def phases_dump(phases: list[tuple[str, float, float, int, int, int]],
                pid: int = MAIN_PID) -> list[dict[str, Any]]:
    """A dump() profile of one process: (path, start, duration, rss_start, rss_end, peak)."""
    records: list[dict[str, Any]] = [header("phases", records_dropped=0)]
    summary: dict[str, dict[str, Any]] = {}
    for path, start, duration, rss_start, rss_end, peak in phases:
        records.append({"t": "phase", "name": path.rsplit("/", 1)[-1], "path": path,
                        "pid": pid, "thread_id": 1, "start": T0 + start, "duration": duration,
                        "rss_start": rss_start, "rss_end": rss_end, "peak_rss": peak,
                        "heap_delta": 0, "error": None})
        s = summary.setdefault(path, {"t": "summary", "path": path, "count": 0,
                                      "total_time": 0.0, "max_peak_rss": 0,
                                      "max_peak_delta": 0, "total_rss_delta": 0})
        s["count"] += 1
        s["total_time"] += duration
        s["max_peak_rss"] = max(s["max_peak_rss"], peak)
        s["max_peak_delta"] = max(s["max_peak_delta"], max(peak - rss_start, 0))
        s["total_rss_delta"] += rss_end - rss_start
    return records + list(summary.values())
