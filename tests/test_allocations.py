"""memtrack.allocations: exact counters per thread and phase, sampled sites, retention."""

from __future__ import annotations

import gc
import os
import threading

import pytest
from conftest import run_python

import memtrack
from memtrack import _core

KIB = 1024


@pytest.fixture(autouse=True)
def _stopped():
    memtrack.allocations.stop()
    memtrack.allocations.clear()
    yield
    memtrack.allocations.stop()
    memtrack.allocations.clear()


def make_blocks(n, size):
    blocks = []  # a loop, not a comprehension: the same innermost frame on every Python
    for _ in range(n):
        blocks.append(bytearray(size))
    return blocks


def make_small(n):
    items = []
    for i in range(n):
        items.append((i, str(i)))
    return items


def innermost_is(site, function):
    # frames name functions by their qualified name ("f.<locals>.<listcomp>")
    return bool(site.frames) and site.frames[0].function.split(".")[-1] == function


def site_bytes(sites, function):
    return sum(s.allocated for s in sites if innermost_is(s, function))


def retained_bytes(sites, function):
    return sum(s.retained for s in sites if innermost_is(s, function))


# -- exact counters -------------------------------------------------------------------------


def test_a_phase_counts_exactly_the_bytes_and_allocations_of_its_thread():
    # given tracking on and a phase that makes 2000 blocks of 10 000 bytes
    with memtrack.allocations(seed=1):
        with memtrack.phase("build") as p:
            blocks = make_blocks(2000, 10_000)
    # then the phase counted every block (a bytearray object and its buffer each) and
    # little else: the loop's int objects and a few reallocations of the list
    stats = p.stats
    assert 2000 * 10_000 <= stats.allocated <= 2000 * 10_000 + 2000 * 200 + 64 * KIB
    assert 2 * 2000 <= stats.allocations <= 3 * 2000 + 100
    # and the summary sums the tracked runs
    assert memtrack.summary()["build"].total_allocated == stats.allocated
    assert memtrack.summary()["build"].total_allocations == stats.allocations
    del blocks


def test_phases_nest_and_each_counts_its_own_span():
    with memtrack.allocations(seed=1):
        with memtrack.phase("outer") as outer:
            a = make_blocks(100, 10_000)
            with memtrack.phase("inner") as inner:
                b = make_blocks(300, 10_000)
    assert 300 * 10_000 <= inner.stats.allocated < 310 * 10_000
    assert 400 * 10_000 <= outer.stats.allocated < 410 * 10_000
    del a, b


def test_without_tracking_phases_have_no_allocation_figures():
    with memtrack.phase("untracked") as p:
        make_blocks(10, 1000)
    assert p.stats.allocated is None and p.stats.allocations is None
    assert memtrack.summary()["untracked"].total_allocated is None
    # and the tuple shape of PhaseStats and PhaseSummary is unchanged (by name only)
    assert len(p.stats) == 13 and len(memtrack.summary()["untracked"]) == 6


def test_a_phase_that_tracking_stopped_in_the_middle_of_is_not_measured():
    memtrack.allocations.start(seed=1)
    with memtrack.phase("cut") as p:
        make_blocks(10, 1000)
        memtrack.allocations.stop()
    assert p.stats.allocated is None


