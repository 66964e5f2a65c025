"""How many workers this machine (or container) can afford.

The usual answer, ``os.cpu_count()``, ignores memory: 32 workers x 1.2 GB on a 32-core
machine with 16 GB is 38 GB and ends in swap or the OOM killer. The answer here is

    usable  = available x (1 - headroom) - main
    workers = floor(usable / per_worker), then at most ``cpus`` and ``max_workers``

where ``available`` is what the process may still allocate (container limits included,
:func:`memtrack.limits.system_memory`), ``main`` what the coordinating process needs and
``per_worker`` the peak private memory of one worker: measured by a
:class:`memtrack.WorkerTable` or read from a saved profile when not given.

The answer is more than memory allows only when ``min_workers`` demands it (by default:
when not even one worker fits), and then :attr:`WorkerPlan.warnings` says so.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from . import _core
from ._sizes import format_size, parse_size
from .limits import CpuLimit, SystemMemory, cpu_limit_info, system_memory

__all__ = ["WorkerPlan", "calculate_max_workers", "plan_workers"]

#: The names :attr:`WorkerPlan.limited_by` can take.
LIMITS = ("memory", "cpus", "max_workers", "min_workers")


def _decimal(n: int) -> str:
    """Decimal units, as people write sizes in configs ("1.2 GB")."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if abs(n) >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{n} B"


def size_text(n: int) -> str:
    """Both binary and decimal: "14.9 GiB (16 GB)", so neither reader is puzzled."""
    if abs(n) < 1000:
        return format_size(n)
    return f"{format_size(n)} ({_decimal(n)})"


def _from(source: str) -> str:
    return source if source == "given" else f"from {source}"


@dataclass
class WorkerPlan:
    """A worker count and the numbers and reasons behind it (see :func:`plan_workers`)."""

    workers: int
    per_worker: int
    main: int
    available: int
    cpus: int
    #: Which bound set ``workers``: "memory", "cpus", "max_workers" or "min_workers".
    limited_by: str
    warnings: list[str] = field(default_factory=list)
    headroom: float = 0.0
    min_workers: int = 1
    max_workers: int | None = None
    #: How many workers memory alone allows (may be 0).
    fit_by_memory: int = 0
    #: Bytes left for workers: ``available x (1 - headroom) - main`` (may be negative).
    usable: int = 0
    #: Where each input came from, keyed "per_worker", "main", "available", "cpus".
    sources: dict[str, str] = field(default_factory=dict)

    def explain(self) -> str:
        """A few lines for a person: the answer, the bound that set it, the numbers."""
        s = self.sources
        max_text = "none" if self.max_workers is None else str(self.max_workers)
        lines = [
            f"{self.workers} worker{'s' if self.workers != 1 else ''}, bound by "
            f"{self.limited_by}.",
            f"memory: {size_text(self.usable)} usable for workers",
            f"  = {size_text(self.available)} available x (1 - {self.headroom * 100:g}% headroom)"
            f" - {size_text(self.main)} for the main process",
            f"  available: {_from(s.get('available', 'given'))}",
            f"  main: {_from(s.get('main', 'given'))}",
            f"per worker: {size_text(self.per_worker)} -> {self.fit_by_memory} fit in memory",
            f"  per worker: {_from(s.get('per_worker', 'given'))}",
            f"cpus: {self.cpus} ({_from(s.get('cpus', 'given'))}); "
            f"max_workers: {max_text}; min_workers: {self.min_workers}",
        ]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


# --------------------------------------------------------------------------- validation


def check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def check_headroom(headroom: Any) -> Fraction:
    """The headroom as an exact fraction of the decimal the caller wrote.

    ``Fraction(0.1)`` is a hair above 1/10, which would make 9 GB usable out of 10 GB
    come out a byte short and drop a worker at an exact boundary; ``repr`` gives back
    the shortest decimal, i.e. what the caller typed.
    """
    if isinstance(headroom, bool) or not isinstance(headroom, (int, float)):
        raise TypeError(f"headroom must be a number in [0, 1), not {type(headroom).__name__}")
    if not math.isfinite(headroom) or not 0 <= headroom < 1:
        raise ValueError(
            f"headroom must be in [0, 1) (a fraction of available memory kept free), "
            f"got {headroom!r}"
        )
    return Fraction(repr(float(headroom)))


