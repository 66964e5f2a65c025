"""Reports: a profile rendered as text, JSON, CSV, Prometheus exposition or one HTML page.

``render(profile, fmt)`` returns the report as a string; ``memtrack report FILE`` is the
command (:mod:`memtrack.cli.report`). What each format holds, and the JSON schema
(``memtrack/report/report.schema.json``), are in ``docs/report.md``. One module per
audience: :mod:`.text` for people, :mod:`.formats` for machines, :mod:`.html` for a browser.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..profile.insights import as_profile, digest, find_insights
from .formats import SCHEMA_ID, render_csv, render_prometheus, report_data
from .html import render_html
from .sites import speedscope
from .text import render_text

__all__ = ["FORMATS", "SCHEMA_ID", "render", "report_data"]

FORMATS = ("text", "json", "csv", "prometheus", "html", "speedscope")


def render(profile: Any, fmt: str = "text", *, name: str | None = None,
           **insight_options: Any) -> str:
    """The report of ``profile`` (a :class:`memtrack.Profile` or a path) in ``fmt``:
    "text", "json", "csv", "prometheus", "html" or "speedscope" (the allocation sites as
    a speedscope file, https://www.speedscope.app).

    ``insight_options`` (``available``, ``cpus``, ``headroom``) go to
    :func:`memtrack.insights`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown report format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if name is None:
        name = os.fspath(profile) if isinstance(profile, (str, os.PathLike)) else "profile"
    profile = as_profile(profile)
    run = digest(profile)
    if fmt == "speedscope":
        return json.dumps(speedscope(profile.sites, name, run.roles), allow_nan=False) + "\n"
    if fmt == "csv":
        return render_csv(run)
    found = find_insights(run, profile, **insight_options)
    if fmt == "text":
        return render_text(run, found, name, sites=profile.sites)
    if fmt == "json":
        data = report_data(profile, name=name, found=found, run=run)
        return json.dumps(data, indent=2, allow_nan=False) + "\n"
    if fmt == "prometheus":
        return render_prometheus(run, found, profile)
    return render_html(run, found, name, sites=profile.sites)
