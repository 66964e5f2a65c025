"""Phases: exact peaks, nesting, threads, decorators, errors and bad input."""

import threading
import time

import pytest
from conftest import MB, run_python
from pool_tasks import touch

import memtrack


@pytest.mark.parametrize("mib", [16, 64, 256])
def test_peak_delta_is_within_2_percent_of_touched_memory(mib):
    # given a phase that touches N MiB and frees it before it ends
    with memtrack.phase("touch") as p:
        buf = touch(mib * MB)
        del buf
    # then the phase saw the whole spike, although it retained nothing
    assert p.stats.peak_delta == pytest.approx(mib * MB, rel=0.02)
    assert abs(p.stats.rss_delta) < 2 * MB


def test_short_spike_is_caught_exactly():
    # a 100 MB allocation freed as fast as it can be: a sampler would miss it
    with memtrack.phase("spike") as p:
        buf = touch(100 * 1000 * 1000)
        del buf
    assert p.stats.peak_delta >= 95 * 1000 * 1000
    assert p.stats.duration < 1.0


def test_nested_phases_each_get_their_own_peak():
    # given an outer phase whose inner phase spikes, then a later smaller spike
    with memtrack.phase("index") as outer:
        with memtrack.phase("parse") as inner:
            buf = touch(96 * MB)
            del buf
        with memtrack.phase("extract") as later:
            small = touch(16 * MB)
            del small
    # then the inner reset did not hide the spike from the outer phase
    assert inner.stats.path == "index/parse"
    assert later.stats.path == "index/extract"
    assert outer.stats.path == "index"
    assert inner.stats.peak_delta == pytest.approx(96 * MB, rel=0.03)
    assert later.stats.peak_delta == pytest.approx(16 * MB, rel=0.1)
    assert outer.stats.peak_delta >= inner.stats.peak_delta
    assert set(memtrack.summary()) == {"index", "index/parse", "index/extract"}


def test_concurrent_phases_in_threads_keep_exact_peaks():
    # given a thread holding a long phase while another thread resets the mark
    started, go = threading.Event(), threading.Event()
    result = {}

    def worker():
        with memtrack.phase("long") as p:
            buf = touch(80 * MB)
            del buf
            started.set()
            go.wait()
        result["stats"] = p.stats

    t = threading.Thread(target=worker)
    t.start()
    started.wait()
    for _ in range(100):  # many resets in this thread while "long" is open
        with memtrack.phase("tiny"):
            pass
    go.set()
    t.join()
    assert result["stats"].peak_delta >= 79 * MB
    assert result["stats"].path == "long"  # threads have their own stacks
    assert memtrack.summary()["tiny"].max_peak_delta < 4 * MB


def test_eight_threads_ten_thousand_phases_exact_counts():
    def work(i):
        for _ in range(10_000):
            with memtrack.phase(f"t{i % 2}"):
                with memtrack.phase("inner"):
                    pass

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = memtrack.summary()
    assert s["t0"].count == s["t1"].count == 40_000
    assert s["t0/inner"].count == s["t1/inner"].count == 40_000
    assert memtrack._core.counters()["open"] == 0


def test_decorator_measures_every_call():
    @memtrack.phase("work")
    def work(n):
        buf = touch(n * MB)
        return len(buf)

    assert work(8) == 8 * MB
    assert work.__name__ == "work"
    work(32)
    s = memtrack.summary()["work"]
    assert s.count == 2
    assert s.max_peak_delta == pytest.approx(32 * MB, rel=0.05)


def test_async_function_decorator():
    import asyncio

    @memtrack.phase("fetch")
    async def fetch():
        await asyncio.sleep(0)
        return 5

    assert asyncio.run(fetch()) == 5
    assert memtrack.summary()["fetch"].count == 1


def test_exception_ends_and_records_the_phase_and_propagates():
    with pytest.raises(KeyError):
        with memtrack.phase("failing") as p:
            raise KeyError("x")
    assert p.stats.error == "KeyError"
    assert memtrack.records()[-1].error == "KeyError"
    with memtrack.phase("ok") as q:
        pass
    assert q.stats.error is None
    assert q.stats.path == "ok"  # the failed phase left the stack


