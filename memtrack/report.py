"""Reports: a profile rendered as text, JSON, CSV, Prometheus exposition or one HTML page.

``render(profile, fmt)`` returns the report as a string; ``memtrack report FILE`` is the
command (:func:`add_report_arguments`, :func:`run_report_command`). What each format holds,
and the JSON schema (``memtrack/report.schema.json``), are in ``docs/report.md``.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
import math
import os
import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, TextIO

from . import __version__
from ._sizes import format_size
from .insights import Insight, Run, _find, _load, digest

__all__ = ["FORMATS", "add_report_arguments", "render", "report_data", "run_report_command"]

FORMATS = ("text", "json", "csv", "prometheus", "html")
#: The JSON report's schema identifier (bumped on an incompatible change).
SCHEMA_ID = "memtrack-report/1"
_SUFFIXES = {".txt": "text", ".json": "json", ".csv": "csv", ".prom": "prometheus",
             ".html": "html", ".htm": "html"}

# Colours for phases (Tableau 10); "no phase" is grey.
PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1",
           "#ff9da7", "#9c755f", "#bab0ac"]
#: The HTML timeline keeps at most this many points per process (the largest in each bucket,
#: so spikes survive), and at most this many phase lanes.
MAX_POINTS = 1500
MAX_LANES = 64


# --------------------------------------------------------------------------- shared pieces


def _jsonable(value: Any) -> Any:
    """Header values come from a file: keep JSON types, name anything else."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _seconds(t: float | None) -> str:
    return "-" if t is None else f"{t:.1f} s"


def _pool_value(point: Any) -> int:
    return point.pss if point.pss is not None else point.rss


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
    points = run.pool
    if len(points) <= rows:
        chosen = list(points)
    else:
        step = (len(points) - 1) / (rows - 1)
        chosen = [points[round(i * step)] for i in range(rows)]
    if run.peak is not None and run.peak not in chosen:
        chosen.append(run.peak)
        chosen.sort(key=lambda p: p.time)
    return chosen


def _main_rss_at(run: Run, time: float) -> int | None:
    values = [s["rss"] for pid, s in run.at(time).items() if run.roles.get(pid) == "main"]
    return sum(values) if values else None


def _exit(w: Any) -> str:
    if w.exit_signal:
        return f"signal {w.exit_signal}"
    if w.exit_code is not None:
        return f"code {w.exit_code}"
    return "-"


# --------------------------------------------------------------------------- text


def _text(run: Run, found: list[Insight], name: str) -> str:
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

    if run.pool:
        out += ["", f"Memory timeline (pool, from {run.pool_source})"]
        rows = []
        for p in _timeline_rows(run):
            mark = " <- peak" if p is run.peak else ""
            rows.append([f"{p.time:.1f} s", str(p.live), format_size(p.pss),
                         format_size(p.rss), format_size(_main_rss_at(run, p.time)),
                         _phases_held(run, p.time) + mark])
        out += _table(["time", "live", "pool PSS", "pool RSS", "main RSS", "workers' phases"],
                      rows, [True, True, True, True, True, False])

    if run.phases:
        out += ["", "Per phase (all processes)"]
        rows = [[r.path, str(r.count), str(r.processes), f"{r.total_time:.2f} s",
                 format_size(r.max_peak_rss), format_size(r.max_peak_delta, signed=True),
                 format_size(r.mean_rss_delta, signed=True)] for r in run.phases]
        out += _table(["phase", "runs", "procs", "time", "max peak RSS", "max peak above start",
                       "mean retained"], rows, [False, True, True, True, True, True, True])

    if run.workers:
        out += ["", "Per worker"]
        rows = [[str(w.pid), w.state, "-" if w.tasks is None else str(w.tasks),
                 format_size(w.rss), format_size(w.max_peak_rss), format_size(w.uss),
                 format_size(w.pss), w.phase or "-", _exit(w),
                 f"{_seconds(w.first_seen)} - {_seconds(w.last_seen)}"] for w in run.workers]
        out += _table(["pid", "state", "tasks", "RSS", "peak RSS", "USS", "PSS", "phase", "exit",
                       "seen"], rows,
                      [True, False, True, True, True, True, True, False, False, False])

    out.append("")
    if run.peak is not None:
        p = run.peak
        if p.pss is not None:
            out.append(f"Pool peak: {format_size(p.pss)} PSS (shared pages counted once) at "
                       f"{p.time:.1f} s with {p.live} workers (RSS sum {format_size(p.rss)})")
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
        out.append(f"Main process peak: {format_size(run.main_peak)}")

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


