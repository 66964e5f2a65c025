"""The text report: what a person reads in a terminal (``memtrack report FILE``)."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence
from typing import Any

from .._series import evenly_spaced
from .._sizes import format_size
from ..pool.forensics import exit_cell
from ..profile.insights import Insight, Run


def seconds(t: float | None) -> str:
    """A time in a report's tables: "12.3 s", or "-" when unknown."""
    return "-" if t is None else f"{t:.1f} s"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]],
           right: Sequence[bool] | None = None) -> list[str]:
    """A plain-text table: columns padded, numbers right-aligned."""
    right = right or [False] * len(headers)
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        out = [str(c).rjust(w) if r else str(c).ljust(w)
               for c, w, r in zip(cells, widths, right, strict=True)]
        return "  " + "  ".join(out).rstrip()

    return [line(headers), "  " + "  ".join("-" * w for w in widths), *map(line, rows)]


def _phases_held(run: Run, time: float) -> str:
    counts: dict[str, int] = {}
    for pid, sample in run.at(time).items():
        if run.roles.get(pid) == "worker" and sample["phase"]:
            counts[sample["phase"]] = counts.get(sample["phase"], 0) + 1
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{name} x{n}" for name, n in ordered) or "-"


def _timeline_rows(run: Run, rows: int = 12) -> list[Any]:
    """About `rows` evenly spaced pool points, and the peak among them."""
    chosen = evenly_spaced(run.pool, rows)
    if run.peak is not None and run.peak not in chosen:
        chosen.append(run.peak)
        chosen.sort(key=lambda p: p.time)
    return chosen


def _main_rss_at(run: Run, time: float) -> int | None:
    values = [s["rss"] for pid, s in run.at(time).items() if run.roles.get(pid) == "root"]
    return sum(values) if values else None


def _death_line(d: Any) -> str:
    where = f"in phase {d.phase}" if d.phase else "between phases"
    when = f" at {d.time:.1f} s" if d.time is not None else ""
    if d.stopped_by_pool:
        return f"worker {d.pid} stopped by the pool afterwards{when} ({d.description})"
    first = "first to die: " if d.culprit else ""
    return (f"{first}worker {d.pid} died {where}{when}, {d.description}, at "
            f"{format_size(d.rss)} (peak {format_size(d.peak_rss)})"
            + (f"; {d.tasks} tasks done" if d.tasks is not None else ""))


