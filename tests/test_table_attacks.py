"""The worker table against a hostile or broken writer: each attack as a real process.

Another process maps the segment and writes it (raised capacity, a counter stuck odd under
a live pid, fields no worker could write, bytes that are not UTF-8, a foreign takeover),
the file is truncated or grown under the reader, a table is planted by another user. The
reader must never crash, never stall past its budget, never show an impossible number.
"""

import json
import math
import os
import random
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import memtrack
from memtrack import _core
from memtrack.pool.table import cleanup_stale, live_tables

HEADER = 256
SLOT = 8192
# Offsets inside a slot (docs/internals.md, csrc/table/layout.h).
SEQ, OWNER, PID, START, STATE, FLAGS = 0, 8, 16, 24, 32, 36
RSS, PEAK, USS, PSS, HEAP, TASKS, UPDATED, JOINED = 40, 48, 56, 64, 72, 80, 88, 96
DEPTH, EXIT_CODE, EXIT_SIGNAL, NPHASES = 104, 108, 112, 116
PHASE_LEN, PHASE = 156, 256
FLAG_EXIT_SIGNAL = 4

POKE = textwrap.dedent("""
    import json, mmap, os, sys
    path, writes = sys.argv[1], json.loads(sys.argv[2])
    fd = os.open(path, os.O_RDWR)
    m = mmap.mmap(fd, 0)
    for offset, data in writes:
        m[offset:offset + len(bytes.fromhex(data))] = bytes.fromhex(data)
    m.close()
    os.close(fd)
""")


def shm_path(table):
    return "/dev/shm" + table.name


def poke(table, writes):
    """Another process writes `writes` [(offset, bytes)] through its own mapping."""
    subprocess.run([sys.executable, "-c", POKE, shm_path(table),
                    json.dumps([(o, d.hex()) for o, d in writes])], check=True)


def bump(table, w):
    """The slot's counter two writes on (even): what a finished write leaves."""
    with open(shm_path(table), "rb") as f:
        f.seek(slot_at(w.slot, SEQ))
        (seq,) = struct.unpack("<Q", f.read(8))
    return struct.pack("<Q", seq + 2)


def slot_at(i, field):
    return HEADER + i * SLOT + field


def start_time(pid):
    state, start = _core.proc_identity(pid)
    assert state == "alive"
    return start


READY = "print(1, flush=True)\n"
IDLE = "with memtrack.phase('boot'): pass\n" + READY + "time.sleep(60)\n"


