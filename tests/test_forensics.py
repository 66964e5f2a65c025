"""memtrack.pool.forensics: how a worker ended, worded once, and the dead as data."""

import os
import signal
import subprocess
import sys

import pytest

import memtrack
from memtrack.pool import forensics


@pytest.mark.parametrize(("code", "sig", "state", "words", "cell"), [
    (None, signal.SIGKILL, "killed", "killed by SIGKILL", "signal 9"),
    (None, 77, "killed", "killed by signal 77", "signal 77"),
    (3, None, "exited", "exited with code 3", "code 3"),
    (0, None, "exited", "exited with code 0", "code 0"),
    (None, None, "killed",
     "killed (without running its exit handlers: a signal, the OOM killer or a crash)", "-"),
    (None, None, "exited", "exited", "-"),
])
def test_an_end_is_worded_the_same_everywhere(code, sig, state, words, cell):
    assert forensics.describe_exit(code, sig, state) == words
    assert forensics.exit_cell(code, sig) == cell


def test_a_multiprocessing_exit_code_splits_into_code_and_signal():
    assert forensics.exit_status(-signal.SIGTERM) == (None, signal.SIGTERM)
    assert forensics.exit_status(2) == (2, None)
    assert forensics.exit_status(None) == (None, None)


def _start(table, code):
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **table.environ()},
                            stdout=subprocess.PIPE)


def test_deaths_are_data_and_explain_broken_pool_is_their_text():
    with memtrack.WorkerTable(capacity=4) as table:
        # given: a worker that is killed in a phase, one that exits with 3, one that exits 0
        killed = _start(table, "import memtrack, time; memtrack.phase('stuck').__enter__(); "
                               "print(1, flush=True); time.sleep(60)")
        killed.stdout.readline()
        failed = _start(table, "import memtrack, sys; memtrack.task_done(); sys.exit(3)")
        fine = _start(table, "import memtrack; memtrack.task_done()")
        assert failed.wait(timeout=60) == 3 and fine.wait(timeout=60) == 0
        table.record_exit(failed.pid, 3)  # reaped by us: the owner tells the table, as a pool does
        killed.send_signal(signal.SIGKILL)
        # wait until it can be waited for, without reaping it: its signal is readable then
        # (a table read in the instant before may record the death without its signal)
        os.waitid(os.P_PID, killed.pid, os.WEXITED | os.WNOWAIT)
        # when the table is read
        found = forensics.deaths(table)
        assert killed.wait(timeout=60) == -signal.SIGKILL
        # then each death carries the worker's slot as it was; one is the first to die
        # (which one the slots cannot tell apart to the heartbeat), and neither was
        # stopped by a pool's SIGTERM
        by_pid = {d.pid: d for d in found}
        assert set(by_pid) == {killed.pid, failed.pid}
        assert found[0].culprit and not found[1].culprit
        assert not any(d.stopped_by_pool or d.oom for d in found)
        assert by_pid[killed.pid].stats.exit_signal == signal.SIGKILL
        assert by_pid[killed.pid].stats.phase == "stuck"
        assert by_pid[failed.pid].stats.exit_code == 3
        assert f"worker {killed.pid} died in phase stuck at " in str(by_pid[killed.pid])
        assert str(by_pid[killed.pid]).endswith("killed by SIGKILL; 0 tasks done")
        assert str(by_pid[failed.pid]).endswith("exited with code 3; 1 tasks done")
        assert str(found[0]).startswith(f"first to die: worker {found[0].pid} died ")
        assert memtrack.explain_broken_pool(table).splitlines() == [str(d) for d in found]


def test_no_death_says_so():
    with memtrack.WorkerTable(capacity=2) as table:
        assert forensics.deaths(table) == []
        assert memtrack.explain_broken_pool(table) == forensics.NO_DEATH
