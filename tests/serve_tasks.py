"""Worker functions for the serve and dask tests: importable by spawned children too."""

import os
import time

from pool_tasks import touch

import memtrack

MB = 1024 * 1024


def load_then_parse(mib, seconds=0.3):
    """Two phases: a small 'load', then 'parse' holding `mib` MiB for `seconds`."""
    with memtrack.phase("load"):
        small = touch(4 * MB)
        time.sleep(seconds / 2)
    with memtrack.phase("parse"):
        buf = touch(mib * MB)
        time.sleep(seconds)
        del buf
    del small
    return os.getpid()


def allocate_past(mib, hold=30.0):
    """Grow in 'explode' by `mib` MiB in steps, then hold it (a nanny should kill us)."""
    keep = []
    with memtrack.phase("explode"):
        for _ in range(mib // 32):
            keep.append(touch(32 * MB))
            time.sleep(0.02)
        time.sleep(hold)
    return os.getpid()
