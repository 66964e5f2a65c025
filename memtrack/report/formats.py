"""The machine formats of a report: JSON (:func:`report_data`, schema
``memtrack/report/report.schema.json``), CSV of every sample, Prometheus exposition."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from typing import Any

from .. import __version__
from ..profile.insights import Insight, Run, as_profile, digest, find_insights

#: The JSON report's schema identifier (bumped on an incompatible change).
SCHEMA_ID = "memtrack-report/1"


def jsonable(value: Any) -> Any:
    """Header values come from a file: keep JSON types, name anything else."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def report_data(profile: Any, *, name: str | None = None,
                found: list[Insight] | None = None, run: Run | None = None,
                **insight_options: Any) -> dict[str, Any]:
    """The JSON report as a dict (schema ``memtrack/report.schema.json``)."""
    profile = as_profile(profile)
    run = run or digest(profile)
    found = found if found is not None else find_insights(run, profile, **insight_options)
    h = run.header

    def point(p: Any) -> dict[str, Any]:
        return {"time": round(p.time, 6), "live": p.live, "rss": p.rss, "pss": p.pss,
                "peak_rss": p.peak_rss}

    return {
        "schema": SCHEMA_ID,
        "memtrack": __version__,
        "source": {
            "file": name, "kind": run.kind, "host": jsonable(h.get("host")),
            "pid": jsonable(h.get("pid")), "created": jsonable(h.get("created")),
            "memtrack": jsonable(h.get("memtrack")), "cpus": jsonable(h.get("cpus")),
            "cpu_limit": jsonable(h.get("cpu_limit")),
            "interval": jsonable(h.get("interval")),
            "peak_method": jsonable(h.get("peak_method")),
            "limits": jsonable(h.get("limits")) if isinstance(h.get("limits"), dict) else None,
            "command": jsonable(h.get("command")) if isinstance(h.get("command"), list)
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
        "insights": [jsonable(i.to_dict()) for i in found],
    }


# --------------------------------------------------------------------------- CSV


CSV_COLUMNS = ("time", "elapsed", "pid", "role", "source", "rss", "peak_rss", "pss", "uss",
               "phase")


def render_csv(run: Run) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    rows = sorted((s for samples in run.samples.values() for s in samples),
                  key=lambda s: (s["time"], s["pid"]))
    t0 = run.t0 or 0.0
    for s in rows:
        writer.writerow([
            f"{s['time'] + t0:.6f}", f"{s['time']:.6f}", s["pid"],
            run.roles.get(s["pid"], "other"), s["source"], s["rss"],
            *("" if s[k] is None else s[k] for k in ("peak_rss", "pss", "uss")),
            s["phase"] or "",
        ])
    return buf.getvalue()


# --------------------------------------------------------------------------- Prometheus


def label_value(value: Any) -> str:
    text = "" if value is None else str(value)
    if "\\" in text or "\n" in text or '"' in text:
        return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return text


def label_text(labels: dict[str, Any]) -> str:
    """``k="v",...`` with each value escaped: a label set rendered once, for reuse."""
    return ",".join(f'{k}="{label_value(v)}"' for k, v in labels.items())


def _number(value: float | int) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value)) if math.isfinite(value) else ("NaN" if math.isnan(value) else (
        "+Inf" if value > 0 else "-Inf"))


def render_prometheus(run: Run, found: list[Insight], profile: Any) -> str:
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

    return exposition(families)


def exposition(families: Sequence[tuple[str, str, str,
                                        Sequence[tuple[dict[str, Any] | str, float | int]]]]
               ) -> str:
    """The Prometheus text exposition of ``(name, type, help, [(labels, value)])`` families:
    the writer of this report and of ``memtrack serve``'s ``/metrics``. ``labels`` is a
    dict, or the text :func:`label_text` made of one (a live scrape renders each worker's
    labels once, not once per family)."""
    lines: list[str] = []
    append = lines.append
    for name, kind, help_text, samples in families:
        append(f"# HELP {name} {help_text}")
        append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            text = labels if isinstance(labels, str) else label_text(labels)
            number = str(value) if type(value) is int else _number(value)
            append(f"{name}{{{text}}} {number}" if text else f"{name} {number}")
    return "\n".join(lines) + "\n"
