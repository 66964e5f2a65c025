"""The worker table: a shared-memory segment every pool worker writes, read live by the parent.

The parent creates a :class:`WorkerTable`; each worker joins it (``initializer=init_worker``,
or ``MEMTRACK_TABLE`` in the environment) and claims one slot that its phases update from C.
The parent reads every slot at any time, also after a worker has died.
"""

from __future__ import annotations

import atexit
import os
import secrets
import warnings
import weakref
from dataclasses import dataclass

from .. import _core
from .._sizes import format_size

WorkerStats = _core.WorkerStats
TableError = _core.TableError

ENV_TABLE = "MEMTRACK_TABLE"
DEFAULT_HEARTBEAT = 0.1
#: The most workers one table holds (the C layout's limit).
MAX_CAPACITY: int = _core.MAX_CAPACITY
#: Every interval memtrack accepts (heartbeat, recorder), as the C core checks it.
INTERVALS = f"{_core.MIN_INTERVAL:g}..{_core.MAX_INTERVAL:g}"


def valid_interval(seconds: float) -> bool:
    """Whether `seconds` is within the intervals memtrack accepts."""
    return _core.MIN_INTERVAL <= seconds <= _core.MAX_INTERVAL


def _prefix() -> str:
    return f"memtrack-{os.getuid()}-"


@dataclass(frozen=True)
class Totals:
    """The pool at one moment: what the live workers hold together."""

    live: int  #: workers alive (idle or running)
    rss: int  #: sum of their rss (shared pages counted once per worker)
    pss: int  #: sum of their pss (shared pages counted once in all)
    uss: int  #: sum of their private memory
    peak_rss: int  #: the largest peak_rss of any worker, dead ones included
    dead: int  #: workers that exited or were killed
    #: the pool's memory: each live worker's pss, or its rss until its first pss reading
    memory: int = 0
    #: the pool's memory now: each live worker's latest rss less the shared part (rss - pss)
    #: of its latest pss reading (rss is fresh at every heartbeat, pss every tenth), or its
    #: rss until its first pss reading
    fresh_memory: int = 0

    def __str__(self) -> str:
        return (
            f"{self.live} live ({self.dead} dead): rss {format_size(self.rss)}, "
            f"pss {format_size(self.pss)}, uss {format_size(self.uss)}, "
            f"largest worker peak {format_size(self.peak_rss)}"
        )


_TOTALS_FIELDS = ("live", "rss", "pss", "uss", "peak_rss", "dead", "memory", "fresh_memory")


