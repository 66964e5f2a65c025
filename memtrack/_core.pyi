"""Type stubs for memtrack._core, the C extension (csrc/).

Every size is in bytes (int); every time is in seconds (float). Times named `start`,
`updated` and `joined` are on the CLOCK_MONOTONIC clock (`time.monotonic()`), which is
system-wide on Linux, so they compare across processes of one machine.
"""

from types import TracebackType
from typing import Any, Final, Literal, Self, final

from _typeshed import ReadableBuffer, structseq
from typing_extensions import disjoint_base

__version__: Final[str]

#: Longest phase name, in UTF-8 bytes.
MAX_NAME: Final[int]
#: Deepest nesting that gets its own path; deeper phases fold into their deepest ancestor.
MAX_DEPTH: Final[int]
#: Longest phase path, in UTF-8 bytes; a longer one folds into its parent's path.
MAX_PATH: Final[int]
#: Distinct paths (and exception names) one process can hold; more go to "(overflow)".
MAX_PATHS: Final[int]
#: The most workers one table holds.
MAX_CAPACITY: Final[int]
#: The range of every interval memtrack accepts (heartbeat, recorder), in seconds.
MIN_INTERVAL: Final[float]
MAX_INTERVAL: Final[float]

# --------------------------------------------------------------------------------------
# Exceptions

class ProfileError(ValueError):
    """A profile file is truncated, corrupt or not a memtrack profile."""

class TableError(ValueError):
    """A worker table segment is not usable: wrong magic, version or size."""

# --------------------------------------------------------------------------------------
# Result types (struct sequences: named tuples made in C)

@final
class Sample(structseq[Any], tuple[float, int, int, int, int, int, int, int, int, int, int, int]):
    """One reading of this process's memory (bytes unless said)."""

    __match_args__: Final = (
        "time", "rss", "peak_rss", "vms", "rss_anon", "rss_file", "rss_shmem", "swap",
        "heap_used", "heap_free", "minor_faults", "major_faults",
    )
    @property
    def time(self) -> float: ...
    @property
    def rss(self) -> int: ...
    @property
    def peak_rss(self) -> int: ...
    @property
    def vms(self) -> int: ...
    @property
    def rss_anon(self) -> int: ...
    @property
    def rss_file(self) -> int: ...
    @property
    def rss_shmem(self) -> int: ...
    @property
    def swap(self) -> int: ...
    @property
    def heap_used(self) -> int: ...
    @property
    def heap_free(self) -> int: ...
    @property
    def minor_faults(self) -> int: ...
    @property
    def major_faults(self) -> int: ...

@final
class Footprint(structseq[int], tuple[int, int, int]):
    """Private and proportional memory of this process."""

    __match_args__: Final = ("uss", "pss", "shared")
    @property
    def uss(self) -> int: ...
    @property
    def pss(self) -> int: ...
    @property
    def shared(self) -> int: ...

