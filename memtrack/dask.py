"""memtrack on a Dask distributed cluster: every worker process in a worker table.

``install(client)`` registers two plugins. On each nanny (the process that starts, watches
and restarts a worker process) a :class:`WorkerTable` is created and its name put in the
environment of the worker processes it starts, so each worker joins it when it starts; the
nanny outlives its worker, so a worker that is killed (by the nanny for memory, by the OOM
killer, by a signal) keeps its slot, its last phase and its memory. On each worker a
:class:`distributed.WorkerPlugin` makes sure the process has joined (a worker without a
nanny gets a table of its own). Tasks use ``memtrack.phase`` as anywhere else.

``collect(client)`` returns, per worker address (dead workers included)::

    {address: {"pid", "rss", "peak_rss", "phases": {path: {"count", "max_peak_delta",
               "max_peak_rss", "total_rss_delta", "total_time"}},
               "state", "phase", "uss", "pss", "tasks", "exit_code", "exit_signal",
               "nanny", "host", "slot", "updated", "error"}}

``record(client, path)`` writes one profile for the cluster run (``memtrack report``: every
worker a series), and ``serve(client)`` serves the same readings over HTTP
(``memtrack serve --dask``). Needs ``distributed`` (``pip install distributed``); the rest of
memtrack does not. See docs/dask.md.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import Any

try:
    from distributed import Client
    from distributed.diagnostics.plugin import NannyPlugin, SchedulerPlugin, WorkerPlugin
except ImportError as e:  # pragma: no cover - the test extra installs distributed
    raise ImportError("memtrack.dask needs Dask distributed: pip install distributed") from e

from . import _core
from .pool.table import ENV_TABLE, WorkerTable, init_worker, worker_slot
from .profile.files import profile_header
from .serve.source import UNREAD, Reading, totals_of, worker_dict

__all__ = ["MemtrackNannyPlugin", "MemtrackSchedulerPlugin", "MemtrackWorkerPlugin",
           "cluster_source", "collect", "install", "record", "scheduler_url", "serve"]

NANNY_PLUGIN = "memtrack-nanny"
WORKER_PLUGIN = "memtrack-worker"
SCHEDULER_PLUGIN = "memtrack-scheduler"
#: Seconds between the nanny's notes of which address its worker process has.
NOTE_INTERVAL = 0.2


class MemtrackNannyPlugin(NannyPlugin):
    """On each nanny: a worker table its worker processes join (through the environment).

    ``restart = True``: a worker process already running when the plugin is registered is
    restarted once, so that it starts with ``MEMTRACK_TABLE`` set.
    """

    name = NANNY_PLUGIN
    restart = True
    idempotent = True

    def __init__(self, capacity: int = 16, heartbeat: float = 0.1) -> None:
        self.capacity = capacity
        self.heartbeat = heartbeat
        self.table: WorkerTable | None = None
        #: pid -> the worker address that process had (a dead worker keeps its address)
        self.addresses: dict[int, str] = {}
        self._process: Any = None  # the AsyncProcess last seen, to learn how it ended
        self._callback: Any = None

    def setup(self, nanny: Any) -> None:
        from tornado.ioloop import PeriodicCallback

        self.table = WorkerTable(capacity=self.capacity, heartbeat=self.heartbeat)
        nanny.env[ENV_TABLE] = self.table.name
        self._callback = PeriodicCallback(lambda: self.note(nanny), NOTE_INTERVAL * 1000)
        self._callback.start()

    def note(self, nanny: Any) -> None:
        """Remember the current worker's address by pid, and how the previous one ended."""
        worker = getattr(nanny, "process", None)
        process = getattr(worker, "process", None)
        if process is not self._process:
            old = self._process
            if old is not None and old.exitcode is not None and self.table is not None \
                    and not self.table.closed:
                self.table.record_exit(old.pid, old.exitcode)
            self._process = process
        pid, address = getattr(nanny, "pid", None), getattr(nanny, "worker_address", None)
        if pid and address:
            self.addresses[pid] = address

    def report(self, nanny: Any) -> list[dict[str, Any]]:
        """Every slot of this nanny's table, as collect() returns it."""
        self.note(nanny)
        if self.table is None or self.table.closed:
            return []
        process = self._process
        if process is not None and process.exitcode is not None:
            self.table.record_exit(process.pid, process.exitcode)
        host = socket.gethostname()
        out = []
        for w in self.table.workers(check=True):
            entry = worker_dict(w)
            entry["address"] = self.addresses.get(w.pid) or f"{nanny.address}/pid-{w.pid}"
            entry["nanny"] = nanny.address
            entry["host"] = host
            out.append(entry)
        return out

    def teardown(self, nanny: Any) -> None:
        if self._callback is not None:
            self._callback.stop()
        if self.table is not None:
            self.table.close()