# --------------------------------------------------------------------------- measured inputs


def _field(worker: Any, name: str) -> int | None:
    """An int field of a worker row (object with attributes, or a profile's dict)."""
    value = worker.get(name) if isinstance(worker, Mapping) else getattr(worker, name, None)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _private_peak(worker: Any) -> int | None:
    """A worker's peak of private memory: its RSS peak minus the pages it shares.

    RSS counts pages shared with the parent and the other workers (copy-on-write after
    fork); adding another worker does not duplicate those, so they are not per-worker
    cost. When the shared part cannot be told, the worker's USS is used, and without USS
    its RSS peak (an overestimate: the safe side).
    """
    peak, rss, uss = _field(worker, "peak_rss"), _field(worker, "rss"), _field(worker, "uss")
    if peak is not None and rss is not None and uss is not None:
        private_peak = peak - max(0, rss - uss)
        if private_peak > 0:
            return private_peak
    if uss:
        return uss
    return peak or None


def _per_worker_from(workers: Any, where: str) -> tuple[int | None, str, list[str]]:
    """The largest private peak among worker rows, where it came from, and warnings."""
    best: tuple[int, Any] | None = None
    killed: list[str] = []
    for worker in workers or ():
        role = worker.get("role") if isinstance(worker, Mapping) else None
        if role not in (None, "worker"):
            continue  # the root, memtrack's helpers and other processes are not workers
        value = _private_peak(worker)
        state = worker.get("state") if isinstance(worker, Mapping) else getattr(
            worker, "state", None)
        pid = _field(worker, "pid")
        if state == "killed":
            killed.append(str(pid) if pid is not None else "?")
        if value is not None and (best is None or value > best[0]):
            best = (value, pid)
    warnings = []
    if killed:
        warnings.append(
            f"worker(s) {', '.join(killed)} in {where} were killed: a worker killed for "
            "memory may have needed more than its recorded peak"
        )
    if best is None:
        return None, "", warnings
    pid_text = f" (pid {best[1]})" if best[1] is not None else ""
    return best[0], f"{where}: largest worker peak of private memory{pid_text}", warnings


def _main_from_this_process() -> tuple[int, str]:
    """The calling process's proportional footprint (PSS), as the pool's parent cost.

    It is already out of ``available`` now, so counting it again is conservative; it
    stands for what the parent will hold while it gathers the workers' results.
    """
    try:
        footprint = _core.footprint()
        pss = getattr(footprint, "pss", None)
        if pss is None:
            pss = footprint[1]
        return int(pss), "this process's PSS (memtrack.footprint())"
    except (OSError, RuntimeError, AttributeError, IndexError, TypeError):
        return int(_core.rss()), "this process's RSS (PSS not readable here)"


def _load_profile(profile: Any) -> tuple[Any, str, list[str]]:
    """A profile object and a name for it; paths are read with ``memtrack.load``.

    A profile cut short (the run was killed, often the very run worth sizing from) is
    read up to its last complete record, with a warning.
    """
    if isinstance(profile, (str, os.PathLike)):
        from .profile import load

        loaded = load(profile, partial=True)
        name = f"profile {os.fspath(profile)}"
        warnings = []
        if loaded.truncated:
            warnings.append(f"{name} is incomplete ({loaded.truncated}); sized from what it holds")
        return loaded, name, warnings
    if not hasattr(profile, "workers"):
        raise TypeError(
            "profile must be a path or an object returned by memtrack.load(), "
            f"not {type(profile).__name__}"
        )
    return profile, "profile", []


# --------------------------------------------------------------------------- the calculator