@final
class PhaseStats(
    structseq[Any],
    tuple[str, str, int, int, float, float, int, int, int, int, int, int, str | None],
):
    """One completed phase."""

    __match_args__: Final = (
        "name", "path", "pid", "thread_id", "start", "duration", "rss_start", "rss_end",
        "rss_delta", "peak_rss", "peak_delta", "heap_delta", "error",
    )
    @property
    def name(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def pid(self) -> int: ...
    @property
    def thread_id(self) -> int: ...
    @property
    def start(self) -> float: ...
    @property
    def duration(self) -> float: ...
    @property
    def rss_start(self) -> int: ...
    @property
    def rss_end(self) -> int: ...
    @property
    def rss_delta(self) -> int: ...
    @property
    def peak_rss(self) -> int: ...
    @property
    def peak_delta(self) -> int: ...
    @property
    def heap_delta(self) -> int | None: ...
    @property
    def error(self) -> str | None: ...
    # By name only (the tuple keeps 13 items); None unless allocation tracking was on
    # from the phase's enter to its exit.
    @property
    def allocated(self) -> int | None: ...
    @property
    def allocations(self) -> int | None: ...

@final
class PhaseSummary(structseq[Any], tuple[int, float, int, int, int, float]):
    """The totals of every completed run of one phase path."""

    __match_args__: Final = (
        "count", "total_time", "max_peak_rss", "max_peak_delta", "total_rss_delta",
        "mean_rss_delta",
    )
    @property
    def count(self) -> int: ...  # type: ignore[override]  # the field hides tuple.count()
    @property
    def total_time(self) -> float: ...
    @property
    def max_peak_rss(self) -> int: ...
    @property
    def max_peak_delta(self) -> int: ...
    @property
    def total_rss_delta(self) -> int: ...
    @property
    def mean_rss_delta(self) -> float: ...
    # By name only (the tuple keeps 6 items); None when no run was tracked.
    @property
    def total_allocated(self) -> int | None: ...
    @property
    def total_allocations(self) -> int | None: ...

@final
class WorkerStats:
    """One worker of a worker table, as its slot last said: a read-only view that decodes
    a field when it is read (``phases`` is built on first access).

    When ``state`` is ``"corrupt"`` or ``"busy"`` only ``pid``, ``state``, ``phases``
    (empty), ``slot`` and ``error`` are set; every other field is None. Otherwise only
    ``exit_code``, ``exit_signal``, ``last_task_time`` and ``error`` can be None.
    """

    @property
    def pid(self) -> int: ...
    @property
    def state(self) -> Literal["idle", "running", "exited", "killed", "busy", "corrupt"]: ...
    @property
    def phase(self) -> str | None: ...
    @property
    def depth(self) -> int | None: ...
    @property
    def rss(self) -> int | None: ...
    @property
    def peak_rss(self) -> int | None: ...
    @property
    def uss(self) -> int | None: ...
    @property
    def pss(self) -> int | None: ...
    @property
    def heap_used(self) -> int | None: ...
    @property
    def tasks(self) -> int | None: ...
    @property
    def updated(self) -> float | None: ...
    @property
    def exit_code(self) -> int | None: ...
    @property
    def exit_signal(self) -> int | None: ...
    @property
    def phases(self) -> dict[str, PhaseSummary]: ...
    @property
    def slot(self) -> int: ...
    @property
    def joined(self) -> float | None: ...
    @property
    def phase_truncated(self) -> bool | None: ...
    @property
    def phase_overflow(self) -> int | None: ...
    @property
    def error(self) -> str | None: ...
    @property
    def role(self) -> Literal["worker", "tool", "root", "helper", "other"] | None: ...
    @property
    def last_task_rss(self) -> int | None: ...
    @property
    def last_task_time(self) -> float | None: ...
    @property
    def recent_ends(self) -> list[tuple[float, int, int, str | None]] | None:
        """The last task ends, oldest first: (time, retained rss, peak_rss, path)."""

# --------------------------------------------------------------------------------------
# Readings

def rss() -> int:
    """Resident set size in bytes (fast: one pread of /proc/self/statm)."""

def peak_rss() -> int:
    """RSS high-water mark since the last reset_peak(), bytes."""

def reset_peak() -> None:
    """Restart the high-water mark at the current RSS."""

def snapshot() -> Sample: ...
def footprint() -> Footprint:
    """USS, PSS and shared bytes from /proc/self/smaps_rollup (slower; releases the GIL)."""

def capabilities() -> dict[str, Any]:
    """{"platform": str, "platform_tested": bool, "peak_method": "kernel" | "sampler",
    "peak_fallback_reason": str | None, "sampler_interval": float, "lacks": list[str],
    "disabled": bool}."""
def memory_limit() -> tuple[int, int, str] | None:
    """(limit, used, source) of the OS's limit on this process (RLIMIT_AS on Linux, the
    job object on Windows), or None when there is none."""
def trim() -> bool:
    """Return free malloc heap to the OS (malloc_trim(0)); True if any was returned."""

# --------------------------------------------------------------------------------------
# Phases

@disjoint_base  # a C type with its own layout: no other C base can join it
class Phase:
    """phase(name): measure the memory of a block of code (a context manager).

    ``memtrack.phase`` subclasses this type and adds use as a decorator.
    """

    def __init__(self, name: str) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
        /,
    ) -> Literal[False]: ...
    def next(self, name: str, /) -> Self:
        """End this active phase and start its sibling ``name`` in the same object, with
        one reading (3 system calls) shared by the end of one and the start of the other.
        ``stats`` is then the ended phase's; the ``with`` block's exit ends the sibling."""

    @property
    def stats(self) -> PhaseStats | None:
        """PhaseStats of the last completed run of this phase object, or None."""

    @property
    def name(self) -> str: ...
    @property
    def active(self) -> bool:
        """True between enter and exit."""

