"""memtrack: where the memory of a Python worker pool goes, per process, worker and phase.

The readings and the phase machinery live in the C extension ``memtrack._core``; this
package adds policy (sizes, errors, files) and the user-facing names.
"""

from __future__ import annotations

import os as _os

try:
    from . import _core
except ImportError as _error:
    raise ImportError(
        f"memtrack's C extension memtrack._core could not be loaded ({_error}). "
        "Install a wheel built for this Python and platform (pip install memtrack from a "
        "wheel file: see the README), or build it from source: apt-get install pkg-config "
        "libmsgpack-dev && pip install --force-reinstall . (in a source checkout: "
        "pip install -e .). A build that linked msgpack-c as a shared library also needs "
        "that library at run time: apt-get install libmsgpackc2",
        name="memtrack._core",
    ) from _error

__version__ = "0.1.0"
if _core.__version__ != __version__:
    raise ImportError(
        f"memtrack {__version__} found a C extension built for {_core.__version__}; "
        "rebuild it: pip install -e ."
    )

from ._core import (  # noqa: E402
    Footprint,
    PhaseStats,
    PhaseSummary,
    ProfileError,
    Sample,
    footprint,
    peak_rss,
    reset,
    reset_peak,
    rss,
    snapshot,
    summary,
)
from . import _alloc  # noqa: E402
from ._alloc import AllocationSite, Frame, allocations  # noqa: E402
from ._phase import phase  # noqa: E402
from ._sizes import format_size, parse_size  # noqa: E402
from .leaks import Growth, MemoryGrowthError, assert_no_growth, measure_growth  # noqa: E402
from .limits import SystemMemory, cpu_limit, system_memory  # noqa: E402
from .pool import table as _table  # noqa: E402
from .pool.forensics import explain_broken_pool  # noqa: E402
from .pool.table import (  # noqa: E402
    TableError,
    Totals,
    WorkerStats,
    WorkerTable,
    cleanup_stale,
    init_worker,
    set_heartbeat,
    task_done,
    worker_slot,
)
from .profile import Profile, dump, load  # noqa: E402
from .profile.insights import Insight, insights  # noqa: E402
from .profile.recording import record  # noqa: E402
from .sizing import WorkerPlan, calculate_max_workers, plan_workers  # noqa: E402


def __getattr__(name: str):
    # The executor pulls in concurrent.futures.process and multiprocessing (~50 ms):
    # load it when first asked for, so that `import memtrack` stays light in workers.
    if name in ("MemoryAwareExecutor", "PoolEvent"):
        from .pool import executor

        return getattr(executor, name)
    raise AttributeError(f"module 'memtrack' has no attribute {name!r}")


class RecordList(list):
    """The recent :class:`PhaseStats`, oldest first; ``dropped`` counts those the ring lost."""

    dropped: int = 0


def records() -> RecordList:
    """The most recent completed phases (a bounded ring, 100 000 by default)."""
    items, dropped = _core.records()
    result = RecordList(items)
    result.dropped = dropped
    return result


def configure(*, max_records: int | None = None, phase_heap: bool | None = None) -> dict:
    """Change settings; returns those in force.

    ``max_records`` resizes the ring of recent phases, keeping the newest. ``phase_heap``
    turns the malloc heap reading of every phase on or off (off by default, and then
    ``PhaseStats.heap_delta`` is None): glibc's ``mallinfo2()`` walks every free chunk and
    takes every arena's lock, cheap in a tidy heap and milliseconds per call in a heap of
    many fragments.
    """
    kwargs: dict = {}
    if max_records is not None:
        if isinstance(max_records, bool) or not isinstance(max_records, int):
            raise TypeError(f"max_records must be an int, not {type(max_records).__name__}")
        kwargs["max_records"] = max_records
    if phase_heap is not None:
        if not isinstance(phase_heap, bool):
            raise TypeError(f"phase_heap must be True or False, not {phase_heap!r}")
        kwargs["phase_heap"] = phase_heap
    return _core.configure(**kwargs)


def capabilities() -> dict:
    """Which peak method is in force (``"kernel"``: exact, ``"sampler"``: bounded error),
    why, and which readings this platform lacks."""
    return _core.capabilities()


def _env_flag(name: str) -> bool:
    return _os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


_core.set_disabled(_env_flag("MEMTRACK_DISABLE"))
_table.register_process_hooks()
_alloc._register_process_hooks()
if not _env_flag("MEMTRACK_DISABLE"):
    _alloc._start_from_environment()
    _alloc._share_from_environment()
    _table.join_from_environment()
    from .profile import recording as _recording

    _recording.record_from_environment()

__all__ = [
    "AllocationSite",
    "Frame",
    "allocations",
    "Footprint",
    "Growth",
    "Insight",
    "MemoryGrowthError",
    "MemoryAwareExecutor",
    "PhaseStats",
    "PoolEvent",
    "PhaseSummary",
    "Profile",
    "ProfileError",
    "RecordList",
    "Sample",
    "SystemMemory",
    "TableError",
    "assert_no_growth",
    "Totals",
    "WorkerPlan",
    "WorkerStats",
    "WorkerTable",
    "calculate_max_workers",
    "capabilities",
    "cleanup_stale",
    "configure",
    "cpu_limit",
    "dump",
    "explain_broken_pool",
    "footprint",
    "format_size",
    "init_worker",
    "insights",
    "load",
    "measure_growth",
    "parse_size",
    "peak_rss",
    "phase",
    "plan_workers",
    "record",
    "records",
    "reset",
    "reset_peak",
    "rss",
    "set_heartbeat",
    "snapshot",
    "summary",
    "system_memory",
    "task_done",
    "worker_slot",
]