# --------------------------------------------------------------------------- JSON


def report_data(profile: Any, *, name: str | None = None,
                found: list[Insight] | None = None, run: Run | None = None,
                **insight_options: Any) -> dict[str, Any]:
    """The JSON report as a dict (schema ``memtrack/report.schema.json``)."""
    profile = _load(profile)
    run = run or digest(profile)
    found = found if found is not None else _find(run, profile, **insight_options)
    h = run.header

    def point(p: Any) -> dict[str, Any]:
        return {"time": round(p.time, 6), "live": p.live, "rss": p.rss, "pss": p.pss,
                "peak_rss": p.peak_rss}

    return {
        "schema": SCHEMA_ID,
        "memtrack": __version__,
        "source": {
            "file": name, "kind": run.kind, "host": _jsonable(h.get("host")),
            "pid": _jsonable(h.get("pid")), "created": _jsonable(h.get("created")),
            "memtrack": _jsonable(h.get("memtrack")), "cpus": _jsonable(h.get("cpus")),
            "cpu_limit": _jsonable(h.get("cpu_limit")),
            "interval": _jsonable(h.get("interval")),
            "peak_method": _jsonable(h.get("peak_method")),
            "limits": _jsonable(h.get("limits")) if isinstance(h.get("limits"), dict) else None,
            "command": _jsonable(h.get("command")) if isinstance(h.get("command"), list)
            else None,
            "truncated": run.truncated, "skipped_records": run.skipped,
        },
        "duration": round(run.duration, 6),
        "pool": {
            "source": run.pool_source, "max_live": run.max_live,
            "peak": point(run.peak) if run.peak is not None else None,
            "rss_peak": point(run.rss_peak) if run.rss_peak is not None else None,
            "peak_bytes": run.peak_bytes,
            "timeline": [point(p) for p in run.pool],
        },
        "main_peak": run.main_peak,
        "phases": [
            {"path": r.path, "count": r.count, "processes": r.processes,
             "total_time": r.total_time, "max_peak_rss": r.max_peak_rss,
             "max_peak_delta": r.max_peak_delta, "total_rss_delta": r.total_rss_delta,
             "mean_rss_delta": r.mean_rss_delta}
            for r in run.phases
        ],
        "workers": [
            {"pid": w.pid, "state": w.state, "tasks": w.tasks, "rss": w.rss,
             "peak_rss": w.peak_rss, "max_peak_rss": w.max_peak_rss, "uss": w.uss,
             "pss": w.pss, "phase": w.phase, "exit_code": w.exit_code,
             "exit_signal": w.exit_signal, "first_seen": w.first_seen,
             "last_seen": w.last_seen, "samples": w.samples}
            for w in run.workers
        ],
        "insights": [_jsonable(i.to_dict()) for i in found],
    }


# --------------------------------------------------------------------------- CSV


CSV_COLUMNS = ("time", "elapsed", "pid", "role", "source", "rss", "peak_rss", "pss", "uss",
               "phase")


def _csv(run: Run) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    rows = sorted((s for samples in run.samples.values() for s in samples),
                  key=lambda s: (s["time"], s["pid"]))
    t0 = run.t0 or 0.0
    for s in rows:
        writer.writerow([
            f"{s['time'] + t0:.6f}", f"{s['time']:.6f}", s["pid"],
            run.roles.get(s["pid"], "process"), s["source"], s["rss"],
            *("" if s[k] is None else s[k] for k in ("peak_rss", "pss", "uss")),
            s["phase"] or "",
        ])
    return buf.getvalue()


# --------------------------------------------------------------------------- Prometheus


def _label(value: Any) -> str:
    text = "" if value is None else str(value)
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float | int) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value)) if math.isfinite(value) else ("NaN" if math.isnan(value) else (
        "+Inf" if value > 0 else "-Inf"))


