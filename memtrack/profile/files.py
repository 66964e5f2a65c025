"""Profiles: msgpack files written and read through msgpack-c (docs/format.md)."""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .. import _core
from .._alloc import AllocationSite, check_site, site_records
from .._files import write_atomically

ProfileError = _core.ProfileError
PhaseStats = _core.PhaseStats
PhaseSummary = _core.PhaseSummary

MAGIC = "memtrack"
#: 2: allocation tracking (``site`` records, ``allocated``/``allocations`` in phases and
#: summaries). Format 1 files still load: they have no sites and None for those fields.
FORMAT_VERSION = 2

_PHASE_FIELDS = {
    "name": str, "path": str, "pid": int, "thread_id": int, "start": float, "duration": float,
    "rss_start": int, "rss_end": int, "peak_rss": int,
}
_SUMMARY_FIELDS = {
    "path": str, "count": int, "total_time": float, "max_peak_rss": int,
    "max_peak_delta": int, "total_rss_delta": int,
}


@dataclass
class Profile:
    """A profile read back with :func:`load`."""

    header: dict[str, Any]
    phases: list[PhaseStats] = field(default_factory=list)
    summary: dict[str, PhaseSummary] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    workers: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    #: Why the file ended early (only with ``load(..., partial=True)``), else None.
    truncated: str | None = None
    #: Pool totals over time (recordings): {time, live, rss, pss, peak_rss}. Last, so
    #: positional construction of the fields above is unchanged.
    pools: list[dict[str, Any]] = field(default_factory=list)
    #: Final records of the processes that are not workers (role root, helper, other;
    #: docs/report.md "Roles"); `workers` holds the workers' (role worker, or none).
    processes: list[dict[str, Any]] = field(default_factory=list)
    #: Sampled allocation sites (format 2) of the writing process and, for a recording
    #: with allocations on, of every memtrack-aware worker: AllocationSite objects.
    sites: list[AllocationSite] = field(default_factory=list)
    #: Problems met while gathering the workers' sites (a recording), else empty.
    site_problems: list[str] = field(default_factory=list)


def combine(parts: Iterable[Any]) -> PhaseSummary:
    """One PhaseSummary of several of the same path (from processes, workers or runs):
    counts, times and retained memory add up, peaks take the largest. The one definition
    of how phase summaries aggregate in Python (the C core keeps its own as phases end)."""
    parts = list(parts)
    if not parts:
        raise ValueError("no phase summaries to combine")
    count = sum(p.count for p in parts)
    total_rss_delta = sum(p.total_rss_delta for p in parts)
    # Parts without allocation figures (untracked phases, report rows) add nothing to them.
    allocated = [getattr(p, "total_allocated", None) for p in parts]
    allocations = [getattr(p, "total_allocations", None) for p in parts]
    tracked = any(a is not None for a in allocated)
    return PhaseSummary((count, sum(p.total_time for p in parts),
                         max(p.max_peak_rss for p in parts), max(p.max_peak_delta for p in parts),
                         total_rss_delta, total_rss_delta / count if count else 0.0),
                        {"total_allocated": sum(a or 0 for a in allocated) if tracked else None,
                         "total_allocations": sum(a or 0 for a in allocations)
                         if tracked else None})


def summarise(records: list[PhaseStats]) -> PhaseSummary:
    """The PhaseSummary of some PhaseStats of one path (the aggregate summary() keeps)."""
    if not records:
        raise ValueError("no phase records to summarise")
    return combine(PhaseSummary((1, r.duration, r.peak_rss, r.peak_delta, r.rss_delta,
                                 float(r.rss_delta)),
                                {"total_allocated": r.allocated,
                                 "total_allocations": r.allocations}) for r in records)


def summarise_by_path(records: list[PhaseStats]) -> dict[str, PhaseSummary]:
    """{path: PhaseSummary} of the given records."""
    grouped: dict[str, list[PhaseStats]] = {}
    for r in records:
        grouped.setdefault(r.path, []).append(r)
    return {path: summarise(rs) for path, rs in grouped.items()}


def summary_fields(s: PhaseSummary) -> dict[str, Any]:
    """A PhaseSummary as the fields a profile stores of it (docs/format.md): the one
    PhaseSummary -> dict, for summary records and a worker's per-phase summaries."""
    fields = {"count": s.count, "total_time": s.total_time, "max_peak_rss": s.max_peak_rss,
              "max_peak_delta": s.max_peak_delta, "total_rss_delta": s.total_rss_delta}
    if s.total_allocated is not None:  # only when tracked, as phase records (docs/format.md)
        fields["total_allocated"] = s.total_allocated
        fields["total_allocations"] = s.total_allocations
    return fields


def summary_records(summary: dict[str, PhaseSummary]) -> list[dict[str, Any]]:
    """The summary records of a profile, one per path, sorted by path."""
    return [{"t": "summary", "path": path, **summary_fields(s)}
            for path, s in sorted(summary.items())]


def profile_header(kind: str) -> dict[str, Any]:
    return {
        "t": "header", "magic": MAGIC, "format": FORMAT_VERSION, "kind": kind,
        "memtrack": _core.__version__, "created": time.time(), "host": socket.gethostname(),
        "pid": os.getpid(), "cpus": os.cpu_count() or 0,
        "peak_method": _core.capabilities()["peak_method"],
    }


def dump(path: str | os.PathLike[str]) -> None:
    """Write this process's phase records and summary to `path` as a msgpack profile."""
    records, dropped = _core.pack_phase_records()
    header = profile_header("phases")
    header["records_dropped"] = dropped
    summary = summary_records(_core.summary())
    sites = site_records()
    if _core.alloc_counters()["samples"] or sites:
        c = _core.alloc_counters()
        header["allocations"] = {"interval": c["interval"], "frames": c["frames"]}
    write_atomically(path, [_core.pack(header), records, *map(_core.pack, summary),
                             *map(_core.pack, sites), _core.pack({"t": "end"})])