def summary() -> dict[str, PhaseSummary]: ...
def records() -> tuple[list[PhaseStats], int]:
    """The record ring, oldest first, and how many records it dropped."""

def reset() -> None:
    """Forget records and summary (open phases carry on)."""

def configure(*, max_records: int = ..., phase_heap: bool = ...) -> dict[str, int | bool]:
    """Change settings; returns those in force: {"max_records": int, "phase_heap": bool}.
    ``phase_heap`` is off by default (mallinfo2's cost grows with the heap)."""

def counters() -> dict[str, int]:
    """{"paths", "open", "overflowed", "dropped", "records"}: table sizes, for tests."""
def set_disabled(flag: object, /) -> None: ...
def is_disabled() -> bool:
    """MEMTRACK_DISABLE (or set_disabled(True)) in force; no system call."""

def use_sampler(reason: str, /) -> None: ...

# --------------------------------------------------------------------------------------
# msgpack (msgpack-c)

def pack(obj: object, /) -> bytes:
    """msgpack of None, bool, int (64-bit), float, str, bytes, list, tuple or dict."""

def pack_phase_records(since: float | None = None) -> tuple[bytes, int]:
    """The record ring as msgpack "phase" maps (docs/format.md), and the dropped count: the
    one encoder of a phase record. With ``since``, only the records that started at or after
    it (``PhaseStats.start``'s clock)."""

def unpack_stream(
    data: ReadableBuffer, /
) -> tuple[list[Any], int, tuple[Literal["truncated", "corrupt"], int, str] | None]:
    """(objects, bytes consumed, None or (kind, offset, message))."""

# --------------------------------------------------------------------------------------
# The worker table: this process as a worker

def join(name: str, /) -> int:
    """Claim a slot in the table `name`: its index, or -1 when the table is full."""

def rejoin() -> int | None:
    """After fork: claim this child's own slot. None when the parent had not joined."""

def leave() -> bool:
    """Mark this worker's slot exited and detach; False when not joined."""

def task_done() -> None: ...
def worker_info() -> tuple[str, int] | None:
    """(table name, slot index) when joined, else None."""

def set_heartbeat(seconds: float, /) -> None: ...
def set_role(role: Literal["worker", "tool", "root", "helper", "other"], /) -> bool:
    """Write this process's role into its slot; False when it holds none."""

# --------------------------------------------------------------------------------------
# The worker table: the reader side

