"""``/metrics``: a reading in the Prometheus text exposition format.

The metric names and labels are the report's (``memtrack report --format prometheus``,
docs/report.md) where they mean the same thing, so one dashboard reads both; the live
families (``memtrack_workers``, ``memtrack_pool_*_bytes``, ``memtrack_table_up``) are
added. The text itself is written by the report's writer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import __version__
from ..report.formats import exposition, label_text, label_value
from .source import STATES, UNREAD, Reading

Samples = list[tuple[dict[str, Any] | str, float | int]]
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def phase_totals(workers: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per phase path, over all workers: runs, time, largest peak and rise, kept memory."""
    out: dict[str, dict[str, Any]] = {}
    for w in workers:
        for path, s in w["phases"].items():
            t = out.get(path)
            if t is None:
                out[path] = dict(s)
                continue
            t["count"] += s["count"]
            t["total_time"] += s["total_time"]
            t["total_rss_delta"] += s["total_rss_delta"]
            t["max_peak_rss"] = max(t["max_peak_rss"], s["max_peak_rss"])
            t["max_peak_delta"] = max(t["max_peak_delta"], s["max_peak_delta"])
    return out


def render_metrics(reading: Reading, *, source_name: str, kind: str,
                   labels: Callable[[dict[str, Any]], dict[str, Any]]) -> str:
    """The exposition text of one reading (every family has HELP and TYPE)."""
    families: list[tuple[str, str, str, Samples]] = []

    def family(name: str, type_: str, help_text: str, samples: Samples) -> None:
        if samples:
            families.append((name, type_, help_text, samples))

    workers = reading.workers
    family("memtrack_table_info", "gauge",
           "The source this server reads (always 1; the labels say which).",
           [({"source": kind, "name": source_name, "memtrack": __version__}, 1)])
    family("memtrack_table_up", "gauge",
           "1 while the source is updated, 0 once it is gone (the values are its final state).",
           [({}, 0 if reading.gone else 1)])
    counts = dict.fromkeys(STATES, 0)
    for w in workers:
        counts[w["state"]] = counts.get(w["state"], 0) + 1
    family("memtrack_workers", "gauge", "Workers in each state.",
           [({"state": s}, n) for s, n in counts.items()])
    t = reading.totals
    family("memtrack_pool_rss_bytes", "gauge",
           "Sum of the live workers' resident memory (shared pages counted once per worker).",
           [({}, t["rss"])])
    family("memtrack_pool_pss_bytes", "gauge",
           "Sum of the live workers' proportional memory (shared pages counted once).",
           [({}, t["pss"])])
    family("memtrack_pool_uss_bytes", "gauge", "Sum of the live workers' private memory.",
           [({}, t["uss"])])
    family("memtrack_pool_memory_bytes", "gauge",
           "The pool's memory: each live worker's PSS, or its RSS until its first PSS reading.",
           [({}, t["memory"])])
    family("memtrack_pool_worker_peak_rss_bytes", "gauge",
           "The largest peak resident memory of any worker, dead ones included.",
           [({}, t["peak_rss"])])

    readable = [w for w in workers if w["state"] not in UNREAD]
    # Each worker's label text is made once per scrape, not once per family.
    own = [label_text(labels(w)) for w in readable]
    in_phase = [f'{base},phase="{label_value(w["phase"] or "")}"'
                for base, w in zip(own, readable, strict=True)]

    def per_worker(key: str, with_phase: bool = True) -> Samples:
        texts = in_phase if with_phase else own
        return [(text, w[key]) for text, w in zip(texts, readable, strict=True)
                if w[key] is not None]

    family("memtrack_worker_rss_bytes", "gauge",
           "Resident memory of each worker at its last reading, with the phase it was in.",
           per_worker("rss"))
    family("memtrack_worker_peak_rss_bytes", "gauge",
           "Peak resident memory of each worker since it joined.", per_worker("peak_rss"))
    family("memtrack_worker_uss_bytes", "gauge",
           "Private (unique) memory of each worker at its last reading (0 before the first).",
           per_worker("uss"))
    family("memtrack_worker_pss_bytes", "gauge",
           "Proportional memory of each worker at its last reading (0 before the first).",
           per_worker("pss"))
    family("memtrack_worker_tasks_total", "counter", "Tasks each worker completed.",
           per_worker("tasks", with_phase=False))
    family("memtrack_worker_alive", "gauge",
           "1 while a worker is alive (idle or running), 0 once it exited or was killed.",
           [(text, 1 if w["state"] in ("idle", "running") else 0)
            for text, w in zip(own, readable, strict=True)])
    family("memtrack_worker_phase_peak_rss_bytes", "gauge",
           "Peak resident memory of each worker in each phase.",
           [(f'{text},phase="{label_value(path)}"', s["max_peak_rss"])
            for text, w in zip(own, readable, strict=True)
            for path, s in sorted(w["phases"].items())])

    phases = sorted(phase_totals(readable).items())
    family("memtrack_phase_runs_total", "counter", "Completed runs of each phase, all workers.",
           [({"phase": p}, s["count"]) for p, s in phases])
    family("memtrack_phase_duration_seconds_total", "counter",
           "Time spent in each phase, summed over runs and workers.",
           [({"phase": p}, float(s["total_time"])) for p, s in phases])
    family("memtrack_phase_peak_rss_bytes", "gauge",
           "Largest resident memory reached during each phase.",
           [({"phase": p}, s["max_peak_rss"]) for p, s in phases])
    family("memtrack_phase_peak_delta_bytes", "gauge",
           "Largest rise of resident memory above a phase's start, over its runs.",
           [({"phase": p}, s["max_peak_delta"]) for p, s in phases])
    family("memtrack_phase_retained_bytes", "gauge",
           "Mean resident memory a run of each phase kept (end minus start; may be negative).",
           [({"phase": p}, s["total_rss_delta"] / s["count"]) for p, s in phases if s["count"]])
    return exposition(families)
