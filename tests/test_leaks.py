"""Every C entry point, called 100 000 times, leaves memory flat."""

import os

import pytest
from conftest import MB

import memtrack
from memtrack import _core

N = 100_000


def _flat(fn, n=N):
    for _ in range(1000):  # warm caches, interned paths, free lists
        fn()
    before = memtrack.rss()
    for _ in range(n):
        fn()
    return memtrack.rss() - before


def _phase():
    with memtrack.phase("leak-check"):
        pass


def _failing_phase():
    try:
        with memtrack.phase("leak-fail"):
            raise ValueError
    except ValueError:
        pass


def _next_phase():
    with memtrack.phase("leak-a") as p:
        p.next("leak-b")
        pytest.raises(ValueError, p.next, "")


def _phase_stats():
    # Entered and left, so .stats builds a PhaseStats (before the exit it is None).
    with memtrack.phase("s") as p:
        pass
    assert p.stats is not None
    return p.stats


def _peak_watch():
    w = _core.PeakWatch()
    w.start()
    w.stop()


PACKED = _core.pack({"t": "x", "values": list(range(20)), "s": "text"})

ENTRY_POINTS = {
    "rss": _core.rss,
    "peak_rss": _core.peak_rss,
    "reset_peak": _core.reset_peak,
    "snapshot": _core.snapshot,
    "capabilities": _core.capabilities,
    "memory_limit": _core.memory_limit,
    "phase": _phase,
    "phase with error": _failing_phase,
    "phase next": _next_phase,
    "phase stats": _phase_stats,
    "summary": _core.summary,
    "counters": _core.counters,
    "configure": _core.configure,
    "pack": lambda: _core.pack({"k": [1, 2.5, "x", b"y", None]}),
    "unpack_stream": lambda: _core.unpack_stream(PACKED),
    "unpack_stream corrupt": lambda: _core.unpack_stream(b"\x92\x01\xc1"),
    "bad phase name": lambda: pytest.raises(ValueError, memtrack.phase, ""),
    "PeakWatch": _peak_watch,
    "pack_phase_records since": lambda: _core.pack_phase_records(since=0.0),
    "list_segments": lambda: _core.list_segments("memtrack-"),
    "segment_exists": lambda: _core.segment_exists("/memtrack-no-such-table"),
}


@pytest.fixture(autouse=True)
def _small_ring():
    # The record ring is bounded but large (100 000 records fill ~8 MB as they come):
    # keep it small so that filling it is not mistaken for a leak.
    old = memtrack.configure()["max_records"]
    memtrack.configure(max_records=100)
    yield
    memtrack.configure(max_records=old)


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_entry_point_does_not_leak(name):
    assert _flat(ENTRY_POINTS[name]) < 1 * MB


def test_footprint_does_not_leak():
    assert _flat(_core.footprint, n=N // 10) < 1 * MB


def test_records_and_pack_phase_records_do_not_leak():
    for _ in range(100):
        _phase()
    assert _flat(_core.records, n=N // 10) < 1 * MB
    assert _flat(_core.pack_phase_records, n=N // 10) < 1 * MB


# --------------------------------------------------------------------------- the table


@pytest.fixture
def table_with_a_dead_worker():
    """A table this process has joined, with one worker that joined and was killed."""
    import signal
    import subprocess
    import sys

    table = memtrack.WorkerTable(capacity=8)
    child = subprocess.Popen(
        [sys.executable, "-c", "import memtrack, time; print(1, flush=True); time.sleep(60)"],
        env={**os.environ, **table.environ()}, stdout=subprocess.PIPE)
    child.stdout.readline()
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert _core.join(table.name) >= 0
    yield table, child.pid
    _core.leave()
    child.stdout.close()
    table.close()


def test_reading_a_table_does_not_leak(table_with_a_dead_worker):
    table, dead = table_with_a_dead_worker
    segment = table._segment
    assert len(segment.read(check=True)) == 2
    assert _flat(lambda: segment.read(check=True), n=N // 10) < 1 * MB
    assert _flat(segment.totals) < 1 * MB
    assert _flat(lambda: segment.record_exit(dead, -9)) < 1 * MB
    assert _flat(segment.header) < 1 * MB
    assert _flat(segment.forget_dead) < 1 * MB
    assert len(segment.read()) == 1  # the dead one was forgotten: the loop really ran


def test_a_worker_joining_leaving_and_finishing_tasks_does_not_leak(table_with_a_dead_worker):
    table, _ = table_with_a_dead_worker
    assert _flat(_core.task_done) < 1 * MB
    (me,) = [w for w in table.workers() if w.pid == os.getpid()]
    assert me.tasks >= N  # the task_done loop counted
    assert _flat(_core.worker_info) < 1 * MB

    def rejoin():
        assert _core.leave()
        assert _core.join(table.name) >= 0

    assert _flat(rejoin, n=N // 10) < 1 * MB
    assert _core.worker_info() is not None


def test_recorders_started_and_stopped_do_not_leak(tmp_path):
    fd = os.open(tmp_path / "rec.mtp", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        def cycle():
            r = _core.Recorder(fd, 0.5)
            r.start()
            r.stop()

        assert _flat(cycle, n=N // 100) < 1 * MB
    finally:
        os.close(fd)