def build_plan(
    per_worker: int | str | None,
    main: int | str | None,
    available: int | str | None,
    cpus: int | None,
    headroom: float,
    min_workers: int,
    max_workers: int | None,
    table: Any,
    profile: Any,
    read_memory: Callable[[], SystemMemory],
    read_cpus: Callable[[], CpuLimit],
) -> WorkerPlan:
    fraction_kept = 1 - check_headroom(headroom)
    check_count("min_workers", min_workers, 1)
    if max_workers is not None:
        check_count("max_workers", max_workers, 1)
        if max_workers < min_workers:
            raise ValueError(
                f"max_workers ({max_workers}) must be at least min_workers ({min_workers})")
    if cpus is not None:
        check_count("cpus", cpus, 1)
    if table is not None and profile is not None:
        raise ValueError("pass table= or profile=, not both")

    sources: dict[str, str] = {}
    warnings: list[str] = []

    # Explicit values first: a caller who says what a worker costs knows best.
    per_worker_bytes = None
    if per_worker is not None:
        per_worker_bytes = parse_size(per_worker, what="per_worker")
        if per_worker_bytes == 0:
            raise ValueError("per_worker must be more than 0 bytes")
        sources["per_worker"] = "given"
    main_bytes = None
    if main is not None:
        main_bytes = parse_size(main, what="main")
        sources["main"] = "given"
    available_bytes = None
    if available is not None:
        available_bytes = parse_size(available, what="available")
        sources["available"] = "given"

    if table is not None:
        if not callable(getattr(table, "workers", None)):
            raise TypeError(
                f"table must be a memtrack.WorkerTable (with .workers()), "
                f"not {type(table).__name__}"
            )
        if per_worker_bytes is None:
            per_worker_bytes, sources["per_worker"], found = _per_worker_from(
                table.workers(), "worker table")
            warnings += found
        if main_bytes is None:
            main_bytes, sources["main"] = _main_from_this_process()
    elif profile is not None:
        loaded, name, found = _load_profile(profile)
        warnings += found
        if per_worker_bytes is None:
            per_worker_bytes, sources["per_worker"], found = _per_worker_from(
                getattr(loaded, "workers", None), name)
            warnings += found
        if main_bytes is None:
            header = getattr(loaded, "header", None)
            main_pss = header.get("main_pss") if isinstance(header, Mapping) else None
            measured = _main_from_samples(getattr(loaded, "samples", None))
            if isinstance(main_pss, int) and not isinstance(main_pss, bool) and main_pss >= 0:
                main_bytes, sources["main"] = main_pss, f"{name}: header main_pss"
            elif measured is not None:
                main_bytes, sources["main"] = measured, (
                    f"{name}: largest PSS of the main process in its samples")
            else:
                main_bytes, sources["main"] = 0, f"not known ({name} has no main_pss): 0"
                warnings.append(
                    f"{name} does not record the main process's memory; counted as 0 "
                    "(pass main= to include it)"
                )

    if per_worker_bytes is None:
        raise ValueError(
            "no per-worker memory to size from: pass per_worker= (e.g. '1.2 GB') or a "
            "table/profile with worker data"
        )
    if main_bytes is None:
        main_bytes, sources["main"] = 0, "not given: 0"

    if available_bytes is None:
        memory = read_memory()
        available_bytes = memory.available
        if memory.limit is None:
            sources["available"] = (
                f"system_memory(): host MemAvailable ({memory.limit_source}), "
                "no cgroup memory limit")
        else:
            sources["available"] = (
                f"system_memory(): cgroup limit {size_text(memory.limit)} in "
                f"{memory.limit_source} minus the cgroup's usage")
    if cpus is None:
        detected = read_cpus()
        cpus = detected.cpus
        sources["cpus"] = f"cpu_limit(): {detected.source}"
    else:
        sources["cpus"] = "given"

    usable = Fraction(available_bytes) * fraction_kept - main_bytes
    fit = max(0, math.floor(usable / per_worker_bytes))

    bounds = [("memory", fit), ("cpus", cpus)]
    if max_workers is not None:
        bounds.append(("max_workers", max_workers))
    limited_by, workers = min(bounds, key=lambda bound: bound[1])  # ties: the first named

    if workers < min_workers:
        if fit < min_workers:
            why = (
                "the main process and headroom leave no memory for workers"
                if usable <= 0 else
                f"{size_text(math.floor(usable))} usable holds {fit} worker(s) of "
                f"{size_text(per_worker_bytes)}"
            )
            warnings.append(
                f"{why}; returning min_workers={min_workers} anyway, which may swap or be "
                "OOM-killed: reduce per-worker memory or free memory"
            )
        if cpus < min_workers:
            warnings.append(
                f"min_workers={min_workers} is more than the {cpus} CPU(s) available; "
                "workers will share CPUs"
            )
        workers, limited_by = min_workers, "min_workers"

    return WorkerPlan(
        workers=workers,
        per_worker=per_worker_bytes,
        main=main_bytes,
        available=available_bytes,
        cpus=cpus,
        limited_by=limited_by,
        warnings=warnings,
        headroom=float(headroom),
        min_workers=min_workers,
        max_workers=max_workers,
        fit_by_memory=fit,
        usable=math.floor(usable),
        sources=sources,
    )


