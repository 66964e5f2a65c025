"""Worker functions for MemoryAwareExecutor tests: importable by spawn children."""

import os
import signal
import time

from pool_tasks import touch, wait_until_published

import memtrack

MB = 1024 * 1024

#: What a leaking worker keeps: it grows by one buffer per call and is never freed.
_kept = []


def square(x):
    return x * x


def add(x, y):
    return x + y


def whoami(_=None):
    return os.getpid()


def sleep_then(x, seconds):
    time.sleep(seconds)
    return x


def log_run(log_dir, n, seconds=0.0):
    """Leave a file per run (several runs of one task would leave several), sleep, return n.

    The file name holds the start time, so a test can tell when each task started.
    """
    started = time.time()
    path = os.path.join(log_dir, f"{n}-{os.getpid()}-{started:.6f}")
    with open(path, "x"):
        pass
    time.sleep(seconds)
    return n


def set_flag(path, n):
    """A task that raises the test's memory probe: it creates the flag file."""
    with open(path, "w"):
        pass
    return n


def leak(mib):
    """Keep `mib` MiB more on every call, like a cache that is never emptied."""
    _kept.append(touch(mib * MB))
    return os.getpid(), len(_kept)


def leak_and_log(log_dir, n, mib):
    """log_run, then keep `mib` MiB more: a worker past its leak threshold."""
    leak(mib)
    return log_run(log_dir, n)


def fail(message):
    raise ValueError(message)


def big_result(mib):
    """A large result that is not retained once sent."""
    return bytes(touch(mib * MB))


def die_in_parse(mib):
    """Grow `mib` MiB inside index/parse, let the heartbeat publish it, then be SIGKILLed."""
    with memtrack.phase("index"):
        with memtrack.phase("parse"):
            buf = touch(mib * MB)
            wait_until_published(memtrack.rss())
            os.kill(os.getpid(), signal.SIGKILL)
            return len(buf)


def hold(mib, seconds):
    """Hold `mib` MiB for a while (the pool's memory is high meanwhile)."""
    buf = touch(mib * MB)
    time.sleep(seconds)
    return len(buf)


def initializer_marks(path):
    """A user initializer: it must run after the worker joined the table."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()} {memtrack.worker_slot() is not None}\n")


def initializer_fails():
    raise RuntimeError("initializer failed on purpose")


def garbage_cycle(mib):
    """Leave `mib` MiB in a reference cycle that only the cyclic collector frees.

    Automatic collection is off in this worker, so only the executor's gc.collect()
    after the task frees it.
    """
    import gc

    gc.disable()
    node = {"data": touch(mib * MB)}
    node["self"] = node
    return os.getpid()
