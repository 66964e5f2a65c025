"""Honest accounting (issue 11), on real pools under fork, spawn and forkserver.

`memtrack run` decides each process's role (tool, root, worker, helper, other) and the
figures count workers only; the first worker to die is told apart from those the pool
stopped afterwards; a kernel OOM kill is reported as one.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest

import memtrack
import memtrack.pool.forensics
from memtrack.profile.insights import digest, insights

MiB = 1024 * 1024
METHODS = ["fork", "spawn", "forkserver"]

#: A program that never imports memtrack: a pool of 2 that each keep 30 MiB per task.
POOL = textwrap.dedent("""
    import multiprocessing as mp, sys, time
    from concurrent.futures import ProcessPoolExecutor
    kept = []
    def work(i):
        kept.append(bytearray(30 << 20))
        for j in range(0, len(kept[-1]), 4096):
            kept[-1][j] = 1
        time.sleep(0.3)
        return i
    if __name__ == "__main__":
        ctx = mp.get_context(sys.argv[1])
        {manager}
        with ProcessPoolExecutor(2, mp_context=ctx) as ex:
            assert sorted(ex.map(work, range(4))) == [0, 1, 2, 3]
""")


def who(profile: memtrack.Profile) -> list[tuple]:
    """What the recorder decided, for an assertion's message: (event, pid, role, time)."""
    t0 = profile.header["started"]
    return [(e["kind"], e["pid"], e.get("role"), round(e["time"] - t0, 3))
            for e in profile.events if e["kind"] in ("join", "exit", "death")]


def memtrack_run(tmp_path: Path, *command: str, timeout: float = 120) -> memtrack.Profile:
    out = tmp_path / "run.mtp"
    proc = subprocess.run(
        [sys.executable, "-m", "memtrack", "run", "--quiet", "-o", str(out), "--", *command],
        capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return memtrack.load(out)


@pytest.mark.parametrize("method", METHODS)
def test_a_pool_run_under_memtrack_run_counts_its_workers_only(tmp_path, method):
    script = tmp_path / "pool.py"
    script.write_text(POOL.format(manager=""))
    profile = memtrack_run(tmp_path, sys.executable, str(script), method)
    run = digest(profile)

    # Two workers, never the helpers multiprocessing starts, the command or memtrack.
    assert len(run.workers) == 2 and run.max_live == 2, who(profile)
    roles = {w.pid: w.role for w in run.processes}
    helpers = [pid for pid, role in roles.items() if role == "helper"]
    assert list(roles.values()).count("root") == 1
    if method == "fork":
        assert helpers == []
    elif method == "spawn":
        assert len(helpers) == 1  # the resource tracker
    else:
        assert len(helpers) == 2  # the resource tracker and the forkserver
    tool = [pid for pid, role in run.roles.items() if role == "tool"]
    assert len(tool) == 1 and tool[0] not in run.samples
    # Profile.workers has the workers sampled through /proc; the rest are processes.
    assert sorted(w["pid"] for w in profile.workers) == sorted(w.pid for w in run.workers)
    assert {w["role"] for w in profile.processes} <= {"root", "helper", "other"}

    # Each worker kept 60 MiB: the pool peak holds both, the root none of it.
    assert run.peak.live == 2 and run.peak.pss >= 2 * 55 * MiB
    assert run.main_peak < 40 * MiB
    for found in insights(profile):
        assert found.kind != "worker_count" or "ran 2 workers" in found.message
        assert found.estimated_savings <= run.peak_bytes


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_manager_server_is_a_helper(tmp_path, method):
    script = tmp_path / "pool.py"
    script.write_text(POOL.format(manager="manager = ctx.Manager(); shared = manager.dict()"))
    run = digest(memtrack_run(tmp_path, sys.executable, str(script), method))
    assert len(run.workers) == 2
    assert sum(w.role == "helper" for w in run.processes) == (1 if method == "fork" else 2)


#: A command that imports memtrack, so it joins the table memtrack run exports; its
#: workers (forked, spawned or from the forkserver) join too.
AWARE = textwrap.dedent("""
    import multiprocessing as mp, sys, time
    from concurrent.futures import ProcessPoolExecutor
    import memtrack
    def work(i):
        with memtrack.phase("task"):
            time.sleep(0.2)
        return i
    if __name__ == "__main__":
        with memtrack.phase("main"):
            with ProcessPoolExecutor(2, mp_context=mp.get_context(sys.argv[1])) as ex:
                assert sorted(ex.map(work, range(6))) == list(range(6))
""")


@pytest.mark.parametrize("method", METHODS)
def test_a_root_that_imports_memtrack_joins_as_root_not_as_a_worker(tmp_path, method):
    script = tmp_path / "aware.py"
    script.write_text(AWARE)
    profile = memtrack_run(tmp_path, sys.executable, str(script), method)
    run = digest(profile)
    assert len(run.workers) == 2, [(w.pid, w.role) for w in run.processes]
    assert sum(w.tasks or 0 for w in run.workers) == 6
    (root,) = [w for w in run.processes if w.role == "root"]
    assert root.pid == profile.header["root_pid"]
    assert all(w["role"] == "worker" for w in profile.workers)
    assert [w["source"] for w in profile.processes if w["role"] == "root"] == ["table"]


def test_memtrack_itself_is_in_no_figure(tmp_path):
    run = digest(memtrack_run(tmp_path, "sleep", "1"))
    (root,) = run.processes
    assert root.role == "root" and run.workers == []
    # sleep is tiny; memtrack run's own ~20 MiB interpreter is not in the root's peak.
    assert run.main_peak < 4 * MiB


# --------------------------------------------------------------------------- deaths


def _suicide(i: int) -> int:
    import time

    if i == 0:
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGKILL)
    with memtrack.phase("wait"):
        time.sleep(5)
    return i


