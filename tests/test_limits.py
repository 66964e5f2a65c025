"""memtrack.limits: memory and CPU limits from fake /proc and /sys trees, and the real machine.

Each fake tree stands for one kind of machine or container: cgroup v2, v1, hybrid, none.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memtrack import limits
from memtrack.limits import CpuLimit, SystemMemory, cpu_limit, cpu_limit_info, system_memory

KiB = 1024
MiB = 1024**2
GiB = 1024**3

HOST_TOTAL = 64 * GiB
HOST_AVAILABLE = 48 * GiB
V1_UNLIMITED = "9223372036854771712"


def meminfo(total: int = HOST_TOTAL, available: int | None = HOST_AVAILABLE,
            swap_total: int = 8 * GiB, swap_free: int = 6 * GiB, extra: str = "") -> str:
    lines = [f"MemTotal:       {total // KiB} kB", f"MemFree:        {total // 4 // KiB} kB"]
    if available is not None:
        lines.append(f"MemAvailable:   {available // KiB} kB")
    lines += ["Buffers:        1024 kB", "Cached:         2048 kB",
              f"SwapTotal:      {swap_total // KiB} kB", f"SwapFree:       {swap_free // KiB} kB"]
    return "\n".join(lines) + "\n" + extra


def build(root: Path, files: dict[str, str | bytes]) -> Path:
    """Write each file (path absolute inside the fake machine) under root."""
    for name, content in files.items():
        path = root / name.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return root


def dirs(root: Path, *names: str) -> None:
    for name in names:
        (root / name.lstrip("/")).mkdir(parents=True, exist_ok=True)


@pytest.fixture
def many_cpus(monkeypatch: pytest.MonkeyPatch) -> int:
    """A host with 64 CPUs, so that quotas in the fake trees are what binds."""
    monkeypatch.setattr(limits.os, "cpu_count", lambda: 64)
    return 64


# --------------------------------------------------------------------------- no cgroup


def test_no_cgroup_uses_host_meminfo(tmp_path: Path) -> None:
    # given: a machine with /proc/meminfo and no cgroup information at all
    build(tmp_path, {"/proc/meminfo": meminfo()})

    # when
    memory = system_memory(tmp_path)

    # then: the host figures, and no limit
    assert memory == SystemMemory(
        total=HOST_TOTAL, available=HOST_AVAILABLE, limit=None, limit_source="/proc/meminfo",
        used=HOST_TOTAL - HOST_AVAILABLE, swap_total=8 * GiB, swap_free=6 * GiB,
    )


def test_root_accepts_a_path_object_and_a_string(tmp_path: Path) -> None:
    # given
    build(tmp_path, {"/proc/meminfo": meminfo()})

    # when / then
    assert system_memory(tmp_path) == system_memory(str(tmp_path))


# --------------------------------------------------------------------------- cgroup v2


def v2_tree(root: Path, path: str, files: dict[str, str], host: str | None = None) -> Path:
    """A pure cgroup v2 machine: the process is in `path`; files are relative to the mount."""
    tree = {
        "/proc/meminfo": host if host is not None else meminfo(),
        "/proc/self/cgroup": f"0::{path}\n",
        "/sys/fs/cgroup/cgroup.controllers": "cpuset cpu io memory pids\n",
    }
    tree.update({f"/sys/fs/cgroup/{name}": content for name, content in files.items()})
    build(root, tree)
    dirs(root, f"/sys/fs/cgroup{path}")
    return root


def test_v2_nested_path_takes_the_smallest_limit_along_the_walk_up(tmp_path: Path) -> None:
    # given: the process in /app/job; the parent /app has the smaller limit
    v2_tree(tmp_path, "/app/job", {
        "app/memory.max": str(4 * GiB),
        "app/memory.current": str(1 * GiB),
        "app/job/memory.max": str(6 * GiB),
        "app/job/memory.current": str(1 * GiB),
    })

    # when
    memory = system_memory(tmp_path)

    # then: the parent's limit binds, and its file is named
    assert memory.limit == 4 * GiB
    assert memory.limit_source == "/sys/fs/cgroup/app/memory.max"
    assert memory.total == 4 * GiB
    assert memory.used == 1 * GiB
    assert memory.available == 3 * GiB


def test_v2_max_everywhere_means_no_limit_and_host_meminfo(tmp_path: Path) -> None:
    # given: a cgroup with the memory controller but "max" at every level
    v2_tree(tmp_path, "/app", {
        "app/memory.max": "max\n", "app/memory.high": "max\n",
        "app/memory.current": str(2 * GiB),
    })

    # when
    memory = system_memory(tmp_path)

    # then
    assert memory.limit is None
    assert memory.limit_source == "/proc/meminfo"
    assert memory.total == HOST_TOTAL
    assert memory.available == HOST_AVAILABLE
    assert memory.used == HOST_TOTAL - HOST_AVAILABLE


def test_v2_memory_high_smaller_than_memory_max_is_the_limit(tmp_path: Path) -> None:
    # given: memory.high throttles below memory.max
    v2_tree(tmp_path, "/app", {
        "app/memory.max": str(8 * GiB), "app/memory.high": str(6 * GiB),
        "app/memory.current": str(1 * GiB),
    })

    # when
    memory = system_memory(tmp_path)

    # then
    assert memory.limit == 6 * GiB
    assert memory.limit_source == "/sys/fs/cgroup/app/memory.high"
    assert memory.available == 5 * GiB


def test_v2_path_not_visible_in_a_cgroup_namespace_uses_the_mount_root(tmp_path: Path) -> None:
    # given: /proc/self/cgroup names a host path, but the container's mount shows only
    # its own cgroup at /sys/fs/cgroup
    build(tmp_path, {
        "/proc/meminfo": meminfo(),
        "/proc/self/cgroup": "0::/kubepods/burstable/pod42/ctr\n",
        "/sys/fs/cgroup/cgroup.controllers": "cpu memory\n",
        "/sys/fs/cgroup/memory.max": str(2 * GiB),
        "/sys/fs/cgroup/memory.current": str(512 * MiB),
    })

    # when
    memory = system_memory(tmp_path)

    # then
    assert memory.limit == 2 * GiB
    assert memory.limit_source == "/sys/fs/cgroup/memory.max"
    assert memory.available == 2 * GiB - 512 * MiB


def test_v2_bind_mounted_cgroup_from_mountinfo_strips_the_mount_root(tmp_path: Path) -> None:
    # given: mountinfo says /sys/fs/cgroup shows the host cgroup /docker/abc, and the
    # process is in its child /docker/abc/worker
    build(tmp_path, {
        "/proc/meminfo": meminfo(),
        "/proc/self/cgroup": "0::/docker/abc/worker\n",
        "/proc/self/mountinfo": (
            "30 25 0:26 /docker/abc /sys/fs/cgroup ro,nosuid - cgroup2 cgroup rw\n"
        ),
        "/sys/fs/cgroup/cgroup.controllers": "memory\n",
        "/sys/fs/cgroup/memory.max": str(3 * GiB),
        "/sys/fs/cgroup/worker/memory.max": str(1 * GiB),
        "/sys/fs/cgroup/worker/memory.current": str(100 * MiB),
    })

    # when
    memory = system_memory(tmp_path)

    # then: the child's limit, found through the stripped path
    assert memory.limit == 1 * GiB
    assert memory.limit_source == "/sys/fs/cgroup/worker/memory.max"


def test_v2_available_leaves_out_inactive_file_cache(tmp_path: Path) -> None:
    # given: 3 GiB charged, of which 1 GiB is inactive (reclaimable) file cache
    v2_tree(tmp_path, "/app", {
        "app/memory.max": str(4 * GiB),
        "app/memory.current": str(3 * GiB),
        "app/memory.stat": f"anon {2 * GiB}\nfile {1 * GiB}\ninactive_file {1 * GiB}\n",
    })

    # when
    memory = system_memory(tmp_path)

    # then: the cache does not count as used
    assert memory.used == 2 * GiB
    assert memory.available == 2 * GiB


def test_available_is_capped_by_host_memavailable(tmp_path: Path) -> None:
    # given: a generous cgroup on a host that has little memory left
    v2_tree(tmp_path, "/app", {
        "app/memory.max": str(16 * GiB), "app/memory.current": str(1 * GiB),
    }, host=meminfo(available=3 * GiB))

    # when
    memory = system_memory(tmp_path)

    # then
    assert memory.limit == 16 * GiB
    assert memory.available == 3 * GiB


def test_a_crowded_parent_leaves_less_room_than_the_child_limit_suggests(tmp_path: Path) -> None:
    # given: the child may use 4 GiB, but its parent (8 GiB) is already 7.5 GiB full
    v2_tree(tmp_path, "/app/job", {
        "app/memory.max": str(8 * GiB), "app/memory.current": str(7 * GiB + 512 * MiB),
        "app/job/memory.max": str(4 * GiB), "app/job/memory.current": str(1 * GiB),
    })

    # when
    memory = system_memory(tmp_path)

    # then: the limit is the child's, but only 0.5 GiB is really available
    assert memory.limit == 4 * GiB
    assert memory.limit_source == "/sys/fs/cgroup/app/job/memory.max"
    assert memory.available == 512 * MiB


def test_limit_at_or_above_host_ram_is_no_limit(tmp_path: Path) -> None:
    # given: a v2 limit larger than the host's RAM
    v2_tree(tmp_path, "/app", {"app/memory.max": str(2 * HOST_TOTAL)})

    # when
    memory = system_memory(tmp_path)

    # then
    assert memory.limit is None
    assert memory.limit_source == "/proc/meminfo"


# --------------------------------------------------------------------------- cgroup v1


def v1_tree(root: Path, path: str, files: dict[str, str], host: str | None = None) -> Path:
    """A cgroup v1 machine: memory controller at /sys/fs/cgroup/memory."""
    tree = {
        "/proc/meminfo": host if host is not None else meminfo(),
        "/proc/self/cgroup": f"5:cpu,cpuacct:{path}\n4:memory:{path}\n1:name=systemd:{path}\n",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes": V1_UNLIMITED,
    }
    tree.update({f"/sys/fs/cgroup/memory/{name}": content for name, content in files.items()})
    build(root, tree)
    dirs(root, f"/sys/fs/cgroup/memory{path}")
    return root


def test_v1_limited(tmp_path: Path) -> None:
    # given: a docker-style v1 cgroup limited to 2 GiB, 1.5 GiB charged, 0.5 GiB of it
    # inactive file cache
    v1_tree(tmp_path, "/docker/abc", {
        "docker/abc/memory.limit_in_bytes": str(2 * GiB),
        "docker/abc/memory.usage_in_bytes": str(1 * GiB + 512 * MiB),
        "docker/abc/memory.stat": f"cache 1\ninactive_file 7\ntotal_inactive_file {512 * MiB}\n",
    })

    # when
    memory = system_memory(tmp_path)

    # then
    assert memory.limit == 2 * GiB
    assert memory.limit_source == "/sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes"
    assert memory.total == 2 * GiB
    assert memory.used == 1 * GiB
    assert memory.available == 1 * GiB


def test_v1_sentinel_means_unlimited(tmp_path: Path) -> None:
    # given: every level holds the page-rounded LONG_MAX "unlimited" value
    v1_tree(tmp_path, "/docker/abc", {
        "docker/abc/memory.limit_in_bytes": V1_UNLIMITED,
        "docker/abc/memory.usage_in_bytes": str(1 * GiB),
    })

    # when
    memory = system_memory(tmp_path)

    # then
    assert memory.limit is None
    assert memory.limit_source == "/proc/meminfo"
    assert memory.total == HOST_TOTAL
    assert memory.available == HOST_AVAILABLE


def test_v1_limit_above_host_total_is_unlimited(tmp_path: Path) -> None:
    # given
    v1_tree(tmp_path, "/job", {"job/memory.limit_in_bytes": str(HOST_TOTAL + GiB)})

    # when / then
    assert system_memory(tmp_path).limit is None


def test_v1_path_not_visible_falls_back_to_the_mount_root(tmp_path: Path) -> None:
    # given: the container sees its own cgroup at the mount root only
    build(tmp_path, {
        "/proc/meminfo": meminfo(),
        "/proc/self/cgroup": "4:memory:/docker/0123456789\n",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes": str(3 * GiB),
        "/sys/fs/cgroup/memory/memory.usage_in_bytes": str(1 * GiB),
    })

    # when
    memory = system_memory(tmp_path)

    # then
    assert memory.limit == 3 * GiB
    assert memory.limit_source == "/sys/fs/cgroup/memory/memory.limit_in_bytes"
    assert memory.available == 2 * GiB


def test_hybrid_uses_v1_memory_when_the_v2_hierarchy_has_no_memory_controller(
    tmp_path: Path,
) -> None:
    # given: like this machine: v1 controllers plus a v2 "unified" mount without memory
    build(tmp_path, {
        "/proc/meminfo": meminfo(),
        "/proc/self/cgroup": "4:memory:/job\n1:cpu:/\n0::/\n",
        "/sys/fs/cgroup/unified/cgroup.controllers": "\n",
        "/sys/fs/cgroup/unified/cgroup.procs": "1\n",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes": V1_UNLIMITED,
        "/sys/fs/cgroup/memory/job/memory.limit_in_bytes": str(1 * GiB),
        "/sys/fs/cgroup/memory/job/memory.usage_in_bytes": str(256 * MiB),
    })

    # when
    memory = system_memory(tmp_path)

    # then
    assert memory.limit == 1 * GiB
    assert memory.limit_source == "/sys/fs/cgroup/memory/job/memory.limit_in_bytes"


def test_hybrid_uses_v2_when_it_holds_the_memory_files(tmp_path: Path) -> None:
    # given: a v1 "memory:" line but no v1 memory mount; v2 at /sys/fs/cgroup/unified
    # has the memory controller
    build(tmp_path, {
        "/proc/meminfo": meminfo(),
        "/proc/self/cgroup": "4:memory:/job\n0::/job\n",
        "/sys/fs/cgroup/unified/cgroup.controllers": "memory\n",
        "/sys/fs/cgroup/unified/job/memory.max": str(5 * GiB),
        "/sys/fs/cgroup/unified/job/memory.current": str(1 * GiB),
    })

    # when
    memory = system_memory(tmp_path)

    # then
    assert memory.limit == 5 * GiB
    assert memory.limit_source == "/sys/fs/cgroup/unified/job/memory.max"


# --------------------------------------------------------------------------- bad files


def test_malformed_memory_max_is_skipped_and_the_parent_limit_used(tmp_path: Path) -> None:
    # given: the leaf's memory.max holds garbage; the parent has a real limit
    v2_tree(tmp_path, "/app/job", {
        "app/memory.max": str(3 * GiB), "app/memory.current": str(1 * GiB),
        "app/job/memory.max": "lots\n", "app/job/memory.current": "???",
    })

    # when
    memory = system_memory(tmp_path)

    # then
    assert memory.limit == 3 * GiB
    assert memory.limit_source == "/sys/fs/cgroup/app/memory.max"


def test_all_cgroup_files_malformed_falls_back_to_meminfo(tmp_path: Path) -> None:
    # given: garbage in memory.max and in a v1-style line too
    v2_tree(tmp_path, "/app", {"app/memory.max": "12abc", "app/memory.high": ""})

    # when
    memory = system_memory(tmp_path)

    # then
    assert memory.limit is None
    assert memory.limit_source == "/proc/meminfo"
    assert memory.total == HOST_TOTAL


def test_unreadable_cgroup_usage_counts_as_host_used_memory(tmp_path: Path) -> None:
    # given: a limit but no readable usage
    v2_tree(tmp_path, "/app", {"app/memory.max": str(20 * GiB), "app/memory.current": "x"})

    # when
    memory = system_memory(tmp_path)

    # then: the host's used memory (16 GiB) stands in, the safe side
    assert memory.used == HOST_TOTAL - HOST_AVAILABLE
    assert memory.available == 4 * GiB


def test_garbage_proc_self_cgroup_and_binary_files_do_not_crash(tmp_path: Path) -> None:
    # given: non-UTF-8 bytes and nonsense lines
    build(tmp_path, {
        "/proc/meminfo": meminfo(),
        "/proc/self/cgroup": b"\xff\xfe\x00garbage\n::\n4:memory\n",
        "/proc/self/mountinfo": b"\xff\xff not mountinfo\n",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes": b"\xff\xff",
    })

    # when
    memory = system_memory(tmp_path)

    # then
    assert memory.limit is None
    assert memory.total == HOST_TOTAL


def test_path_escaping_the_mount_is_not_followed(tmp_path: Path) -> None:
    # given: a process outside the namespace shows up as "0::/../.."; a file outside the
    # mount would be read if the path were followed
    v2_tree(tmp_path, "/", {"memory.max": str(2 * GiB)})
    build(tmp_path, {"/proc/self/cgroup": "0::/../../..\n", "/memory.max": str(1 * GiB)})

    # when
    memory = system_memory(tmp_path)

    # then: the mount root, not the file above it
    assert memory.limit_source == "/sys/fs/cgroup/memory.max"
    assert memory.limit == 2 * GiB


def test_meminfo_without_memavailable_estimates_it(tmp_path: Path) -> None:
    # given: an old kernel's /proc/meminfo without MemAvailable and with a garbage line
    build(tmp_path, {"/proc/meminfo": meminfo(available=None, extra="Bogus: many kB\n")})

    # when
    memory = system_memory(tmp_path)

    # then: MemFree + Buffers + Cached
    assert memory.available == HOST_TOTAL // 4 + 1024 * KiB + 2048 * KiB


def test_malformed_memavailable_is_skipped(tmp_path: Path) -> None:
    # given
    text = meminfo().replace(f"MemAvailable:   {HOST_AVAILABLE // KiB} kB", "MemAvailable: ?? kB")
    build(tmp_path, {"/proc/meminfo": text})

    # when
    memory = system_memory(tmp_path)

    # then: the estimate, not a crash and not zero
    assert memory.available == HOST_TOTAL // 4 + 1024 * KiB + 2048 * KiB


def test_nothing_readable_gives_zeros_and_unknown(tmp_path: Path) -> None:
    # given: an empty fake root

    # when
    memory = system_memory(tmp_path)

    # then
    assert memory == SystemMemory(0, 0, None, "unknown", 0, 0, 0)


# --------------------------------------------------------------------------- CPUs


def test_cpu_v2_quota_rounds_up(tmp_path: Path, many_cpus: int) -> None:
    # given: 1.5 CPUs of quota
    v2_tree(tmp_path, "/app", {"app/cpu.max": "150000 100000\n"})

    # when
    info = cpu_limit_info(tmp_path)

    # then
    assert info == CpuLimit(2, "/sys/fs/cgroup/app/cpu.max")
    assert cpu_limit(tmp_path) == 2


def test_cpu_v2_max_means_no_quota(tmp_path: Path, many_cpus: int) -> None:
    # given
    v2_tree(tmp_path, "/app", {"app/cpu.max": "max 100000\n"})

    # when / then
    assert cpu_limit_info(tmp_path) == CpuLimit(many_cpus, "os.cpu_count()")


def test_cpu_v2_walks_up_to_the_smallest_quota(tmp_path: Path, many_cpus: int) -> None:
    # given: the parent allows 3 CPUs, the child 8
    v2_tree(tmp_path, "/app/job", {
        "app/cpu.max": "300000 100000", "app/job/cpu.max": "800000 100000",
    })

    # when / then
    assert cpu_limit_info(tmp_path) == CpuLimit(3, "/sys/fs/cgroup/app/cpu.max")


def test_cpu_v1_quota(tmp_path: Path, many_cpus: int) -> None:
    # given: a combined cpu,cpuacct mount with 4 CPUs of quota
    v1_tree(tmp_path, "/job", {})
    build(tmp_path, {
        "/sys/fs/cgroup/cpu,cpuacct/job/cpu.cfs_quota_us": "400000\n",
        "/sys/fs/cgroup/cpu,cpuacct/job/cpu.cfs_period_us": "100000\n",
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
    })

    # when / then
    assert cpu_limit_info(tmp_path) == CpuLimit(
        4, "/sys/fs/cgroup/cpu,cpuacct/job/cpu.cfs_quota_us")


def test_cpu_v1_minus_one_means_no_quota(tmp_path: Path, many_cpus: int) -> None:
    # given
    v1_tree(tmp_path, "/job", {})
    build(tmp_path, {
        "/sys/fs/cgroup/cpu,cpuacct/job/cpu.cfs_quota_us": "-1\n",
        "/sys/fs/cgroup/cpu,cpuacct/job/cpu.cfs_period_us": "100000\n",
    })

    # when / then
    assert cpu_limit(tmp_path) == many_cpus


def test_cpu_without_cgroup_is_the_cpu_count(tmp_path: Path, many_cpus: int) -> None:
    # given: no cgroup files at all

    # when / then
    assert cpu_limit_info(tmp_path) == CpuLimit(many_cpus, "os.cpu_count()")


def test_cpu_malformed_quota_is_skipped(tmp_path: Path, many_cpus: int) -> None:
    # given
    v2_tree(tmp_path, "/app", {"app/cpu.max": "fast 100000", "cpu.max": "0 0"})

    # when / then
    assert cpu_limit(tmp_path) == many_cpus


def test_cpu_is_at_least_one_even_when_nothing_is_known(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # given: os.cpu_count() cannot tell
    monkeypatch.setattr(limits.os, "cpu_count", lambda: None)

    # when / then
    assert cpu_limit(tmp_path) == 1


# --------------------------------------------------------------------------- this machine


def test_real_machine_memory_agrees_with_psutil() -> None:
    # given: psutil as an independent oracle
    psutil = pytest.importorskip("psutil")
    oracle = psutil.virtual_memory()

    # when
    memory = system_memory()

    # then: sane numbers; equal to the host's when there is no limit
    assert 0 < memory.total <= oracle.total
    assert 0 < memory.available <= memory.total
    assert 0 <= memory.used <= memory.total
    swap = psutil.swap_memory()
    assert memory.swap_total == swap.total
    if memory.limit is None:
        assert memory.limit_source == "/proc/meminfo"
        assert memory.total == oracle.total
        assert abs(memory.available - oracle.available) < max(256 * MiB, oracle.total // 20)
    else:
        assert memory.limit < oracle.total
        assert memory.limit_source.startswith("/sys/fs/cgroup/")


def test_real_machine_cpus_within_affinity() -> None:
    # given
    affinity = len(os.sched_getaffinity(0))

    # when
    cpus = cpu_limit()

    # then
    assert 1 <= cpus <= min(affinity, os.cpu_count() or affinity)


# --------------------------------------------------------------------------- real cgroup v1


def _own_v1_cgroup(controller: str) -> Path | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3 and controller in parts[1].split(","):
            for mount in Path("/sys/fs/cgroup").glob("*"):
                if controller in mount.name.split(",") and mount.is_dir():
                    return mount / parts[2].lstrip("/")
    return None


def _run_in_new_v1_cgroup(controller: str, settings: dict[str, str], code: str) -> tuple[
    Path, dict
]:
    """Create a child v1 cgroup, run `code` in a Python process that moves itself into it,
    and return (cgroup dir, the JSON the code printed). Skips when not allowed."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("needs root on Linux to create a cgroup")
    parent = _own_v1_cgroup(controller)
    if parent is None or not parent.is_dir():
        pytest.skip(f"no cgroup v1 {controller} controller mounted for this process")
    child = parent / f"memtrack-test-{os.getpid()}"
    try:
        child.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup under {parent}: {exc}")
    try:
        try:
            for name, value in settings.items():
                (child / name).write_text(value)
        except OSError as exc:
            pytest.skip(f"cannot configure cgroup {child}: {exc}")
        script = (
            "import json, os, sys\n"
            "with open(sys.argv[1], 'w') as f: f.write(str(os.getpid()))\n"
            + code
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEMTRACK_")}
        result = subprocess.run(
            [sys.executable, "-c", script, str(child / "cgroup.procs")],
            capture_output=True, text=True, timeout=60, env=env,
        )
        if result.returncode != 0 and "cgroup.procs" in result.stderr:
            pytest.skip(f"cannot move a process into {child}: {result.stderr.strip()}")
        assert result.returncode == 0, result.stderr
        return child, json.loads(result.stdout)
    finally:
        try:
            child.rmdir()
        except OSError as exc:  # pragma: no cover - leaves a note, not a failure
            print(f"could not remove test cgroup {child}: {exc}", file=sys.stderr)


def test_real_v1_memory_cgroup_limit_is_seen_from_inside() -> None:
    # given: a real child memory cgroup limited to 512 MiB, and a process inside it
    child, seen = _run_in_new_v1_cgroup(
        "memory", {"memory.limit_in_bytes": str(512 * MiB)},
        "import dataclasses\n"
        "from memtrack.limits import system_memory\n"
        "print(json.dumps(dataclasses.asdict(system_memory())))\n",
    )

    # then: the process sees the limit and the file it came from
    assert seen["limit"] == 512 * MiB
    assert seen["limit_source"] == str(child / "memory.limit_in_bytes")
    assert seen["total"] == 512 * MiB
    assert 0 < seen["available"] <= 512 * MiB
    assert 0 <= seen["used"] <= 512 * MiB
    assert not child.exists()


def test_real_v1_cpu_cgroup_quota_is_seen_from_inside() -> None:
    # given: a real child cpu cgroup with half a CPU of quota
    child, seen = _run_in_new_v1_cgroup(
        "cpu", {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "50000"},
        "from memtrack.limits import cpu_limit_info\n"
        "print(json.dumps(list(cpu_limit_info())))\n",
    )

    # then: rounded up to one CPU, named by the quota file
    assert seen == [1, str(child / "cpu.cfs_quota_us")]


def test_system_memory_is_a_frozen_value() -> None:
    # given
    memory = system_memory()

    # when / then
    with pytest.raises(dataclasses.FrozenInstanceError):
        memory.total = 1  # type: ignore[misc]


def test_rlimit_as_is_the_platform_limit_and_binds_system_memory() -> None:
    # given: a process whose address space is limited (ulimit -v) below the host's RAM
    total = system_memory().total
    limit = min(2 * GiB, total // 2) // MiB * MiB
    script = (
        "import json, resource\n"
        f"resource.setrlimit(resource.RLIMIT_AS, ({limit}, resource.RLIM_INFINITY))\n"
        "from memtrack import _core\n"
        "from memtrack.limits import system_memory\n"
        "m = system_memory()\n"
        "print(json.dumps([_core.memory_limit(), m.limit, m.limit_source, m.used]))\n"
    )

    # when
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True).stdout
    (seen_limit, used, source), memory_limit, memory_source, memory_used = json.loads(out)

    # then: the platform layer reads it, with the address space used against it
    assert (seen_limit, source) == (limit, "RLIMIT_AS")
    assert 0 < used < limit
    # and, unless a cgroup binds tighter, it is the limit system_memory() reports
    if memory_source == "RLIMIT_AS":
        assert memory_limit == limit and memory_used == used
    else:
        assert memory_limit < limit


def test_no_rlimit_no_platform_limit() -> None:
    # given this test process, which runs without an RLIMIT_AS (as pytest is started here)
    import resource

    if resource.getrlimit(resource.RLIMIT_AS)[0] != resource.RLIM_INFINITY:
        pytest.skip("this pytest runs under an RLIMIT_AS (ulimit -v)")
    # then
    from memtrack import _core

    assert _core.memory_limit() is None
    assert system_memory().limit_source != "RLIMIT_AS"
