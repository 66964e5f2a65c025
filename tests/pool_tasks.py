"""Worker functions for pool tests: importable by spawn and forkserver children."""

import mmap
import os
import signal
import time

import memtrack

MB = 1024 * 1024


def touch(nbytes):
    """`nbytes` made resident in an anonymous mapping of their own, unmapped when the object
    goes. Not a bytearray: glibc serves a block below its moving mmap threshold from the heap,
    and a forked worker inherits the parent's free, already-resident heap chunks, so a spike
    could reuse them and show no growth (seen in CI: a 24 MiB parse phase with delta 0)."""
    if nbytes == 0:
        return bytearray()  # mmap refuses an empty mapping
    buf = mmap.mmap(-1, nbytes)
    for i in range(0, nbytes, mmap.PAGESIZE):
        buf[i] = 1
    return buf


def analyze(mib):
    """A task in two nested phases that spikes `mib` MiB in parse."""
    with memtrack.phase("index"):
        with memtrack.phase("parse"):
            buf = touch(mib * MB)
            time.sleep(0.02)
            del buf
    return os.getpid()


def wait_until_published(rss, timeout=60):
    """Wait until this worker's slot shows an rss of at least `rss` (its heartbeat has
    published it): an event, however loaded the machine, not a fixed sleep."""
    name, slot = memtrack.worker_slot()
    table = memtrack.WorkerTable.attach(name)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(w.slot == slot and w.rss >= rss for w in table.workers()):
                return
            time.sleep(0.01)
        raise TimeoutError(f"the heartbeat did not publish rss {rss} in {timeout} s")
    finally:
        table.close()


def die_in_parse(mib):
    """Grow `mib` MiB inside index/parse, then be killed by SIGKILL there."""
    with memtrack.phase("index"):
        with memtrack.phase("parse"):
            buf = touch(mib * MB)
            wait_until_published(memtrack.rss())
            os.kill(os.getpid(), signal.SIGKILL)
            return len(buf)


def slot_of_this_worker(_):
    time.sleep(0.05)
    return memtrack.worker_slot()


def grow_slowly(steps):
    """A long phase that grows in steps: the heartbeat must show it while it runs."""
    keep = []
    with memtrack.phase("long"):
        for _ in range(steps):
            keep.append(touch(20 * MB))
            time.sleep(0.15)
    return os.getpid()


def allocate_in_phases(n):
    """Allocation-tracking task: 20 MB in "load", 5 MB in "parse" (blocks of 10 000 bytes)."""
    keep = []
    with memtrack.phase("load"):
        for _ in range(2000 * n):
            keep.append(bytearray(10_000))
    with memtrack.phase("parse"):
        for _ in range(500 * n):
            keep.append(bytearray(10_000))
    return os.getpid()
