"""Readings: snapshot(), footprint(), rss(), peak_rss(), capabilities() against the kernel."""

import os
import resource

import psutil
import pytest
from conftest import MB, run_python, touch

import memtrack


def test_rss_matches_the_kernel_and_psutil():
    # given a process with 64 MiB more resident memory
    base = memtrack.rss()
    buf = touch(64 * MB)
    # when reading rss
    ours, theirs = memtrack.rss(), psutil.Process().memory_info().rss
    # then it follows the allocation and agrees with psutil
    assert ours - base >= 63 * MB
    assert abs(ours - theirs) < 2 * MB
    del buf


def test_snapshot_fields_are_consistent():
    s = memtrack.snapshot()
    assert isinstance(s, memtrack.Sample)
    assert s.rss > 0 and s.vms >= s.rss and s.peak_rss >= s.rss
    assert abs(s.rss - (s.rss_anon + s.rss_file + s.rss_shmem)) < 1 * MB
    if "heap" in memtrack.capabilities()["lacks"]:  # another malloc (jemalloc, ASan)
        assert s.heap_used == 0
    else:
        assert s.heap_used > 0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    assert 0 < s.minor_faults <= ru.ru_minflt
    assert s.time == pytest.approx(__import__("time").monotonic(), abs=5)


def test_footprint_matches_psutil_full_info():
    f = memtrack.footprint()
    info = psutil.Process().memory_full_info()
    assert isinstance(f, memtrack.Footprint)
    assert abs(f.uss - info.uss) < 2 * MB
    assert abs(f.pss - info.pss) < 2 * MB
    assert f.pss >= f.uss


def test_peak_rss_reset_forgets_an_old_spike():
    # given a spike that has been freed
    buf = touch(128 * MB)
    del buf
    assert memtrack.peak_rss() - memtrack.rss() > 100 * MB
    # when the peak is reset
    memtrack.reset_peak()
    # then the peak starts again from the current rss
    assert memtrack.peak_rss() - memtrack.rss() < 4 * MB


def test_peak_is_not_the_parents_in_a_spawned_child():
    # getrusage's ru_maxrss keeps the peak of the image a process exec'd from: a worker
    # spawned by a 256 MiB parent reports 256 MiB forever, and clear_refs cannot reset it.
    # memtrack must see through that floor, as spawn-started pool workers are exactly this.
    big = touch(256 * MB)
    out = run_python(
        """
        import resource, memtrack
        from conftest import MB, run_python, touch
        memtrack.reset_peak()
        stale = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        with memtrack.phase("small") as p:
            b = touch(8 * MB)
        print(stale - memtrack.rss(), memtrack.peak_rss() - memtrack.rss(), p.stats.peak_delta)
        """,
        env={"PYTHONPATH": __import__("os").path.dirname(__file__)},
    )
    del big
    stale_gap, peak_gap, phase_peak = map(int, out.stdout.split())
    assert stale_gap > 200 * MB  # the kernel floor is there...
    assert peak_gap < 4 * MB  # ...and memtrack does not report it
    assert 7 * MB <= phase_peak < 12 * MB


def test_phases_under_the_floor_stay_exact_from_the_status_file_alone():
    # given a spawned child of a large parent: every reading is under the floor, where the
    # mark and rss both come from one read of /proc/self/status
    big = touch(256 * MB)
    out = run_python(
        """
        import memtrack
        from conftest import MB, touch
        with memtrack.phase("spike") as p:
            b = touch(24 * MB)
            del b
            p.next("calm")
            keep = touch(4 * MB)
        calm = p.stats
        print(calm.peak_delta, calm.rss_delta, memtrack.rss() - calm.rss_end,
              memtrack.records()[0].peak_delta)
        """,
        env={"PYTHONPATH": __import__("os").path.dirname(__file__)},
    )
    del big
    calm_peak, calm_delta, rss_gap, spike_peak = map(int, out.stdout.split())
    # then the spike is its own, the calm phase's peak is its 4 MB, and rss is the real one
    assert 23 * MB <= spike_peak < 28 * MB
    assert 3 * MB <= calm_peak < 6 * MB and 3 * MB <= calm_delta < 6 * MB
    assert abs(rss_gap) < 2 * MB


def test_peak_rss_is_never_below_rss_while_memory_grows():
    chunks = []
    for _ in range(300):
        chunks.append(bytearray(256 * 1024))
        assert memtrack.peak_rss() >= memtrack.rss() - 64 * 1024  # statm read after the peak
        assert memtrack.snapshot().peak_rss >= memtrack.snapshot().rss - 64 * 1024


def test_peak_rss_is_not_reset_by_phases():
    # given a spike after reset_peak(), then phases (each resets the kernel mark)
    memtrack.reset_peak()
    buf = touch(96 * MB)
    del buf
    for _ in range(3):
        with memtrack.phase("in-between"):
            pass
    # then peak_rss() still reports the spike: phases fold the mark before resetting
    assert memtrack.peak_rss() - memtrack.rss() > 90 * MB
    assert memtrack.snapshot().peak_rss == memtrack.peak_rss()


def test_capabilities_report_the_kernel_method_here():
    caps = memtrack.capabilities()
    assert caps["platform"] == "linux"
    assert caps["platform_tested"] is True  # False on Windows and macOS (docs/platforms.md)
    assert caps["peak_method"] == "kernel"
    assert caps["peak_fallback_reason"] is None
    assert set(caps["lacks"]) <= {"heap"}  # "heap" only under another malloc (ASan run)


def test_forked_child_reports_its_own_memory():
    # given a parent whose peak is high, and a child forked before it grows by 256 MiB
    spike = touch(200 * MB)
    del spike
    r, w = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: wait until the parent has grown, then report
        os.close(w)
        os.read(r, 1)
        statm_rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGESIZE")
        os.write(w2, f"{memtrack.rss()} {statm_rss} {memtrack.peak_rss()}".encode())
        os._exit(0)
    os.close(r)
    big = touch(256 * MB)
    os.write(w, b"x")
    ours, statm_rss, peak = map(int, os.read(r2, 100).split())
    os.waitpid(pid, 0)
    # then the child's readings are its own, not the parent's
    parent = memtrack.rss()
    assert abs(ours - statm_rss) < 2 * MB
    assert parent - ours > 200 * MB
    assert peak < parent - 200 * MB
    del big
