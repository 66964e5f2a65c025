"""MemoryAwareExecutor: real pools (fork and spawn), real pauses, leaks, deaths and sizing."""

import math
import multiprocessing as mp
import os
import pickle
import signal
import time
from concurrent.futures import CancelledError, wait
from concurrent.futures.process import BrokenProcessPool

import executor_tasks as tasks
import pytest
from conftest import run_python

import memtrack
from memtrack.limits import cpu_limit, system_memory
from memtrack.pool.executor import MemoryAwareExecutor, PoolEvent
from memtrack.sizing import plan_workers

MB = 1024 * 1024
GB = 10**9
METHODS = ["fork", "spawn"]
HERE = os.path.dirname(__file__)


def ctx(method):
    return mp.get_context(method)


def wait_for(condition, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def runs(log_dir):
    """{task number: [start times]} from the files tasks.log_run leaves."""
    found = {}
    for name in os.listdir(log_dir):
        n, _pid, started = name.split("-")
        found.setdefault(int(n), []).append(float(started))
    return found


class FlagProbe:
    """Reports `high` bytes while `flag` exists (or, with invert, until it exists)."""

    def __init__(self, flag, *, high=900, low=100, invert=False):
        self.flag, self.high, self.low, self.invert = flag, high, low, invert

    def __call__(self):
        exists = os.path.exists(self.flag)
        return self.high if exists != self.invert else self.low


# --------------------------------------------------------------------------- running tasks


@pytest.mark.parametrize("method", METHODS)
def test_map_returns_results_in_order_from_tracked_workers(method):
    with MemoryAwareExecutor(2, mp_context=ctx(method)) as ex:
        squares = list(ex.map(tasks.square, range(20)))
        sums = list(ex.map(tasks.add, range(7), range(100, 107), chunksize=3))
        pids = set(ex.map(tasks.whoami, range(6)))
    assert squares == [x * x for x in range(20)]
    assert sums == [x + 100 + x for x in range(7)]
    workers = {w.pid: w for w in ex.table.workers()}
    assert pids <= set(workers) and 1 <= len(pids) <= 2
    assert all(w.state == "exited" for w in workers.values())  # clean exits at shutdown
    assert ex.events == []


def test_task_errors_come_back_with_the_workers_traceback_and_the_pool_goes_on():
    with MemoryAwareExecutor(1, mp_context=ctx("fork")) as ex:
        failed = ex.submit(tasks.fail, "no such file")
        unpicklable_argument = ex.submit(tasks.square, lambda: 1)
        after = ex.submit(tasks.square, 7)
        with pytest.raises(ValueError, match="no such file") as info:
            failed.result()
        assert "in fail" in str(info.value.__cause__)  # the remote traceback
        with pytest.raises((pickle.PicklingError, AttributeError)):
            unpicklable_argument.result()
        assert after.result() == 49


def test_the_users_initializer_runs_in_each_worker_after_it_joined_the_table(tmp_path):
    marks = tmp_path / "init"
    with MemoryAwareExecutor(2, mp_context=ctx("spawn"), initializer=tasks.initializer_marks,
                             initargs=(str(marks),)) as ex:
        pids = set(ex.map(tasks.sleep_then, [None] * 4, [0.2] * 4))
        pids = set(ex.map(tasks.whoami, range(4)))
    lines = marks.read_text().split()
    assert lines[1::2] == ["True"] * (len(lines) // 2)  # joined before the user's init ran
    assert pids <= {int(p) for p in lines[::2]}


def test_a_failing_initializer_breaks_the_pool_and_says_so():
    with pytest.raises(BrokenProcessPool, match="initializer"):
        with MemoryAwareExecutor(1, mp_context=ctx("fork"),
                                 initializer=tasks.initializer_fails) as ex:
            ex.submit(tasks.square, 2).result()


# --------------------------------------------------------------------------- pausing


def test_no_task_starts_while_memory_is_high_and_each_runs_once_after(tmp_path):
    # Given a pool whose memory reads high until a flag file appears
    resume_flag = tmp_path / "memory-is-fine"
    log = tmp_path / "runs"
    log.mkdir()
    probe = FlagProbe(resume_flag, invert=True)
    with MemoryAwareExecutor(2, mp_context=ctx("fork"), memory_probe=probe, limit=1000,
                             pause_at=0.8) as ex:
        futures = [ex.submit(tasks.log_run, str(log), n) for n in range(6)]
        # when it has had time to start them, nothing has run
        time.sleep(0.8)
        assert runs(log) == {}
        assert not any(f.running() or f.done() for f in futures)
        assert ex.paused
        # then memory falls: every task runs exactly once
        resume_flag.touch()
        assert [f.result(timeout=20) for f in futures] == list(range(6))
        assert not ex.paused
    pause, resume = ex.events
    assert (pause.kind, resume.kind) == ("pause", "resume")
    assert pause.numbers["used"] == 900 and resume.numbers["used"] == 100
    assert pause.numbers["limit"] == 1000 and pause.numbers["threshold"] == 800
    assert 1 <= pause.numbers["queued"] <= 6 and pause.pid is None  # as submitted so far
    assert "above 80% of the" in pause.detail
    started = runs(log)
    assert sorted(started) == list(range(6))
    assert all(len(times) == 1 for times in started.values())
    assert min(t for times in started.values() for t in times) >= resume.time


def test_a_pause_in_the_middle_holds_back_queued_tasks_until_memory_falls(tmp_path):
    # Given one worker and a probe that reads high while the flag exists
    flag = tmp_path / "memory-is-high"
    log = tmp_path / "runs"
    log.mkdir()
    with MemoryAwareExecutor(1, mp_context=ctx("fork"), memory_probe=FlagProbe(flag),
                             limit="1 kB", pause_at=0.5) as ex:
        first = ex.submit(tasks.log_run, str(log), 0, 0.3)  # time to queue the rest
        trigger = ex.submit(tasks.set_flag, str(flag), 1)   # memory goes high here
        rest = [ex.submit(tasks.log_run, str(log), n) for n in range(2, 7)]
        assert (first.result(timeout=20), trigger.result(timeout=20)) == (0, 1)
        wait_for(lambda: ex.paused, what="the pause")
        time.sleep(0.5)
        assert sorted(runs(log)) == [0]
        assert not any(f.running() or f.done() for f in rest)
        os.unlink(flag)
        assert [f.result(timeout=20) for f in rest] == [2, 3, 4, 5, 6]
    kinds = [e.kind for e in ex.events]
    assert kinds == ["pause", "resume"]
    pause, resume = ex.events
    assert pause.numbers["running"] == 0 and pause.numbers["queued"] == 5
    started = runs(log)
    assert sorted(started) == [0, 2, 3, 4, 5, 6]
    assert all(len(times) == 1 for times in started.values())
    held = [t for n in range(2, 7) for t in started[n]]
    assert min(held) >= resume.time > pause.time


def test_by_default_the_pool_pauses_on_its_workers_pss():
    # A limit so small that one live worker is above it: the second task must wait.
    with MemoryAwareExecutor(1, mp_context=ctx("fork"), limit="10 MB") as ex:
        first = ex.submit(tasks.hold, 30, 0.4)
        second = ex.submit(tasks.square, 3)
        assert first.result(timeout=20) == 30 * MB
        wait_for(lambda: ex.paused, what="the pause")
        time.sleep(0.3)
        assert not second.running() and not second.done()
        (worker,) = ex.table.workers()
        ex.shutdown(cancel_futures=True)
    assert second.cancelled()
    (pause,) = ex.events
    assert pause.kind == "pause" and "pool pss" in pause.detail
    assert pause.numbers["limit"] == 10**7 and pause.numbers["threshold"] == 8 * 10**6
    assert pause.numbers["used"] >= 10 * MB
    assert pause.numbers["used"] <= max(worker.rss, worker.pss) + 40 * MB


# --------------------------------------------------------------------------- recycling


@pytest.mark.parametrize("method", METHODS)
def test_a_leaking_worker_is_replaced_without_losing_a_task(method):
    # Each call keeps 50 MiB more; 100 MB over the level after the first task is a leak.
    with MemoryAwareExecutor(1, mp_context=ctx(method), leak_threshold="100 MB") as ex:
        results = list(ex.map(tasks.leak, [50] * 7))
    pids = [pid for pid, _ in results]
    kept = [n for _, n in results]
    # The third call takes a worker 100 MiB (> 100 MB) over its first level: replaced.
    assert kept == [1, 2, 3, 1, 2, 3, 1]
    assert len(set(pids)) == 3
    recycles = [e for e in ex.events if e.kind == "recycle"]
    assert [e.pid for e in recycles] == [pids[0], pids[3]]
    for event in recycles:
        assert event.numbers["growth"] > event.numbers["leak_threshold"] == 100 * 10**6
        assert event.numbers["growth"] == event.numbers["retained"] - event.numbers["baseline"]
        assert event.numbers["growth"] >= 95 * MB and event.numbers["tasks"] == 3
        assert "leak_threshold" in event.detail and "after its first task" in event.detail
    states = {w.pid: w.state for w in ex.table.workers()}
    assert [states[pid] for pid in dict.fromkeys(pids)] == ["exited"] * 3  # none was killed


def test_recycling_among_several_busy_workers_loses_and_repeats_nothing(tmp_path):
    log = tmp_path / "runs"
    log.mkdir()
    with MemoryAwareExecutor(2, mp_context=ctx("fork"), leak_threshold="100 MB") as ex:
        leaks = [ex.submit(tasks.leak, 50) for _ in range(10)]
        logged = [ex.submit(tasks.log_run, str(log), n) for n in range(10)]
        results = [f.result(timeout=30) for f in leaks]
        assert [f.result(timeout=30) for f in logged] == list(range(10))
    assert all(1 <= n <= 3 for _, n in results)
    assert any(e.kind == "recycle" for e in ex.events)
    assert all(len(times) == 1 for times in runs(log).values()) and len(runs(log)) == 10


def test_memory_a_task_returns_is_not_counted_as_retained():
    # After a first task with an empty result, 40 MiB results: sent back and freed,
    # not 40 MiB retained over the first level (a leak at 30 MB).
    with MemoryAwareExecutor(1, mp_context=ctx("fork"), leak_threshold="30 MB") as ex:
        sizes = [len(r) for r in ex.map(tasks.big_result, [0, 40, 40, 40])]
    assert sizes == [0] + [40 * MB] * 3
    assert ex.events == []


def test_garbage_in_reference_cycles_is_collected_before_measuring():
    # Each task leaves 40 MiB in a cycle with automatic collection off: only the
    # executor's gc.collect() tells that from a leak of 30 MB per task.
    with MemoryAwareExecutor(1, mp_context=ctx("fork"), leak_threshold="30 MB") as ex:
        pids = set(ex.map(tasks.garbage_cycle, [40] * 4))
    assert len(pids) == 1
    assert ex.events == []


def test_leak_threshold_none_measures_nothing_and_never_recycles():
    with MemoryAwareExecutor(1, mp_context=ctx("fork"), leak_threshold=None) as ex:
        results = list(ex.map(tasks.leak, [30] * 5))
    assert [n for _, n in results] == [1, 2, 3, 4, 5]
    assert ex.events == []


# --------------------------------------------------------------------------- deaths


@pytest.mark.parametrize("method", METHODS)
def test_a_killed_worker_breaks_the_pool_with_the_tables_forensics(method):
    ex = MemoryAwareExecutor(2, mp_context=ctx(method))
    # Given one worker busy with a slow task and another that is killed mid-parse
    slow = ex.submit(tasks.sleep_then, "finished", 1.5)
    doomed = ex.submit(tasks.die_in_parse, 64)
    queued = [ex.submit(tasks.square, n) for n in range(3)]
    with pytest.raises(BrokenProcessPool) as info:
        doomed.result(timeout=30)
    message = str(info.value)
    (death,) = [e for e in ex.events if e.kind == "death"]
    (dead,) = [w for w in ex.table.workers(check=True) if w.state == "killed"]
    # then the error names the worker, its last phase, its rss and peak, and the signal
    assert death.pid == dead.pid
    assert f"worker {dead.pid} died in phase index/parse at" in message
    assert "killed by SIGKILL" in message and "peak" in message
    assert dead.exit_signal == signal.SIGKILL and dead.rss >= 64 * MB
    assert death.numbers["rss"] == dead.rss and death.numbers["peak_rss"] == dead.peak_rss
    assert death.detail in message
    # queued tasks fail the same way, the other worker's task finishes, nothing new starts
    for future in queued:
        with pytest.raises(BrokenProcessPool, match=f"worker {dead.pid} died"):
            future.result(timeout=30)
    assert slow.result(timeout=30) == "finished"
    with pytest.raises(BrokenProcessPool, match="died in phase index/parse"):
        ex.submit(tasks.square, 1)
    ex.shutdown()


# --------------------------------------------------------------------------- sizing


def test_without_max_workers_the_pool_is_sized_by_plan_workers():
    # Small workers: the CPUs bind, as plan_workers says.
    with MemoryAwareExecutor(per_worker="1 MB", mp_context=ctx("fork")) as ex:
        pids = set(ex.map(tasks.sleep_then, [None] * 8, [0.05] * 8))
        pids = set(ex.map(tasks.whoami, range(8)))
    plan = ex.plan
    same = plan_workers("1 MB", main=plan.main, available=plan.available, cpus=plan.cpus)
    assert ex.max_workers == plan.workers == same.workers == cpu_limit()
    assert plan.limited_by == "cpus" and plan.per_worker == 10**6
    assert 1 <= len(pids) <= ex.max_workers
    assert ex.table.capacity >= ex.max_workers

    # Workers of two thirds of the available memory: memory binds at one.
    per_worker = system_memory().available * 2 // 3
    ex = MemoryAwareExecutor(per_worker=per_worker)
    same = plan_workers(per_worker, main=ex.plan.main, available=ex.plan.available,
                        cpus=ex.plan.cpus)
    assert ex.max_workers == ex.plan.workers == same.workers == 1
    assert ex.plan.limited_by == "memory"
    ex.shutdown()


def test_a_worker_larger_than_memory_gets_one_worker_and_a_warning():
    with pytest.warns(RuntimeWarning, match="OOM"):
        ex = MemoryAwareExecutor(per_worker=system_memory().available * 3)
    assert ex.max_workers == 1 and ex.plan.limited_by == "min_workers"
    ex.shutdown()


def test_an_explicit_max_workers_wins_and_without_per_worker_the_cpus_decide():
    ex = MemoryAwareExecutor(3)
    assert (ex.max_workers, ex.plan) == (3, None)
    ex.shutdown()
    ex = MemoryAwareExecutor()
    assert (ex.max_workers, ex.plan) == (cpu_limit(), None)
    ex.shutdown()
    with pytest.warns(RuntimeWarning, match="do not fit"):
        ex = MemoryAwareExecutor(4, per_worker=system_memory().available // 2)
    assert ex.max_workers == 4
    ex.shutdown()


def test_the_limit_is_the_cgroup_limit_or_the_machines_memory():
    memory = system_memory()
    ex = MemoryAwareExecutor(1)
    assert ex.limit == (memory.limit or memory.total)
    ex.shutdown()
    ex = MemoryAwareExecutor(1, limit="2 GB")
    assert ex.limit == 2 * GB
    ex.shutdown()


# --------------------------------------------------------------------------- shutdown


def test_shutdown_waits_for_queued_tasks_then_refuses_new_ones():
    ex = MemoryAwareExecutor(1, mp_context=ctx("fork"))
    futures = [ex.submit(tasks.sleep_then, n, 0.1) for n in range(4)]
    ex.shutdown(wait=True)
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(tasks.square, 2)
    ex.shutdown()  # twice is fine
    assert [w.state for w in ex.table.workers()] == ["exited"]  # readable after shutdown


def test_shutdown_without_waiting_still_runs_queued_tasks():
    ex = MemoryAwareExecutor(1, mp_context=ctx("fork"))
    futures = [ex.submit(tasks.sleep_then, n, 0.3) for n in range(3)]
    ex.shutdown(wait=False)
    assert not all(f.done() for f in futures)  # it did not wait
    done, not_done = wait(futures, timeout=30)
    assert not not_done and [f.result() for f in futures] == [0, 1, 2]


def test_shutdown_with_cancel_futures_cancels_only_queued_tasks():
    ex = MemoryAwareExecutor(1, mp_context=ctx("fork"))
    running = ex.submit(tasks.sleep_then, "kept", 0.5)
    queued = [ex.submit(tasks.square, n) for n in range(4)]
    wait_for(running.running, what="the first task to start")
    ex.shutdown(wait=True, cancel_futures=True)
    assert running.result() == "kept"
    assert all(f.cancelled() for f in queued)
    with pytest.raises(CancelledError):
        queued[0].result()


def test_a_queued_task_can_be_cancelled_before_a_worker_takes_it():
    with MemoryAwareExecutor(1, mp_context=ctx("fork")) as ex:
        busy = ex.submit(tasks.sleep_then, 1, 0.4)
        queued = ex.submit(tasks.square, 5)
        after = ex.submit(tasks.square, 6)
        assert queued.cancel()
        assert (busy.result(), after.result()) == (1, 36)
    assert queued.cancelled()


@pytest.mark.parametrize("method", [None, "fork", "spawn", "forkserver"])
def test_queued_tasks_still_run_when_the_program_ends_without_shutdown(tmp_path, method):
    # As with ProcessPoolExecutor: interpreter exit waits for queued tasks, then ends.
    # Python 3.12 refuses new threads and fork() at exit, so the workers must all be up
    # before it (issue 13: 3.12.1 dropped every queued task, exit code 0, no message).
    log = tmp_path / "runs"
    log.mkdir()
    context = "None" if method is None else f"mp.get_context({method!r})"
    proc = run_python(f"""
        import multiprocessing as mp
        import sys
        sys.path.insert(0, {HERE!r})
        import executor_tasks
        from memtrack.pool.executor import MemoryAwareExecutor
        ex = MemoryAwareExecutor(2, mp_context={context})
        for n in range(6):
            ex.submit(executor_tasks.log_run, {str(log)!r}, n, 0.05)
    """)
    assert sorted(runs(log)) == [0, 1, 2, 3, 4, 5], proc.stderr
    if method != "fork":  # a forkserver or spawn pool never forks from this threaded process
        assert "DeprecationWarning" not in proc.stderr


def test_a_worker_recycled_just_before_exit_still_runs_the_rest(tmp_path):
    # Every task leaks past the threshold, so workers are replaced while tasks are queued
    # at exit: replacements start as soon as the old worker is gone, or are skipped at
    # exit (where Python 3.12 could not start them); no task is lost either way.
    log = tmp_path / "runs"
    log.mkdir()
    run_python(f"""
        import sys
        sys.path.insert(0, {HERE!r})
        import executor_tasks
        from memtrack.pool.executor import MemoryAwareExecutor
        ex = MemoryAwareExecutor(2, leak_threshold="8 MB", pause_at=None)
        for n in range(8):
            ex.submit(executor_tasks.leak_and_log, {str(log)!r}, n, 16)
    """)
    assert sorted(runs(log)) == list(range(8))


def test_without_a_context_the_executor_uses_a_forkserver(monkeypatch):
    # fork() from the executor's threaded process is unsafe (Python 3.12+ warns); a
    # forkserver forks from a process of its own. A start method set by the user wins.
    from memtrack.pool import executor
    monkeypatch.setattr(mp, "get_start_method", lambda allow_none=False: None)
    assert executor.default_context().get_start_method() == "forkserver"
    monkeypatch.setattr(mp, "get_start_method", lambda allow_none=False: "spawn")
    assert executor.default_context() is mp.get_context()


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("kwargs, error, words", [
    ({"max_workers": 0}, ValueError, "max_workers must be at least 1"),
    ({"max_workers": "4"}, TypeError, "max_workers must be an int"),
    ({"max_workers": True}, TypeError, "max_workers must be an int"),
    ({"pause_at": 0}, ValueError, r"pause_at must be in \(0, 1\]"),
    ({"pause_at": 1.5}, ValueError, r"pause_at must be in \(0, 1\]"),
    ({"pause_at": math.nan}, ValueError, "pause_at"),
    ({"pause_at": "80%"}, TypeError, "pause_at must be a number"),
    ({"leak_threshold": "lots"}, ValueError, "leak_threshold: cannot read 'lots'"),
    ({"leak_threshold": 0}, ValueError, "leak_threshold must be more than 0"),
    ({"leak_threshold": -5}, ValueError, "leak_threshold must not be negative"),
    ({"per_worker": "big"}, ValueError, "per_worker: cannot read 'big'"),
    ({"per_worker": 0}, ValueError, "per_worker must be more than 0"),
    ({"limit": "1 parsec"}, ValueError, "limit: cannot read"),
    ({"mp_context": "spawn"}, TypeError, "mp_context must be a multiprocessing context"),
    ({"initializer": "setup"}, TypeError, "initializer must be a callable"),
    ({"memory_probe": 42}, TypeError, "memory_probe must be a callable"),
])
def test_bad_arguments_are_clear_errors(kwargs, error, words):
    with pytest.raises(error, match=words):
        MemoryAwareExecutor(**kwargs)


def test_bad_map_chunksize_is_a_clear_error():
    with MemoryAwareExecutor(1) as ex:
        with pytest.raises(ValueError, match="chunksize must be at least 1"):
            ex.map(tasks.square, range(3), chunksize=0)


def test_events_are_small_frozen_records():
    event = PoolEvent("pause", 1.0, None, "pool memory high", {"used": 1})
    with pytest.raises(AttributeError):
        event.kind = "resume"
    assert str(event) == "pause: pool memory high"
    assert str(PoolEvent("death", 1.0, 42, "killed", {})) == "death worker 42: killed"
    assert memtrack.pool.executor.MemoryAwareExecutor is MemoryAwareExecutor


def test_a_pool_paused_with_idle_workers_goes_on_one_task_at_a_time(monkeypatch):
    # Memory that stays high with every worker idle cannot fall by waiting: after the stall
    # window the pool runs one task at a time, so shutdown() and exit never hang.
    import memtrack.pool.executor as executor_module

    monkeypatch.setattr(executor_module, "STALL_WARNING_AFTER", 0.3)
    ex = memtrack.MemoryAwareExecutor(2, memory_probe=lambda: 10**12, limit="1 GB")
    with pytest.warns(RuntimeWarning, match="one task at a time"):
        futures = [ex.submit(pow, 2, i) for i in range(4)]
        ex.shutdown(wait=True)
    assert [f.result() for f in futures] == [1, 2, 4, 8]
    assert [e.kind for e in ex.events][0] == "pause"