def render_text(run: Run, found: list[Insight], name: str, *,
                sites: Sequence[Any] = ()) -> str:
    h = run.header
    out: list[str] = []
    host = h.get("host", "?")
    cpus = h.get("cpu_limit") or h.get("cpus")
    limits = h.get("limits") if isinstance(h.get("limits"), dict) else {}
    facts = [f"{run.kind}", f"host {host}"]
    if cpus:
        facts.append(f"{cpus} CPUs")
    if isinstance(limits.get("available"), int):
        facts.append(f"{format_size(limits['available'])} available")
    out.append(f"memtrack report: {name} ({', '.join(facts)})")
    command = h.get("command")
    if isinstance(command, list) and command:
        out.append(f"command: {' '.join(map(str, command))}")
    out.append(f"duration {run.duration:.1f} s, {len(run.workers)} worker"
               f"{'s' if len(run.workers) != 1 else ''} ({run.max_live} at most at once), "
               f"{sum(len(v) for v in run.samples.values())} samples")
    if run.truncated:
        out.append(f"warning: incomplete profile ({run.truncated}); reported what it holds")
    if run.skipped:
        out.append(f"warning: {run.skipped} record(s) with missing or ill-typed fields left out")
    if run.events_dropped:
        out.append(f"warning: {run.events_dropped} task event(s) dropped: a worker's ring "
                   "overflowed before the recorder read it")
    if run.deaths:
        out += ["", "Deaths (the first to die first)"]
        out += [f"  {_death_line(d)}" for d in run.deaths]

    if run.pool:
        out += ["", f"Memory timeline (pool, from {run.pool_source})"]
        rows = []
        for p in _timeline_rows(run):
            mark = " <- peak" if p is run.peak else ""
            rows.append([f"{p.time:.1f} s", str(p.live), format_size(p.pss),
                         format_size(p.rss), format_size(_main_rss_at(run, p.time)),
                         _phases_held(run, p.time) + mark])
        out += _table(["time", "live", "pool PSS", "pool RSS", "root RSS", "workers' phases"],
                      rows, [True, True, True, True, True, False])

    if run.phases:
        out += ["", "Per phase (all processes)"]
        rows = [[r.path, str(r.count), str(r.processes), f"{r.total_time:.2f} s",
                 format_size(r.max_peak_rss), format_size(r.max_peak_delta, signed=True),
                 format_size(r.mean_rss_delta, signed=True)] for r in run.phases]
        out += _table(["phase", "runs", "procs", "time", "max peak RSS", "max peak above start",
                       "mean retained"], rows, [False, True, True, True, True, True, True])

    if run.processes:
        out += ["", "Other processes (not workers: in no worker count, sizing or insight)"]
        rows = [[str(w.pid), w.role, w.state, format_size(w.max_peak_rss), format_size(w.pss),
                 exit_cell(w.exit_code, w.exit_signal)] for w in run.processes]
        out += _table(["pid", "role", "state", "peak RSS", "PSS", "exit"], rows,
                      [True, False, False, True, True, False])

    if run.workers:
        out += ["", "Per worker"]
        rows = [[str(w.pid), w.state, "-" if w.tasks is None else str(w.tasks),
                 format_size(w.rss), format_size(w.max_peak_rss), format_size(w.uss),
                 format_size(w.pss), w.phase or "-", exit_cell(w.exit_code, w.exit_signal),
                 f"{seconds(w.first_seen)} - {seconds(w.last_seen)}"] for w in run.workers]
        out += _table(["pid", "state", "tasks", "RSS", "peak RSS", "USS", "PSS", "phase", "exit",
                       "seen"], rows,
                      [True, False, True, True, True, True, True, False, False, False])

    if sites:
        from .sites import text_lines

        out += text_lines(sites, run.roles)

    out.append("")
    if run.peak is not None:
        p = run.peak
        if p.pss is not None:
            out.append(f"Pool peak: {format_size(p.pss)} PSS (shared pages counted once) at "
                       f"{p.time:.1f} s with {p.live} workers (RSS sum {format_size(p.rss)})"
                       + (", PSS estimated since its last reading" if p.pss_estimated else ""))
        else:
            out.append(f"Pool peak: {format_size(p.rss)} RSS sum (PSS not recorded) at "
                       f"{p.time:.1f} s with {p.live} workers")
        r = run.rss_peak
        if r is not None and r is not p and r.rss > p.rss:
            out.append(f"  RSS sum peaked at {format_size(r.rss)} at {r.time:.1f} s with "
                       f"{r.live} workers (PSS is read less often than RSS)")
        bounds = [q.peak_rss for q in run.pool if q.peak_rss is not None]
        if bounds:
            out.append("  workers' own peaks, summed per round: at most "
                       f"{format_size(max(bounds))}")
    elif run.peak_bytes is not None:
        out.append(f"Peak: {format_size(run.peak_bytes)} RSS (no pool timeline in this profile)")
    if run.main_peak is not None:
        out.append(f"Root process peak: {format_size(run.main_peak)} PSS (the command; "
                   "memtrack's own process is not in any figure)")

    out += ["", "Insights"]
    if not found:
        out.append("  none: nothing in this profile crossed an insight's threshold")
    for n, i in enumerate(found, 1):
        out.append(f"  {n}. [{i.severity}] {i.title}")
        for line in _wrap(i.message, 94):
            out.append(f"     {line}")
    return "\n".join(out) + "\n"


_SIZE_SPACE = re.compile(r"(\d) (B|KiB|MiB|GiB|TiB)\b")


def _wrap(text: str, width: int) -> list[str]:
    """Wrap at spaces, but never between a number and its unit ("3.1 GiB")."""
    glued = _SIZE_SPACE.sub("\\1\x00\\2", text)
    return [line.replace("\x00", " ") for line in textwrap.wrap(glued, width)] or [""]