def test_phase_stats_fields():
    # 40 MiB: above glibc's largest mmap threshold, so it cannot come from free heap
    with memtrack.phase("fields") as p:
        keep = touch(40 * MB)
    s = p.stats
    assert (s.name, s.path, s.pid) == ("fields", "fields", __import__("os").getpid())
    assert s.thread_id == threading.get_ident()
    assert s.rss_delta == s.rss_end - s.rss_start
    assert s.peak_delta == s.peak_rss - s.rss_start
    assert s.rss_delta == pytest.approx(40 * MB, rel=0.05)
    assert s.start <= time.monotonic() and s.duration > 0
    del keep


def test_summary_totals():
    for n in (40, 48):
        with memtrack.phase("grow") as p:
            keep = touch(n * MB)
        del keep
    s = memtrack.summary()["grow"]
    assert s.count == 2
    assert s.max_peak_delta == pytest.approx(48 * MB, rel=0.05)
    assert s.mean_rss_delta == pytest.approx(s.total_rss_delta / 2)
    assert s.total_time > 0 and s.max_peak_rss >= p.stats.peak_rss


def test_records_ring_is_bounded_and_counts_drops():
    old = memtrack.configure()["max_records"]
    try:
        memtrack.configure(max_records=10)
        for i in range(25):
            with memtrack.phase(f"r{i}"):
                pass
        recs = memtrack.records()
        assert [r.name for r in recs] == [f"r{i}" for i in range(15, 25)]
        assert recs.dropped == 15
        assert memtrack.summary()["r0"].count == 1  # the summary keeps everything
    finally:
        memtrack.configure(max_records=old)


def test_reset_forgets_records_and_summary():
    with memtrack.phase("x"):
        pass
    memtrack.reset()
    assert memtrack.summary() == {} and len(memtrack.records()) == 0


def test_deep_nesting_folds_into_the_deepest_path():
    depth = memtrack._core.MAX_DEPTH + 5
    opened = [memtrack.phase("d") for _ in range(depth)]
    for p in opened:
        p.__enter__()
    for p in reversed(opened):
        p.__exit__(None, None, None)
    deepest = max(memtrack.summary(), key=len)
    assert deepest.count("d") == memtrack._core.MAX_DEPTH
    assert memtrack.summary()[deepest].count == 6


@pytest.mark.parametrize(
    "name, exc, words",
    [
        (123, TypeError, "must be a str"),
        (None, TypeError, "must be a str"),
        (b"parse", TypeError, "must be a str"),
        ("", ValueError, "must not be empty"),
        ("x" * 256, ValueError, "256 UTF-8 bytes"),
        ("é" * 128, ValueError, "256 UTF-8 bytes"),
        ("\ud800", UnicodeEncodeError, "surrogate"),
    ],
)
def test_bad_phase_names_are_rejected_with_the_reason(name, exc, words):
    with pytest.raises(exc, match=words):
        memtrack.phase(name)


def test_longest_allowed_name():
    with memtrack.phase("é" * 127 + "x") as p:
        pass
    assert p.stats.name == "é" * 127 + "x"


def test_phase_object_cannot_be_entered_twice_at_once():
    p = memtrack.phase("once")
    with p:
        with pytest.raises(RuntimeError, match="already active"):
            p.__enter__()
    with p:  # but it can be reused afterwards
        pass
    with pytest.raises(RuntimeError, match="not active"):
        p.__exit__(None, None, None)


def test_disable_makes_phases_a_no_op():
    out = run_python(
        """
        import memtrack
        with memtrack.phase("x") as p:
            pass
        print(p.stats, memtrack.summary(), memtrack.capabilities()["disabled"])
        """,
        env={"MEMTRACK_DISABLE": "1"},
    )
    assert out.stdout.split() == ["None", "{}", "True"]


def test_path_table_overflow_goes_to_overflow_path():
    out = run_python(
        """
        import memtrack
        n = memtrack._core.MAX_PATHS + 10
        for i in range(n):
            with memtrack.phase(f"p{i}"):
                pass
        s = memtrack.summary()
        c = memtrack._core.counters()
        print(s["(overflow)"].count >= 10, c["overflowed"] >= 10,
              len(s) <= memtrack._core.MAX_PATHS)
        """
    )
    assert out.stdout.split() == ["True", "True", "True"]


def test_forked_child_starts_with_its_own_records():
    import os

    with memtrack.phase("before-fork"):
        pass
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        with memtrack.phase("in-child"):
            pass
        os.write(w, ",".join(sorted(memtrack.summary())).encode())
        os._exit(0)
    os.close(w)
    child = os.read(r, 1000).decode()
    os.waitpid(pid, 0)
    assert child == "in-child"
    assert "in-child" not in memtrack.summary()