class WorkerTable:
    """A shared-memory table of pool workers, created by the parent of a pool.

    ``WorkerTable(capacity=64)`` creates a segment (mode 0600, unguessable name) that holds
    up to `capacity` workers at once; ``heartbeat`` is how often (seconds) each worker
    refreshes its rss/peak while inside a long phase (0 disables it). The creator removes
    the segment on :meth:`close`, on leaving the ``with`` block, and at interpreter exit.
    Use :meth:`attach` to read a table another process created.
    """

    def __init__(
        self, capacity: int = 64, name: str | None = None, *, heartbeat: float = DEFAULT_HEARTBEAT
    ) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise TypeError(f"capacity must be an int, not {type(capacity).__name__}")
        if not 1 <= capacity <= MAX_CAPACITY:
            raise ValueError(
                f"capacity must be between 1 and {MAX_CAPACITY} workers, not {capacity}")
        if (
            isinstance(heartbeat, bool)
            or not isinstance(heartbeat, (int, float))
            or not (heartbeat == 0 or valid_interval(heartbeat))
        ):
            raise ValueError(f"heartbeat must be 0 (off) or {INTERVALS} seconds, not {heartbeat!r}")
        cleanup_stale()
        name = f"/{_prefix()}{secrets.token_hex(12)}" if name is None else _normalise(name)
        self._segment = _core.Segment(name, capacity=capacity, heartbeat_ms=round(heartbeat * 1000))
        self._owner = True
        #: The kernel's OOM-kill counters when the table was made (this process's cgroup's,
        #: and the host's): forensics.deaths() tells an OOM kill from them.
        self.oom_baseline = oom_counters()
        self._finalizer = weakref.finalize(self, self._segment.close)
        _open_tables.append(weakref.ref(self))

    @classmethod
    def attach(cls, name: str) -> WorkerTable:
        """Open an existing table to read it (``memtrack top``); closing it removes nothing."""
        table = cls.__new__(cls)
        table._segment = _core.Segment(_normalise(name))
        table._owner = False
        table.oom_baseline = oom_counters()
        table._finalizer = weakref.finalize(table, table._segment.close)
        return table

    @property
    def name(self) -> str:
        """The segment name: pass it to :func:`init_worker` or put it in ``MEMTRACK_TABLE``."""
        return self._segment.name

    @property
    def capacity(self) -> int:
        return self._segment.header()["capacity"]

    @property
    def closed(self) -> bool:
        return self._segment.closed

    def header(self) -> dict:
        """The segment header: version, capacity, slot size, creator pid and start, heartbeat."""
        return self._segment.header()

    @property
    def damage(self) -> str | None:
        """Why the table can no longer be read (another process resized it or rewrote its
        header), or None. Once damaged, :meth:`workers` and :meth:`totals` raise TableError."""
        return self._segment.damage()

    def workers(self, *, check: bool = False) -> list[WorkerStats]:
        """Every worker that has claimed a slot, dead ones included, each read consistently.

        A worker that stopped updating is checked against ``/proc`` (pid and start time, so
        a reused pid is not mistaken for it). ``check=True`` checks every worker now, as
        forensics after a broken pool should. A slot that fails validation comes back with
        ``state == "corrupt"`` and the field named in ``error``; a slot its live worker kept
        mid-write for the whole read (a fixed budget of 2 ms, not per slot) comes back
        ``"busy"``. Neither stops the others. The views are read-only and decode a field when
        it is read; a slot that did not change since the last call gives the same view.
        Raises TableError when the table is damaged (see :attr:`damage`).
        """
        return self._segment.read(check=check)

    def totals(self) -> Totals:
        """Live workers and their summed rss / pss / uss, and the largest worker peak.

        Summed in C from one read of the table, without a Python object per worker: poll
        this, not :meth:`workers`. Busy and corrupt slots count in neither live nor dead."""
        # Filled without the dataclass's __init__ (8 frozen setattrs cost more than the
        # read itself): a poll at every task must stay cheap.
        totals = object.__new__(Totals)
        totals.__dict__.update(zip(_TOTALS_FIELDS, self._segment.totals()))
        return totals

    def forget_dead(self) -> int:
        """Free the slots of dead workers; returns how many."""
        return self._segment.forget_dead()

    def record_exit(self, pid: int, exitcode: int) -> bool:
        """Record what the pool learned about a worker's end (``Process.exitcode``:
        negative for a signal). Returns False when no slot belongs to `pid`."""
        return self._segment.record_exit(pid, exitcode)

    def environ(self) -> dict[str, str]:
        """``{"MEMTRACK_TABLE": name}``: for ``env=`` of a subprocess that should join."""
        return {ENV_TABLE: self.name}

    def close(self) -> None:
        """Unmap the segment; the creator also removes it. Safe to call twice."""
        self._finalizer()

    def __enter__(self) -> WorkerTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"capacity={self.capacity}"
        return f"<WorkerTable {self.name} {state}>"


_open_tables: list[weakref.ref[WorkerTable]] = []


def latest_open_table() -> WorkerTable | None:
    """The table this process created most recently and has not closed, if any."""
    _open_tables[:] = [r for r in _open_tables if r() is not None and not r().closed]
    for ref in reversed(_open_tables):
        table = ref()
        if table is not None and not table.closed and _core.segment_exists(table.name):
            return table
    return None


def _normalise(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"table name must be a str, not {type(name).__name__}")
    return name if name.startswith("/") else "/" + name


def _this_users_tables() -> list[tuple[str, bool, str | None]]:
    """(name, whether its creator is alive, what is damaged or None) of each table of this
    user, sorted by name.

    The one scan behind :func:`cleanup_stale` and :func:`live_tables`. A creator is alive
    only if its pid runs with the same start time as recorded in the header, so a reused
    pid does not keep a stale table alive. Segments that are unreadable, not tables, or
    made in another pid namespace (a container sharing the segments: its creator's pid
    means nothing here) are left out: not ours to judge.
    """
    found = []
    for name in _core.list_segments(_prefix()):
        try:
            pid, start, same_namespace, damage = _core.segment_creator(name)
        except (OSError, TableError):
            continue
        if not same_namespace:
            continue
        state, actual_start = _core.proc_identity(pid)
        found.append((name, state == "alive" and actual_start == start, damage))
    return found


def cleanup_stale() -> list[str]:
    """Remove this user's tables whose creator has died without removing them.

    A damaged table of this user (resized, wrong mode or layout version) whose creator is
    dead is removed too. Returns the names removed.
    """
    removed = []
    for name, alive, _damage in _this_users_tables():
        if not alive:
            try:
                _core.unlink_segment(name)
                removed.append(name)
            except OSError:
                pass
    return removed


def live_tables() -> list[str]:
    """Names of this user's tables whose creator is alive (for ``memtrack top``).

    Only tables that a reader can attach: owned by this user, a regular file of mode 0600,
    and undamaged (a header that matches the file's size and this layout version)."""
    return [name for name, alive, damage in _this_users_tables() if alive and damage is None]


# --------------------------------------------------------------------------------------
# The worker side

_warned_full = False