def test_each_thread_counts_its_own_allocations():
    # given two threads in phases of their own, one allocating 4x the other
    results = {}
    barrier = threading.Barrier(2)

    def work(name, n):
        barrier.wait()
        with memtrack.phase(name) as p:
            keep = make_blocks(n, 10_000)
        results[name] = (p.stats, memtrack.allocations.counters()["thread"])
        del keep

    with memtrack.allocations(seed=2):
        threads = [threading.Thread(target=work, args=("small", 200)),
                   threading.Thread(target=work, args=("large", 800))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    # then each phase holds only its own thread's blocks
    assert 200 * 10_000 <= results["small"][0].allocated < 205 * 10_000
    assert 800 * 10_000 <= results["large"][0].allocated < 820 * 10_000
    # and each thread's own counter covers its phase
    assert results["small"][1][0] >= results["small"][0].allocated
    # and the process total keeps the threads that have ended
    assert memtrack.allocations.counters()["allocated"] >= 1000 * 10_000


def test_counters_grow_across_stop_and_start_cycles_and_sites_survive_stop():
    totals = []
    for i in range(5):
        with memtrack.allocations(seed=i):
            keep = make_blocks(200, 10_000)
        totals.append(memtrack.allocations.counters()["allocated"])
        del keep
    assert all(b - a >= 200 * 10_000 for a, b in zip(totals, totals[1:], strict=False))
    assert not memtrack.allocations.running()
    assert memtrack.allocations.sites()  # readable after stop


# -- sampling ---------------------------------------------------------------------------------


def test_sites_in_known_phases_are_found_with_their_share_of_the_bytes():
    # given three call sites in two phases: 60% / 30% / 10% of 60 MB
    with memtrack.allocations(interval=64 * KIB, seed=12345):
        with memtrack.phase("load"):
            big = make_blocks(3600, 10_000)     # 36 MB
        with memtrack.phase("parse"):
            mid = make_blocks(1800, 10_000)     # 18 MB
            small = [bytes(600) for _ in range(10_000)]  # 6 MB
    sites = memtrack.allocations.sites()
    load = memtrack.allocations.sites(phase="load")
    parse = memtrack.allocations.sites(phase="parse")
    total = sum(s.allocated for s in sites)
    # then the estimates agree with the truth within generous bounds: at one sample per
    # 64 KiB a site of 6 MB has ~90 samples, a standard error of ~10%; the bounds are 4
    # of them (the fixed seed makes the run the same every time: no flakes)
    assert site_bytes(load, "make_blocks") == pytest.approx(36e6, rel=0.2)
    assert site_bytes(parse, "make_blocks") == pytest.approx(18e6, rel=0.25)
    assert site_bytes(parse, "<listcomp>") + site_bytes(
        parse, "test_sites_in_known_phases_are_found_with_their_share_of_the_bytes"
    ) == pytest.approx(6e6, rel=0.4)
    assert total == pytest.approx(60e6, rel=0.15)
    assert {s.phase for s in sites} >= {"load", "parse"}
    # and every site names the line that allocates
    top = load[0]
    assert top.frames[0].function == "make_blocks"
    assert top.frames[0].filename == __file__
    assert top.frames[1].function.startswith("test_sites_in_known_phases")
    del big, mid, small


def test_retained_by_site_counts_only_what_is_still_live():
    # given two sites: one whose blocks are kept, one whose blocks are dropped
    with memtrack.allocations(interval=64 * KIB, seed=7):
        kept = make_blocks(2000, 10_000)
        for _ in range(20):
            make_small(5000)  # ~20 x 5000 small tuples and strings, all freed
    sites = memtrack.allocations.sites()
    assert retained_bytes(sites, "make_blocks") == pytest.approx(20e6, rel=0.2)
    assert retained_bytes(sites, "make_small") < 0.05 * site_bytes(sites, "make_small")
    assert site_bytes(sites, "make_small") > 1e6
    del kept


def test_a_fixed_seed_gives_the_same_samples():
    def once():
        memtrack.allocations.clear()
        with memtrack.allocations(seed=99):
            keep = make_blocks(500, 10_000)
        del keep
        return sorted((s.frames[0].line, s.samples) for s in memtrack.allocations.sites()
                      if s.frames)

    assert once() == once()


def test_frames_option_bounds_the_stack_kept():
    def deep(n):
        return deep(n - 1) if n else make_blocks(500, 10_000)

    with memtrack.allocations(frames=3, seed=5):
        keep = deep(20)
    assert max(len(s.frames) for s in memtrack.allocations.sites()) == 3
    memtrack.allocations.clear()
    with memtrack.allocations(frames=0, seed=5):
        keep = deep(20)
    assert all(s.location == "(no Python frame)" for s in memtrack.allocations.sites())
    del keep


def test_bad_options_are_refused_with_the_bad_value():
    with pytest.raises(ValueError, match="frames must be between 0 and 64"):
        memtrack.allocations(frames=65)
    with pytest.raises(ValueError, match="nonsense"):
        memtrack.allocations(interval="nonsense")
    with pytest.raises(ValueError, match="seed"):
        memtrack.allocations.start(seed=-1)
    assert memtrack.allocations.start() is True
    assert memtrack.allocations.start(interval=1) is False  # running: its settings stay
    assert memtrack.allocations.counters()["interval"] == 512 * KIB
    with pytest.raises(RuntimeError, match="already running"):
        _core.alloc_start()


def test_threads_allocating_at_once_are_sampled_safely():
    # given eight threads allocating and freeing at once (frees cross threads too)
    shared = []
    lock = threading.Lock()

    def churn():
        for _ in range(200):
            block = make_blocks(20, 4096)
            with lock:
                shared.append(block)
                if len(shared) > 10:
                    shared.pop(0)

    with memtrack.allocations(interval=32 * KIB, seed=11):
        threads = [threading.Thread(target=churn) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    sites = memtrack.allocations.sites()
    total = site_bytes(sites, "make_blocks")
    assert total == pytest.approx(8 * 200 * 20 * 4096, rel=0.2)
    # the ~11 blocks still held are what is retained (at most a few MB)
    assert retained_bytes(sites, "make_blocks") < 0.1 * total


def test_numpy_array_data_is_tracked():
    np = pytest.importorskip("numpy")
    with memtrack.allocations(seed=3):
        with memtrack.phase("arrays") as p:
            arrays = [np.ones(100_000) for _ in range(50)]  # 40 MB of array data
    assert p.stats.allocated >= 50 * 800_000
    sites = memtrack.allocations.sites(phase="arrays")
    assert sum(s.allocated for s in sites) == pytest.approx(40e6, rel=0.25)
    assert sum(s.retained for s in sites) == pytest.approx(40e6, rel=0.25)
    del arrays


def test_numpy_imported_after_start_is_tracked_from_its_import():
    run_python("""
        import memtrack
        memtrack.allocations.start(seed=4)
        import numpy as np
        with memtrack.phase("arrays") as p:
            a = np.ones(10_000_000)
        assert p.stats.allocated >= 80_000_000, p.stats
        assert np.core.multiarray.get_handler_name() == "memtrack"
        memtrack.allocations.stop()
        assert np.core.multiarray.get_handler_name() != "memtrack"
    """)


def test_a_forked_child_starts_with_zero_counters_and_no_samples():
    with memtrack.allocations(seed=8):
        keep = make_blocks(1000, 10_000)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                c = memtrack.allocations.counters()
                ok = c["allocated"] < 1_000_000 and c["samples"] == 0
                ok = ok and not memtrack.allocations.sites()
                with memtrack.phase("child") as p:
                    mine = make_blocks(300, 10_000)
                ok = ok and 300 * 10_000 <= p.stats.allocated < 310 * 10_000
                ok = ok and site_bytes(memtrack.allocations.sites(), "make_blocks") > 0
                del mine
                os.write(w, b"ok" if ok else b"no")
            finally:
                os._exit(0)
        os.close(w)
        answer = os.read(r, 2)
        os.waitpid(pid, 0)
        os.close(r)
    assert answer == b"ok"
    assert memtrack.allocations.counters()["samples"] > 0
    del keep


def test_the_environment_switch_starts_tracking_at_import():
    run_python("""
        import memtrack
        assert memtrack.allocations.running()
        assert memtrack.allocations.counters()["interval"] == 64 * 1024
        with memtrack.phase("p") as p:
            x = [bytearray(1000) for _ in range(1000)]
        assert p.stats.allocated >= 1_000_000
    """, env={"MEMTRACK_ALLOCATIONS": "1", "MEMTRACK_ALLOC_INTERVAL": "64 KiB"})


def test_the_disable_switch_turns_tracking_off():
    run_python("""
        import memtrack
        assert not memtrack.allocations.running()
        assert memtrack.allocations.start() is False
        assert not memtrack.allocations.running()
        with memtrack.phase("p") as p:
            pass
        assert p.stats is None  # phases are off too
        with memtrack.allocations():
            x = [bytearray(1000) for _ in range(1000)]
        assert memtrack.allocations.counters()["allocated"] == 0
    """, env={"MEMTRACK_ALLOCATIONS": "1", "MEMTRACK_DISABLE": "1"})


def test_tracemalloc_on_top_keeps_working_and_stop_leaves_its_hooks_in():
    run_python("""
        import tracemalloc, memtrack
        memtrack.allocations.start(seed=1)
        tracemalloc.start()
        assert memtrack.allocations.stop() is True  # its hooks stay under tracemalloc's
        x = [bytearray(1000) for _ in range(1000)]
        assert tracemalloc.get_traced_memory()[0] >= 1_000_000
        tracemalloc.stop()
        memtrack.allocations.start(seed=1)   # the hooks are still in: no double wrap
        with memtrack.phase("p") as p:
            y = [bytearray(1000) for _ in range(1000)]
        assert 1_000_000 <= p.stats.allocated < 1_200_000, p.stats
    """)


def test_the_entry_points_do_not_leak():
    def cycle():
        with memtrack.allocations(interval=16 * KIB, seed=1):
            with memtrack.phase("leakloop"):
                keep = make_blocks(50, 1000)
        memtrack.allocations.sites()
        memtrack.allocations.counters()
        memtrack.allocations.clear()
        del keep

    for _ in range(50):
        cycle()
    gc.collect()
    before = memtrack.rss()
    for _ in range(500):
        cycle()
    gc.collect()
    assert memtrack.rss() - before < 2 * 1024 * 1024


# -- workers: every worker's sites reach the parent's one profile ---------------------------


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_a_recording_holds_every_workers_sites_under_any_start_method(tmp_path, method):
    import multiprocessing as mp

    from pool_tasks import allocate_in_phases

    path = tmp_path / "pool.mtp"
    if method == "forkserver":
        # A forkserver started before the recording (by an earlier test) lacks the side
        # channel in its environment: a limit documented in docs/allocations.md. Start anew.
        from multiprocessing import forkserver

        forkserver._forkserver._stop()
    memtrack.allocations.start(interval=64 * KIB, seed=21)
    with memtrack.WorkerTable(capacity=8) as table:
        with memtrack.record(path, table=table) as rec:
            assert rec.sites_dir is not None  # tracking was on: the side channel is open
            with mp.get_context(method).Pool(
                    2, initializer=memtrack.init_worker, initargs=(table.name,)) as pool:
                pids = set(pool.map(allocate_in_phases, [1, 1, 1, 1], chunksize=1))
                pool.close()
                pool.join()
    memtrack.allocations.stop()
    profile = memtrack.load(path)
    assert profile.header["format"] == 2 and not profile.site_problems
    # then each worker's sites are in the file, in the phases that allocated
    by_worker = {}
    for s in profile.sites:
        if s.pid in pids:
            by_worker.setdefault(s.pid, {}).setdefault(s.phase, 0)
            by_worker[s.pid][s.phase] += s.allocated
    assert set(by_worker) == pids
    # 4 tasks of 20 MB in load and 5 MB in parse, shared by the workers
    load = sum(w.get("load", 0) for w in by_worker.values())
    parse = sum(w.get("parse", 0) for w in by_worker.values())
    assert load == pytest.approx(80e6, rel=0.15)
    assert parse == pytest.approx(20e6, rel=0.25)
    # and the sites name the worker function
    assert any(f.function == "allocate_in_phases" for s in profile.sites if s.pid in pids
               for f in s.frames[:1])
    # and the directory of the side channel is gone, the environment restored
    assert not any(p.name.endswith(".sites") for p in tmp_path.iterdir())
    assert "MEMTRACK_ALLOC_DIR" not in os.environ


def test_dump_writes_this_processs_sites_and_load_reads_them_back(tmp_path):
    with memtrack.allocations(interval=64 * KIB, seed=5):
        with memtrack.phase("build"):
            keep = make_blocks(1000, 10_000)
    path = tmp_path / "p.mtp"
    memtrack.dump(path)
    profile = memtrack.load(path)
    assert profile.header["allocations"] == {"interval": 64 * KIB, "frames": 16}
    assert profile.sites == memtrack.allocations.sites()
    assert profile.phases[-1].allocated == memtrack.records()[-1].allocated
    assert profile.summary["build"].total_allocated >= 1000 * 10_000
    del keep


def test_a_format_1_profile_still_loads_without_sites():
    from memtrack.profile import parse

    data = b"".join(_core.pack(r) for r in [
        {"t": "header", "magic": "memtrack", "format": 1},
        {"t": "phase", "name": "a", "path": "a", "pid": 1, "thread_id": 2, "start": 0.0,
         "duration": 1.0, "rss_start": 10, "rss_end": 20, "peak_rss": 30, "heap_delta": 0,
         "error": None},
        {"t": "summary", "path": "a", "count": 1, "total_time": 1.0, "max_peak_rss": 30,
         "max_peak_delta": 20, "total_rss_delta": 10},
        {"t": "end"}])
    profile = parse(data)
    assert profile.sites == []
    assert profile.phases[0].allocated is None
    assert profile.summary["a"].total_allocated is None


def test_a_bad_site_record_is_a_profile_error():
    from memtrack.profile import parse

    data = b"".join(_core.pack(r) for r in [
        {"t": "header", "magic": "memtrack", "format": 2},
        {"t": "site", "phase": "", "pid": 1, "samples": "many", "allocated": 1,
         "allocations": 1, "retained": 0, "retained_samples": 0, "frames": []},
        {"t": "end"}])
    with pytest.raises(memtrack.ProfileError, match="'samples' should be a non-negative int"):
        parse(data)


def test_memtrack_run_allocations_records_the_sites_of_a_child(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "run.mtp"
    script = tmp_path / "child.py"
    script.write_text(
        "import memtrack\n"
        "with memtrack.phase('work'):\n"
        "    for _ in range(30_000):\n"
        "        bytearray(10_000)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMTRACK_")}
    subprocess.run([sys.executable, "-m", "memtrack", "run", "--quiet", "--allocations", "-o",
                    str(path), "--", sys.executable, str(script)], check=True, env=env,
                   timeout=120)
    profile = memtrack.load(path)
    work = [s for s in profile.sites if s.phase == "work"]
    # 300 MB at the default 512 KiB mean interval: ~570 samples, so the estimate's spread
    # is ~4%; the bound is over 4 of those (30 MB gave 57 samples: 36% off was seen in CI).
    assert sum(s.allocated for s in work) == pytest.approx(300e6, rel=0.18)
    assert work[0].frames[0].filename == str(script)


def test_next_ends_one_span_and_starts_the_next_with_its_own_counts():
    with memtrack.allocations(seed=1):
        with memtrack.phase("first") as p:
            a = make_blocks(100, 10_000)
            p.next("second")
            b = make_blocks(300, 10_000)
    first, second = memtrack.records()[-2:]
    assert (first.path, second.path) == ("first", "second")
    assert 100 * 10_000 <= first.allocated < 105 * 10_000
    assert 300 * 10_000 <= second.allocated < 310 * 10_000
    del a, b