def _prometheus(run: Run, found: list[Insight], profile: Any) -> str:
    families: list[tuple[str, str, str, list[tuple[dict[str, Any], float | int]]]] = []

    def family(name: str, kind: str, help_text: str,
               samples: list[tuple[dict[str, Any], float | int]]) -> None:
        if samples:
            families.append((name, kind, help_text, samples))

    h = run.header
    family("memtrack_profile_info", "gauge",
           "The profile this report was made from (always 1; the labels say which).",
           [({"host": h.get("host"), "kind": run.kind, "memtrack": h.get("memtrack")}, 1)])
    family("memtrack_run_duration_seconds", "gauge",
           "Time from the first to the last record of the profile.", [({}, run.duration)])

    def worker_gauge(field_name: str) -> list[tuple[dict[str, Any], float | int]]:
        return [({"pid": w.pid, "phase": w.phase}, getattr(w, field_name))
                for w in run.workers if getattr(w, field_name) is not None]

    family("memtrack_worker_rss_bytes", "gauge",
           "Resident memory of each worker at its last reading, with the phase it was in.",
           worker_gauge("rss"))
    family("memtrack_worker_peak_rss_bytes", "gauge",
           "Peak resident memory of each worker over the run.", worker_gauge("max_peak_rss"))
    family("memtrack_worker_uss_bytes", "gauge",
           "Private (unique) memory of each worker at its last reading.", worker_gauge("uss"))
    family("memtrack_worker_pss_bytes", "gauge",
           "Proportional memory of each worker at its last reading (shared pages split).",
           worker_gauge("pss"))
    family("memtrack_worker_tasks_total", "counter", "Tasks each worker completed.",
           [({"pid": w.pid}, w.tasks) for w in run.workers if w.tasks is not None])
    per_worker_phase = []
    for w in getattr(profile, "workers", None) or ():
        phases = w.get("phases") if isinstance(w, dict) else None
        pid = w.get("pid") if isinstance(w, dict) else None
        if not isinstance(phases, dict) or isinstance(pid, bool) or not isinstance(pid, int):
            continue
        for path, p in sorted(phases.items(), key=lambda kv: str(kv[0])):
            peak = p.get("max_peak_rss") if isinstance(p, dict) else None
            if isinstance(path, str) and isinstance(peak, int) and not isinstance(peak, bool):
                per_worker_phase.append(({"pid": pid, "phase": path}, peak))
    family("memtrack_worker_phase_peak_rss_bytes", "gauge",
           "Peak resident memory of each worker in each phase.", per_worker_phase)

    def phase_metric(value: Callable[[Any], float | int]) -> list[tuple[dict[str, Any], Any]]:
        return [({"phase": r.path}, value(r)) for r in run.phases]

    family("memtrack_phase_runs_total", "counter", "Completed runs of each phase, all processes.",
           phase_metric(lambda r: r.count))
    family("memtrack_phase_duration_seconds_total", "counter",
           "Time spent in each phase, summed over runs and processes.",
           phase_metric(lambda r: r.total_time))
    family("memtrack_phase_peak_rss_bytes", "gauge",
           "Largest resident memory reached during each phase.",
           phase_metric(lambda r: r.max_peak_rss))
    family("memtrack_phase_peak_delta_bytes", "gauge",
           "Largest rise of resident memory above a phase's start, over its runs.",
           phase_metric(lambda r: r.max_peak_delta))
    family("memtrack_phase_retained_bytes", "gauge",
           "Mean resident memory a run of each phase kept (end minus start; may be negative).",
           phase_metric(lambda r: r.mean_rss_delta))
    if run.peak is not None:
        family("memtrack_pool_peak_rss_bytes", "gauge",
               "Sum of the workers' resident memory at the pool's peak.",
               [({}, run.peak.rss)])
        if run.peak.pss is not None:
            family("memtrack_pool_peak_pss_bytes", "gauge",
                   "Pool memory at its peak with shared pages counted once (sum of PSS).",
                   [({}, run.peak.pss)])
    family("memtrack_pool_workers_max", "gauge", "The most workers alive at once.",
           [({}, run.max_live)] if run.workers else [])
    if run.main_peak is not None:
        family("memtrack_main_peak_bytes", "gauge",
               "Peak memory of the processes that are not workers (PSS when known, else RSS).",
               [({}, run.main_peak)])
    seen = set()
    savings = []
    for i in found:
        subject = i.evidence.get("phase") if isinstance(i.evidence.get("phase"), str) else ""
        if (i.kind, subject) in seen:
            continue
        seen.add((i.kind, subject))
        savings.append(({"kind": i.kind, "severity": i.severity, "subject": subject},
                        i.estimated_savings))
    family("memtrack_insight_estimated_savings_bytes", "gauge",
           "Bytes a fix for each insight would save at the pool's peak (an estimate).", savings)

    lines = []
    for name, kind, help_text, samples in families:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{text}}} {_number(value)}" if text
                         else f"{name} {_number(value)}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- HTML


