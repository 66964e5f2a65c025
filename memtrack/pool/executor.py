"""MemoryAwareExecutor: a process pool that sizes, throttles and recycles its workers by memory.

It is a :class:`concurrent.futures.Executor` built from the standard library's own parts.
Each worker is a one-process :class:`~concurrent.futures.ProcessPoolExecutor`, so starting
processes, running the initializer, pickling calls and noticing a dead process are the
standard library's code; what is added is one dispatcher thread in front of them that
decides *when* and *to which worker* the next task goes:

- a task goes to a worker only when that worker is idle, so at most one task per worker
  is ever in flight and pausing really stops new work;
- before handing a task out, the pool's memory is compared with ``pause_at`` of the limit;
  above it nothing is handed out (queued tasks wait, running ones finish) until it falls;
- after each task the worker reports the memory it retained (when its plain RSS is over
  the leak bound, measured again after collecting garbage and returning free heap to the
  OS, since only that decides); a worker that retains more than ``leak_threshold`` over
  what it held after its first task is replaced between two tasks: only that worker, and
  no task is lost;
- when a worker dies, its one-process pool breaks and the executor turns that into a
  :class:`~concurrent.futures.process.BrokenProcessPool` carrying the worker table's
  forensics (pid, last phase, rss, peak, how it ended).

See docs/executor.md for the design and its trade-offs.
"""

from __future__ import annotations

import collections
import functools
import io
import itertools
import logging
import math
import multiprocessing as mp
import os
import pickle
import queue
import threading
import time
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError, Executor, Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing.reduction import ForkingPickler
from typing import Any

from .. import _core
from .._sizes import format_size, parse_size
from ..leaks import retained_rss
from ..limits import cpu_limit_info, system_memory
from ..sizing import WorkerPlan, plan_workers
from .forensics import deaths, describe_exit, exit_status
from .memory import PoolMemory
from .table import MAX_CAPACITY, WorkerTable, init_worker

__all__ = ["MemoryAwareExecutor", "PoolEvent"]

_log = logging.getLogger("memtrack.executor")  # the documented name (docs/executor.md)

#: How often a paused pool looks at memory again (seconds).
PAUSE_POLL = 0.05
#: The default probe reads cgroup files (~1 ms); it reuses a reading this young (seconds).
CGROUP_PROBE_EVERY = 0.05
#: A pause with no task running that lasts this long is warned about once (seconds): while
#: every worker is idle, waiting alone may never bring the pool's memory down.
STALL_WARNING_AFTER = 30.0


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class PoolEvent:
    """Something the executor did or saw: a pause, a resume, a recycle or a death.

    ``numbers`` holds the figures behind it in bytes (or counts): for "pause"/"resume"
    ``used``, ``limit``, ``threshold``, ``running``, ``queued``; for "recycle"
    ``retained``, ``baseline``, ``growth``, ``leak_threshold``, ``tasks``; for "death"
    ``rss``, ``peak_rss``, ``tasks`` as far as the worker table knows them.
    """

    kind: str  #: "pause", "resume", "recycle" or "death"
    time: float  #: seconds since the epoch (``time.time()``)
    pid: int | None  #: the worker concerned (None for pauses and resumes)
    detail: str  #: one line for a person
    numbers: dict[str, int] = field(default_factory=dict, hash=False)

    def __str__(self) -> str:
        who = f" worker {self.pid}" if self.pid is not None else ""
        return f"{self.kind}{who}: {self.detail}"


# --------------------------------------------------------------------------- the worker side


def _init_worker(table_name: str, initializer: Callable[..., Any] | None,
                 initargs: tuple[Any, ...]) -> None:
    """Initializer of every worker: join the table, then run the user's initializer."""
    init_worker(table_name)
    if initializer is not None:
        initializer(*initargs)


def _dumps(obj: Any) -> bytes:
    """Pickle as multiprocessing would (its reducers included)."""
    buf = io.BytesIO()
    ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def _dumps_exception(exc: BaseException) -> bytes:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    exc.__traceback__ = None  # its frames may hold the task's data: do not keep them
    try:
        return _dumps((exc, text))
    except BaseException as pickling_error:  # noqa: BLE001 - any pickling failure
        stand_in = RuntimeError(f"{type(exc).__name__}: {exc} (the exception could not be "
                                f"pickled: {pickling_error!r})")
        return _dumps((stand_in, text))


# What a task sends back: (kind, value, pid, retained). kind RESULT: value is the result
# itself (nothing measured); PICKLED: the pickled result; ERROR: a pickled (exception,
# traceback text).
_RESULT, _PICKLED, _ERROR = 0, 1, 2