def joined_worker(table, code=IDLE):
    """A live process joined to the table (no heartbeat: its slot changes only when its
    phases do). `code` prints 1 when the test may look at it."""
    p = subprocess.Popen(
        [sys.executable, "-c", "import memtrack, sys, time; memtrack.set_heartbeat(0)\n" + code],
        env={**os.environ, **table.environ()}, stdout=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"1"
    deadline = time.monotonic() + 10
    while not any(w.pid == p.pid for w in table.workers()):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return p


def stop(p):
    p.kill()
    p.wait()


def test_raised_capacity_makes_the_table_damaged_not_a_crash():
    with memtrack.WorkerTable(capacity=2) as table:
        p = joined_worker(table)
        try:
            assert table.damage is None and len(table.workers()) == 1
            poke(table, [(16, struct.pack("<I", 4096))])  # header.capacity
            with pytest.raises(memtrack.TableError, match="header was rewritten"):
                table.workers()
            with pytest.raises(memtrack.TableError, match="damaged"):
                table.totals()
            assert "header was rewritten" in table.damage
            assert table.capacity == 2  # copied at attach, never re-read
            with pytest.raises(memtrack.TableError, match="size does not match"):
                memtrack.WorkerTable.attach(table.name)
        finally:
            stop(p)


@pytest.mark.parametrize("change", [-SLOT, -4096, +SLOT, +1])
def test_a_segment_resized_under_the_reader_is_damaged_never_sigbus(change):
    with memtrack.WorkerTable(capacity=4) as table:
        p = joined_worker(table)
        try:
            size = os.stat(shm_path(table)).st_size
            subprocess.run([sys.executable, "-c",
                            f"import os; os.truncate({shm_path(table)!r}, {size + change})"],
                           check=True)
            with pytest.raises(memtrack.TableError, match="size changed"):
                table.workers()
            with pytest.raises(memtrack.TableError, match="size changed"):
                table.totals()
            with pytest.raises(memtrack.TableError):
                table.forget_dead()
            assert "size changed" in table.damage
        finally:
            stop(p)


FLIPPER = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
size = int(sys.argv[2])
while True:
    os.ftruncate(fd, 256)
    os.ftruncate(fd, size)
"""

RACE = """
import collections, os, subprocess, sys, time, memtrack
t = memtrack.WorkerTable(capacity=64)
path = "/dev/shm" + t.name
flipper = subprocess.Popen([sys.executable, "-c", sys.argv[1], path,
                            str(os.stat(path).st_size)])
seen = collections.Counter()
deadline = time.monotonic() + 60
while time.monotonic() < deadline and not seen["sigbus"]:
    try:
        r = memtrack.WorkerTable.attach(t.name)
    except memtrack.TableError:
        seen["attach refused"] += 1
        continue
    try:
        for _ in range(3):
            r.workers()
        seen["read"] += 1
    except memtrack.TableError as e:
        seen["sigbus" if "SIGBUS caught" in str(e) else "size check"] += 1
    r.close()
flipper.kill()
flipper.wait()
print(dict(seen))
"""


def test_a_truncation_racing_the_size_check_is_caught_not_fatal():
    # Another process shrinks and regrows the file as fast as it can, so that some
    # truncations land between a pass's size check and its loads: the SIGBUS guard must
    # turn those into a damaged table. The reader runs in a child: without the guard it
    # would die of SIGBUS (and not take pytest with it).
    out = subprocess.run([sys.executable, "-c", RACE, FLIPPER], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seen = eval(out.stdout.strip().splitlines()[-1])
    assert seen.get("sigbus", 0) >= 1, seen


def test_the_recorder_survives_a_truncated_table(tmp_path):
    with memtrack.WorkerTable(capacity=2) as table:
        p = joined_worker(table)
        try:
            with memtrack.record(tmp_path / "run.mtp", interval=0.005, table=table) as rec:
                time.sleep(0.05)
                os.truncate(shm_path(table), HEADER)
                time.sleep(0.05)
            assert rec.status["samples"] > 2
        finally:
            stop(p)
    profile = memtrack.load(tmp_path / "run.mtp")
    assert profile is not None


def stuck(table, slots, pid):
    """Every slot in `slots` claimed by live `pid` with its counter left odd."""
    writes = []
    for i in slots:
        writes += [(slot_at(i, OWNER), struct.pack("<q", pid)),
                   (slot_at(i, PID), struct.pack("<qQ", pid, start_time(pid))),
                   (slot_at(i, STATE), struct.pack("<I", 1)),
                   (slot_at(i, UPDATED), struct.pack("<dd", time.monotonic(), time.monotonic())),
                   (slot_at(i, SEQ), struct.pack("<Q", 7))]
    poke(table, writes)


def test_counters_stuck_odd_under_a_live_pid_cost_one_budget_not_one_per_slot():
    with memtrack.WorkerTable(capacity=64) as table:
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            stuck(table, range(64), sleeper.pid)
            ticks = []
            running = threading.Event()

            def count():
                running.set()
                while running.is_set():
                    ticks.append(1)
                    time.sleep(0)

            t = threading.Thread(target=count)
            t.start()
            running.wait()
            try:
                began = time.monotonic()
                ws = table.workers()
                took = time.monotonic() - began
                ticks_during = len(ticks)
                table.totals()
            finally:
                running.clear()
                t.join()
            assert [w.state for w in ws] == ["busy"] * 64
            assert all("mid-write" in w.error and w.pid == sleeper.pid and w.rss is None
                       for w in ws)
            # The old reader waited 50 ms per slot (3.2 s here) with the GIL held; the
            # budget is for the whole read, and the other thread ran meanwhile.
            assert took < 1.0
            assert ticks_during > 0
            assert memtrack.explain_broken_pool(table) == "no worker of this table died"
            # A worker joining a full table of stuck slots does not stall on them and
            # does not take them over: their owner is alive.
            began = time.monotonic()
            out = subprocess.run(
                [sys.executable, "-W", "ignore", "-c",
                 f"import memtrack; print(memtrack.init_worker({table.name!r}))"],
                capture_output=True, text=True, check=True)
            assert out.stdout.strip() == "-1"
            assert time.monotonic() - began < 10
            assert table.record_exit(sleeper.pid, -9) is False
            assert table.forget_dead() == 0
        finally:
            stop(sleeper)
        # Its owner is dead now: the slots are the last state of a dead writer.
        ws = table.workers(check=True)
        assert {w.state for w in ws} == {"killed"}
        assert all("writer died" in w.error for w in ws)
        assert table.forget_dead() == 64


def test_a_child_forked_while_another_thread_reads_can_still_read_and_close():
    # A read that waits (a slot stuck mid-write: 2 ms without the GIL) holds the table's
    # lock; a fork at that moment copies the lock held, by a thread the child lacks.
    with memtrack.WorkerTable(capacity=2) as table:
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            stuck(table, [0], sleeper.pid)
            reading = threading.Event()
            done = threading.Event()

            def reader():
                while not done.is_set():
                    table.workers()
                    reading.set()

            t = threading.Thread(target=reader)
            t.start()
            reading.wait()
            pids = []
            try:
                for _ in range(10):
                    pid = os.fork()
                    if pid == 0:
                        code = 1
                        try:
                            code = 0 if table.workers()[0].state == "busy" else 2
                            table.close()
                        finally:
                            os._exit(code)
                    pids.append(pid)
            finally:
                done.set()
                t.join()
            deadline = time.monotonic() + 30
            for pid in pids:
                while True:
                    got, status = os.waitpid(pid, os.WNOHANG)
                    if got:
                        assert os.waitstatus_to_exitcode(status) == 0
                        break
                    if time.monotonic() > deadline:
                        for p in pids:
                            os.kill(p, 9)
                        pytest.fail("a forked child hung on the lock it inherited")
                    time.sleep(0.01)
        finally:
            stop(sleeper)


GARBAGE = [
    (PEAK, struct.pack("<Q", 2**64 - 1), "field peak_rss"),
    (RSS, struct.pack("<Q", 2**63), "field rss"),
    (TASKS, struct.pack("<Q", 2**63), "field tasks"),
    (UPDATED, struct.pack("<d", math.nan), "field updated"),
    (JOINED, struct.pack("<d", 1e300), "field joined"),
    (DEPTH, struct.pack("<I", 4_000_000_000), "field depth"),
    (STATE, struct.pack("<I", 99), "field state"),
    (NPHASES, struct.pack("<I", 1000), "field nphases"),
    (PHASE, b"x" * 256, "field phase"),
    (FLAGS, struct.pack("<I", FLAG_EXIT_SIGNAL), None),  # with EXIT_SIGNAL below
]
SIGNALS = [(-1, "field exit_signal"), (65, "field exit_signal"), (0, "field exit_signal")]


CASES = [(o, d, f) for o, d, f in GARBAGE if f] + [
    ((FLAGS, struct.pack("<I", FLAG_EXIT_SIGNAL)), (EXIT_SIGNAL, struct.pack("<i", sig)), field)
    for sig, field in SIGNALS]


@pytest.mark.parametrize("offset,data,field", CASES, ids=[f"{c[2]}-{i}"
                                                          for i, c in enumerate(CASES)])
def test_impossible_fields_are_corrupt_with_the_field_named(offset, data, field):
    # "killed by signal -1", 16 EiB peaks, 2^63 tasks, NaN times, depth 4e9: never shown.
    with memtrack.WorkerTable(capacity=2) as table:
        p = joined_worker(table, "with memtrack.phase('a'): pass\n" + READY + "time.sleep(60)")
        try:
            (w,) = table.workers()
            assert w.state == "idle" and w.phases["a"].count == 1
            # A write as a worker would do it: the counter moves, so readers copy again.
            writes = [offset, data] if isinstance(offset, tuple) else [(offset, data)]
            poke(table, [(slot_at(w.slot, o), d) for o, d in writes]
                 + [(slot_at(w.slot, SEQ), bump(table, w))])
            (w,) = table.workers()
            assert w.state == "corrupt" and field in w.error
            assert w.pid == p.pid and w.rss is None and w.tasks is None and w.phases == {}
            t = table.totals()
            assert (t.live, t.rss, t.peak_rss) == (0, 0, 0)  # never summed
        finally:
            stop(p)


def test_sums_never_wrap():
    # Each slot at the bound of the machine's memory: the sum of 64 of them still fits.
    with memtrack.WorkerTable(capacity=8) as table:
        ps = [joined_worker(table) for _ in range(3)]
        try:
            t = table.totals()
            assert t.live == 3 and 0 < t.rss == sum(w.rss for w in table.workers())
            assert t.memory >= t.pss and t.fresh_memory > 0
        finally:
            for p in ps:
                stop(p)


def test_non_utf8_phase_bytes_never_reach_a_profile_load_rejects(tmp_path):
    with memtrack.WorkerTable(capacity=2) as table:
        p = joined_worker(table, "with memtrack.phase('parse'):\n"
                                 "    " + READY + "    time.sleep(60)")
        try:
            deadline = time.monotonic() + 10
            while table.workers()[0].phase != "parse":
                assert time.monotonic() < deadline
                time.sleep(0.01)
            (w,) = table.workers()
            bad = b"pa\xffrse/\xed\xa0\x80x/\xc3"
            poke(table, [(slot_at(w.slot, PHASE_LEN), struct.pack("<I", len(bad))),
                         (slot_at(w.slot, PHASE), bad + b"\0"),
                         (slot_at(w.slot, SEQ), bump(table, w))])
            (w,) = table.workers()
            assert w.state == "running" and "\ufffd" in w.phase
            with memtrack.record(tmp_path / "run.mtp", interval=0.005, table=table):
                time.sleep(0.1)
        finally:
            stop(p)
    profile = memtrack.load(tmp_path / "run.mtp")  # raised ProfileError before
    assert profile is not None
    raw = (tmp_path / "run.mtp").read_bytes()
    assert b"pa\xffrse" not in raw and "pa\ufffdrse".encode() in raw


def test_a_slot_whose_owner_lives_is_never_taken_over():
    with memtrack.WorkerTable(capacity=1) as table:
        p = joined_worker(table)
        try:
            (w,) = table.workers()
            poke(table, [(slot_at(w.slot, SEQ), struct.pack("<Q", 9))])  # stuck odd
            assert table.workers()[0].state == "busy"
            # Neither the pool (record_exit) nor a claimant may write it: its owner lives.
            assert table.record_exit(p.pid, -9) is False
            out = subprocess.run(
                [sys.executable, "-W", "ignore", "-c",
                 f"import memtrack; print(memtrack.init_worker({table.name!r}))"],
                capture_output=True, text=True, check=True)
            assert out.stdout.strip() == "-1"
            assert table.workers()[0].state == "busy"
        finally:
            stop(p)
        # Dead now: a claimant may take the slot over.
        out = subprocess.run(
            [sys.executable, "-c",
             f"import memtrack; print(memtrack.init_worker({table.name!r}))"],
            capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "0"


def plant_foreign_copy(table, name):
    """A valid table file under our prefix, owned by `nobody`."""
    path = "/dev/shm" + name
    with open(shm_path(table), "rb") as f:
        data = f.read()
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.write(fd, data)
    os.close(fd)
    os.chown(path, 65534, 65534)
    return path


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to chown a file to nobody")
def test_a_table_planted_by_another_user_is_never_read_nor_removed():
    name = f"/memtrack-{os.getuid()}-planted{os.getpid()}"
    with memtrack.WorkerTable(capacity=2) as table:
        path = plant_foreign_copy(table, name)
        try:
            assert table.name in live_tables()
            assert name not in live_tables()
            with pytest.raises(memtrack.TableError, match="belongs to uid 65534"):
                memtrack.WorkerTable.attach(name)
            with pytest.warns(RuntimeWarning, match="belongs to uid 65534"):
                assert memtrack.init_worker(name) == -1
            out = subprocess.run([sys.executable, "-m", "memtrack", "top", "--once"],
                                 capture_output=True, text=True)
            assert name not in out.stdout + out.stderr
            cleanup_stale()
            assert os.path.exists(path)  # not ours to remove
        finally:
            os.unlink(path)


def test_a_damaged_table_of_a_dead_creator_is_cleaned_a_live_ones_kept():
    code = textwrap.dedent("""
        import os, sys, memtrack
        t = memtrack.WorkerTable(capacity=2)
        os.truncate("/dev/shm" + t.name, 256 + 2 * 8192 + 4096)
        print(t.name, flush=True)
        os._exit(0)
    """)
    with memtrack.WorkerTable(capacity=2) as live:
        os.truncate(shm_path(live), HEADER + 2 * SLOT + 4096)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True)
        dead_name = out.stdout.strip()
        assert os.path.exists("/dev/shm" + dead_name)
        removed = cleanup_stale()
        assert dead_name in removed and not os.path.exists("/dev/shm" + dead_name)
        assert live.name not in removed and os.path.exists(shm_path(live))
        assert live.name not in live_tables()  # damaged: not offered to top


def test_long_phase_paths_are_never_merged_in_a_slot_summary():
    long_a = "x" * 120 + "-alpha"
    long_b = "x" * 120 + "-beta"
    with memtrack.WorkerTable(capacity=2) as table:
        p = joined_worker(table, f"with memtrack.phase({long_a!r}): pass\n"
                                 f"with memtrack.phase({long_b!r}): pass\n"
                                 f"with memtrack.phase({long_b!r}): pass\n"
                                 "with memtrack.phase('short'): pass\n" + READY +
                                 "time.sleep(60)")
        try:
            deadline = time.monotonic() + 10
            while table.workers()[0].tasks < 4:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            (w,) = table.workers()
            counts = sorted((s.count, k.startswith("x" * 100) and "\u2026#" in k)
                            for k, s in w.phases.items() if k != "short")
            assert counts == [(1, True), (2, True)]
            assert w.phases["short"].count == 1 and w.phase_overflow == 0
        finally:
            stop(p)


def test_views_are_reused_while_a_slot_is_unchanged_and_carry_the_task_ring():
    with memtrack.WorkerTable(capacity=4) as table:
        p = joined_worker(table, "for i in range(20):\n"
                                 "    with memtrack.phase('task'): pass\n" + READY +
                                 "time.sleep(60)")
        try:
            a, b = table.workers(), table.workers()
            assert a[0] is b[0]  # unchanged: the same view
            w = a[0]
            assert w.role == "worker" and w.tasks == 20 and w.phases["task"].count == 20
            ends = w.recent_ends
            assert len(ends) == 16 and [e[3] for e in ends] == ["task"] * 16
            assert [e[0] for e in ends] == sorted(e[0] for e in ends)
            assert all(e[1] > 0 and e[2] >= e[1] for e in ends)
        finally:
            stop(p)
        (c,) = table.workers()
        assert c is not w and c.state == "killed"  # its death changed what it shows


def test_a_process_says_its_role_in_its_slot():
    with memtrack.WorkerTable(capacity=2) as table:
        p = joined_worker(table, "from memtrack.pool.table import set_role\n"
                                 "assert set_role('helper')\n" + READY + "time.sleep(60)")
        try:
            (w,) = table.workers()
            assert w.role == "helper"
            poke(table, [(slot_at(w.slot, 152), b"\x09"), (slot_at(w.slot, SEQ), bump(table, w))])
            (w,) = table.workers()
            assert w.state == "corrupt" and "field role" in w.error
        finally:
            stop(p)
    from memtrack.pool.table import set_role

    assert set_role("tool") is False  # this process holds no slot
    with pytest.raises(ValueError, match="role must be"):
        set_role("boss")


def test_random_slot_bytes_never_crash_and_never_show_an_impossible_number():
    rng = random.Random(20261203)
    bound = 1 << 62
    with memtrack.WorkerTable(capacity=4) as table:
        p = joined_worker(table)
        try:
            import mmap

            fd = os.open(shm_path(table), os.O_RDWR)
            m = mmap.mmap(fd, 0)
            states = set()
            try:
                for i in range(3000):
                    slot = rng.randrange(4)
                    base = HEADER + slot * SLOT
                    if i % 4 == 0:
                        m[base + 8:base + 1024 + 160 * 4] = rng.randbytes(1016 + 640)
                    else:
                        for _ in range(8):
                            m[base + rng.randrange(SLOT)] = rng.getrandbits(8)
                    if i % 5 == 0:  # a plausible claim, so the reader reads it
                        m[base + 8:base + 16] = struct.pack("<q", p.pid)
                        m[base:base + 8] = struct.pack("<Q", 2 * rng.randrange(1 << 20))
                    for w in table.workers():
                        states.add(w.state)
                        if w.state in ("corrupt", "busy"):
                            assert w.error and w.rss is None
                            continue
                        assert w.state in ("idle", "running", "exited", "killed")
                        for v in (w.rss, w.peak_rss, w.uss, w.pss, w.tasks):
                            assert 0 <= v < bound
                        assert math.isfinite(w.updated) and math.isfinite(w.joined)
                        assert w.exit_signal is None or 1 <= w.exit_signal <= 64
                        assert isinstance(w.phase, str) and w.depth < 1 << 17
                        for path, s in w.phases.items():
                            assert isinstance(path, str) and s.count > 0
                            assert math.isfinite(s.total_time) and s.total_time >= 0
                    t = table.totals()
                    assert 0 <= t.rss < bound * 4 and 0 <= t.memory < bound * 4
            finally:
                m.close()
                os.close(fd)
        finally:
            stop(p)
    assert "corrupt" in states