def _resource(name: str) -> str:
    return resources.files("memtrack").joinpath("_html", name).read_text(encoding="utf-8")


def _script_json(value: Any) -> str:
    """JSON safe inside <script>: no '</script>', no '<!--', no line separators."""
    text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _thin_max(rows: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """At most `limit` samples: the largest of each bucket, so a spike is never thinned away."""
    if len(rows) <= limit:
        return rows
    size = len(rows) / limit
    return [max(rows[int(i * size):max(int((i + 1) * size), int(i * size) + 1)],
                key=lambda r: r["rss"]) for i in range(limit)]


def _chart_data(run: Run) -> dict[str, Any]:
    names: list[str] = []
    index: dict[str, int] = {}

    def phase_id(name: str | None) -> int:
        if name is None:
            return -1
        if name not in index:
            index[name] = len(names)
            names.append(name)
        return index[name]

    for r in run.phases:  # stable colours: the phase table's order first
        phase_id(r.path)
    order = {"main": 0, "process": 1, "worker": 2}
    pids = sorted(run.samples, key=lambda pid: (order.get(run.roles.get(pid, "process"), 1),
                                                pid))
    processes = []
    for pid in pids:
        rows = _thin_max(run.samples[pid], MAX_POINTS)
        use_pss = False  # a worker's own line is its RSS; the pool line shows PSS
        processes.append({
            "pid": pid, "role": run.roles.get(pid, "process"),
            "points": [[round(r["time"], 3), r["pss"] if use_pss else r["rss"],
                        phase_id(r["phase"])] for r in rows],
        })
    pool = run.pool
    if len(pool) > MAX_POINTS:
        step = len(pool) / MAX_POINTS
        pool = [max(pool[int(i * step):max(int((i + 1) * step), int(i * step) + 1)],
                    key=_pool_value) for i in range(MAX_POINTS)]
    lanes_pids: list[int] = []
    for interval in run.intervals:
        if interval.pid not in lanes_pids:
            lanes_pids.append(interval.pid)
    lanes_pids.sort(key=lambda pid: (order.get(run.roles.get(pid, "process"), 1), pid))
    lanes_pids = lanes_pids[:MAX_LANES]
    lane_of = {pid: f"{run.roles.get(pid, 'process')} {pid}" for pid in lanes_pids}
    intervals = [[lane_of[i.pid], round(i.start, 3), round(i.end, 3), phase_id(i.phase)]
                 for i in run.intervals if i.pid in lane_of]
    return {
        "duration": run.duration,
        "phases": names,
        "palette": PALETTE,
        "processes": processes,
        "pool": {
            "source": run.pool_source,
            "rss": [[round(p.time, 3), p.rss] for p in pool],
            "pss": [[round(p.time, 3), p.pss] for p in pool if p.pss is not None],
        },
        "peak": ({"time": run.peak.time, "bytes": _pool_value(run.peak)}
                 if run.peak is not None else None),
        "lanes": [lane_of[pid] for pid in lanes_pids],
        "lanes_hidden": max(0, len({i.pid for i in run.intervals}) - len(lanes_pids)),
        "intervals": intervals,
        "phase_bars": [{"path": r.path, "peak_delta": r.max_peak_delta,
                        "retained": r.mean_rss_delta, "peak_rss": r.max_peak_rss}
                       for r in run.phases],
    }


def _e(value: Any) -> str:
    return html.escape("-" if value is None else str(value))


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                numeric: Sequence[bool], row_class: Sequence[str] | None = None) -> str:
    head = "".join(f'<th class="{"num" if n else ""}">{_e(h)}</th>'
                   for h, n in zip(headers, numeric, strict=True))
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_class[i]}"' if row_class and row_class[i] else ""
        cells = "".join(f'<td class="{"num" if n else ""}">{_e(c)}</td>'
                        for c, n in zip(row, numeric, strict=True))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _html(run: Run, found: list[Insight], name: str) -> str:
    h = run.header
    cards = []
    if run.peak is not None:
        measure = "PSS" if run.peak.pss is not None else "RSS sum"
        cards.append(("Pool peak", format_size(_pool_value(run.peak)),
                      f"{measure} at {run.peak.time:.1f} s, {run.peak.live} workers"))
        r = run.rss_peak
        if r is not None and r is not run.peak and r.rss > run.peak.rss:
            cards.append(("Pool RSS sum peak", format_size(r.rss),
                          f"at {r.time:.1f} s (PSS is read less often)"))
    elif run.peak_bytes is not None:
        cards.append(("Peak", format_size(run.peak_bytes), "largest phase peak (RSS)"))
    cards.append(("Workers", str(len(run.workers)), f"{run.max_live} at most at once"))
    cards.append(("Duration", f"{run.duration:.1f} s",
                  f"{sum(len(v) for v in run.samples.values())} samples"))
    best = max(found, key=lambda i: i.estimated_savings, default=None)
    if best is not None and best.estimated_savings > 0:
        cards.append(("Largest estimated saving", format_size(best.estimated_savings),
                      best.kind.replace("_", " ")))
    cards_html = "".join(
        f'<div class="card"><div class="label">{_e(a)}</div><div class="value">{_e(b)}</div>'
        f'<div class="note">{_e(c)}</div></div>' for a, b, c in cards)

    if found:
        items = []
        for i in found:
            evidence = json.dumps(_jsonable(i.evidence), indent=2)
            items.append(
                f'<li class="insight {_e(i.severity)}"><div class="title">'
                f'<span class="badge">{_e(i.severity)}</span> {_e(i.title)}</div>'
                f"<p>{_e(i.message)}</p><details><summary>evidence</summary>"
                f"<pre>{_e(evidence)}</pre></details></li>")
        insights_html = f'<ol class="insights">{"".join(items)}</ol>'
    else:
        insights_html = "<p>None: nothing in this profile crossed an insight's threshold.</p>"

    phase_table = _html_table(
        ["phase", "runs", "processes", "time", "max peak RSS", "max peak above start",
         "mean retained"],
        [[r.path, r.count, r.processes, f"{r.total_time:.2f} s", format_size(r.max_peak_rss),
          format_size(r.max_peak_delta, signed=True), format_size(r.mean_rss_delta, signed=True)]
         for r in run.phases],
        [False, True, True, True, True, True, True]) if run.phases else "<p>No phases.</p>"
    worker_table = _html_table(
        ["pid", "state", "tasks", "RSS", "peak RSS", "USS", "PSS", "phase", "exit", "seen"],
        [[w.pid, w.state, w.tasks, format_size(w.rss), format_size(w.max_peak_rss),
          format_size(w.uss), format_size(w.pss), w.phase, _exit(w),
          f"{_seconds(w.first_seen)} - {_seconds(w.last_seen)}"] for w in run.workers],
        [True, False, True, True, True, True, True, False, False, False],
        ["bad" if w.state == "killed" or w.exit_signal else "" for w in run.workers],
    ) if run.workers else "<p>No workers in this profile.</p>"

    facts = [run.kind, f"host {h.get('host', '?')}"]
    cpus = h.get("cpu_limit") or h.get("cpus")
    if cpus:
        facts.append(f"{cpus} CPUs")
    limits = h.get("limits") if isinstance(h.get("limits"), dict) else {}
    if isinstance(limits.get("available"), int):
        facts.append(f"{format_size(limits['available'])} available")
    warnings = []
    if run.truncated:
        warnings.append(f"Incomplete profile ({run.truncated}); this reports what it holds.")
    if run.skipped:
        warnings.append(f"{run.skipped} record(s) with missing or ill-typed fields left out.")
    data = _chart_data(run)
    lanes_height = 50 + 22 * max(1, len(data["lanes"]))
    values = {
        "TITLE": _e(f"memtrack report: {name}"),
        "NAME": _e(name),
        "FACTS": _e(", ".join(facts)),
        "WARNINGS": "".join(f'<p class="notice">{_e(w)}</p>' for w in warnings),
        "CARDS": cards_html,
        "INSIGHTS": insights_html,
        "PHASE_TABLE": phase_table,
        "WORKER_TABLE": worker_table,
        "LANES_HEIGHT": str(lanes_height),
        "VERSION": _e(__version__),
        "DATA": _script_json(data),
        "CHART_JS": _resource("chart.min.js"),
        "APP_JS": _resource("report.js"),
    }
    # One pass, so text inside a substituted value is never substituted again.
    return re.sub(r"\{\{([A-Z_]+)\}\}", lambda m: values[m.group(1)], _resource("report.html"))


