"""Forensics: what happened to a pool's workers, from the slots they left behind.

How a worker ended is worded here and nowhere else: :func:`describe_exit` in a sentence
("killed by SIGKILL"), :func:`exit_cell` in a table cell ("signal 9"). The table, the
executor, the reports and ``memtrack top`` all call them. :func:`deaths` gives the dead
workers as data; :func:`explain_broken_pool` is its text.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, replace
from typing import Any

from .._sizes import format_size
from .table import WorkerStats, WorkerTable

#: What :func:`explain_broken_pool` says when no worker of the table died.
NO_DEATH = "no worker of this table died"


def signal_name(number: int) -> str:
    """"SIGKILL" for 9; "signal 77" for a number this platform does not name."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def exit_status(exitcode: int | None) -> tuple[int | None, int | None]:
    """A ``multiprocessing`` exit code (negative: the signal) as (exit_code, exit_signal)."""
    if exitcode is None:
        return None, None
    if exitcode < 0:
        return None, -exitcode
    return exitcode, None


def describe_exit(exit_code: int | None = None, exit_signal: int | None = None,
                  state: str | None = None) -> str:
    """How a worker ended, in words: "killed by SIGKILL", "exited with code 3"; "killed
    (without running its exit handlers ...)" when only the table's ``state`` knows it;
    "exited" when nothing more is known."""
    if exit_signal is not None:
        return f"killed by {signal_name(exit_signal)}"
    if exit_code is not None:
        return f"exited with code {exit_code}"
    if state == "killed":
        return "killed (without running its exit handlers: a signal, the OOM killer or a crash)"
    return "exited"


def exit_cell(exit_code: int | None, exit_signal: int | None) -> str:
    """How a worker ended, for a table cell: "signal 9", "code 1", or "-" (not known)."""
    if exit_signal:
        return f"signal {exit_signal}"
    if exit_code is not None:
        return f"code {exit_code}"
    return "-"


def describe_worker_exit(w: Any) -> str:
    """:func:`describe_exit` of anything with ``exit_code``, ``exit_signal`` and ``state``
    (a :class:`WorkerStats`)."""
    return describe_exit(w.exit_code, w.exit_signal, w.state)


@dataclass(frozen=True)
class Death:
    """One worker that died (or a slot that cannot be read), as the table last saw it.

    ``stats`` is None only for an unreadable slot (``error`` says why)."""

    slot: int
    pid: int | None
    stats: WorkerStats | None
    error: str | None = None
    #: The first worker to die: what broke the pool (see :func:`deaths`).
    culprit: bool = False
    #: Stopped by the pool after the culprit died (SIGTERM from the executor).
    stopped_by_pool: bool = False
    #: Killed by the kernel's OOM killer: its cgroup's OOM counter rose.
    oom: bool = False

    def __str__(self) -> str:
        w = self.stats
        if w is None:
            return f"slot {self.slot}: unreadable ({self.error})"
        where = f"in phase {w.phase}" if w.phase else "between phases"
        how = ("killed by the kernel OOM killer (SIGKILL)" if self.oom
               else describe_worker_exit(w))
        if self.stopped_by_pool:
            return (f"worker {w.pid} was stopped by the pool afterwards ({how}) {where}, "
                    f"at {format_size(w.rss)}; {w.tasks} tasks done")
        first = "first to die: " if self.culprit else ""
        return (f"{first}worker {w.pid} died {where} at {format_size(w.rss)} "
                f"(peak {format_size(w.peak_rss)}), {how}; {w.tasks} tasks done")


def died(w: WorkerStats) -> bool:
    """Whether a readable slot tells of a death: killed, or exited with a non-zero code."""
    return w.state == "killed" or (w.state == "exited" and w.exit_code not in (None, 0))


def deaths(table: WorkerTable) -> list[Death]:
    """The workers of ``table`` that died, the first to die first, then the slots that
    fail validation.

    When one worker dies, ProcessPoolExecutor (and ``Pool.terminate()``) stops the others
    with SIGTERM: those are marked ``stopped_by_pool``, after the culprit. Among the rest
    the first to die is the one whose slot stopped changing first (its last heartbeat or
    phase change). A worker killed by SIGKILL (or by an unseen signal) while the OOM
    counter of the table's cgroup rose since the table was made is marked ``oom``, one
    per kill counted.
    """
    dead, corrupt = [], []
    for w in table.workers(check=True):
        if w.state == "corrupt":
            corrupt.append(Death(w.slot, w.pid or None, None, w.error))
        elif died(w):
            dead.append(Death(w.slot, w.pid, w))
    dead.sort(key=lambda d: (d.stats.exit_signal == signal.SIGTERM,
                             d.stats.updated if d.stats.updated is not None else 0.0, d.slot))
    kills = _oom_kills_since(table)
    found = []
    for i, d in enumerate(dead):
        sig = d.stats.exit_signal
        oom = kills > 0 and sig in (None, signal.SIGKILL)
        kills -= oom
        # A bystander was terminated: SIGTERM (what ProcessPoolExecutor and Pool send).
        terminated = sig == signal.SIGTERM
        found.append(replace(d, culprit=i == 0, oom=oom,
                             stopped_by_pool=i > 0 and terminated and not oom
                             and dead[0].stats.exit_signal != signal.SIGTERM))
    return found + corrupt


def _oom_kills_since(table: WorkerTable) -> int:
    """OOM kills counted for the cgroup of the table's process since the table was made
    (or attached): its workers are in that cgroup unless something moved them."""
    from .table import oom_counters

    before = dict(getattr(table, "oom_baseline", None) or ())
    for file, now in oom_counters():
        if file in before and now > before[file]:
            return now - before[file]
    return 0


def explain_broken_pool(table: WorkerTable) -> str:
    """What happened to the workers that died, the first to die first, e.g. for a
    ``BrokenProcessPool`` handler: "first to die: worker 4711 died in phase index/parse at
    1.3 GiB (peak 1.4 GiB), killed by SIGKILL; ..." then the workers the pool stopped."""
    return "\n".join(map(str, deaths(table))) or NO_DEATH