def _install_exit_hooks() -> None:
    """Mark this worker "exited" when it ends normally (not when it is killed).

    multiprocessing children leave through os._exit, which skips atexit, so a
    multiprocessing finalizer is registered too; its registry is cleared when a
    multiprocessing child starts, so it is registered again after that.
    """
    import multiprocessing.util as mp_util

    mp_util.Finalize(None, _core.leave, exitpriority=-100)


class _AfterBootstrap:
    """A weak-referenceable key for multiprocessing's after-fork registry."""


_after_bootstrap = _AfterBootstrap()


def _joined(index: int, name: str) -> None:
    global _warned_full
    if index >= 0:
        _install_exit_hooks()
        return
    if not _warned_full:
        _warned_full = True
        warnings.warn(
            f"memtrack: worker table {name} is full; pid {os.getpid()} runs untracked",
            RuntimeWarning,
            stacklevel=3,
        )


def init_worker(name: str, heartbeat: float | None = None) -> int:
    """Join the worker table `name`: use as ``initializer=memtrack.init_worker``.

    Claims a slot for this process (a free one, else the oldest dead one). When the
    table is full, gone or not a table, the worker runs untracked with a warning that
    says why: memtrack never breaks a pool. Returns the slot index, or -1 when
    untracked. ``heartbeat`` overrides the
    table's refresh interval for this worker (seconds; 0 disables).
    """
    name = _normalise(name)
    if heartbeat is not None and (isinstance(heartbeat, bool)
                                  or not isinstance(heartbeat, (int, float))):
        raise TypeError(f"heartbeat must be a number of seconds, not {type(heartbeat).__name__}")
    try:
        index = _core.join(name)
    except (OSError, TableError) as e:
        # As a pool initializer, raising would break the pool: run untracked, and say why.
        gone = " (closed by its creator?)" if isinstance(e, FileNotFoundError) else ""
        warnings.warn(f"memtrack: cannot join worker table {name}{gone}: {e}; "
                      f"pid {os.getpid()} runs untracked", RuntimeWarning, stacklevel=2)
        return -1
    _joined(index, name)
    if heartbeat is not None and index >= 0:
        _core.set_heartbeat(heartbeat)
    return index


def task_done() -> None:
    """Count one task for this worker (an outermost phase ending counts one by itself)."""
    _core.task_done()


def worker_slot() -> tuple[str, int] | None:
    """(table name, slot index) when this process is a joined worker, else None."""
    return _core.worker_info()


ROLES = ("worker", "tool", "root", "helper", "other")


def set_role(role: str) -> bool:
    """Say what this process is to the pool, in its slot (``WorkerStats.role``): "worker"
    (what every slot starts as), "tool", "root", "helper" or "other". Returns False when
    this process holds no slot."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    return _core.set_role(role)


def set_heartbeat(seconds: float) -> None:
    """Change this worker's heartbeat interval (0 disables the thread)."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"heartbeat must be a number of seconds, not {type(seconds).__name__}")
    _core.set_heartbeat(float(seconds))


def _after_fork_in_child() -> None:
    """A forked child claims its own slot: in the table its parent had joined, else in the
    one MEMTRACK_TABLE names (a pool forked by a parent that set it after importing us)."""
    index = _core.rejoin()
    if index is not None:
        info = _core.worker_info()
        _joined(index, info[0] if info else "(table)")
    elif os.environ.get(ENV_TABLE) and not _core.capabilities()["disabled"]:
        join_from_environment(in_forkserver=False)


def _in_forkserver() -> bool:
    """The forkserver process only forks workers: it must not take a slot itself.

    Its children inherit its command line, so a process is the forkserver only when its
    own command line runs multiprocessing.forkserver and its parent's does not.
    """
    marker = "multiprocessing.forkserver"
    if not any(marker in arg for arg in getattr(os.sys, "orig_argv", ())):
        return False
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return marker.encode() not in f.read()
    except OSError:
        return True


def join_from_environment(*, in_forkserver: bool | None = None) -> None:
    name = os.environ.get(ENV_TABLE)
    if in_forkserver is None:
        in_forkserver = _in_forkserver()
    if not name or _core.worker_info() is not None or in_forkserver:
        return
    try:
        init_worker(name)
    except (OSError, TableError, ValueError) as e:
        warnings.warn(
            f"memtrack: cannot join {ENV_TABLE}={name}: {e}; running untracked",
            RuntimeWarning,
            stacklevel=2,
        )


def register_process_hooks() -> None:
    import multiprocessing.util as mp_util

    os.register_at_fork(after_in_child=_after_fork_in_child)
    mp_util.register_after_fork(
        _after_bootstrap,
        lambda _obj: _install_exit_hooks() if _core.worker_info() is not None else None,
    )
    atexit.register(_core.leave)


def oom_counters() -> list[tuple[str, int]]:
    """The OOM-kill counter of this process's memory cgroup now (cgroup v2, v1, else the
    host's /proc/vmstat when neither is readable), as [(file, kills)], or []."""
    own = _core.oom_kills(0)
    return [own] if own is not None else []
