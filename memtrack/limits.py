"""How much memory and how many CPUs this process may really use — inside a container too.

Host-wide numbers (``/proc/meminfo``, ``os.cpu_count()``) are wrong in a container: a
container limited to 8 GB on a 256 GB host sees 256 GB there, sizes its pool for it and is
OOM-killed. The limits that bind come from the cgroup of the process, so this module reads

1. cgroup v2: the path on the ``0::/path`` line of ``/proc/self/cgroup``, and ``memory.max``,
   ``memory.high`` and ``cpu.max`` in that cgroup *and every ancestor* (a parent's limit
   binds its children too);
2. cgroup v1: the ``memory`` / ``cpu`` controller lines of ``/proc/self/cgroup`` and
   ``memory.limit_in_bytes``, ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` likewise;
3. the host: ``/proc/meminfo`` and the CPU count / affinity of the process;
4. for ``root="/"``, the limit the platform layer reads on the process itself
   (``memtrack._core.memory_limit()``: ``RLIMIT_AS`` on Linux, the job object's memory
   limits on Windows), as one more level.

Hybrid machines mount v1 controllers *and* a v2 hierarchy; whichever hierarchy actually
has the memory (or cpu) files is used. Mount points come from ``/proc/self/mountinfo``
when it is readable, else from the usual places under ``/sys/fs/cgroup``.

Every function takes ``root``: the directory that stands for ``/``. Tests build fake
``proc`` and ``sys`` trees under a temporary directory; ``root="/"`` reads the real ones.
Nothing here raises on unreadable or malformed files: a file that cannot be read, or holds
a value that cannot be parsed, is skipped and the next source is used. Only the standard
library is used, and no path outside ``root`` is read (apart from ``os.cpu_count()`` and,
for ``root="/"``, the CPU affinity and ``sysconf`` of the calling process).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

from . import _core

__all__ = ["CpuLimit", "SystemMemory", "cpu_limit", "cpu_limit_info", "system_memory"]

#: cgroup v1 reports "no limit" as LONG_MAX rounded down to a page (9223372036854771712
#: with 4 KiB pages, other values with larger pages); anything this large is no limit.
_V1_UNLIMITED_FLOOR = 2**62

_CGROUP_BASE = "/sys/fs/cgroup"


@dataclass(frozen=True)
class SystemMemory:
    """Memory this process may use, in bytes.

    total:        RAM it may use at most: ``min(MemTotal, limit)``.
    available:    what it can still allocate without swapping or being OOM-killed:
                  ``min(MemAvailable, limit - usage)`` where usage leaves out reclaimable
                  file cache (``inactive_file``); with nested cgroups, the tightest level.
    limit:        the smallest cgroup limit (``memory.max``, ``memory.high`` or
                  ``memory.limit_in_bytes``) or platform limit (``RLIMIT_AS``, a Windows
                  job object's) below host RAM, or None when there is none.
    limit_source: the file ``limit`` came from as an absolute path inside the machine or
                  container, e.g. ``"/sys/fs/cgroup/memory.max"``, or the platform
                  limit's name (``"RLIMIT_AS"``, ``"job object (job memory)"``);
                  ``"/proc/meminfo"`` when there is no limit.
    used:         the usage of the cgroup that sets ``limit`` (without inactive file
                  cache) when limited, else ``MemTotal - MemAvailable``.
    swap_total, swap_free: from ``/proc/meminfo`` (host-wide).
    """

    total: int
    available: int
    limit: int | None
    limit_source: str
    used: int
    swap_total: int
    swap_free: int


class CpuLimit(NamedTuple):
    """How many CPUs this process may use, and which source bound it."""

    cpus: int
    #: e.g. "/sys/fs/cgroup/cpu.max", "sched_getaffinity(0)", "os.cpu_count()".
    source: str


# --------------------------------------------------------------------------- file reading


def _read_text(path: str) -> str | None:
    """The content of a small text file, or None when it cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="strict") as f:
            return f.read(1 << 20)
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _read_int(path: str) -> int | None:
    """A single integer file (``memory.current``), or None when missing or malformed."""
    text = _read_text(path)
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def _read_keyed(path: str) -> dict[str, int]:
    """``key value`` lines (``memory.stat``); malformed lines are skipped."""
    text = _read_text(path)
    values: dict[str, int] = {}
    if text is None:
        return values
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                values[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return values


def _is_real_root(root: str) -> bool:
    return os.path.realpath(root) == "/"


def _host_path(root: str, path: str) -> str:
    """``path`` (absolute inside the machine/container) as a path under ``root``."""
    return os.path.join(root, path.lstrip("/"))


def _shown_path(root: str, host_path: str) -> str:
    """``host_path`` under ``root`` shown as the absolute path seen inside ``root``."""
    relative = os.path.relpath(host_path, root)
    return "/" if relative == "." else "/" + relative


# --------------------------------------------------------------------------- /proc/meminfo


class _MemInfo(NamedTuple):
    total: int | None
    available: int | None
    swap_total: int
    swap_free: int


def _read_meminfo(root: str) -> _MemInfo:
    """Host memory from ``/proc/meminfo`` (values there are in kB = KiB).

    A missing or malformed ``MemAvailable`` (kernels before 3.14 lack it) is estimated as
    ``MemFree + Buffers + Cached``; when ``MemTotal`` is unusable and ``root`` is the real
    root, ``sysconf`` supplies the totals.
    """
    text = _read_text(_host_path(root, "/proc/meminfo")) or ""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        parts = rest.split()
        if not sep or not parts:
            continue
        try:
            value = int(parts[0])
        except ValueError:
            continue
        if value < 0:
            continue
        unit = parts[1].lower() if len(parts) > 1 else ""
        fields[name.strip()] = value * 1024 if unit == "kb" else value

    total = fields.get("MemTotal") or None
    available = fields.get("MemAvailable")
    if available is None and all(k in fields for k in ("MemFree", "Buffers", "Cached")):
        available = fields["MemFree"] + fields["Buffers"] + fields["Cached"]
    if _is_real_root(root):
        if total is None:
            total = _sysconf_bytes("SC_PHYS_PAGES")
        if available is None:
            available = _sysconf_bytes("SC_AVPHYS_PAGES")
    if total is not None and available is not None:
        available = min(available, total)
    return _MemInfo(total, available, fields.get("SwapTotal", 0), fields.get("SwapFree", 0))


def _sysconf_bytes(name: str) -> int | None:
    try:
        pages = os.sysconf(name)
        page_size = os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    if pages <= 0 or page_size <= 0:
        return None
    return pages * page_size


# --------------------------------------------------------------------------- cgroup layout


class _Mount(NamedTuple):
    point: str  # absolute mount point inside root, e.g. "/sys/fs/cgroup/memory"
    cgroup_root: str  # the cgroup this mount shows at its top, "/" unless bind-mounted


def _unescape_mountinfo(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    for escaped, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(escaped, char)
    return field


def _mountinfo_cgroup_mounts(root: str) -> tuple[list[_Mount], dict[str, list[_Mount]]]:
    """cgroup2 mounts and cgroup v1 mounts by controller, from ``/proc/self/mountinfo``."""
    text = _read_text(_host_path(root, "/proc/self/mountinfo")) or ""
    v2: list[_Mount] = []
    v1: dict[str, list[_Mount]] = {}
    for line in text.splitlines():
        before, sep, after = line.partition(" - ")
        left, right = before.split(), after.split()
        if not sep or len(left) < 5 or len(right) < 3:
            continue
        mount = _Mount(_unescape_mountinfo(left[4]), _unescape_mountinfo(left[3]))
        if right[0] == "cgroup2":
            v2.append(mount)
        elif right[0] == "cgroup":
            for option in right[2].split(","):
                v1.setdefault(option, []).append(mount)
    return v2, v1


def _v2_mounts(root: str) -> list[_Mount]:
    """Where the v2 hierarchy is mounted: mountinfo first, then the usual places."""
    mounts, _ = _mountinfo_cgroup_mounts(root)
    for point in (_CGROUP_BASE, _CGROUP_BASE + "/unified"):
        if os.path.isfile(_host_path(root, point + "/cgroup.controllers")):
            mounts.append(_Mount(point, "/"))
    return _unique(mounts)


def _v1_mounts(root: str, controller: str) -> list[_Mount]:
    """Where a v1 controller is mounted: mountinfo first, then ``/sys/fs/cgroup/<names>``
    (combined mounts such as ``cpu,cpuacct`` included)."""
    _, by_controller = _mountinfo_cgroup_mounts(root)
    mounts = list(by_controller.get(controller, []))
    try:
        names = sorted(os.listdir(_host_path(root, _CGROUP_BASE)))
    except OSError:
        names = []
    for name in names:
        if controller in name.split(","):
            mounts.append(_Mount(f"{_CGROUP_BASE}/{name}", "/"))
    return _unique(mounts)


def _unique(mounts: list[_Mount]) -> list[_Mount]:
    seen: set[str] = set()
    result = []
    for mount in mounts:
        if mount.point not in seen:
            seen.add(mount.point)
            result.append(mount)
    return result


def _proc_self_cgroup(root: str) -> tuple[str | None, dict[str, str]]:
    """The v2 path (``0::/path``) and the v1 path of each controller."""
    text = _read_text(_host_path(root, "/proc/self/cgroup")) or ""
    v2_path: str | None = None
    v1_paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[2].startswith("/"):
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2_path = path
        else:
            for controller in controllers.split(","):
                if controller:
                    v1_paths[controller] = path
    return v2_path, v1_paths


def _cgroup_dirs(root: str, mount: _Mount, cgroup_path: str) -> list[str]:
    """The directories of the process's cgroup and each ancestor up to the mount, leaf first.

    When the path from ``/proc/self/cgroup`` is not visible under the mount (a cgroup
    namespace, or a container that sees only its own cgroup bind-mounted), the mount
    itself is the process's cgroup as far as this view goes.
    """
    top = os.path.normpath(_host_path(root, mount.point))
    relative = cgroup_path
    prefix = mount.cgroup_root.rstrip("/")
    if prefix and (relative == prefix or relative.startswith(prefix + "/")):
        relative = relative[len(prefix):]
    leaf = os.path.normpath(os.path.join(top, relative.lstrip("/")))
    if not (leaf == top or leaf.startswith(top + os.sep)) or not os.path.isdir(leaf):
        leaf = top
    dirs = [leaf]
    while leaf != top:
        leaf = os.path.dirname(leaf)
        dirs.append(leaf)
    return dirs


# --------------------------------------------------------------------------- memory


class _Level(NamedTuple):
    limit: int
    limit_file: str  # host path of the file the limit came from
    usage: int | None  # usage without inactive file cache, None when unreadable


def _v2_memory_limit(path: str) -> int | None:
    """``memory.max`` / ``memory.high``: bytes, ``max`` (no limit: None), malformed: None."""
    text = _read_text(path)
    if text is None or text.strip() == "max":
        return None
    try:
        value = int(text.strip())
    except ValueError:
        return None
    return value if value >= 0 else None


def _usage_without_cache(
    usage_file: str, stat_file: str, cache_keys: tuple[str, ...]
) -> int | None:
    """Cgroup usage minus inactive file cache, which the kernel reclaims before OOM."""
    usage = _read_int(usage_file)
    if usage is None or usage < 0:
        return None
    stat = _read_keyed(stat_file)
    cache = next((stat[key] for key in cache_keys if key in stat), 0)
    return max(0, usage - max(0, cache))


def _v2_memory_levels(root: str, host_total: int | None) -> list[_Level] | None:
    """Limits along the v2 cgroup path; None when v2 has no memory controller here."""
    path, _ = _proc_self_cgroup(root)
    if path is None:
        return None
    for mount in _v2_mounts(root):
        dirs = _cgroup_dirs(root, mount, path)
        top = dirs[-1]
        controllers = (_read_text(os.path.join(top, "cgroup.controllers")) or "").split()
        has_files = any(
            os.path.exists(os.path.join(d, name))
            for d in dirs for name in ("memory.max", "memory.current")
        )
        if not has_files and "memory" not in controllers:
            continue
        levels = []
        for d in dirs:
            usage = _usage_without_cache(
                os.path.join(d, "memory.current"), os.path.join(d, "memory.stat"),
                ("inactive_file",),
            )
            for name in ("memory.max", "memory.high"):
                limit = _v2_memory_limit(os.path.join(d, name))
                if limit is not None and (host_total is None or limit < host_total):
                    levels.append(_Level(limit, os.path.join(d, name), usage))
        return levels
    return None


def _v1_memory_levels(root: str, host_total: int | None) -> list[_Level] | None:
    """Limits along the v1 memory cgroup path; None when there is no v1 memory controller."""
    _, paths = _proc_self_cgroup(root)
    if "memory" not in paths:
        return None
    for mount in _v1_mounts(root, "memory"):
        dirs = _cgroup_dirs(root, mount, paths["memory"])
        if not any(os.path.exists(os.path.join(d, "memory.limit_in_bytes")) for d in dirs):
            continue
        levels = []
        for d in dirs:
            limit_file = os.path.join(d, "memory.limit_in_bytes")
            limit = _read_int(limit_file)
            if limit is None or limit < 0 or limit >= _V1_UNLIMITED_FLOOR:
                continue
            if host_total is not None and limit >= host_total:
                continue
            usage = _usage_without_cache(
                os.path.join(d, "memory.usage_in_bytes"), os.path.join(d, "memory.stat"),
                ("total_inactive_file", "inactive_file"),
            )
            levels.append(_Level(limit, limit_file, usage))
        return levels
    return None


def system_memory(root: str | os.PathLike[str] = "/") -> SystemMemory:
    """Memory this process may use, container limits included (see :class:`SystemMemory`).

    Sources, in order: the cgroup v2 hierarchy if it has the memory controller, else the
    cgroup v1 memory controller, and always the host's ``/proc/meminfo``. Along the cgroup
    path every ancestor is read up to the top of the mount, because a parent's limit binds
    its children; the smallest limit is reported and ``available`` is the tightest room
    left at any level. A limit at or above host RAM (and v1's "unlimited" value,
    9223372036854771712) is no limit.

    Never raises on bad files: an unreadable file or a malformed value (``memory.max``
    holding ``"lots"``) is skipped and the next source is used, down to ``/proc/meminfo``.
    If a limited cgroup's usage cannot be read, the host's used memory stands in for it,
    which overstates usage: the safe side for sizing. Without any readable source, the
    fields are 0 and ``limit_source`` is ``"unknown"``.
    """
    root = os.fspath(root)
    host = _read_meminfo(root)
    host_used = (
        max(0, host.total - host.available)
        if host.total is not None and host.available is not None else 0
    )

    levels = _v2_memory_levels(root, host.total)
    if levels is None:
        levels = _v1_memory_levels(root, host.total)
    levels = levels or []
    if _is_real_root(root):
        platform = _core.memory_limit()
        if platform is not None and (host.total is None or platform[0] < host.total):
            limit, used, source = platform
            levels.append(_Level(limit, source, used))

    if not levels:
        if host.total is None:
            return SystemMemory(0, host.available or 0, None, "unknown", 0,
                                host.swap_total, host.swap_free)
        source = "/proc/meminfo" if os.path.isfile(_host_path(root, "/proc/meminfo")) \
            else "sysconf"
        return SystemMemory(host.total, host.available if host.available is not None else 0,
                            None, source, host_used, host.swap_total, host.swap_free)

    binding = min(levels, key=lambda level: level.limit)  # leaf first: ties name the deepest

    def usage_of(level: _Level) -> int:
        return level.usage if level.usage is not None else min(host_used, level.limit)

    room = min(max(0, level.limit - usage_of(level)) for level in levels)
    available = room if host.available is None else min(room, host.available)
    total = binding.limit if host.total is None else min(binding.limit, host.total)
    return SystemMemory(
        total=total,
        available=available,
        limit=binding.limit,
        limit_source=_shown_path(root, binding.limit_file) if os.path.isabs(binding.limit_file)
        else binding.limit_file,  # "RLIMIT_AS", "job object (job memory)"
        used=usage_of(binding),
        swap_total=host.swap_total,
        swap_free=host.swap_free,
    )


# --------------------------------------------------------------------------- CPUs


def _ceil_div(quota: int, period: int) -> int:
    return -(-quota // period)


def _v2_cpu_quota(root: str) -> tuple[int, str] | None:
    """The tightest ``cpu.max`` along the v2 path, as whole CPUs (rounded up)."""
    path, _ = _proc_self_cgroup(root)
    if path is None:
        return None
    best: tuple[int, str] | None = None
    for mount in _v2_mounts(root):
        for d in _cgroup_dirs(root, mount, path):
            cpu_max = os.path.join(d, "cpu.max")
            parts = (_read_text(cpu_max) or "").split()
            if not parts or parts[0] == "max":
                continue
            try:
                quota = int(parts[0])
                period = int(parts[1]) if len(parts) > 1 else 100_000
            except ValueError:
                continue
            if quota <= 0 or period <= 0:
                continue
            cpus = _ceil_div(quota, period)
            if best is None or cpus < best[0]:
                best = (cpus, _shown_path(root, cpu_max))
    return best


def _v1_cpu_quota(root: str) -> tuple[int, str] | None:
    """The tightest ``cpu.cfs_quota_us / cpu.cfs_period_us`` along the v1 cpu path."""
    _, paths = _proc_self_cgroup(root)
    if "cpu" not in paths:
        return None
    best: tuple[int, str] | None = None
    for mount in _v1_mounts(root, "cpu"):
        for d in _cgroup_dirs(root, mount, paths["cpu"]):
            quota_file = os.path.join(d, "cpu.cfs_quota_us")
            quota = _read_int(quota_file)
            period = _read_int(os.path.join(d, "cpu.cfs_period_us"))
            if quota is None or period is None or quota <= 0 or period <= 0:
                continue  # -1: no quota at this level
            cpus = _ceil_div(quota, period)
            if best is None or cpus < best[0]:
                best = (cpus, _shown_path(root, quota_file))
    return best


def cpu_limit_info(root: str | os.PathLike[str] = "/") -> CpuLimit:
    """How many CPUs this process may keep busy, and which source set that number.

    The smallest of: a cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` over
    ``cpu.cfs_period_us``, rounded up: a quota of 1.5 CPUs keeps 2 workers partly busy),
    the CPU affinity of this process (only for ``root="/"``, the real machine) and
    ``os.cpu_count()``. At least 1. Malformed quota files are skipped.
    """
    root = os.fspath(root)
    candidates: list[tuple[int, str]] = []
    for quota in (_v2_cpu_quota(root), _v1_cpu_quota(root)):
        if quota is not None:
            candidates.append(quota)
    if _is_real_root(root) and hasattr(os, "sched_getaffinity"):
        try:
            candidates.append((len(os.sched_getaffinity(0)), "sched_getaffinity(0)"))
        except OSError:
            pass
    count = os.cpu_count()
    if count:
        candidates.append((count, "os.cpu_count()"))
    if not candidates:
        return CpuLimit(1, "unknown (assumed 1)")
    cpus, source = min(candidates, key=lambda c: c[0])
    return CpuLimit(max(1, cpus), source)


def cpu_limit(root: str | os.PathLike[str] = "/") -> int:
    """The number of CPUs this process may keep busy (see :func:`cpu_limit_info`)."""
    return cpu_limit_info(root).cpus

