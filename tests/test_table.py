"""The worker table: real pools under fork, spawn and forkserver, real deaths, real /dev/shm."""

import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import pool_tasks
import pytest
from conftest import MB

import memtrack

METHODS = ["fork", "spawn", "forkserver"]
HERE = os.path.dirname(__file__)


def shm_path(table):
    return "/dev/shm" + table.name


@pytest.mark.parametrize("method", METHODS)
def test_process_pool_workers_report_phases(method):
    with memtrack.WorkerTable(capacity=8) as table:
        ctx = mp.get_context(method)
        with ProcessPoolExecutor(
            2, mp_context=ctx, initializer=memtrack.init_worker, initargs=(table.name,)
        ) as ex:
            pids = set(ex.map(pool_tasks.analyze, [24, 48, 24, 48]))
        workers = {w.pid: w for w in table.workers()}
    assert pids <= set(workers)
    assert sum(w.tasks for w in workers.values()) == 4
    for pid in pids:
        w = workers[pid]
        assert w.state == "exited", w
        assert set(w.phases) == {"index", "index/parse"}
        assert w.phases["index/parse"].max_peak_delta >= 23 * MB
        assert w.peak_rss >= w.phases["index/parse"].max_peak_rss
        assert w.phase == "" and w.depth == 0
    biggest = max(w.phases["index/parse"].max_peak_delta for w in workers.values())
    assert biggest == pytest.approx(48 * MB, rel=0.05)