def _main_from_samples(samples: Any) -> int | None:
    """The main process's largest PSS in a recording: the samples of the root (the
    recording process itself with memtrack.record, the command with memtrack run; never
    memtrack run's own process, role ``tool``). None without any."""
    found = [s.get("pss") for s in samples or () if isinstance(s, Mapping)
             and (s.get("role") == "root" if "role" in s else s.get("source") in ("self", "root"))]
    found = [p for p in found if isinstance(p, int) and not isinstance(p, bool) and p > 0]
    return max(found) if found else None


def plan_workers(
    per_worker: int | str | None = None,
    *,
    main: int | str | None = None,
    available: int | str | None = None,
    cpus: int | None = None,
    headroom: float = 0.0,
    min_workers: int = 1,
    max_workers: int | None = None,
    table: Any = None,
    profile: Any = None,
) -> WorkerPlan:
    """How many workers fit, with the numbers, the binding limit and where inputs came from.

    Sizes are bytes or text ("1.2 GB", "512 MiB"). Without ``available``/``cpus`` the
    machine's are detected, container limits included (``system_memory().available``,
    ``cpu_limit()``). ``headroom`` is the fraction of ``available`` kept free, in [0, 1).

    Without ``per_worker``, it is the largest peak of private memory among the workers of
    ``table`` (a :class:`memtrack.WorkerTable`) or ``profile`` (a path or the result of
    :func:`memtrack.load`); without ``main``, it is this process's PSS (with ``table``)
    or the profile header's ``main_pss``, or the largest PSS of the main process in the
    profile's samples, else 0.

    >>> plan_workers("1.2 GB", main="0.5 GB", available="16 GB", cpus=32).workers
    12

    Raises TypeError/ValueError for inputs of the wrong type or range, and ValueError
    when there is no per-worker size to use.
    """
    return build_plan(per_worker, main, available, cpus, headroom, min_workers, max_workers,
                       table, profile, lambda: system_memory(), lambda: cpu_limit_info())


def calculate_max_workers(
    per_worker: int | str | None = None,
    *,
    main: int | str | None = None,
    available: int | str | None = None,
    cpus: int | None = None,
    headroom: float = 0.0,
    min_workers: int = 1,
    max_workers: int | None = None,
    table: Any = None,
    profile: Any = None,
) -> int:
    """The worker count of :func:`plan_workers` (same arguments), for ``max_workers=``.

    >>> calculate_max_workers("1.2 GB", main="0.5 GB", available="16 GB", cpus=32)
    12
    """
    return plan_workers(per_worker, main=main, available=available, cpus=cpus,
                        headroom=headroom, min_workers=min_workers, max_workers=max_workers,
                        table=table, profile=profile).workers
