"""``memtrack.allocations``: which code allocates the memory, per phase (docs/allocations.md).

The hooks live in C (``csrc/alloc.c``): they wrap CPython's allocators (PEP 445) and,
when numpy is imported, numpy's data allocator, count every allocation exactly per
thread (and so per phase), and sample allocations by bytes to find their Python call
sites. This module adds the Python-side policy: options, the environment switch, the
numpy import hook and the :class:`AllocationSite` objects.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any

from . import _core
from ._sizes import parse_size

ENV_ALLOCATIONS = "MEMTRACK_ALLOCATIONS"
ENV_INTERVAL = "MEMTRACK_ALLOC_INTERVAL"
ENV_FRAMES = "MEMTRACK_ALLOC_FRAMES"
DEFAULT_INTERVAL = 512 * 1024
DEFAULT_FRAMES = 16
MAX_FRAMES = _core.ALLOC_MAX_FRAMES

_lock = threading.Lock()
_state: dict[str, Any] = {"numpy": False, "interval": DEFAULT_INTERVAL, "frames": DEFAULT_FRAMES}


@dataclass(frozen=True)
class Frame:
    """One Python frame of an allocation site."""

    filename: str
    line: int
    function: str

    def __str__(self) -> str:
        return f"{self.filename}:{self.line} {self.function}"


@dataclass(frozen=True)
class AllocationSite:
    """One call stack in one phase, as the samples saw it.

    ``allocated`` and ``allocations`` are unbiased estimates of the bytes and the number
    of allocations made there; ``retained`` estimates the bytes allocated there that were
    still live when tracking stopped (or now, while it runs). ``samples`` is how many
    sampled allocations back the estimates: the fewer, the rougher.
    """

    phase: str
    frames: tuple[Frame, ...]
    samples: int
    allocated: int
    allocations: int
    retained: int
    retained_samples: int
    pid: int
    overflow: bool = False

    @property
    def location(self) -> str:
        """The innermost frame as ``file:line function``, or why there is none."""
        if self.overflow:
            return "(site table full)"
        if not self.frames:
            return "(no Python frame)"
        return str(self.frames[0])

    def to_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "pid": self.pid, "samples": self.samples,
                "allocated": self.allocated, "allocations": self.allocations,
                "retained": self.retained, "retained_samples": self.retained_samples,
                "overflow": self.overflow,
                "frames": [[f.filename, f.line, f.function] for f in self.frames]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AllocationSite:
        return cls(phase=d["phase"], pid=d["pid"], samples=d["samples"],
                   allocated=d["allocated"], allocations=d["allocations"],
                   retained=d["retained"], retained_samples=d["retained_samples"],
                   overflow=bool(d.get("overflow", False)),
                   frames=tuple(Frame(str(f[0]), int(f[1]), str(f[2])) for f in d["frames"]))


def _interval(value: int | str | None) -> int:
    if value is None:
        text = os.environ.get(ENV_INTERVAL)
        return parse_size(text) if text else DEFAULT_INTERVAL
    if isinstance(value, bool):
        raise TypeError("interval must be a size (int or str such as '512 KiB'), not a bool")
    return parse_size(value)


def _frames(value: int | None) -> int:
    if value is None:
        text = os.environ.get(ENV_FRAMES)
        if not text:
            return DEFAULT_FRAMES
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{ENV_FRAMES}={text!r} is not a number of frames") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"frames must be an int, not {type(value).__name__}")
    if not 0 <= value <= MAX_FRAMES:
        raise ValueError(f"frames must be between 0 and {MAX_FRAMES}, not {value}")
    return value


def start(interval: int | str | None = None, *, frames: int | None = None,
          seed: int | None = None, numpy: bool = True) -> bool:
    """Start tracking allocations; True if this call started it.

    False, and nothing changes, when memtrack is disabled (``MEMTRACK_DISABLE``) or
    tracking is already running (``MEMTRACK_ALLOCATIONS=1`` started it at import, say):
    the running tracking keeps its settings, so a worker's own ``start()`` never fails.

    `interval` is the mean number of bytes between samples (default 512 KiB, or
    ``MEMTRACK_ALLOC_INTERVAL``); `frames` the Python frames kept per sample (default 16,
    at most 64); `seed` fixes the sampling for reproducible runs. With `numpy`, numpy's
    array data is tracked too, from now on if numpy is imported, else from its import.
    """
    size = _interval(interval)
    depth = _frames(frames)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be a non-negative int, not {seed!r}")
    if _core.capabilities()["disabled"]:
        return False
    with _lock:
        if _core.alloc_counters()["running"]:
            return False
        _core.alloc_start(interval=size, frames=depth, seed=-1 if seed is None else seed)
        _state.update(interval=size, frames=depth)
        if numpy:
            _hook_numpy()
    return True


def stop() -> bool:
    """Stop tracking; the sites and counters stay readable. False if it was not running."""
    with _lock:
        running = _core.alloc_counters()["running"]
        if running:
            _core.alloc_stop()
            if _state["numpy"]:
                _core.alloc_uninstall_numpy()
                _state["numpy"] = False
        _unwatch_numpy()
        return running


def running() -> bool:
    """True while allocations are being tracked."""
    return bool(_core.alloc_counters()["running"])


def clear() -> None:
    """Forget every sampled site (the exact counters are never cleared)."""
    _core.alloc_clear()


def counters() -> dict[str, Any]:
    """Exact counters and the sampler's state.

    ``thread``: the calling thread's ``(bytes, allocations)``, exact; ``threads``:
    ``{thread id: (bytes, allocations)}`` of the live threads (another running thread's
    as of its latest sample, at most about one interval behind; the caller's exact);
    ``allocated``/``allocations``: their sum plus the threads that ended (exact at their
    end); ``samples``, ``sites``, ``live_samples``, ``untracked`` (sampled blocks whose
    frees could not be tracked: the pointer set was full), ``interval``, ``frames``,
    ``pymalloc_split`` (True when the MEM/OBJ hooks leave pymalloc's large blocks to the
    RAW hook, the cheaper way; False under debug hooks or ``PYTHONMALLOC=malloc``).
    """
    return _core.alloc_counters()


def sites(*, phase: str | None = None) -> list[AllocationSite]:
    """The sampled sites of this process, largest estimated ``allocated`` first.

    With `phase`, only the sites sampled while that phase path was the innermost open.
    """
    pid = os.getpid()
    result = []
    for path, stack, samples, nbytes, count, live, live_samples, overflow in _core.alloc_sites():
        if phase is not None and path != phase:
            continue
        result.append(AllocationSite(
            phase=path, frames=tuple(Frame(f, line, fn) for f, line, fn in stack),
            samples=samples, allocated=round(nbytes), allocations=round(count),
            retained=max(round(live), 0), retained_samples=live_samples, pid=pid,
            overflow=overflow))
    result.sort(key=lambda s: (-s.allocated, s.location))
    return result


class allocations:
    """Track which code allocates memory: ``with memtrack.allocations(): ...``.

    Also ``memtrack.allocations.start()`` / ``.stop()`` / ``.sites()`` /
    ``.counters()`` / ``.clear()`` / ``.running()``, ``MEMTRACK_ALLOCATIONS=1`` (at
    import) and ``memtrack run --allocations``. While it runs, every
    :class:`PhaseStats` has ``allocated`` and ``allocations`` (exact, for the thread
    that ran the phase) and the sampled sites say where the bytes came from.
    """

    start = staticmethod(start)
    stop = staticmethod(stop)
    running = staticmethod(running)
    clear = staticmethod(clear)
    counters = staticmethod(counters)
    sites = staticmethod(sites)

    def __init__(self, interval: int | str | None = None, *, frames: int | None = None,
                 seed: int | None = None, numpy: bool = True) -> None:
        self._options = {"interval": _interval(interval), "frames": _frames(frames),
                         "seed": seed, "numpy": numpy}
        self.started = False

    def __enter__(self) -> allocations:
        self.started = start(**self._options)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.started:
            stop()


# -- numpy -------------------------------------------------------------------------------


def _numpy_api() -> Any:
    for name in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "_ARRAY_API"):
            return module._ARRAY_API
    return None


def _install_numpy() -> None:
    api = _numpy_api()
    if api is not None and _core.alloc_counters()["running"]:
        _core.alloc_install_numpy(api)
        _state["numpy"] = True


class _AfterImport(importlib.abc.Loader):
    """Runs numpy's own loader, then puts memtrack's handler in (one import only)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def create_module(self, spec: Any) -> Any:
        return self.inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        module.__loader__ = self.inner
        if module.__spec__ is not None:
            module.__spec__.loader = self.inner
        self.inner.exec_module(module)
        with _lock:
            _install_numpy()


class _NumpyWatch(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "numpy":
            return None
        _unwatch_numpy()
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _AfterImport(spec.loader)
        return spec


_watch = _NumpyWatch()


def _unwatch_numpy() -> None:
    try:
        sys.meta_path.remove(_watch)
    except ValueError:
        pass


def _hook_numpy() -> None:
    if "numpy" in sys.modules:
        _install_numpy()
    elif _watch not in sys.meta_path:
        sys.meta_path.insert(0, _watch)


def _env_on() -> bool:
    return os.environ.get(ENV_ALLOCATIONS, "").strip().lower() not in ("", "0", "false", "no",
                                                                       "off")


def _start_from_environment() -> None:
    """``MEMTRACK_ALLOCATIONS=1``: track from import on (a bad setting warns, never breaks)."""
    if not _env_on() or _core.alloc_counters()["running"]:
        return
    try:
        start()
    except (TypeError, ValueError) as e:
        import warnings

        warnings.warn(f"memtrack: {ENV_ALLOCATIONS} is set but allocations could not start: {e}",
                      RuntimeWarning, stacklevel=2)


# -- the side channel: every worker's sites reach the parent's one profile ---------------
#
# A recording with allocations on (memtrack.record(..., allocations=True), or
# memtrack run --allocations) creates a directory beside its file and names it in
# MEMTRACK_ALLOC_DIR. Every memtrack-aware process that inherits it (forked, spawned,
# forkserver's children, any subprocess) writes its own sites to <dir>/<pid>.sites from a
# daemon thread, at most once a second and only when they changed, and once more when it
# exits normally (atexit, and multiprocessing's finalizers, since pool workers leave
# through os._exit). The recording reads the files when it stops. A worker that is killed
# leaves the file of its last write: at most about a second of samples is lost.

ENV_SITES_DIR = "MEMTRACK_ALLOC_DIR"
WRITE_EVERY = 1.0
SITES_SUFFIX = ".sites"


def site_records() -> list[dict[str, Any]]:
    """This process's sites as profile ``site`` records (docs/format.md)."""
    return [{"t": "site", **s.to_dict()} for s in sites()]


class _SiteWriter:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.pid = os.getpid()
        self.last: tuple[int, int] | None = None
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="memtrack-sites", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(WRITE_EVERY):
            try:
                self.flush()
            except OSError:
                return  # the recording ended and took its directory: nothing to say

    def flush(self) -> None:
        """Write this process's sites if they changed since the last write."""
        with self.lock:
            if os.getpid() != self.pid:
                return
            c = _core.alloc_counters()
            key = (c["samples"], c["live_samples"])
            if key == self.last or c["samples"] == 0:
                return
            from .pool.table import worker_slot

            record = {"t": "sites", "pid": self.pid, "slot": worker_slot(),
                      "sites": [s.to_dict() for s in sites()]}
            path = os.path.join(self.directory, f"{self.pid}{SITES_SUFFIX}")
            tmp = f"{path}.tmp"
            with open(tmp, "wb") as f:
                f.write(_core.pack(record))
            os.replace(tmp, path)
            self.last = key

    def final_flush(self) -> None:
        self.stopped.set()
        try:
            self.flush()
        except OSError:
            pass


_writer: _SiteWriter | None = None


def _share_from_environment() -> None:
    """Start the site writer when MEMTRACK_ALLOC_DIR names a recording's directory."""
    global _writer
    directory = os.environ.get(ENV_SITES_DIR)
    if not directory or not os.path.isdir(directory):
        _writer = None
        return
    from .pool.table import _in_forkserver

    if _in_forkserver():
        return  # it only forks workers: they write their own
    _writer = _SiteWriter(directory)
    _writer.start()


def _final_flush() -> None:
    if _writer is not None:
        _writer.final_flush()


class _AfterBootstrap:
    """A weak-referenceable key for multiprocessing's after-fork registry."""


_after_bootstrap = _AfterBootstrap()


def _register_process_hooks() -> None:
    import atexit
    import multiprocessing.util as mp_util

    os.register_at_fork(after_in_child=_share_from_environment)
    # multiprocessing children leave through os._exit (no atexit), and clear the
    # finalizer registry when they start: register the final write after that.
    mp_util.register_after_fork(
        _after_bootstrap, lambda _obj: mp_util.Finalize(None, _final_flush, exitpriority=-50))
    atexit.register(_final_flush)


def read_shared_sites(directory: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The ``site`` records the workers left in `directory`, and the problems found.

    A file that cannot be read or is not what a worker writes is reported, not fatal:
    one bad worker never costs the recording.
    """
    records: list[dict[str, Any]] = []
    problems: list[str] = []
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return records, problems
    for name in names:
        if not name.endswith(SITES_SUFFIX):
            continue
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as f:
                data = f.read()
            objects, _, error = _core.unpack_stream(data)
            if error is not None or len(objects) != 1:
                raise ValueError("not one complete msgpack object")
            rec = objects[0]
            if not isinstance(rec, dict) or rec.get("t") != "sites":
                raise ValueError("not a sites record")
            for d in rec["sites"]:
                site = check_site(d, where=name)
                records.append({"t": "site", **site.to_dict(), "slot": rec.get("slot")})
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(f"{name}: {e}")
    return records, problems


def check_site(d: Any, *, where: str) -> AllocationSite:
    """An AllocationSite from a ``site`` record, every field checked (ValueError)."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: a site is not a map")
    for key in ("pid", "samples", "allocated", "allocations", "retained", "retained_samples"):
        v = d.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{where}: site field {key!r} should be a non-negative int, "
                             f"found {v!r}")
    if not isinstance(d.get("phase"), str):
        raise ValueError(f"{where}: site field 'phase' should be str, found {d.get('phase')!r}")
    frames = d.get("frames")
    if not isinstance(frames, list) or not all(
            isinstance(f, list) and len(f) == 3 and isinstance(f[0], str)
            and isinstance(f[1], int) and not isinstance(f[1], bool) and isinstance(f[2], str)
            for f in frames):
        raise ValueError(f"{where}: site field 'frames' should be [[file, line, function], ...]")
    return AllocationSite.from_dict(d)