@pytest.mark.parametrize("method", METHODS)
def test_multiprocessing_pool_joins_through_the_environment(method):
    # A fresh interpreter: the forkserver is started once per parent, with the
    # environment of that moment, so MEMTRACK_TABLE must be set before the first pool.
    code = textwrap.dedent(f"""
        import multiprocessing as mp, os, sys
        sys.path.insert(0, {HERE!r})
        import memtrack, pool_tasks
        with memtrack.WorkerTable(capacity=8) as table:
            os.environ["MEMTRACK_TABLE"] = table.name   # no initializer at all
            with mp.get_context({method!r}).Pool(2) as pool:
                slots = pool.map(pool_tasks.slot_of_this_worker, range(4))
                pool.map(pool_tasks.analyze, [8, 8])
            workers = table.workers()
        print(all(s is not None and s[0] == table.name for s in slots))
        print(len({{s[1] for s in slots}}) == len({{w.pid for w in workers}}))
        print(sum(w.phases["index"].count for w in workers if "index" in w.phases))
        print(memtrack.worker_slot())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # every task ran in a joined worker; the forkserver itself took no slot;
    # both analyze tasks were summarised; the parent did not join its own table
    assert out.stdout.split() == ["True", "True", "2", "None"]


def test_plain_subprocess_joins_through_the_environment():
    with memtrack.WorkerTable(capacity=4) as table:
        code = "import memtrack; print(memtrack.worker_slot()[1]); memtrack.task_done()"
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, **table.environ()},
            capture_output=True,
            text=True,
            check=True,
        )
        (w,) = table.workers()
    assert int(out.stdout) == w.slot
    assert (w.tasks, w.state) == (1, "exited")


def test_a_forked_child_of_a_worker_claims_its_own_slot():
    with memtrack.WorkerTable(capacity=4) as table:
        code = textwrap.dedent("""
            import memtrack, os
            memtrack.init_worker(os.environ["T"])
            parent_slot = memtrack.worker_slot()[1]
            pid = os.fork()
            if pid == 0:
                with memtrack.phase("child-work"):
                    pass
                os._exit(0 if memtrack.worker_slot()[1] != parent_slot else 1)
            _, status = os.waitpid(pid, 0)
            with memtrack.phase("parent-work"):
                pass
            print(pid, os.waitstatus_to_exitcode(status))
        """)
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "T": table.name},
            capture_output=True,
            text=True,
            check=True,
        )
        child_pid, code = map(int, out.stdout.split())
        by_pid = {w.pid: w for w in table.workers()}
    assert code == 0
    assert len(by_pid) == 2
    assert set(by_pid[child_pid].phases) == {"child-work"}
    (parent,) = [w for p, w in by_pid.items() if p != child_pid]
    assert set(parent.phases) == {"parent-work"}  # the child never wrote into it


def test_worker_killed_mid_phase_leaves_its_forensics():
    with memtrack.WorkerTable(capacity=4, heartbeat=0.05) as table:
        with pytest.raises(BrokenProcessPool):
            with ProcessPoolExecutor(
                1,
                mp_context=mp.get_context("spawn"),
                initializer=memtrack.init_worker,
                initargs=(table.name,),
            ) as ex:
                ex.submit(pool_tasks.die_in_parse, 64).result()
        text = memtrack.explain_broken_pool(table)
        (w,) = table.workers(check=True)
    assert w.state == "killed"
    assert w.phase == "index/parse" and w.depth == 2
    assert w.rss >= 64 * MB and w.peak_rss >= w.rss
    assert f"worker {w.pid} died in phase index/parse at" in text
    assert "killed" in text


def test_killed_child_of_ours_reports_its_signal():
    # When the reader is the dead worker's parent and it is not reaped yet, the signal
    # is read without reaping it (waitid WNOWAIT), so the owner can still wait for it.
    with memtrack.WorkerTable(capacity=4) as table:
        code = (
            "import memtrack, time; memtrack.phase('stuck').__enter__(); "
            "print(1, flush=True); time.sleep(60)"
        )
        p = subprocess.Popen(
            [sys.executable, "-c", code],
            env={**os.environ, **table.environ()},
            stdout=subprocess.PIPE,
        )
        p.stdout.readline()
        p.send_signal(signal.SIGKILL)
        os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)  # dead, and not reaped
        (w,) = table.workers()
        assert (w.state, w.exit_signal, w.phase) == ("killed", signal.SIGKILL, "stuck")
        assert "killed by SIGKILL" in memtrack.explain_broken_pool(table)
        assert p.wait() == -signal.SIGKILL  # still ours to reap


@pytest.mark.skipif(os.geteuid() != 0, reason="setting ns_last_pid needs root")
def test_pid_reuse_does_not_revive_a_dead_worker():
    with memtrack.WorkerTable(capacity=4) as table:
        code = "import memtrack, time; print(1, flush=True); time.sleep(60)"
        p = subprocess.Popen(
            [sys.executable, "-c", code],
            env={**os.environ, **table.environ()},
            stdout=subprocess.PIPE,
        )
        p.stdout.readline()
        dead_pid = p.pid
        assert [w.state for w in table.workers()] == ["idle"]
        p.kill()
        p.wait()  # reaped: the pid is free again
        # Make the kernel hand the same pid to a new, unrelated process.
        impostor = None
        for _ in range(50):
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(dead_pid - 1))
            candidate = subprocess.Popen(["sleep", "30"])
            if candidate.pid == dead_pid:
                impostor = candidate
                break
            candidate.kill()
            candidate.wait()
        if impostor is None:
            pytest.skip("could not get the kernel to reuse the pid")
        try:
            (w,) = table.workers()
            assert w.pid == dead_pid and w.state == "killed"
        finally:
            impostor.kill()
            impostor.wait()


def test_stale_segment_of_a_killed_parent_is_removed():
    code = (
        "import memtrack, time; t = memtrack.WorkerTable(2); "
        "print(t.name, flush=True); time.sleep(60)"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    name = p.stdout.readline().strip()
    assert os.path.exists("/dev/shm" + name)
    assert name not in memtrack.cleanup_stale()  # its creator is alive: kept
    p.kill()
    p.wait()
    assert os.path.exists("/dev/shm" + name)  # SIGKILL ran no cleanup
    assert name in memtrack.cleanup_stale()
    assert not os.path.exists("/dev/shm" + name)



def test_the_platform_lists_this_users_tables_only():
    # Listing tables is the platform layer's (mt_os_shm_list): ours are listed, a
    # segment with our prefix owned by another user and one with another prefix are not.
    from memtrack import _core

    prefix = f"memtrack-{os.getuid()}-"
    with memtrack.WorkerTable(2) as table:
        foreign = f"/dev/shm/{prefix}not-ours-{os.getpid()}"
        other = f"/dev/shm/memtrack-other-prefix-{os.getpid()}"
        for path in (foreign, other):
            with open(path, "wb"):
                pass
        try:
            if os.geteuid() == 0:
                os.chown(foreign, 65534, 65534)
            names = _core.list_segments(prefix)
            assert table.name in names and names == sorted(names)
            assert ("/" + os.path.basename(foreign) in names) == (os.geteuid() != 0)
            assert "/" + os.path.basename(other) not in names
            assert _core.segment_exists(table.name)
            assert table.name in memtrack.pool.table.live_tables()
        finally:
            os.unlink(foreign)
            os.unlink(other)
    assert not _core.segment_exists(table.name)
    assert table.name not in _core.list_segments(prefix)
    with pytest.raises(TypeError, match="prefix must be a str"):
        _core.list_segments(b"memtrack")

def test_creating_a_table_cleans_stale_ones_and_close_removes_it():
    code = (
        "import memtrack, os; t = memtrack.WorkerTable(2); print(t.name, flush=True); os._exit(0)"
    )
    stale = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True
    ).stdout.strip()
    assert os.path.exists("/dev/shm" + stale)
    table = memtrack.WorkerTable(2)
    assert not os.path.exists("/dev/shm" + stale)
    path = shm_path(table)
    table.close()
    table.close()
    assert not os.path.exists(path)


def test_segment_is_private_and_unguessable():
    with memtrack.WorkerTable(2) as a, memtrack.WorkerTable(2) as b:
        assert os.stat(shm_path(a)).st_mode & 0o777 == 0o600
        assert a.name != b.name and len(a.name) > 30
        h = a.header()
        assert (h["capacity"], h["slot_size"], h["version"]) == (2, 8192, 2)
        assert h["creator_pid"] == os.getpid()


def test_a_forked_child_leaving_normally_keeps_the_parents_table():
    with memtrack.WorkerTable(2) as table:
        pid = os.fork()
        if pid == 0:
            table.close()  # as its inherited exit hooks would
            os._exit(0)
        os.waitpid(pid, 0)
        assert os.path.exists(shm_path(table))
        assert memtrack.WorkerTable.attach(table.name).capacity == 2
    assert not os.path.exists(shm_path(table))


def test_interpreter_exit_removes_the_table():
    code = "import memtrack; t = memtrack.WorkerTable(2); print(t.name)"
    name = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True
    ).stdout.strip()
    assert name and not os.path.exists("/dev/shm" + name)


def test_heartbeat_shows_growth_inside_a_long_phase():
    with memtrack.WorkerTable(capacity=2, heartbeat=0.05) as table:
        with ProcessPoolExecutor(
            1,
            mp_context=mp.get_context("fork"),
            initializer=memtrack.init_worker,
            initargs=(table.name,),
        ) as ex:
            fut = ex.submit(pool_tasks.grow_slowly, 8)
            seen = []
            while not fut.done():
                ws = table.workers()
                if ws and ws[0].phase == "long":
                    seen.append(ws[0].rss)
                time.sleep(0.05)
    assert len(seen) >= 5
    assert max(seen) - min(seen) >= 80 * MB  # growth seen while the phase was still open


def test_full_table_lets_workers_run_untracked_and_reuses_dead_slots():
    with memtrack.WorkerTable(capacity=1) as table:
        env = {**os.environ, **table.environ()}
        hold = (
            "import memtrack, sys, time; print(memtrack.worker_slot(), flush=True); time.sleep(30)"
        )
        first = subprocess.Popen(
            [sys.executable, "-c", hold], env=env, stdout=subprocess.PIPE, text=True
        )
        assert first.stdout.readline().strip() != "None"
        second = subprocess.run(
            [
                sys.executable,
                "-W",
                "always",
                "-c",
                "import memtrack; print(memtrack.worker_slot())",
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert second.stdout.strip() == "None"  # ran, untracked
        assert "is full" in second.stderr and "runs untracked" in second.stderr
        first.kill()
        first.wait()
        third = subprocess.run(
            [sys.executable, "-c", "import memtrack; print(memtrack.worker_slot()[1])"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert third.stdout.strip() == "0"  # the dead worker's slot, reused
        assert [w.state for w in table.workers()] == ["exited"]
        assert table.forget_dead() == 1
        assert table.workers() == []


def test_pool_larger_than_the_table_still_completes():
    with memtrack.WorkerTable(capacity=1) as table:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with ProcessPoolExecutor(
                3,
                mp_context=mp.get_context("fork"),
                initializer=memtrack.init_worker,
                initargs=(table.name,),
            ) as ex:
                results = list(ex.map(pool_tasks.analyze, [4] * 6))
        assert len(results) == 6
        assert len(table.workers()) == 1


def test_forget_dead_frees_killed_slots():
    with memtrack.WorkerTable(capacity=2) as table:
        p = subprocess.Popen(
            [sys.executable, "-c", "import memtrack, time; print(1, flush=True); time.sleep(30)"],
            env={**os.environ, **table.environ()},
            stdout=subprocess.PIPE,
        )
        p.stdout.readline()
        p.kill()
        p.wait()
        assert [w.state for w in table.workers()] == ["killed"]
        assert table.forget_dead() == 1
        assert table.workers() == []


def test_wrong_magic_version_or_size_is_a_clear_error(tmp_path):
    name = f"/memtrack-test-{os.getpid()}"
    path = "/dev/shm" + name
    cases = [
        (b"NOTATABL" + bytes(8192 + 248), "wrong magic"),
        (b"MEMTRACK" + (9).to_bytes(4, "little") + bytes(8192 + 244), "layout version"),
        (b"MEMTRACK" + bytes(20), "smaller than a table header"),
        (b"", "empty"),
        (b"MEMTRACK" + bytes(8192 + 248), "mode is 0644, not 0600"),
    ]
    try:
        for data, words in cases:
            fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o644 if "mode" in words else 0o600)
            os.write(fd, data)
            os.close(fd)
            with pytest.raises(memtrack.TableError, match=words):
                memtrack.WorkerTable.attach(name)
            # A worker must not break its pool over it: it warns (saying why) and runs
            # untracked.
            with pytest.warns(RuntimeWarning, match=f"cannot join worker table.*{words}"):
                assert memtrack.init_worker(name) == -1
        # Joining through the environment warns and runs untracked instead of failing.
        out = subprocess.run(
            [sys.executable, "-c", "import memtrack; print(memtrack.worker_slot())"],
            env={**os.environ, "MEMTRACK_TABLE": name},
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0 and out.stdout.strip() == "None"
        assert "cannot join" in out.stderr
    finally:
        os.unlink(path)
    with pytest.raises(FileNotFoundError):
        memtrack.WorkerTable.attach("/memtrack-does-not-exist")
    with pytest.warns(RuntimeWarning, match="closed by its creator"):
        assert memtrack.init_worker("/memtrack-does-not-exist") == -1
    with pytest.raises(TypeError, match="heartbeat"):
        memtrack.init_worker("/memtrack-does-not-exist", heartbeat="fast")
    with pytest.raises(ValueError, match="bad worker table name"):
        memtrack.init_worker("/a/b")
    with pytest.raises(ValueError, match="capacity"):
        memtrack.WorkerTable(capacity=0)
    with pytest.raises(TypeError):
        memtrack.WorkerTable(capacity="8")
    with pytest.raises(ValueError, match="heartbeat"):
        memtrack.WorkerTable(capacity=2, heartbeat=True)
    with pytest.raises(TypeError, match="heartbeat"):
        memtrack.set_heartbeat("fast")
    named = f"memtrack-{os.getuid()}-named-{os.getpid()}"
    with memtrack.WorkerTable(capacity=2, name=named) as t:
        assert t.name == "/" + named and os.path.exists("/dev/shm/" + named)


def test_random_bytes_in_slots_never_crash_the_reader():
    import mmap

    rng = random.Random(7)
    with memtrack.WorkerTable(capacity=4) as table:
        subprocess.run(
            [sys.executable, "-c", "import memtrack\nwith memtrack.phase('a'): pass"],
            env={**os.environ, **table.environ()},
            check=True,
        )
        with open(shm_path(table), "r+b") as f:
            m = mmap.mmap(f.fileno(), 0)
            try:
                states = set()
                for i in range(2000):
                    start = 256 + rng.randrange(4) * 8192
                    if i % 3 == 0:  # whole slot of noise
                        m[start : start + 8192] = rng.randbytes(8192)
                    else:  # a few bytes anywhere in the slots
                        for _ in range(8):
                            m[256 + rng.randrange(4 * 8192)] = rng.getrandbits(8)
                    for w in table.workers():
                        states.add(w.state)
                        if w.state == "corrupt":
                            assert w.error
                        else:
                            assert isinstance(w.phase, str)
                            for path, s in w.phases.items():
                                assert isinstance(path, str) and s.count > 0
                    table.forget_dead()
            finally:
                m.close()
    assert "corrupt" in states


def test_reader_never_sees_a_torn_slot():
    # A writer ends phases in a tight loop; in a consistent slot, tasks equals the count
    # of the outermost phase and the phase path matches its depth.
    with memtrack.WorkerTable(capacity=2, heartbeat=0.001) as table:
        code = textwrap.dedent("""
            import memtrack, sys
            print(1, flush=True)
            while True:
                with memtrack.phase("a"):
                    with memtrack.phase("b"):
                        pass
        """)
        p = subprocess.Popen(
            [sys.executable, "-c", code],
            env={**os.environ, **table.environ()},
            stdout=subprocess.PIPE,
        )
        p.stdout.readline()
        try:
            reads = 0
            read = table._segment.read
            expected_phase = {0: "", 1: "a", 2: "a/b"}
            while reads < 1_000_000:
                for w in read():
                    if w.state == "busy":  # its writer was preempted mid-write: shown as such
                        assert w.error and w.rss is None
                        continue
                    a = w.phases.get("a")
                    assert w.error is None
                    assert w.tasks == (a.count if a else 0)
                    assert expected_phase[w.depth] == w.phase
                    reads += 1
        finally:
            p.kill()
            p.wait()
    assert reads >= 1_000_000


def test_totals_count_live_workers_and_the_largest_peak():
    with memtrack.WorkerTable(capacity=4, heartbeat=0.02) as table:
        env = {**os.environ, **table.environ()}
        code = (
            "import memtrack, time\nb = bytearray(40 << 20)\n"
            "for i in range(0, len(b), 4096): b[i] = 1\n"
            "print(1, flush=True)\ntime.sleep(30)"
        )
        procs = [
            subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE)
            for _ in range(2)
        ]
        for p in procs:
            p.stdout.readline()
        time.sleep(0.3)  # a few heartbeats: uss/pss published
        t = table.totals()
        ws = table.workers()
        for p in procs:
            p.kill()
            p.wait()
        after = table.totals()
    assert t.live == 2 and t.dead == 0
    assert t.rss == sum(w.rss for w in ws) and t.rss >= 80 * MB
    assert 0 < t.uss <= t.pss <= t.rss
    assert (after.live, after.dead) == (0, 2)
    assert after.peak_rss >= 40 * MB


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a new pid namespace")
def test_cleanup_does_not_judge_tables_of_another_pid_namespace():
    import shutil

    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    # A table created in a child pid namespace shares /dev/shm but not pids: its creator's
    # pid (small, inside the namespace) must not be looked up here.
    code = ("import memtrack, time; t = memtrack.WorkerTable(2); "
            "print(t.name, flush=True); time.sleep(30)")
    p = subprocess.Popen(["unshare", "--pid", "--fork", sys.executable, "-c", code],
                         stdout=subprocess.PIPE, text=True)
    try:
        name = p.stdout.readline().strip()
        if not name:
            pytest.skip("could not create a pid namespace here")
        assert name not in memtrack.cleanup_stale()
        assert os.path.exists("/dev/shm" + name)
    finally:
        p.kill()
        p.wait()
        if name:
            memtrack._core.unlink_segment(name)



def test_pool_memory_is_the_tables_sum_at_rest_and_sees_growth_at_once():
    # One definition of a pool's memory (memtrack/pool/memory.py) for the executor and the
    # pytest plugin, summed in C (totals().fresh_memory): growth since the last PSS
    # reading counts at once, before the next PSS reading.
    from conftest import wait_for

    from memtrack.pool.memory import PoolMemory

    code = textwrap.dedent("""
        import sys, memtrack
        memtrack.init_worker(sys.argv[1], heartbeat=0.05)
        sys.stdin.readline()                 # the parent saw a PSS reading
        memtrack.set_heartbeat(0)            # from now on only phases publish
        print("rest", flush=True)
        sys.stdin.readline()
        b = bytearray(64 << 20); b[::4096] = b"x" * len(b[::4096])
        memtrack.phase("grown").__enter__()  # publishes rss, not pss
        print("grown", flush=True)
        sys.stdin.readline()
    """)
    with memtrack.WorkerTable(capacity=4) as table:
        p = subprocess.Popen([sys.executable, "-c", code, table.name], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: [w for w in table.workers() if w.pss], what="a PSS reading")
            p.stdin.write("\n")
            p.stdin.flush()
            assert p.stdout.readline() == "rest\n"
            (rest,) = table.workers()
            pool = PoolMemory(table)
            at_rest = pool.now()
            assert table.totals().memory == rest.pss
            assert abs(at_rest - rest.pss) < 4 * MB  # rss moved little since the PSS read
            p.stdin.write("\n")
            p.stdin.flush()
            assert p.stdout.readline() == "grown\n"
            (grown,) = table.workers()
            assert grown.pss == rest.pss and grown.rss >= rest.rss + 60 * MB
            assert pool.now() - at_rest == grown.rss - rest.rss  # the growth, at once
            assert table.totals().memory == rest.pss             # PSS alone waits for a read
        finally:
            p.stdin.close()
            p.wait(timeout=60)
        assert PoolMemory(table).now() is None  # no live worker
