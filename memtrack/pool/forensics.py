"""Forensics: what happened to a pool's workers, from the slots they left behind.

How a worker ended is worded here and nowhere else: :func:`describe_exit` in a sentence
("killed by SIGKILL"), :func:`exit_cell` in a table cell ("signal 9"). The table, the
executor, the reports and ``memtrack top`` all call them. :func:`deaths` gives the dead
workers as data; :func:`explain_broken_pool` is its text.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
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

    def __str__(self) -> str:
        w = self.stats
        if w is None:
            return f"slot {self.slot}: unreadable ({self.error})"
        where = f"in phase {w.phase}" if w.phase else "between phases"
        return (f"worker {w.pid} died {where} at {format_size(w.rss)} "
                f"(peak {format_size(w.peak_rss)}), {describe_worker_exit(w)}; "
                f"{w.tasks} tasks done")


def died(w: WorkerStats) -> bool:
    """Whether a readable slot tells of a death: killed, or exited with a non-zero code."""
    return w.state == "killed" or (w.state == "exited" and w.exit_code not in (None, 0))


def deaths(table: WorkerTable) -> list[Death]:
    """The workers of ``table`` that died and the slots that fail validation, in slot order."""
    found = []
    for w in table.workers(check=True):
        if w.state == "corrupt":
            found.append(Death(w.slot, w.pid or None, None, w.error))
        elif died(w):
            found.append(Death(w.slot, w.pid, w))
    return found


def explain_broken_pool(table: WorkerTable) -> str:
    """What happened to the workers that died, e.g. for a ``BrokenProcessPool`` handler:
    "worker 4711 died in phase index/parse at 1.3 GiB (peak 1.4 GiB), killed by SIGKILL"."""
    return "\n".join(map(str, deaths(table))) or NO_DEATH