@final
class Segment:
    """Segment(name, capacity=0, heartbeat_ms=100): a worker table mapping.

    capacity=0 attaches to an existing table; otherwise creates one (mode 0600).
    """

    def __init__(self, name: str, capacity: int = 0, heartbeat_ms: int = 100) -> None: ...
    def read(self, check: bool = False) -> list[WorkerStats]: ...
    def totals(self) -> tuple[int, int, int, int, int, int, int, int]:
        """(live, rss, pss, uss, peak_rss, dead, memory, fresh_memory)."""
        ...
    def forget_dead(self) -> int: ...
    def record_exit(self, pid: int, exitcode: int, /) -> bool: ...
    def header(self) -> dict[str, Any]:
        """version, capacity, slot_size, creator_pid, creator_start, created (unix time),
        heartbeat_ms, slot_phases, size (bytes of the mapping), as attached."""
    def damage(self) -> str | None:
        """Why the table can no longer be read (resized, header rewritten), or None."""
    def close(self) -> None: ...
    @property
    def name(self) -> str: ...
    @property
    def closed(self) -> bool: ...

def segment_creator(name: str, /) -> tuple[int, int, bool, str | None]:
    """(creator pid, creator start time in clock ticks since boot, whether it was created
    in this process's pid namespace, what is damaged or None) of the table `name`; raises
    TableError when it is not this user's table at all."""

def proc_identity(pid: int, /) -> tuple[Literal["alive", "zombie", "gone"], int]:
    """Whether `pid` runs, and its start time (clock ticks since boot, /proc/<pid>/stat)."""

def oom_kills(pid: int, /) -> tuple[str, int] | None:
    """Where the kernel counts the OOM kills of `pid`'s memory cgroup (0: this process):
    cgroup v2 ``memory.events``, v1 ``memory.oom_control``, else ``/proc/vmstat``; and
    the ``oom_kill`` count in it. None when none of them can be read."""

def unlink_segment(name: str, /) -> None: ...
def list_segments(prefix: str, /) -> list[str]:
    """Sorted names ("/<name>") of this user's segments whose name starts with `prefix`;
    [] where segments cannot be listed."""
def segment_exists(name: str, /) -> bool: ...

# --------------------------------------------------------------------------------------
# The recorder behind memtrack.record (csrc/sampler.c)

@final
class PeakWatch:
    """The exact rss peak between start() and stop(), in every thread, without a record."""

    def start(self) -> None: ...
    def stop(self) -> tuple[int, int, int, float]:
        """(rss_start, rss_end, peak_rss, duration)."""
        ...

class Recorder:
    """Recorder(fd, interval, table=None, root_pid=0, pss_every=10, self_role='root').

    A native thread that samples every `interval` seconds (0.001 to 3600) and appends
    msgpack records (docs/format.md) to the open file descriptor `fd`, in chunks.
    ``table`` is a worker table name to sample; ``root_pid`` > 0 also samples every
    descendant of that process through /proc; pss is read at most every `pss_every` samples and within a CPU budget
    (estimated from the RSS change in between). ``self_role`` is this process's role in
    the recording: "root" (it runs the pool) or "tool" (memtrack run: in no figure).
    """

    def __init__(
        self,
        fd: int,
        interval: float,
        table: str | None = None,
        root_pid: int = 0,
        pss_every: int = 10,
        self_role: Literal["root", "tool"] = "root",
    ) -> None: ...
    def start(self) -> None: ...
    def stop(self) -> dict[str, Any]:
        """Stop, write what is buffered, return the status; raises the first write error."""

    def status(self) -> dict[str, Any]:
        """{"samples", "bytes", "live", "pool_rss", "pool_pss", "pool_peak", "max_pool_pss",
        "max_pool_peak", "self_rss": int, "failed", "running": bool}."""

# Allocation tracking (csrc/alloc.c); memtrack.allocations is the public face.
ALLOC_MAX_FRAMES: Final[int]

def alloc_start(*, interval: int = ..., frames: int = ..., seed: int = ...) -> None: ...
def alloc_stop() -> bool: ...
def alloc_clear() -> None: ...
def alloc_counters() -> dict[str, Any]: ...
def alloc_sites() -> list[
    tuple[str, tuple[tuple[str, int, str], ...], int, float, float, float, int, bool]
]: ...
def alloc_install_numpy(capsule: Any) -> bool: ...
def alloc_uninstall_numpy() -> bool: ...
