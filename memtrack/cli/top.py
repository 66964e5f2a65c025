"""``memtrack top [NAME]``: a live view of a worker table, refreshed twice a second.

Plain ANSI output (no dependency): per worker pid, state, phase, rss, peak, pss, tasks,
then the pool totals. ``--once`` prints one frame without escape codes, for scripts.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time

from .. import _core
from .._sizes import format_size
from ..pool.forensics import exit_cell
from ..pool.table import WorkerTable, live_tables

_COLUMNS = ("pid", "state", "rss", "peak", "pss", "tasks", "phase")


def render_frame(table: WorkerTable, *, width: int = 100, now: float | None = None) -> str:
    """One frame of the view as text: the worker rows, then the totals."""
    workers = sorted(table.workers(), key=lambda w: (w.state not in ("running", "idle"), w.slot))
    header = f"{'pid':>8} {'state':<8} {'rss':>10} {'peak':>10} {'pss':>10} {'tasks':>6}  phase"
    lines = [
        f"memtrack top  {table.name}  ({len(workers)} workers, capacity {table.capacity})",
        "",
        header,
    ]
    phase_width = max(width - len(header) + len("phase"), 10)
    for w in workers:
        if w.state in ("corrupt", "busy"):
            lines.append(f"{w.pid or '?':>8} {w.state:<8} {w.error}")
            continue
        phase = w.phase or "-"
        if w.phase_truncated:
            phase += "..."
        if len(phase) > phase_width:
            phase = "..." + phase[-(phase_width - 3) :]
        state = w.state if w.exit_signal is None else exit_cell(None, w.exit_signal)
        lines.append(
            f"{w.pid:>8} {state:<8} {format_size(w.rss):>10} {format_size(w.peak_rss):>10} "
            f"{format_size(w.pss) if w.pss else '-':>10} {w.tasks:>6}  {phase}"
        )
    t = table.totals()
    lines += ["", f"pool: {t}"]
    return "\n".join(lines)


def find_table(name: str | None) -> str:
    if name:
        return name
    tables = live_tables()
    if not tables:
        raise ValueError(
            "no live worker table of this user; pass its NAME "
            "(the WorkerTable.name, also in MEMTRACK_TABLE of its workers)"
        )
    if len(tables) > 1:
        raise ValueError("several live worker tables; pass one NAME: " + ", ".join(tables))
    return tables[0]


def add_top_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="table name (default: the single live table)")
    parser.add_argument("--once", action="store_true", help="print one frame and exit")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between frames")


def run_top_command(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise ValueError(f"--interval must be positive, not {args.interval}")
    table = WorkerTable.attach(find_table(args.name))
    try:
        if args.once or not sys.stdout.isatty():
            print(render_frame(table, width=shutil.get_terminal_size().columns))
            return 0
        while True:
            gone = not _core.segment_exists(table.name)
            frame = render_frame(table, width=shutil.get_terminal_size().columns)
            footer = "table removed by its creator: final state" if gone else "(ctrl-c to quit)"
            sys.stdout.write("\x1b[H\x1b[2J" + frame + "\n\n" + footer + "\n")
            sys.stdout.flush()
            if gone:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    finally:
        table.close()
    return 0