def _spin(_: int) -> int:
    import time

    time.sleep(5)
    return 0


@pytest.mark.parametrize("method", METHODS)
def test_the_first_worker_to_die_comes_first_and_bystanders_are_marked(method):
    ctx = mp.get_context(method)
    with memtrack.WorkerTable(capacity=8, heartbeat=0.05) as table:
        ex = ProcessPoolExecutor(3, mp_context=ctx, initializer=memtrack.init_worker,
                                 initargs=(table.name,))
        futures = [ex.submit(_suicide, i) for i in range(3)]
        processes = dict(ex._processes)  # the pool's own, to tell the table how each ended
        with pytest.raises(BrokenProcessPool):
            for f in futures:
                f.result(timeout=60)
        ex.shutdown(wait=True)
        for pid, process in processes.items():  # as MemoryAwareExecutor does
            table.record_exit(pid, process.exitcode)
        found = memtrack.pool.forensics.deaths(table)
        text = memtrack.explain_broken_pool(table)
    assert len(found) == 3, text
    first, *others = found
    assert first.culprit and not first.stopped_by_pool
    assert first.stats.exit_signal == signal.SIGKILL and not first.stats.phase
    assert all(d.stopped_by_pool and not d.culprit for d in others), text
    lines = text.splitlines()
    assert lines[0].startswith(f"first to die: worker {first.pid} died")
    assert all("stopped by the pool afterwards" in line for line in lines[1:])


CGROUP_V1 = Path("/sys/fs/cgroup/memory")


def _small_cgroup() -> Path | None:
    """A memory cgroup of 64 MiB of our own (v2, else v1), or None when we may not."""
    if os.geteuid() != 0:
        return None
    name = f"memtrack-oom-{uuid.uuid4().hex[:8]}"
    for root, limit_file in ((Path("/sys/fs/cgroup"), "memory.max"),
                             (CGROUP_V1, "memory.limit_in_bytes")):
        if not (root / limit_file).exists() and not (root / "cgroup.controllers").exists():
            continue
        try:
            group = root / name
            group.mkdir()
            (group / limit_file).write_text(str(64 * MiB))
            if limit_file == "memory.limit_in_bytes":
                swap = group / "memory.memsw.limit_in_bytes"
                if swap.exists():
                    swap.write_text(str(64 * MiB))
            else:
                (group / "memory.swap.max").write_text("0")
            return group
        except OSError:
            try:
                group.rmdir()
            except OSError:
                pass
    return None


#: A pool parent that lives in a memory cgroup of 64 MiB (a container with a limit): one
#: worker allocates past it and the kernel OOM-kills it; the executor then stops the other.
OOM_POOL = textwrap.dedent("""
    import multiprocessing as mp, os, sys, time
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    import memtrack
    from memtrack.pool import forensics
    def work(i):
        if i == 0:
            with memtrack.phase("hog"):
                hog = []
                while True:
                    hog.append(bytearray(8 << 20))
                    for j in range(0, len(hog[-1]), 4096):
                        hog[-1][j] = 1
        time.sleep(10)
    with open(os.path.join(sys.argv[1], "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    with memtrack.WorkerTable(capacity=8, heartbeat=0.05) as table:
        ex = ProcessPoolExecutor(2, mp_context=mp.get_context("fork"),
                                 initializer=memtrack.init_worker, initargs=(table.name,))
        futures = [ex.submit(work, i) for i in range(2)]
        processes = dict(ex._processes)
        try:
            for f in futures:
                f.result(timeout=60)
        except BrokenProcessPool:
            pass
        ex.shutdown(wait=True)
        for pid, process in processes.items():  # how each ended, as the pool saw it
            table.record_exit(pid, process.exitcode)
        found = forensics.deaths(table)
        print("culprit-oom" if found and found[0].culprit and found[0].oom else "no-oom")
        print(memtrack.explain_broken_pool(table))
""")