def _check(record: dict[str, Any], fields: dict[str, type], where: str) -> None:
    for key, kind in fields.items():
        value = record.get(key)
        ok = isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
        if not ok or isinstance(value, bool):
            raise ProfileError(f"{where}: field {key!r} should be {kind.__name__}, found {value!r}")
        if kind is float and not math.isfinite(value):
            raise ProfileError(f"{where}: field {key!r} should be a finite number, found {value!r}")


def _phase_stats(r: dict[str, Any], where: str) -> PhaseStats:
    _check(r, _PHASE_FIELDS, where)
    error = r.get("error")
    if error is not None and not isinstance(error, str):
        raise ProfileError(f"{where}: field 'error' should be str or nil, found {error!r}")
    heap = r.get("heap_delta")  # nil when the heap was not read (configure(phase_heap=False))
    if heap is not None and (not isinstance(heap, int) or isinstance(heap, bool)):
        raise ProfileError(f"{where}: field 'heap_delta' should be int or nil, found {heap!r}")
    peak_delta = max(r["peak_rss"] - r["rss_start"], 0)
    return PhaseStats((r["name"], r["path"], r["pid"], r["thread_id"], float(r["start"]),
                       float(r["duration"]), r["rss_start"], r["rss_end"],
                       r["rss_end"] - r["rss_start"], r["peak_rss"], peak_delta,
                       heap, error),
                      {"allocated": _optional_count(r, "allocated", where),
                       "allocations": _optional_count(r, "allocations", where)})


def _optional_count(r: dict[str, Any], key: str, where: str) -> int | None:
    """An unsigned int or nil; absent (files before allocation tracking) is nil."""
    value = r.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ProfileError(f"{where}: field {key!r} should be a non-negative int or nil, "
                           f"found {value!r}")
    return value


def _phase_summary(r: dict[str, Any], where: str) -> PhaseSummary:
    _check(r, _SUMMARY_FIELDS, where)
    if r["count"] < 1:
        raise ProfileError(f"{where}: summary count must be at least 1, found {r['count']}")
    return PhaseSummary((r["count"], float(r["total_time"]), r["max_peak_rss"],
                         r["max_peak_delta"], r["total_rss_delta"],
                         r["total_rss_delta"] / r["count"]),
                        {"total_allocated": _optional_count(r, "total_allocated", where),
                         "total_allocations": _optional_count(r, "total_allocations", where)})


def parse(data: bytes, *, name: str = "<bytes>", partial: bool = False) -> Profile:
    """Read a profile from bytes; see :func:`load`."""
    objects, consumed, error = _core.unpack_stream(data)
    if not objects:
        if error is None:
            raise ProfileError(f"{name}: empty file, not a memtrack profile")
        raise ProfileError(f"{name}: not a memtrack profile ({error[2]})")
    header = objects[0]
    if not isinstance(header, dict) or header.get("magic") != MAGIC or header.get("t") != "header":
        raise ProfileError(f"{name}: not a memtrack profile (no memtrack header at byte 0)")
    version = header.get("format")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ProfileError(f"{name}: header has no format version")
    if version > FORMAT_VERSION:
        raise ProfileError(
            f"{name}: written in profile format {version}; this memtrack reads format "
            f"{FORMAT_VERSION} or older: upgrade memtrack"
        )
    profile = Profile(header=header)
    ended = False
    for i, record in enumerate(objects[1:], start=1):
        where = f"{name}: record {i}"
        if ended:
            raise ProfileError(f"{where}: data after the end record")
        if not isinstance(record, dict) or not isinstance(record.get("t"), str):
            raise ProfileError(f"{where}: not a record (a map with a 't' kind)")
        kind = record["t"]
        if kind == "phase":
            profile.phases.append(_phase_stats(record, where))
        elif kind == "summary":
            profile.summary[record.get("path")] = _phase_summary(record, where)
        elif kind == "sample":
            profile.samples.append(record)
        elif kind == "worker":
            if record.get("role") in (None, "worker"):
                profile.workers.append(record)
            else:
                profile.processes.append(record)
        elif kind == "event":
            profile.events.append(record)
        elif kind == "pool":
            profile.pools.append(record)
        elif kind == "site":
            try:
                profile.sites.append(check_site(record, where=where))
            except ValueError as e:
                raise ProfileError(str(e)) from None
        elif kind == "site_problems":
            problems = record.get("problems")
            if isinstance(problems, list):
                profile.site_problems += [str(p) for p in problems]
        elif kind == "end":
            ended = True
        else:
            # Newer minor additions are skipped, not fatal: the version gate handles breaks.
            continue
    problem = None
    if error is not None:
        kind, offset, message = error
        problem = f"{kind} at byte {offset} after record {len(objects) - 1}: {message}"
    elif not ended:
        problem = f"truncated after record {len(objects) - 1} (byte {consumed}): no end record"
    if problem is not None:
        if not partial:
            raise ProfileError(f"{name}: {problem}")
        profile.truncated = problem
    return profile


def load(path: str | os.PathLike[str], *, partial: bool = False) -> Profile:
    """Read a profile written by :func:`dump` (or by ``memtrack.record``).

    A truncated, corrupt or foreign file raises :class:`ProfileError` saying what is
    wrong and at which byte. With ``partial=True`` a file cut short (a run killed before
    it finished) is read up to the last complete record, and ``Profile.truncated`` says
    where it stopped.
    """
    with open(path, "rb") as f:
        data = f.read()
    return parse(data, name=os.fspath(path), partial=partial)