class MemtrackWorkerPlugin(WorkerPlugin):
    """On each worker: join the nanny's table, or one of its own without a nanny."""

    name = WORKER_PLUGIN
    idempotent = True

    def __init__(self, capacity: int = 16, heartbeat: float = 0.1) -> None:
        self.capacity = capacity
        self.heartbeat = heartbeat
        self.own_table: WorkerTable | None = None

    def setup(self, worker: Any) -> None:
        if worker_slot() is not None:
            return  # joined at start, from MEMTRACK_TABLE (the nanny's table)
        name = os.environ.get(ENV_TABLE)
        if name:
            init_worker(name)
            return
        # No nanny: this process owns the table, so a killed worker takes it along.
        self.own_table = WorkerTable(capacity=self.capacity, heartbeat=self.heartbeat)
        init_worker(self.own_table.name)

    def report(self, worker: Any) -> list[dict[str, Any]]:
        if self.own_table is None:
            return []
        out = []
        for w in self.own_table.workers(check=True):
            entry = worker_dict(w)
            entry.update(address=worker.address, nanny=None, host=socket.gethostname())
            out.append(entry)
        return out

    def teardown(self, worker: Any) -> None:
        if self.own_table is not None:
            self.own_table.close()


def install(client: Client, *, capacity: int = 16, heartbeat: float = 0.1,
            scheduler_address: str | None = None, **serve_options: Any) -> None:
    """Register memtrack on every worker of `client`'s cluster, and on the ones that join
    later. Workers under a nanny are restarted once (see :class:`MemtrackNannyPlugin`).

    ``capacity``: slots of each nanny's table (a worker restarted more often than that
    reuses the slot of the oldest dead one); ``heartbeat``: seconds between a busy
    worker's refreshes. ``scheduler_address="HOST:PORT"`` also makes the scheduler serve
    the cluster itself (:class:`MemtrackSchedulerPlugin`; ``serve_options``: ``public``,
    ``token``, ``interval``, ``window``).
    """
    if not isinstance(client, Client):
        raise TypeError(f"install() needs a distributed.Client, not {type(client).__name__}")
    client.register_plugin(MemtrackNannyPlugin(capacity, heartbeat))
    client.register_plugin(MemtrackWorkerPlugin(capacity, heartbeat))
    if scheduler_address is not None:
        client.register_plugin(MemtrackSchedulerPlugin(scheduler_address, **serve_options))


def _nanny_report(dask_worker: Any) -> list[dict[str, Any]] | None:
    plugin = dask_worker.plugins.get(NANNY_PLUGIN)
    return None if plugin is None else plugin.report(dask_worker)


def _worker_report(dask_worker: Any) -> list[dict[str, Any]] | None:
    plugin = dask_worker.plugins.get(WORKER_PLUGIN)
    return None if plugin is None else plugin.report(dask_worker)


def _entries(client: Client) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    nannies = {addr: info.get("nanny") for addr, info in
               client.scheduler_info(n_workers=-1)["workers"].items()}
    with_nanny = [addr for addr, nanny in nannies.items() if nanny]
    without = [addr for addr, nanny in nannies.items() if not nanny]
    if with_nanny:
        for result in client.run(_nanny_report, nanny=True, workers=with_nanny,
                                 on_error="return").values():
            if isinstance(result, list):
                entries += result
    if without:
        for result in client.run(_worker_report, workers=without,
                                 on_error="return").values():
            if isinstance(result, list):
                entries += result
    return entries


