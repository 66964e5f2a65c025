"""``memtrack.record(path)``: a timeline of this process and its worker pool, as a profile.

A native thread samples every ``interval`` seconds (without the GIL) and appends msgpack
records to `path` in chunks, so a run that is killed leaves a file readable up to its last
chunk (``memtrack.load(path, partial=True)``). See docs/format.md for the records.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import tempfile
import threading
import time
import warnings
from typing import Any

from .. import _alloc, _core
from ..pool.table import TableError, WorkerTable, latest_open_table, valid_interval
from .files import profile_header, summarise_by_path, summary_fields, summary_records

ENV_PROFILE = "MEMTRACK_PROFILE"
ENV_INTERVAL = "MEMTRACK_INTERVAL"
DEFAULT_INTERVAL = 0.05


def default_interval() -> float:
    """``MEMTRACK_INTERVAL`` (seconds) when set and valid, else 0.05."""
    text = os.environ.get(ENV_INTERVAL)
    if not text:
        return DEFAULT_INTERVAL
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{ENV_INTERVAL}={text!r} is not a number of seconds") from None
    if not valid_interval(value):
        raise ValueError(f"{ENV_INTERVAL}={text!r} must be between "
                         f"{_core.MIN_INTERVAL:g} and {_core.MAX_INTERVAL:g} seconds")
    return value


def _limits() -> tuple[dict[str, Any], int]:
    from ..limits import cpu_limit, system_memory

    try:
        limits = dataclasses.asdict(system_memory())
    except (OSError, ValueError) as e:
        limits = {"error": str(e)}
    return limits, cpu_limit()


def _worker_record(w: _core.WorkerStats, role: str | None = None) -> dict[str, Any]:
    return {
        "t": "worker", "source": "table", "role": role or "worker", "pid": w.pid,
        "slot": w.slot, "state": w.state, "tasks": w.tasks,
        "rss": w.rss, "peak_rss": w.peak_rss, "uss": w.uss, "pss": w.pss, "phase": w.phase,
        "exit_code": w.exit_code, "exit_signal": w.exit_signal, "joined": w.joined,
        "updated": w.updated, "error": w.error,
        "phases": {path: summary_fields(s) for path, s in (w.phases or {}).items()},
    }


class record:
    """Record a memory timeline of this process (and of a worker pool) to `path`.

    ``with memtrack.record("run.mtp"):`` samples this process every `interval` seconds
    (default 0.05, or ``MEMTRACK_INTERVAL``): rss, the exact peak since the previous
    sample, pss at most every `pss_every` samples (default 1: as often as a CPU budget of
    0.2% of a core per process allows, so a 1 GB worker is read every few seconds and a
    small one every round; estimated from the RSS change in between), the current phase. When a :class:`WorkerTable`
    is open (`table`, or else the latest one this process opened) every worker slot is
    sampled too, with join/exit/death/phase/task events and the pool total. With
    `root_pid` every descendant of that process is sampled through ``/proc`` as well,
    memtrack-aware or not. At the end the file gets each worker's summary, this process's
    phases and summary, and an end record.

    With `allocations` (default: when allocation tracking is running here at the start)
    the file also gets the sampled allocation sites of this process and of every
    memtrack-aware process started during the recording, whatever its start method: the
    recording names a directory beside the file in ``MEMTRACK_ALLOC_DIR`` (and sets
    ``MEMTRACK_ALLOCATIONS=1``, and this process's interval and frames) for its
    children, which write their sites there (docs/allocations.md).
    """

    def __init__(self, path: str | os.PathLike[str], interval: float | None = None, *,
                 table: WorkerTable | None = None, root_pid: int | None = None,
                 pss_every: int = 1, command: list[str] | None = None,
                 allocations: bool | None = None) -> None:
        self.path = os.fspath(path)
        self.interval = default_interval() if interval is None else float(interval)
        if not valid_interval(self.interval):
            raise ValueError(f"interval must be between {_core.MIN_INTERVAL:g} and "
                             f"{_core.MAX_INTERVAL:g} seconds, not {interval!r}")
        if isinstance(pss_every, bool) or not isinstance(pss_every, int) or pss_every < 1:
            raise ValueError(f"pss_every must be a positive int, not {pss_every!r}")
        self.table = table
        self.root_pid = root_pid
        self.pss_every = pss_every
        self.command = command
        if allocations is not None and not isinstance(allocations, bool):
            raise TypeError(f"allocations must be True, False or None, not {allocations!r}")
        self.allocations = allocations
        self.sites_dir: str | None = None
        self._saved_env: dict[str, str | None] = {}
        self.status: dict[str, Any] | None = None
        self._recorder: Any = None
        self._fd = -1
        self._started = 0.0
        self._owner_pid = 0
        self._lock = threading.Lock()

    def __enter__(self) -> record:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        with self._lock:
            if self._recorder is not None:
                raise RuntimeError("this recording is already running")
            table = self.table if self.table is not None else latest_open_table()
            self.table = table
            header = profile_header("recording")
            limits, cpus = _limits()
            header.update(interval=self.interval, limits=limits, cpu_limit=cpus,
                          table=table.name if table else None, command=self.command,
                          root_pid=self.root_pid or os.getpid(),
                          started=time.monotonic())
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, _core.pack(header))
                # With a root_pid the command is another process and this one is
                # memtrack's own (memtrack run): in no figure. Else this process
                # is the root of the pool it records.
                self._recorder = _core.Recorder(fd, self.interval,
                                                table=table.name if table else None,
                                                root_pid=self.root_pid or 0,
                                                pss_every=self.pss_every,
                                                self_role="tool" if self.root_pid else "root")
                self._started = header["started"]
                self._owner_pid = os.getpid()
                self.share_sites()
                self._recorder.start()
            except BaseException:
                self._recorder = None
                os.close(fd)
                raise
            self._fd = fd

    def allocation_environ(self) -> dict[str, str]:
        """What a child needs to track allocations and share its sites (empty when off)."""
        if self.sites_dir is None:
            return {}
        env = {_alloc.ENV_ALLOCATIONS: "1", _alloc.ENV_SITES_DIR: self.sites_dir}
        c = _core.alloc_counters()
        if c["running"]:  # children sample like this process
            env[_alloc.ENV_INTERVAL] = str(c["interval"])
            env[_alloc.ENV_FRAMES] = str(c["frames"])
        return env

    def share_sites(self) -> None:
        """Create the directory for the workers' sites (done by start(); call it earlier
        when a child must be started before the recording, as ``memtrack run`` does)."""
        if self.sites_dir is not None:
            return
        on = self.allocations
        if on is None:
            on = _core.alloc_counters()["running"]
        if not on:
            return
        self.sites_dir = tempfile.mkdtemp(prefix=os.path.basename(self.path) + ".",
                                          suffix=_alloc.SITES_SUFFIX,
                                          dir=os.path.dirname(os.path.abspath(self.path)))
        for key, value in self.allocation_environ().items():
            self._saved_env[key] = os.environ.get(key)
            os.environ[key] = value

    def _gather_sites(self) -> list[dict[str, Any]]:
        """This process's sites and those the workers left: ``site`` records."""
        if self.sites_dir is None:
            return []
        records = _alloc.site_records()
        shared, problems = _alloc.read_shared_sites(self.sites_dir)
        records += [r for r in shared if r["pid"] != os.getpid()]
        if problems:
            records.append({"t": "site_problems", "problems": problems})
        self.discard_sites()
        return records

    def discard_sites(self) -> None:
        """Put the environment back and remove the sites directory."""
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = {}
        if self.sites_dir is not None:
            shutil.rmtree(self.sites_dir, ignore_errors=True)
            self.sites_dir = None

    def live_status(self) -> dict[str, Any]:
        """The latest pool figures from the sampling thread (for a status line)."""
        rec = self._recorder
        return rec.status() if rec is not None else dict(self.status or {})

    def stop(self) -> dict[str, Any]:
        """Stop sampling, append the summaries and the end record, close the file."""
        with self._lock:
            if self._owner_pid != os.getpid():
                # A forked child inherited this object (and an atexit hook): the
                # recording and its file are the parent's; the thread is not here.
                self._recorder = None
                return dict(self.status or {})
            rec, self._recorder = self._recorder, None
            if rec is None:
                return dict(self.status or {})
            try:
                self.status = rec.stop()
                workers = []
                if self.table is not None and not self.table.closed:
                    roles = self.status.get("roles") or {}
                    try:
                        workers = [_worker_record(w, roles.get(w.pid))
                                   for w in self.table.workers(check=True)]
                    except TableError:
                        pass  # damaged under us (resized, rewritten): no summaries to trust
                # Only the phases of the recording's own span, and their summary. (Two
                # snapshots of the ring: a phase another thread ends between them is in
                # one only, as it would be a moment later in neither.)
                phases, _dropped = _core.pack_phase_records(since=self._started)
                own = [s for s in _core.records()[0] if s.start >= self._started]
                tail = [*summary_records(summarise_by_path(own)), *self._gather_sites(),
                        {"t": "end", "time": time.monotonic(),
                         "samples": self.status["samples"]}]
                os.write(self._fd, b"".join([*map(_core.pack, workers), phases,
                                             *map(_core.pack, tail)]))
            finally:
                os.close(self._fd)
                self._fd = -1
            return self.status


_env_recording: record | None = None


def record_from_environment() -> None:
    """``MEMTRACK_PROFILE=path``: record this process from import to exit."""
    global _env_recording
    path = os.environ.get(ENV_PROFILE)
    if not path or _env_recording is not None:
        return
    if "{pid}" not in path:
        # Children inherit the environment: without a {pid} in the path they would
        # overwrite this file, so only this process records.
        del os.environ[ENV_PROFILE]
    path = path.replace("{pid}", str(os.getpid()))
    try:
        recording = record(path)
        recording.start()
    except (OSError, ValueError) as e:
        # A misconfigured environment must not stop the program from importing us.
        warnings.warn(f"memtrack: {ENV_PROFILE}={path!r}: {e}; not recording",
                      RuntimeWarning, stacklevel=2)
        return
    _env_recording = recording
    atexit.register(recording.stop)