def _run_task(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
              bound: int | None) -> tuple[int, Any, int, int | None]:
    """Run one task in a worker and report the memory it retained (unless ``bound`` is None).

    Retained memory is the RSS after ``gc.collect()`` and ``malloc_trim(0)``. Both only
    lower the RSS, so when the plain RSS is already at most ``bound`` (the level that
    would count as a leak) they cannot change the verdict and are skipped: a full
    collection costs milliseconds in a large heap. ``bound=0`` always measures fully (a
    worker's first task sets its baseline).

    The result is pickled here, so that the measurement does not count the result object
    the parent is about to receive; the pickled bytes themselves are subtracted.
    """
    pid = os.getpid()
    if bound is None:
        return _RESULT, fn(*args, **kwargs), pid, None
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - sent back, as ProcessPoolExecutor does
        kind, payload = _ERROR, _dumps_exception(exc)
    else:
        try:
            kind, payload = _PICKLED, _dumps(result)
        except BaseException as exc:  # noqa: BLE001
            kind, payload = _ERROR, _dumps_exception(exc)
        del result
    retained = max(0, _core.rss() - len(payload))
    if retained > bound:
        retained = max(0, retained_rss() - len(payload))
    return kind, payload, pid, retained


def _run_chunk(fn: Callable[..., Any], chunk: tuple[tuple[Any, ...], ...]) -> list[Any]:
    return [fn(*args) for args in chunk]


class _RemoteTraceback(Exception):
    """The worker's traceback, shown as the cause of an exception raised by a task."""

    def __init__(self, tb: str) -> None:
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def _decode(kind: int, value: Any) -> tuple[Any, BaseException | None]:
    if kind == _RESULT:
        return value, None
    if kind == _PICKLED:
        return pickle.loads(value), None
    exc, text = pickle.loads(value)
    exc.__cause__ = _RemoteTraceback(f'\n"""\n{text}"""')
    return None, exc


# --------------------------------------------------------------------------- memory probes


def default_context() -> Any:
    """The start method of a MemoryAwareExecutor given no ``mp_context``: "forkserver"
    where the platform has it and no start method was chosen with
    ``multiprocessing.set_start_method``, else multiprocessing's default.

    The executor runs threads (its dispatcher, each worker pool's manager), and fork()
    from a threaded process is unsafe (Python 3.12+ warns about it): a forkserver forks
    from its own single-threaded process. It is Python 3.14's default on Linux too.
    """
    if mp.get_start_method(allow_none=True) is None and \
            "forkserver" in mp.get_all_start_methods():
        return mp.get_context("forkserver")
    return mp.get_context()


def table_capacity(workers: int) -> int:
    """Slots for a pool of `workers`: as many again for their replacements (a recycled or
    dead worker's slot keeps its last figures for forensics until a newcomer needs the
    room), and 4 spare."""
    return min(MAX_CAPACITY, 2 * workers + 4)


class _CgroupUsage:
    """The default probe when a cgroup limit binds: the cgroup's usage (it counts every
    process of the container, not only the pool), reused while younger than
    CGROUP_PROBE_EVERY. Without a cgroup limit the probe is :class:`PoolMemory`."""

    source = "cgroup usage"

    def __init__(self) -> None:
        self._last = (-math.inf, 0)

    def __call__(self) -> int:
        now = time.monotonic()
        if now - self._last[0] >= CGROUP_PROBE_EVERY:
            self._last = (now, system_memory().used)
        return self._last[1]


# --------------------------------------------------------------------------- the dispatcher


def _ended(exitcode: int | None) -> str:
    """How a process ended, from its multiprocessing exit code, after "worker 42 "."""
    if exitcode is None:
        return "ended"
    words = describe_exit(*exit_status(exitcode))
    return f"was {words}" if words.startswith("killed") else words