_REQUIRED = ("pid", "rss", "peak_rss", "phases")


def collect(client: Client) -> dict[str, dict[str, Any]]:
    """Every memtrack worker of the cluster, dead ones included, by worker address.

    A worker the nanny is restarting shows up again (with its dead predecessor) once its
    replacement has joined the scheduler. Workers without memtrack (``install`` not
    called) are left out.
    """
    return _by_address(_entries(client))


def _by_address(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for e in entries:
        entry = {k: e[k] for k in _REQUIRED}
        entry["phases"] = {path: {"count": s["count"], "max_peak_delta": s["max_peak_delta"],
                                  "max_peak_rss": s["max_peak_rss"],
                                  "total_rss_delta": s["total_rss_delta"],
                                  "total_time": s["total_time"]}
                           for path, s in e["phases"].items()}
        entry.update({k: v for k, v in e.items() if k not in entry and k != "address"})
        if entry["state"] in UNREAD:
            continue
        address = e["address"]
        previous = out.get(address)
        # A slot reused by a later process at the same address: keep the newest.
        if previous is None or (entry.get("joined") or 0) >= (previous.get("joined") or 0):
            out[address] = entry
    return out


# --------------------------------------------------------------------------- serving


class ClusterSource:
    """A Dask cluster as a source for :class:`memtrack.serve.Server` (collect() per read)."""

    kind = "dask"
    cheap = False  # each read asks every nanny: scrapes get the latest sampled reading
    heartbeat = 1.0

    def __init__(self, client: Client | None, *, owned: bool = False, name: str | None = None,
                 reader: Any = None) -> None:
        self.client = client
        self.name = name if name is not None else str(client.scheduler.address)
        self._owned = owned
        self._reader = reader if reader is not None else (lambda: collect(client))
        self._last = Reading(time.time(), [], totals_of([]))
        self._problem: str | None = None

    def read(self) -> Reading:
        try:
            data = self._reader()
        except Exception as e:  # the scheduler went away, a timeout...: keep the last one
            problem = f"cannot read the Dask cluster: {type(e).__name__}: {e}"
            if problem != self._problem:  # said once, not every interval
                print(f"memtrack serve: {problem} ({self.name}); serving the last reading",
                      file=sys.stderr, flush=True)
            self._problem = problem
            return Reading(time.time(), self._last.workers, self._last.totals, problem)
        if self._problem is not None:
            print(f"memtrack serve: the Dask cluster {self.name} answers again",
                  file=sys.stderr, flush=True)
            self._problem = None
        workers = []
        for address, entry in sorted(data.items()):
            w = {k: entry.get(k) for k in ("pid", "slot", "state", "phase", "depth", "rss",
                                           "peak_rss", "uss", "pss", "tasks", "exit_code",
                                           "exit_signal", "joined", "updated", "error")}
            w["phases"] = entry["phases"]
            w["address"] = address
            w["host"] = entry.get("host")
            workers.append(w)
        self._last = Reading(time.time(), workers, totals_of(workers))
        return self._last

    def labels(self, worker: dict[str, Any]) -> dict[str, Any]:
        return {"worker": worker.get("address"), "pid": worker["pid"]}

    def close(self) -> None:
        if self._owned and self.client is not None:
            self.client.close()


def cluster_source(scheduler: str) -> ClusterSource:
    """A source for ``memtrack serve --dask tcp://host:8786`` (connects a client)."""
    try:
        client = Client(scheduler, timeout=10)
    except (OSError, TimeoutError) as e:
        raise ValueError(f"cannot connect to the Dask scheduler {scheduler}: {e}") from None
    return ClusterSource(client, owned=True)


def serve(client: Client, address: str | tuple[str, int] = ("127.0.0.1", 0), *,
          public: bool = False, token: str | None = None, interval: float = 1.0,
          window: float = 300.0) -> Any:
    """Serve the cluster's memtrack workers (page, ``/metrics``, ``/api/workers``) from
    this process, read every `interval` seconds; returns the running Server."""
    from .serve import Server

    return Server(ClusterSource(client), address, public=public, token=token,
                  interval=interval, window=window).start()


class MemtrackSchedulerPlugin(SchedulerPlugin):
    """Serve the cluster's memtrack workers from inside the scheduler process.

    Register it with ``install(client, scheduler_address="HOST:PORT")`` (or
    ``client.register_plugin``): the scheduler then listens there itself (page,
    ``/metrics``, ``/api/workers``, the token rules of docs/serve.md) and asks its nannies
    for their tables every `interval` seconds, as collect() does from a client. The
    address it got (port 0: any free port) is :func:`scheduler_url`.
    """

    name = SCHEDULER_PLUGIN
    idempotent = True

    def __init__(self, address: str = "127.0.0.1:0", *, public: bool = False,
                 token: str | None = None, interval: float = 1.0, window: float = 300.0
                 ) -> None:
        self.address = address
        self.public = public
        self.token = token
        self.interval = interval
        self.window = window
        self.server: Any = None

    async def start(self, scheduler: Any) -> None:
        import asyncio

        from .serve import Server

        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()

        def read() -> dict[str, dict[str, Any]]:
            if threading.get_ident() == loop_thread:
                return {}  # the first reading, from start() itself: nothing to wait for
            future = asyncio.run_coroutine_threadsafe(_scheduler_entries(scheduler), loop)
            return _by_address(future.result(timeout=60))

        source = ClusterSource(None, name=str(scheduler.address), reader=read)
        self.server = Server(source, self.address, public=self.public, token=self.token,
                             interval=self.interval, window=self.window).start()

    async def close(self) -> None:
        if self.server is not None:
            import asyncio

            # Off the event loop: a reading in flight needs the loop to finish.
            await asyncio.get_running_loop().run_in_executor(None, self.server.close)


async def _scheduler_entries(scheduler: Any) -> list[dict[str, Any]]:
    """What _entries() gets through a client, asked by the scheduler itself."""
    from distributed.protocol.pickle import dumps
    from distributed.protocol.serialize import Serialize, Serialized, deserialize

    with_nanny = [a for a, ws in scheduler.workers.items() if ws.nanny]
    without = [a for a, ws in scheduler.workers.items() if not ws.nanny]
    entries: list[dict[str, Any]] = []
    for function, workers, nanny in ((_nanny_report, with_nanny, True),
                                     (_worker_report, without, False)):
        if not workers:
            continue
        msg = {"op": "run", "function": dumps(function), "args": dumps(()), "wait": True,
               "kwargs": dumps({})}
        responses = await scheduler.broadcast(msg=msg, workers=workers, nanny=nanny,
                                              on_error="return_pickle")
        for response in responses.values():
            if not isinstance(response, dict) or response.get("status") != "OK":
                continue
            # The scheduler passes results through without unpacking them.
            result = response.get("result")
            if isinstance(result, Serialized):
                result = deserialize(result.header, result.frames)
            elif isinstance(result, Serialize):
                result = result.data
            if isinstance(result, list):
                entries += result
    return entries


def _scheduler_url(dask_scheduler: Any) -> str | None:
    plugin = dask_scheduler.plugins.get(SCHEDULER_PLUGIN)
    return None if plugin is None or plugin.server is None else plugin.server.url


def scheduler_url(client: Client) -> str | None:
    """The URL the scheduler-side server listens on (None without the plugin)."""
    return client.run_on_scheduler(_scheduler_url)


# --------------------------------------------------------------------------- recording


def _sample(entry: dict[str, Any], now: float, address: str) -> dict[str, Any]:
    return {"t": "sample", "time": now, "pid": entry["pid"], "source": "worker",
            "rss": entry["rss"], "peak_rss": entry["peak_rss"], "pss": entry.get("pss") or None,
            "uss": entry.get("uss") or None, "phase": entry.get("phase"), "worker": address,
            "host": entry.get("host")}


class record:
    """``with memtrack.dask.record(client, "cluster.mtp"):`` one profile of a cluster run.

    Every `interval` seconds collect() gives one ``sample`` per live worker (its series,
    with its address and host) and one ``pool`` record; ``join`` and ``death``/``exit``
    events mark workers that appear and end; at the end each worker's final ``worker``
    record (dead ones with their last phase) and the end record. ``memtrack report`` reads
    it like any recording. Pids identify the series: workers on different hosts that
    happen to share a pid would share one (their ``worker`` field still tells them apart).
    """

    def __init__(self, client: Client, path: str | os.PathLike[str], interval: float = 1.0
                 ) -> None:
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) \
                or not 0.05 <= interval <= 3600:
            raise ValueError(f"interval must be between 0.05 and 3600 seconds, not {interval!r}")
        self.client = client
        self.path = os.fspath(path)
        self.interval = float(interval)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fd = -1
        self._seen: dict[str, dict[str, Any]] = {}
        self._rounds = 0
        self.error: str | None = None

    def __enter__(self) -> record:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("this recording is already running")
        header = profile_header("recording")
        header.update(interval=self.interval, started=time.monotonic(), table=None,
                      command=None, source="dask",
                      scheduler=str(self.client.scheduler.address))
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                           0o644)
        os.write(self._fd, _core.pack(header))
        self._round()  # the first round now, so a short run has one
        self._thread = threading.Thread(target=self._run, name="memtrack-dask-record",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._round()

    def _round(self) -> None:
        try:
            data = collect(self.client)
        except Exception as e:  # keep recording: the next round may reach the cluster
            self.error = f"{type(e).__name__}: {e}"
            return
        now = time.monotonic()
        records = []
        live = [(a, e) for a, e in data.items() if e["state"] in ("idle", "running")]
        for address, entry in sorted(data.items()):
            before = self._seen.get(address)
            if before is None or before["pid"] != entry["pid"]:
                records.append({"t": "event", "time": now, "kind": "join", "pid": entry["pid"],
                                "slot": entry.get("slot"), "phase": entry.get("phase"),
                                "rss": entry["rss"], "peak_rss": entry["peak_rss"],
                                "exit_code": None, "exit_signal": None,
                                "state": entry["state"], "worker": address})
            ended = entry["state"] in ("exited", "killed")
            was_alive = before is None or before["state"] in ("idle", "running") \
                or before["pid"] != entry["pid"]
            if ended and was_alive:
                records.append({"t": "event", "time": now,
                                "kind": "death" if entry["state"] == "killed" else "exit",
                                "pid": entry["pid"], "slot": entry.get("slot"),
                                "phase": entry.get("phase"), "rss": entry["rss"],
                                "peak_rss": entry["peak_rss"],
                                "exit_code": entry.get("exit_code"),
                                "exit_signal": entry.get("exit_signal"),
                                "state": entry["state"], "worker": address})
            self._seen[address] = entry
        records += [_sample(e, now, a) for a, e in live]
        records.append({"t": "pool", "time": now, "live": len(live),
                        "rss": sum(e["rss"] for _, e in live),
                        "pss": sum((e.get("pss") or e["rss"]) for _, e in live),
                        "peak_rss": sum(e["peak_rss"] for _, e in live)})
        os.write(self._fd, b"".join(_core.pack(r) for r in records))
        self._rounds += 1

    def stop(self) -> None:
        """Stop, append every worker's final record and the end record, close the file."""
        if self._thread is None or self._fd < 0:
            return
        self._stop.set()
        self._thread.join()
        try:
            self._round()
            tail = []
            for address, e in sorted(self._seen.items()):
                tail.append({"t": "worker", "pid": e["pid"], "slot": e.get("slot"),
                             "state": e["state"], "tasks": e.get("tasks"), "rss": e["rss"],
                             "peak_rss": e["peak_rss"], "uss": e.get("uss"),
                             "pss": e.get("pss"), "phase": e.get("phase"),
                             "exit_code": e.get("exit_code"),
                             "exit_signal": e.get("exit_signal"), "joined": e.get("joined"),
                             "updated": e.get("updated"), "error": e.get("error"),
                             "phases": e["phases"], "worker": address, "host": e.get("host")})
            tail.append({"t": "end", "time": time.monotonic(), "samples": self._rounds})
            os.write(self._fd, b"".join(_core.pack(r) for r in tail))
        finally:
            os.close(self._fd)
            self._fd = -1
