"""What the server shows: readings of a worker table (or of a Dask cluster), as plain dicts.

A source has ``name``, ``cheap`` (True when a read costs microseconds, so every scrape may
read afresh) and ``read() -> Reading``. Every worker is one dict with the same keys, so the
page, ``/metrics`` and ``/api/workers`` need not know where the numbers came from.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from .. import _core
from ..pool.table import TableError, WorkerTable

#: The keys of a worker's phase summary, as ``WorkerStats.phases`` holds them.
PHASE_KEYS = ("count", "total_time", "max_peak_rss", "max_peak_delta", "total_rss_delta")
STATES = ("idle", "running", "exited", "killed", "busy", "corrupt")
#: States whose slot carries no numbers this time: "busy" (its worker held it mid-write
#: for the whole read: it is alive) and "corrupt" (it failed validation).
UNREAD = ("busy", "corrupt")


@dataclass
class Reading:
    """One look at every worker."""

    time: float  #: time.time() of the reading
    workers: list[dict[str, Any]]
    totals: dict[str, int]
    #: why the source no longer updates (the table was removed ...), else None
    gone: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Source(Protocol):
    name: str
    kind: str
    cheap: bool

    def read(self) -> Reading: ...

    def labels(self, worker: dict[str, Any]) -> dict[str, Any]: ...

    def close(self) -> None: ...


def worker_dict(w: Any) -> dict[str, Any]:
    """A :class:`memtrack.WorkerStats` as the dict every source uses."""
    return {
        "pid": w.pid, "slot": w.slot, "state": w.state, "phase": w.phase, "depth": w.depth,
        "rss": w.rss, "peak_rss": w.peak_rss, "uss": w.uss, "pss": w.pss, "tasks": w.tasks,
        "exit_code": w.exit_code, "exit_signal": w.exit_signal, "joined": w.joined,
        "updated": w.updated, "error": w.error,
        "phases": {path: {"count": s.count, "total_time": s.total_time,
                          "max_peak_rss": s.max_peak_rss, "max_peak_delta": s.max_peak_delta,
                          "total_rss_delta": s.total_rss_delta}
                   for path, s in (w.phases or {}).items()},
    }


def totals_of(workers: list[dict[str, Any]]) -> dict[str, int]:
    """Pool totals of worker dicts (for sources without a table's own totals())."""
    live = [w for w in workers if w["state"] in ("idle", "running")]
    return {
        "live": len(live), "dead": sum(1 for w in workers if w["state"] in ("exited", "killed")),
        "rss": sum(w["rss"] or 0 for w in live), "pss": sum(w["pss"] or 0 for w in live),
        "uss": sum(w["uss"] or 0 for w in live),
        "peak_rss": max((w["peak_rss"] or 0 for w in workers), default=0),
        "memory": sum((w["pss"] or w["rss"] or 0) for w in live),
    }


class TableSource:
    """A worker table, by name (attached read-only) or as a :class:`WorkerTable` object."""

    kind = "table"
    cheap = True

    def __init__(self, table: WorkerTable | str) -> None:
        if isinstance(table, str):
            self._table = WorkerTable.attach(table)
            self._owned = True
        else:
            self._table = table
            self._owned = False
        self.name = self._table.name
        #: seconds between a busy worker's refreshes: the page's default rate
        self.heartbeat = self._table.header()["heartbeat_ms"] / 1000
        self._last = Reading(time.time(), [], {"live": 0, "dead": 0, "rss": 0, "pss": 0,
                                               "uss": 0, "peak_rss": 0, "memory": 0})
        self._gone: str | None = None
        self._lock = threading.Lock()  # protects _last and _gone (readers are threads)

    def read(self) -> Reading:
        """The table now; once it is gone, its final state with ``gone`` saying why."""
        with self._lock:
            if self._gone is None:
                if self._table.closed:
                    self._gone = "the worker table was closed by its creator"
                elif not _core.segment_exists(self.name):
                    # The mapping stays readable after the unlink: keep what it says last.
                    self._gone = "the worker table was removed by its creator"
                    self._last = self._read_now()
                if self._gone is not None:
                    self._last.gone = self._gone
                    print(f"memtrack serve: {self._gone} ({self.name}); serving its final "
                          "state", file=sys.stderr, flush=True)
                    return self._last
                self._last = self._read_now()
            return self._last

    def _read_now(self) -> Reading:
        try:
            workers = [worker_dict(w) for w in self._table.workers()]
            t = self._table.totals()
        except (OSError, ValueError, TableError) as e:
            self._gone = f"the worker table can no longer be read: {e}"
            return Reading(time.time(), self._last.workers, self._last.totals, self._gone)
        totals = {"live": t.live, "dead": t.dead, "rss": t.rss, "pss": t.pss, "uss": t.uss,
                  "peak_rss": t.peak_rss, "memory": t.memory}
        return Reading(time.time(), workers, totals, self._gone)

    def labels(self, worker: dict[str, Any]) -> dict[str, Any]:
        return {"pid": worker["pid"]}

    def close(self) -> None:
        if self._owned:
            self._table.close()
