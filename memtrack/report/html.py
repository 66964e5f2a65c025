"""The HTML report: one self-contained page (charts inlined from ``assets/``)."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Sequence
from importlib import resources
from typing import Any

from .. import __version__
from .._series import bucket_max
from .._sizes import format_size
from ..pool.forensics import exit_cell
from ..profile.insights import Insight, Run
from .formats import jsonable
from .text import seconds

# Colours for phases (Tableau 10); "no phase" is grey.
PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1",
           "#ff9da7", "#9c755f", "#bab0ac"]
#: The HTML timeline keeps at most this many points per process (the largest in each bucket,
#: so spikes survive), and at most this many phase lanes.
MAX_POINTS = 1500
MAX_LANES = 64


def _pool_value(point: Any) -> int:
    return point.pss if point.pss is not None else point.rss


def _resource(name: str) -> str:
    return resources.files(__package__).joinpath("assets", name).read_text(encoding="utf-8")


def _script_json(value: Any) -> str:
    """JSON safe inside <script>: no '</script>', no '<!--', no line separators."""
    text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


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
    order = {"root": 0, "helper": 1, "other": 1, "worker": 2}
    pids = sorted(run.samples, key=lambda pid: (order.get(run.roles.get(pid, "other"), 1),
                                                pid))
    processes = []
    for pid in pids:
        rows = bucket_max(run.samples[pid], MAX_POINTS, key=lambda r: r["rss"])
        use_pss = False  # a worker's own line is its RSS; the pool line shows PSS
        processes.append({
            "pid": pid, "role": run.roles.get(pid, "other"),
            "points": [[round(r["time"], 3), r["pss"] if use_pss else r["rss"],
                        phase_id(r["phase"])] for r in rows],
        })
    pool = bucket_max(run.pool, MAX_POINTS, key=_pool_value)
    lanes_pids: list[int] = []
    for interval in run.intervals:
        if interval.pid not in lanes_pids:
            lanes_pids.append(interval.pid)
    lanes_pids.sort(key=lambda pid: (order.get(run.roles.get(pid, "other"), 1), pid))
    lanes_pids = lanes_pids[:MAX_LANES]
    lane_of = {pid: f"{run.roles.get(pid, 'other')} {pid}" for pid in lanes_pids}
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


def _alloc_parts(run: Run, sites: Sequence[Any]) -> tuple[str, str]:
    """The allocation section (top sites, flame graph) and its scripts; empty without sites."""
    if not sites:
        return "", ""
    from .sites import TOP_SITES, flame_tree, top_by

    total = sum(s.allocated for s in sites)
    tables = []
    for phase_path, group in top_by(sites, "phase", TOP_SITES).items():
        whole = sum(s.allocated for s in sites if s.phase == phase_path)
        tables.append(f"<h3>phase {_e(phase_path or '(no phase)')}: ~{_e(format_size(whole))} "
                      "allocated</h3>")
        tables.append(_html_table(
            ["allocated", "share", "retained", "allocations", "samples", "site", "called from",
             "processes"],
            [[format_size(r["allocated"]), f"{100 * r['allocated'] / whole:.0f}%" if whole
              else "-", format_size(r["retained"]), r["allocations"], r["samples"],
              r["location"], str(r["frames"][1]) if len(r["frames"]) > 1 else "",
              len(r["pids"])] for r in group],
            [True, True, True, True, True, False, False, True]))
    section = (
        '<section>\n  <h2>Allocation sites</h2>\n'
        f'  <p class="note-small">Sampled by bytes: ~{_e(format_size(total))} allocated in '
        f'{sum(s.samples for s in sites)} samples from {len({s.pid for s in sites})} '
        'process(es). Each box of the flame graph is a Python frame, below it its callers, up '
        'to its phase; its width is the estimated bytes allocated there (click to zoom). '
        'Estimates from few samples are rough: see the samples column.</p>\n'
        '  <div class="legend"><label><input type="radio" name="flame-measure" value="allocated" '
        'checked> allocated</label> <label><input type="radio" name="flame-measure" '
        'value="retained"> retained at the end</label></div>\n'
        '  <div id="flame" class="flame"></div>\n'
        '  <div id="flame-details" class="note-small"></div>\n'
        f'  {"".join(tables)}\n</section>')
    data = {"allocated": flame_tree(sites, "allocated"), "retained": flame_tree(sites, "retained")}
    scripts = (
        f'<script type="application/json" id="memtrack-flame">{_script_json(data)}</script>\n'
        f"<script>{_resource('d3.min.js')}</script>\n"
        f"<script>{_resource('d3-flamegraph.min.js')}</script>\n"
        f"<script>{_resource('flame.js')}</script>")
    return section, scripts


def render_html(run: Run, found: list[Insight], name: str, *,
                sites: Sequence[Any] = ()) -> str:
    h = run.header
    cards = []
    if run.deaths:
        # What broke the pool comes first: the first worker to die, and how.
        first = run.deaths[0]
        stopped = sum(d.stopped_by_pool for d in run.deaths)
        others = len(run.deaths) - 1 - stopped
        where = f"in {first.phase}" if first.phase else "between phases"
        count = "1" + (f" + {others} more" if others else "") + (
            f" + {stopped} stopped by the pool" if stopped else "")
        cards.append(("Deaths", count,
                      f"first: worker {first.pid} {where}, {first.description}, at "
                      f"{format_size(first.rss)}"))
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
    if run.main_peak is not None:
        cards.append(("Root peak", format_size(run.main_peak), "the command's PSS"))
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
            evidence = json.dumps(jsonable(i.evidence), indent=2)
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
    # The dead first, the first to die at the top; a bystander is marked as one.
    death_of = {d.pid: d for d in run.deaths}
    rank = {d.pid: i for i, d in enumerate(run.deaths)}
    workers = sorted(run.workers, key=lambda w: rank.get(w.pid, len(rank)))

    def end(w: Any) -> str:
        d = death_of.get(w.pid)
        cell = exit_cell(w.exit_code, w.exit_signal)
        if d is None:
            return cell
        tag = ("OOM kill, first to die" if d.culprit and d.how == "oom" else
               "first to die" if d.culprit else "stopped by the pool" if d.stopped_by_pool
               else "died")
        return f"{cell} ({tag})"

    worker_table = _html_table(
        ["pid", "state", "tasks", "RSS", "peak RSS", "USS", "PSS", "phase", "exit", "seen"],
        [[w.pid, w.state, w.tasks, format_size(w.rss), format_size(w.max_peak_rss),
          format_size(w.uss), format_size(w.pss), w.phase, end(w),
          f"{seconds(w.first_seen)} - {seconds(w.last_seen)}"] for w in workers],
        [True, False, True, True, True, True, True, False, False, False],
        ["bad" if (d := death_of.get(w.pid)) is not None and not d.stopped_by_pool
         else "" for w in workers],
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
    alloc_section, alloc_scripts = _alloc_parts(run, sites)
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
        "ALLOC_SECTION": alloc_section,
        "ALLOC_SCRIPTS": alloc_scripts,
    }
    # One pass, so text inside a substituted value is never substituted again.
    return re.sub(r"\{\{([A-Z_]+)\}\}", lambda m: values[m.group(1)], _resource("report.html"))
