"""Every C entry point, called 100 000 times, leaves memory flat."""

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
    "phase stats": lambda: memtrack.phase("s").stats,
    "summary": _core.summary,
    "counters": _core.counters,
    "configure": _core.configure,
    "pack": lambda: _core.pack({"k": [1, 2.5, "x", b"y", None]}),
    "unpack_stream": lambda: _core.unpack_stream(PACKED),
    "unpack_stream corrupt": lambda: _core.unpack_stream(b"\x92\x01\xc1"),
    "bad phase name": lambda: pytest.raises(ValueError, memtrack.phase, ""),
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