def test_phases_open_across_fork_are_the_parents_not_the_childs():
    import os

    with memtrack.phase("main"):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            with memtrack.phase("work") as p:
                pass
            child_path = p.stats.path
            # the child leaves "main" too (the with block ends): that records nothing
    if pid == 0:
        os.write(w, f"{child_path} {','.join(sorted(memtrack.summary()))}".encode())
        os._exit(0)
    os.close(w)
    child = os.read(r, 1000).decode()
    os.waitpid(pid, 0)
    assert child == "work work"  # not "main/work", and no "main" record in the child
    assert sorted(memtrack.summary()) == ["main"]


def test_phase_heap_reading_is_off_by_default_and_opt_in():
    # given the default settings: no allocator statistics on the hot path
    assert memtrack.configure()["phase_heap"] is False
    with memtrack.phase("no-heap") as p:
        keep = touch(64 * MB)  # above glibc's largest mmap threshold: fresh pages
    assert p.stats.heap_delta is None  # not read: never a silent 0
    # the other readings still are: the 64 MiB written inside the phase show
    assert p.stats.peak_delta >= 60 * MB and p.stats.rss_delta >= 60 * MB
    assert p.stats.rss_delta == p.stats.rss_end - p.stats.rss_start
    with pytest.raises(TypeError, match="phase_heap"):
        memtrack.configure(phase_heap=1)
    # when opted in, heap_delta is the change of malloc's heap in use
    try:
        assert memtrack.configure(phase_heap=True)["phase_heap"] is True
        with memtrack.phase("heap") as q:
            more = bytearray(4 << 20)  # mmap()ed by malloc: counted in hblkhd
    finally:
        memtrack.configure(phase_heap=False)
    assert q.stats.heap_delta >= 4 << 20
    del keep, more


def test_next_ends_a_phase_and_starts_its_sibling_exactly():
    # given an outer phase with a phase that moves on to a sibling
    with memtrack.phase("job"):
        with memtrack.phase("parse") as p:
            touch(30 * MB).close()  # a spike, gone before next()
            held = touch(8 * MB)
            first = p.next("extract")
            assert first is p and p.name == "extract" and p.active
            parse = p.stats
            touch(20 * MB).close()  # a spike of the sibling's own
        extract = p.stats
    held.close()
    # then each got its own exact peak, and the shared reading joins them
    assert parse.path == "job/parse" and extract.path == "job/extract"
    # (within 2%: the kernel's RSS counters lag by their per-CPU batches)
    assert abs(parse.peak_delta - 30 * MB) < 0.02 * 30 * MB
    assert abs(extract.peak_delta - 20 * MB) < 0.02 * 30 * MB  # not the spike before next()
    assert parse.rss_end == extract.rss_start
    assert parse.start + parse.duration == extract.start
    assert abs(parse.rss_delta - 8 * MB) < 0.02 * 30 * MB
    # and the enclosing phase kept the larger of the two, as with an exit and an enter
    assert memtrack.summary()["job"].max_peak_delta > 0.98 * 30 * MB


def test_next_is_checked():
    p = memtrack.phase("a")
    with pytest.raises(RuntimeError, match="not active"):
        p.next("b")
    with p:
        with pytest.raises(ValueError, match="empty"):
            p.next("")
        with pytest.raises(TypeError, match="str"):
            p.next(3)
        assert p.name == "a" and p.active  # a refused next() changes nothing
        inner = memtrack.phase("inner").__enter__()
        with pytest.raises(RuntimeError, match="inner phases"):
            p.next("b")
        inner.__exit__(None, None, None)
        p.next("b")
    assert p.stats.path == "b" and not p.active
    counts = {k: v.count for k, v in memtrack.summary().items() if k in ("a", "b")}
    assert counts == {"a": 1, "b": 1}


def test_next_from_another_thread_is_refused():
    errors = []
    with memtrack.phase("mine") as p:
        t = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, p.next, "x")))
        t.start()
        t.join()
    assert errors and "another thread" in str(errors[0].value)


def test_next_with_memtrack_disabled_only_renames():
    memtrack._core.set_disabled(True)
    try:
        with memtrack.phase("a") as p:
            assert p.next("b") is p
        assert p.name == "b" and p.stats is None
    finally:
        memtrack._core.set_disabled(False)