# --------------------------------------------------------------------------- entry points


def render(profile: Any, fmt: str = "text", *, name: str | None = None,
           **insight_options: Any) -> str:
    """The report of ``profile`` (a :class:`memtrack.Profile` or a path) in ``fmt``:
    "text", "json", "csv", "prometheus" or "html".

    ``insight_options`` (``available``, ``cpus``, ``headroom``) go to
    :func:`memtrack.insights.insights`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown report format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if name is None:
        name = os.fspath(profile) if isinstance(profile, (str, os.PathLike)) else "profile"
    profile = _load(profile)
    run = digest(profile)
    if fmt == "csv":
        return _csv(run)
    found = _find(run, profile, **insight_options)
    if fmt == "text":
        return _text(run, found, name)
    if fmt == "json":
        data = report_data(profile, name=name, found=found, run=run)
        return json.dumps(data, indent=2, allow_nan=False) + "\n"
    if fmt == "prometheus":
        return _prometheus(run, found, profile)
    return _html(run, found, name)


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``memtrack report``."""
    parser.add_argument("file", metavar="FILE", help="a profile (memtrack record / dump)")
    parser.add_argument("--format", "-f", choices=FORMATS, default=None,
                        help="output format (default: from the -o suffix, else text)")
    parser.add_argument("-o", "--output", metavar="OUT",
                        help="write the report here instead of standard output")
    parser.add_argument("--available", metavar="SIZE",
                        help="size the worker-count insight for this much memory, e.g. '16 GB' "
                             "(default: the recording host's)")
    parser.add_argument("--cpus", type=int, metavar="N",
                        help="size the worker-count insight for N CPUs (default: the "
                             "recording host's)")
    parser.add_argument("--headroom", type=float, default=0.0, metavar="F",
                        help="fraction of available memory to keep free when sizing, in [0, 1)")