class _Task:
    __slots__ = ("future", "fn", "args", "kwargs")

    def __init__(self, future: Future, fn: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> None:
        self.future, self.fn, self.args, self.kwargs = future, fn, args, kwargs


class _Worker:
    """One worker: a one-process ProcessPoolExecutor and what the dispatcher knows of it.

    Only the dispatcher thread reads or writes these fields (a retiring thread only shuts
    ``pool`` down and reports back through the inbox).
    """

    __slots__ = ("index", "pool", "state", "task", "pid", "baseline", "tasks")

    def __init__(self, index: int) -> None:
        self.index = index
        self.pool: ProcessPoolExecutor | None = None  # made when it first gets a task
        self.state = "idle"  # "idle", "busy", "retiring", "dead" or "closed"
        self.task: _Task | None = None
        self.pid: int | None = None
        self.baseline: int | None = None  # retained after its first task
        self.tasks = 0


_WAKE = ("wake",)


class _Dispatcher:
    """The thread that hands queued tasks to idle workers, and everything it decides.

    ``lock`` protects ``pending``, ``shutting_down``, ``exiting`` and ``broken``: the
    fields that ``submit()`` and ``shutdown()`` touch from the caller's threads.
    ``start_lock`` serializes the first ``submit()`` calls, which start the workers and
    the thread. Everything else is the dispatcher thread's alone once it runs; other
    threads talk to it through ``inbox``.

    Every worker process is started before it can be needed at interpreter exit: the
    first ``submit()`` starts them all in the caller's thread and waits until each has
    run a first call (its pool's threads are up then), and a replacement starts as soon
    as the worker it replaces has gone. Python 3.12 refuses to start threads and to
    fork once the interpreter is shutting down, so a pool that started its processes
    lazily would drop the tasks still queued at exit.
    """

    def __init__(self, *, workers: int, table: WorkerTable, mp_context: Any,
                 initializer: Callable[..., Any] | None, initargs: tuple[Any, ...],
                 pause_at: float | None, limit: int, probe: Callable[[], int],
                 probe_source: str, leak_threshold: int | None) -> None:
        self.table = table
        self.mp_context = mp_context
        self.initargs = (table.name, initializer, initargs)
        self.pause_at = pause_at
        self.limit = limit
        self.threshold = None if pause_at is None else math.floor(pause_at * limit)
        self.probe = probe
        self.probe_source = probe_source
        self.leak_threshold = leak_threshold

        self.lock = threading.Lock()
        self.pending: collections.deque[_Task] = collections.deque()  # protected by lock
        self.shutting_down = False  # protected by lock
        self.exiting = False  # protected by lock: the interpreter is shutting down
        self.start_lock = threading.Lock()
        self.broken: str | None = None  # protected by lock

        self.inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.workers = [_Worker(i) for i in range(workers)]
        self.events: list[PoolEvent] = []
        self.paused = False
        self.paused_since = 0.0
        self.stall_warned = False
        self.probe_warned = False
        self.retirements: list[threading.Thread] = []
        self.thread: threading.Thread | None = None

    # ------------------------------------------------------------------ caller's side

    def start(self) -> None:
        """Start every worker, then the thread: once, from the first submit(), in the
        caller's thread (not under ``lock``: starting processes takes a while)."""
        with self.start_lock:
            if self.thread is not None:
                return
            first_calls = []
            try:
                for worker in self.workers:
                    worker.pool = self._new_pool()
                    first_calls.append(worker.pool.submit(os.getpid))
            except BaseException:
                for worker in self.workers:
                    if worker.pool is not None:
                        worker.pool.shutdown(wait=False, cancel_futures=True)
                        worker.pool = None
                raise
            # A worker whose start failed (its initializer raised, it died) has a broken
            # pool: its first task reports that, with the forensics, as before.
            wait_futures(first_calls)
            for worker, call in zip(self.workers, first_calls):
                if call.exception() is None:
                    worker.pid = call.result()
            thread = threading.Thread(target=self.run, name="memtrack-dispatcher",
                                      daemon=True)
            thread.start()
            self.thread = thread
            _live_dispatchers.add(self)

    def stop(self, *, cancel_futures: bool = False, wait: bool = True,
             exiting: bool = False) -> None:
        with self.lock:
            self.shutting_down = True
            self.exiting = self.exiting or exiting
            cancelled = list(self.pending) if cancel_futures else []
            if cancel_futures:
                self.pending.clear()
            thread = self.thread
        for task in cancelled:
            task.future.cancel()
        self.inbox.put(_WAKE)
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()

    # ------------------------------------------------------------------ the thread

    def run(self) -> None:
        try:
            while True:
                try:
                    message = self.inbox.get(timeout=self._poll_timeout())
                except queue.Empty:
                    message = None
                while message is not None:
                    self._handle(message)
                    try:
                        message = self.inbox.get_nowait()
                    except queue.Empty:
                        message = None
                with self.lock:
                    broken = self.broken
                if broken is not None:
                    self._fail_pending(broken)
                else:
                    self._dispatch()
                if self._finished():
                    return
        except BaseException:  # pragma: no cover - a bug here must not hang the callers
            _log.exception("memtrack: the MemoryAwareExecutor dispatcher failed")
            with self.lock:
                if self.broken is None:
                    self.broken = "the MemoryAwareExecutor's dispatcher thread failed"
            self._fail_pending(self.broken)
            for worker in self.workers:
                if worker.task is not None:
                    worker.task.future.set_exception(BrokenProcessPool(self.broken))
                    worker.task = None
            raise
        finally:
            self._close()

    def _poll_timeout(self) -> float | None:
        """Block until a message comes, except while paused with work queued: then look
        at memory again every PAUSE_POLL seconds."""
        if not self.paused:
            return None
        with self.lock:
            return PAUSE_POLL if self.pending else None

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "done":
            self._task_done(*message[1:])
        elif kind == "retired":
            self._retired(message[1])
        elif kind == "ready":
            self._ready(*message[1:])

    def _finished(self) -> bool:
        with self.lock:
            stopping = self.shutting_down or self.broken is not None
            waiting = bool(self.pending)
        if not stopping or waiting:
            return False
        return all(w.state not in ("busy", "retiring", "starting") for w in self.workers)

    # ------------------------------------------------------------------ handing out

    def _dispatch(self) -> None:
        while True:
            worker = next((w for w in self.workers if w.state == "idle"), None)
            if worker is None:
                return
            with self.lock:
                if not self.pending:
                    return
            one_only = False
            if self._memory_high():
                stalled = time.monotonic() - self.paused_since >= STALL_WARNING_AFTER
                if any(w.state == "busy" for w in self.workers) or not stalled:
                    return
                # Paused that long with nothing running: waiting has not lowered the
                # memory (idle workers hold it), so go on one task at a time rather
                # than stall for ever (and hang shutdown and interpreter exit).
                one_only = True
            with self.lock:
                if not self.pending:
                    return
                task = self.pending.popleft()
            if task.future.set_running_or_notify_cancel():
                self._start(worker, task)
            if one_only:
                return

    def _start(self, worker: _Worker, task: _Task) -> None:
        worker.task = task
        try:  # an idle worker always has its pool: start() or _retired() made it
            inner = worker.pool.submit(_run_task, task.fn, task.args, task.kwargs,
                                       self._leak_bound(worker))
        except BrokenProcessPool as exc:  # the process died while idle
            self._died(worker, exc)
            return
        except RuntimeError as exc:  # the interpreter is exiting
            worker.task = None
            task.future.set_exception(exc)
            return
        worker.state = "busy"
        inner.add_done_callback(functools.partial(self._post_done, worker, task))

    def _leak_bound(self, worker: _Worker) -> int | None:
        """What the worker may retain before it counts as leaking (see _run_task)."""
        if self.leak_threshold is None:
            return None
        if worker.baseline is None:
            return 0
        return worker.baseline + self.leak_threshold

    def _post_done(self, worker: _Worker, task: _Task, inner: Future) -> None:
        self.inbox.put(("done", worker, task, inner))

    def _memory_high(self) -> bool:
        """Whether the pool is above ``pause_at`` of the limit; records pauses/resumes."""
        if self.threshold is None:
            return False
        try:
            used = int(self.probe())
        except Exception as exc:  # noqa: BLE001 - a failing probe must not stop the pool
            if not self.probe_warned:
                self.probe_warned = True
                warnings.warn(f"memtrack: the memory probe failed ({exc!r}); the pool runs "
                              "without pausing until it answers again", RuntimeWarning,
                              stacklevel=2)
            return False
        high = used > self.threshold
        if high != self.paused:
            self.paused = high
            self.paused_since = time.monotonic()
            self.stall_warned = False
            self._pause_event("pause" if high else "resume", used)
        elif high:
            self._warn_if_stalled(used)
        return high

    def _pause_event(self, kind: str, used: int) -> None:
        running = sum(w.state == "busy" for w in self.workers)
        with self.lock:
            queued = len(self.pending)
        where = "above" if kind == "pause" else "back to or below"
        detail = (f"pool memory {format_size(used)} ({self.probe_source}) {where} "
                  f"{self.pause_at:.0%} of the {format_size(self.limit)} limit "
                  f"({format_size(self.threshold)}); {running} task(s) running, "
                  f"{queued} queued")
        self._record(kind, None, detail, used=used, limit=self.limit,
                     threshold=self.threshold, running=running, queued=queued)

    def _warn_if_stalled(self, used: int) -> None:
        if self.stall_warned or any(w.state == "busy" for w in self.workers):
            return
        if time.monotonic() - self.paused_since >= STALL_WARNING_AFTER:
            self.stall_warned = True
            warnings.warn(
                f"memtrack: the pool has been paused for {STALL_WARNING_AFTER:.0f} s: its memory "
                f"{format_size(used)} stays above {format_size(self.threshold)} even with its "
                "workers idle, so it runs one task at a time; lower max_workers or raise "
                "pause_at", RuntimeWarning, stacklevel=2)

    # ------------------------------------------------------------------ results

    def _task_done(self, worker: _Worker, task: _Task, inner: Future) -> None:
        worker.task = None
        worker.state = "idle"
        if inner.cancelled():  # never done by this module; kept safe all the same
            task.future.set_exception(CancelledError("the worker's pool cancelled the task"))
            return
        exc = inner.exception()
        if isinstance(exc, BrokenProcessPool):
            worker.task = task
            self._died(worker, exc)
            return
        if exc is not None:  # e.g. the arguments could not be pickled: the worker is fine
            task.future.set_exception(exc)
            return
        kind, value, pid, retained = inner.result()
        worker.pid = pid
        worker.tasks += 1
        try:
            result, error = _decode(kind, value)
        except BaseException as decode_error:  # noqa: BLE001 - the caller gets it
            result, error = None, decode_error
        del value
        if error is not None:
            task.future.set_exception(error)
        else:
            task.future.set_result(result)
        del result, error
        if retained is not None and self.leak_threshold is not None:
            self._check_leak(worker, retained)

    def _check_leak(self, worker: _Worker, retained: int) -> None:
        if worker.baseline is None:
            worker.baseline = retained
            return
        growth = retained - worker.baseline
        if growth <= self.leak_threshold:
            return
        with self.lock:
            exiting = self.exiting
        if exiting:  # no thread or process may start now (Python 3.12): keep it
            _log.info("memtrack: worker %s retained %s over its first task's level, kept: "
                      "the interpreter is exiting", worker.pid, format_size(growth))
            return
        detail = (f"retained {format_size(retained)} after task {worker.tasks}, "
                  f"{format_size(growth)} more than the {format_size(worker.baseline)} after "
                  f"its first task (leak_threshold {format_size(self.leak_threshold)}): "
                  "replaced by a fresh worker")
        self._record("recycle", worker.pid, detail, retained=retained,
                     baseline=worker.baseline, growth=growth,
                     leak_threshold=self.leak_threshold, tasks=worker.tasks)
        worker.state = "retiring"
        thread = threading.Thread(target=self._retire, args=(worker, worker.pool),
                                  name=f"memtrack-retire-{worker.pid}", daemon=True)
        self.retirements.append(thread)
        thread.start()

    def _retire(self, worker: _Worker, pool: ProcessPoolExecutor) -> None:
        """Let the worker's process exit (it is idle) before a fresh one replaces it, so
        the leaked memory is gone before new memory is taken."""
        try:
            pool.shutdown(wait=True)
        finally:
            self.inbox.put(("retired", worker))

    def _retired(self, worker: _Worker) -> None:
        self.retirements = [t for t in self.retirements if t.is_alive()]
        worker.pid = None
        worker.baseline = None
        worker.tasks = 0
        with self.lock:
            stopping = self.broken is not None or (self.shutting_down and not self.pending)
        if stopping:
            worker.state = "closed"
            return
        # The replacement starts now, not when a task needs it (which may be at exit).
        try:
            worker.pool = self._new_pool()
            first_call = worker.pool.submit(os.getpid)
        except RuntimeError as exc:  # the interpreter is exiting (Python 3.12 refuses)
            if worker.pool is not None:
                worker.pool.shutdown(wait=False)
            worker.pool = None
            worker.state = "closed"
            if all(w.state in ("closed", "dead") for w in self.workers):
                self._fail_pending(f"no worker is left to run the queued tasks: a recycled "
                                   f"worker could not be replaced ({exc})")
            return
        worker.state = "starting"
        first_call.add_done_callback(lambda call: self.inbox.put(("ready", worker, call)))

    def _ready(self, worker: _Worker, call: Future) -> None:
        """A replacement ran its first call: it takes tasks (if it died, its first task
        finds the broken pool and reports the death)."""
        if worker.state == "starting":
            worker.state = "idle"
            if call.exception() is None:
                worker.pid = call.result()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(1, mp_context=self.mp_context, initializer=_init_worker,
                                   initargs=self.initargs)

    # ------------------------------------------------------------------ deaths

    def _died(self, worker: _Worker, cause: BrokenProcessPool) -> None:
        """A worker's process died: the executor is broken, as a ProcessPoolExecutor is.

        Its task and every queued task fail with BrokenProcessPool carrying the worker
        table's forensics; tasks running in other workers finish; nothing new starts.
        """
        task, worker.task = worker.task, None
        worker.state = "dead"
        # The pool's process objects give the exit status once it has reaped them; the
        # attribute is private, so it only adds the signal to the forensics when present.
        processes = dict(getattr(worker.pool, "_processes", None) or {})
        worker.pool.shutdown(wait=True)
        for pid, process in processes.items():
            if process.exitcode is not None:
                self.table.record_exit(pid, process.exitcode)
        pid = next(iter(processes), worker.pid)

        found = deaths(self.table)
        joined = {w.pid for w in self.table.workers()}
        lines = [f"worker {p} {_ended(process.exitcode)} before it joined the worker "
                 "table (while starting: see its output)"
                 for p, process in processes.items() if p not in joined]
        lines += map(str, found)
        if not found:
            lines.append(
                "the worker table saw no worker killed: a process ended on its own (if the "
                "initializer raised, concurrent.futures logged its traceback)")
        forensics = "\n".join(lines)
        message = ("A worker of the MemoryAwareExecutor died; the pool is not usable "
                   f"anymore. What the worker table knows:\n{forensics}")
        with self.lock:
            if self.broken is None:
                self.broken = message
            message = self.broken

        death = next((d for d in found if pid is not None and d.pid == pid), None)
        line = str(death) if death is not None else None
        stats = next((w for w in self.table.workers() if w.pid == pid), None)
        numbers = {} if stats is None else {
            "rss": stats.rss, "peak_rss": stats.peak_rss, "tasks": stats.tasks}
        self._record("death", pid, line or f"worker died: {cause}", **numbers)

        if task is not None:
            error = BrokenProcessPool(message)
            error.__cause__ = cause
            task.future.set_exception(error)
        self._fail_pending(message)

    def _fail_pending(self, message: str) -> None:
        with self.lock:
            tasks = list(self.pending)
            self.pending.clear()
        for task in tasks:
            if task.future.set_running_or_notify_cancel():
                task.future.set_exception(BrokenProcessPool(message))

    # ------------------------------------------------------------------ bookkeeping

    def _record(self, kind: str, pid: int | None, detail: str, **numbers: int) -> None:
        event = PoolEvent(kind, time.time(), pid, detail, dict(numbers))
        self.events.append(event)
        _log.info("memtrack: %s", event)

    def _close(self) -> None:
        """Shut every worker's pool down (the thread is ending: nothing is running)."""
        for thread in self.retirements:
            thread.join()
        for worker in self.workers:
            if worker.state != "closed":
                worker.state = "closed"
                if worker.pool is not None:
                    worker.pool.shutdown(wait=True)
        _live_dispatchers.discard(self)


_live_dispatchers: weakref.WeakSet[_Dispatcher] = weakref.WeakSet()


def _at_exit() -> None:
    """At interpreter exit, finish queued tasks as ProcessPoolExecutor does.

    Registered to run before concurrent.futures' own exit hook, while the workers'
    pools still take tasks; the dispatcher thread is a daemon so that it never holds
    up an exit after this.
    """
    for dispatcher in list(_live_dispatchers):
        dispatcher.stop(wait=True, exiting=True)


# threading._register_atexit runs hooks before non-daemon threads are joined, newest
# first, so this runs before concurrent.futures.process's hook (registered on import).
# It is private (concurrent.futures uses it for the same purpose); without it, queued
# tasks of a pool never shut down are dropped at exit.
try:
    threading._register_atexit(_at_exit)  # type: ignore[attr-defined]
except (AttributeError, RuntimeError):  # pragma: no cover - another Python, or exiting
    pass


# --------------------------------------------------------------------------- the executor


def _check_workers(max_workers: Any) -> int:
    if isinstance(max_workers, bool) or not isinstance(max_workers, int):
        raise TypeError(f"max_workers must be an int or None, not {type(max_workers).__name__}")
    if max_workers < 1:
        raise ValueError(f"max_workers must be at least 1, got {max_workers}")
    return max_workers


def _check_pause_at(pause_at: Any) -> float | None:
    if pause_at is None:
        return None
    if isinstance(pause_at, bool) or not isinstance(pause_at, (int, float)):
        raise TypeError(f"pause_at must be a number in (0, 1] or None, "
                        f"not {type(pause_at).__name__}")
    if not math.isfinite(pause_at) or not 0 < pause_at <= 1:
        raise ValueError(f"pause_at must be in (0, 1] (a fraction of the memory limit), "
                         f"got {pause_at!r}")
    return float(pause_at)


def _check_positive_size(value: Any, what: str) -> int:
    size = parse_size(value, what=what)
    if size == 0:
        raise ValueError(f"{what} must be more than 0 bytes")
    return size


class MemoryAwareExecutor(Executor):
    """A process pool that sizes itself, pauses and recycles workers by memory.

    ``MemoryAwareExecutor(max_workers=None, *, per_worker=None, pause_at=0.80,
    leak_threshold="300 MB", mp_context=None, initializer=None, initargs=())``

    - **Size.** Without ``max_workers``, the count is ``memtrack.plan_workers(per_worker)``
      (available memory, container limits included, over ``per_worker``, at most the
      CPUs) when ``per_worker`` is given, else the CPU limit (``memtrack.cpu_limit()``).
      :attr:`plan` keeps the :class:`~memtrack.WorkerPlan`.
    - **Pause.** No task is handed to a worker while the pool's memory is above
      ``pause_at`` of the limit: the sum of the workers' PSS against the machine's RAM,
      or the cgroup's usage against its limit when a cgroup limit binds. Running tasks
      finish; queued ones wait and start, each once, when memory is back below.
      ``pause_at=None`` never pauses.
    - **Recycle.** After each task the worker reports its RSS; when that is over the leak
      bound it runs ``gc.collect()`` and ``malloc_trim(0)`` first and measures again (they
      can only lower it, so below the bound they would change nothing). A worker retaining
      more than ``leak_threshold`` over its level after its first task is replaced by a
      fresh process before it gets another task; ``leak_threshold=None`` turns this off.
    - **Deaths.** When a worker dies, its task and all queued ones fail with
      ``BrokenProcessPool`` whose message says which worker died, in which phase, at
      what rss and peak (:func:`memtrack.explain_broken_pool`); running tasks of the
      other workers finish. Later ``submit()`` calls raise the same error.

    :attr:`table` is the pool's :class:`~memtrack.WorkerTable` (readable after shutdown;
    removed with the executor or at exit) and :attr:`events` lists the pauses, resumes,
    recycles and deaths as :class:`PoolEvent`.

    For tests and special deployments, ``memory_probe`` (a callable returning the bytes
    the pool uses now) and ``limit`` (bytes or text such as "8 GB") replace the detected
    memory and limit.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        per_worker: int | str | None = None,
        pause_at: float | None = 0.80,
        leak_threshold: int | str | None = "300 MB",
        mp_context: Any = None,
        initializer: Callable[..., Any] | None = None,
        initargs: Iterable[Any] = (),
        memory_probe: Callable[[], int] | None = None,
        limit: int | str | None = None,
    ) -> None:
        pause = _check_pause_at(pause_at)
        leak = None if leak_threshold is None else _check_positive_size(
            leak_threshold, "leak_threshold")
        given_limit = None if limit is None else _check_positive_size(limit, "limit")
        if memory_probe is not None and not callable(memory_probe):
            raise TypeError(f"memory_probe must be a callable returning bytes, "
                            f"not {type(memory_probe).__name__}")
        if mp_context is None:
            mp_context = default_context()
        elif not callable(getattr(mp_context, "get_start_method", None)):
            raise TypeError("mp_context must be a multiprocessing context, e.g. "
                            f"multiprocessing.get_context('spawn'), not "
                            f"{type(mp_context).__name__}")
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be a callable, not {type(initializer).__name__}")
        initargs = tuple(initargs)

        self._plan: WorkerPlan | None = None
        if max_workers is None:
            if per_worker is None:
                workers = cpu_limit_info().cpus
            else:
                self._plan = plan_workers(per_worker)
                workers = self._plan.workers
                for text in self._plan.warnings:
                    warnings.warn(f"memtrack: {text}", RuntimeWarning, stacklevel=2)
        else:
            workers = _check_workers(max_workers)
            if per_worker is not None:
                fit = plan_workers(per_worker, cpus=workers).fit_by_memory
                if fit < workers:
                    warnings.warn(
                        f"memtrack: max_workers={workers} workers of {per_worker} each do "
                        f"not fit in the memory available now (only {fit} do); the pool will "
                        "pause while memory is short", RuntimeWarning, stacklevel=2)
        self._max_workers = workers

        memory = system_memory()
        cgroup = memory.limit is not None and given_limit is None and memory_probe is None
        self._limit = given_limit or memory.limit or memory.total
        if pause is not None and not self._limit:
            raise ValueError("the memory limit could not be read here; pass limit= "
                             "(e.g. '8 GB') or pause_at=None")

        self._table = WorkerTable(capacity=table_capacity(workers))
        if memory_probe is None:
            default = _CgroupUsage() if cgroup else PoolMemory(self._table)
            probe: Callable[[], int] = default
            source = default.source
        else:
            probe, source = memory_probe, "memory_probe"
        self._dispatcher = _Dispatcher(
            workers=workers, table=self._table, mp_context=mp_context,
            initializer=initializer, initargs=initargs, pause_at=pause,
            limit=self._limit, probe=probe, probe_source=source, leak_threshold=leak)
        # Dropping the executor without shutdown() lets queued tasks finish, then ends.
        self._finalizer = weakref.finalize(self, self._dispatcher.stop, wait=False)

    # ------------------------------------------------------------------ Executor API

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        dispatcher = self._dispatcher
        if dispatcher.thread is None:
            with dispatcher.lock:
                self._check_open()
            dispatcher.start()  # the first call starts every worker (see _Dispatcher)
        with dispatcher.lock:
            self._check_open()
            future: Future = Future()
            dispatcher.pending.append(_Task(future, fn, args, kwargs))
        dispatcher.inbox.put(_WAKE)
        return future

    submit.__doc__ = (Executor.submit.__doc__ or "") + """
        The first call starts every worker and returns once each is ready."""

    def _check_open(self) -> None:
        """Raise as ProcessPoolExecutor.submit() would on a broken or shut-down pool
        (the caller holds the dispatcher's ``lock``)."""
        dispatcher = self._dispatcher
        if dispatcher.broken is not None:
            raise BrokenProcessPool(dispatcher.broken)
        if dispatcher.shutting_down:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any],
            timeout: float | None = None, chunksize: int = 1) -> Iterator[Any]:
        """Like ``ProcessPoolExecutor.map``: results in order; ``chunksize`` > 1 sends
        that many calls to a worker at once (one task, one memory measurement)."""
        if isinstance(chunksize, bool) or not isinstance(chunksize, int):
            raise TypeError(f"chunksize must be an int, not {type(chunksize).__name__}")
        if chunksize < 1:
            raise ValueError(f"chunksize must be at least 1, got {chunksize}")
        if chunksize == 1:
            return super().map(fn, *iterables, timeout=timeout)
        calls = zip(*iterables, strict=False)  # map() stops at the shortest
        chunks = iter(lambda: tuple(itertools.islice(calls, chunksize)), ())
        results = super().map(functools.partial(_run_chunk, fn), chunks, timeout=timeout)
        return itertools.chain.from_iterable(results)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new tasks; with ``cancel_futures`` the queued ones are cancelled; with
        ``wait`` return when the rest have finished and every worker has exited.
        The worker table stays readable."""
        self._dispatcher.stop(cancel_futures=cancel_futures, wait=wait)

    # ------------------------------------------------------------------ memtrack's additions

    @property
    def table(self) -> WorkerTable:
        """The pool's worker table: live and dead workers, their phases and memory."""
        return self._table

    @property
    def events(self) -> list[PoolEvent]:
        """The pauses, resumes, recycles and deaths so far, oldest first (a copy)."""
        return list(self._dispatcher.events)

    @property
    def max_workers(self) -> int:
        """How many worker processes run at most."""
        return self._max_workers

    @property
    def plan(self) -> WorkerPlan | None:
        """The plan that set :attr:`max_workers` (None when it was given or by CPUs)."""
        return self._plan

    @property
    def limit(self) -> int:
        """The memory limit ``pause_at`` applies to, in bytes."""
        return self._limit

    @property
    def paused(self) -> bool:
        """Whether the pool is holding tasks back for memory now."""
        return self._dispatcher.paused

    def __repr__(self) -> str:
        state = "paused" if self.paused else "running"
        with self._dispatcher.lock:
            if self._dispatcher.broken is not None:
                state = "broken"
            elif self._dispatcher.shutting_down:
                state = "shut down"
            queued = len(self._dispatcher.pending)
        return (f"<MemoryAwareExecutor {self._max_workers} workers, {state}, "
                f"{queued} queued, limit {format_size(self._limit)}>")
