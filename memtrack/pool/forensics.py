"""Forensics: what happened to a pool's workers, from the slots they left behind."""

from __future__ import annotations

import signal

from .._sizes import format_size
from .table import WorkerStats, WorkerTable


def describe_exit(w: WorkerStats) -> str:
    """How a worker ended, in words: "killed by SIGKILL", "exited with code 3"."""
    if w.exit_signal is not None:
        try:
            return f"killed by {signal.Signals(w.exit_signal).name}"
        except ValueError:
            return f"killed by signal {w.exit_signal}"
    if w.exit_code is not None:
        return f"exited with code {w.exit_code}"
    if w.state == "killed":
        return "killed (without running its exit handlers: a signal, the OOM killer or a crash)"
    return "exited"


def explain_broken_pool(table: WorkerTable) -> str:
    """What happened to the workers that died, e.g. for a ``BrokenProcessPool`` handler:
    "worker 4711 died in phase index/parse at 1.3 GiB (peak 1.4 GiB), killed by SIGKILL"."""
    lines = []
    for w in table.workers(check=True):
        if w.state == "corrupt":
            lines.append(f"slot {w.slot}: unreadable ({w.error})")
            continue
        if w.state == "killed" or (w.state == "exited" and w.exit_code not in (None, 0)):
            where = f"in phase {w.phase}" if w.phase else "between phases"
            lines.append(
                f"worker {w.pid} died {where} at {format_size(w.rss)} "
                f"(peak {format_size(w.peak_rss)}), {describe_exit(w)}; "
                f"{w.tasks} tasks done"
            )
    if not lines:
        return "no worker of this table died"
    return "\n".join(lines)