def run_report_command(args: argparse.Namespace, *, out: TextIO | None = None,
                       err: TextIO | None = None) -> int:
    """``memtrack report``: 0 on success, 2 when the file or an option is bad."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    from . import _core
    from .profile import load

    fmt = getattr(args, "format", None)
    output = getattr(args, "output", None)
    if fmt is None:
        suffix = os.path.splitext(output)[1].lower() if output else ""
        fmt = _SUFFIXES.get(suffix, "text")
    options = {"available": getattr(args, "available", None),
               "cpus": getattr(args, "cpus", None),
               "headroom": getattr(args, "headroom", 0.0)}
    try:
        profile = load(args.file, partial=True)
        if profile.truncated:
            print(f"memtrack report: warning: {args.file} is incomplete ({profile.truncated});"
                  " reporting what it holds", file=err)
        text = render(profile, fmt, name=os.fspath(args.file), **options)
    except (OSError, ValueError, TypeError, _core.ProfileError) as exc:
        print(f"memtrack report: error: {exc}", file=err)
        return 2
    if output:
        try:
            with open(output, "w", encoding="utf-8", newline="") as f:
                f.write(text)
        except OSError as exc:
            print(f"memtrack report: error: cannot write {output}: {exc}", file=err)
            return 2
        print(f"memtrack report: wrote {fmt} to {output}", file=err)
    else:
        out.write(text)
    return 0