def test_a_kernel_oom_kill_is_reported_as_one(tmp_path):
    group = _small_cgroup()
    if group is None:
        pytest.skip("no memory cgroup can be made here (needs root and a memory controller)")
    script = tmp_path / "oom.py"
    script.write_text(OOM_POOL)
    try:
        proc = subprocess.run([sys.executable, str(script), str(group)], capture_output=True,
                              text=True, timeout=120)
    finally:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                import time

                time.sleep(0.1)
    assert proc.returncode == 0, proc.stderr
    verdict, first, *rest = proc.stdout.splitlines()
    assert verdict == "culprit-oom", proc.stdout
    assert first.startswith("first to die: worker ") and "in phase hog" in first
    assert "kernel OOM killer" in first
    assert rest and all("stopped by the pool afterwards" in line for line in rest), proc.stdout


# --------------------------------------------------------------------------- task events


_kept: list[bytearray] = []


def _keep_4_mib(i: int) -> int:
    """A short task that keeps 4 MiB for good: a leak of 4 MiB per task."""
    import time

    with memtrack.phase("task"):
        block = bytearray(4 * MiB)
        for j in range(0, len(block), 4096):
            block[j] = 1
        _kept.append(block)
        time.sleep(0.005)
    return i


def _tiny(i: int) -> int:
    with memtrack.phase("tiny"):
        pass
    return i


def _recorded_pool(tmp_path: Path, method: str, task, n: int, interval: float = 0.05):
    path = tmp_path / "pool.mtp"
    with memtrack.WorkerTable(capacity=8) as table:
        with memtrack.record(path, interval=interval, table=table):
            with ProcessPoolExecutor(2, mp_context=mp.get_context(method),
                                     initializer=memtrack.init_worker,
                                     initargs=(table.name,)) as ex:
                assert sorted(ex.map(task, range(n))) == list(range(n))
    return memtrack.load(path)


@pytest.mark.parametrize("method", METHODS)
def test_every_task_reaches_the_profile_and_a_40_task_leak_is_found(tmp_path, method):
    profile = _recorded_pool(tmp_path, method, _keep_4_mib, 40)
    tasks = [e for e in profile.events if e["kind"] == "task"]
    dropped = sum(e["count"] for e in profile.events if e["kind"] == "dropped")
    assert len(tasks) + dropped == 40 and dropped == 0
    assert {e["phase"] for e in tasks} == {"task"}
    # Each worker's task numbers run 1, 2, 3, ... without a gap.
    for pid in {e["pid"] for e in tasks}:
        numbers = [e["tasks"] for e in tasks if e["pid"] == pid]
        assert numbers == list(range(1, len(numbers) + 1))
    leak = [i for i in insights(profile) if i.kind == "leak"]
    assert leak, [i.title for i in insights(profile)]
    assert leak[0].title.startswith("Leak in 'task'")
    for w in leak[0].evidence["workers"]:
        assert w["slope_per_task"] == pytest.approx(4 * MiB, rel=0.1)


def test_a_ring_that_overflowed_says_how_many_task_events_were_dropped(tmp_path):
    # 300 empty tasks between two rounds half a second apart: more than a ring holds.
    profile = _recorded_pool(tmp_path, "fork", _tiny, 300, interval=0.5)
    tasks = [e for e in profile.events if e["kind"] == "task"]
    dropped = sum(e["count"] for e in profile.events if e["kind"] == "dropped")
    assert dropped > 0 and len(tasks) + dropped == 300
    run = digest(profile)
    assert run.events_dropped == dropped
    from memtrack.report import render

    assert f"{dropped} task event(s) dropped" in render(profile, "text")


def test_reports_put_the_first_worker_to_die_first_with_a_deaths_card():
    import synthetic_profiles as sp

    from memtrack.report import render

    records = [sp.header("recording")]
    for slot, pid in enumerate((301, 302, 303)):
        records.append({"t": "event", "time": sp.T0, "kind": "join", "pid": pid, "slot": slot,
                        "rss": 30 * MiB, "role": "worker"})
    for pid, t, sig, oom in ((303, 2.05, 15, False), (302, 2.0, 9, True), (301, 2.05, 15, False)):
        records.append({"t": "event", "time": sp.T0 + t, "kind": "death", "pid": pid,
                        "phase": "parse", "rss": 900 * MiB if pid == 302 else 40 * MiB,
                        "peak_rss": 950 * MiB if pid == 302 else 40 * MiB, "exit_signal": sig,
                        "state": "killed", "oom": oom, "role": "worker"})
    profile = sp.load(records)
    text = render(profile, "text")
    deaths = text[text.index("Deaths (the first to die first)"):].splitlines()[1:4]
    assert deaths[0].strip().startswith("first to die: worker 302 died in phase parse")
    assert "OOM killer" in deaths[0]
    assert all("stopped by the pool afterwards" in line for line in deaths[1:])
    page = render(profile, "html")
    cards = page[page.index('class="card"'):]
    assert cards.index("Deaths") < cards.index("Workers")
    assert "first: worker 302 in parse, killed by the kernel OOM killer" in page
    table = page[page.index(">USS</th>"):]  # the worker table: the dead first, 302 on top
    assert table.index(">302<") < table.index(">303<") < table.index(">301<") or \
        table.index(">302<") < table.index(">301<") < table.index(">303<")
    assert "(OOM kill, first to die)" in table and "(stopped by the pool)" in table
