"""The plugin's allocation report: a failing test shows where it allocated.

When allocation tracking runs in the test process (``MEMTRACK_ALLOCATIONS=1``, or
``memtrack.allocations.start()`` in a conftest), the sampled sites are read before and after
each test's call; a test that fails gets a report section "memtrack allocation sites" with
the sites that allocated the most during its body (estimated bytes, retained bytes, the
line and its caller). A test that passes costs two reads of the site table, nothing else.
"""

from __future__ import annotations

from typing import Any

from .. import _core
from .._sizes import format_size

TOP = 10
SECTION = "memtrack allocation sites"

_Key = tuple[str, bool, tuple[tuple[str, int, str], ...]]


def totals() -> dict[_Key, tuple[float, float, int]] | None:
    """{(phase, overflow, frames): (allocated, retained, samples)} now; None when off."""
    if not _core.alloc_counters()["running"]:
        return None
    out = {}
    for path, frames, samples, nbytes, _count, live, _live_n, overflow in _core.alloc_sites():
        out[(path, overflow, frames)] = (nbytes, live, samples)
    return out


def section(before: dict[_Key, tuple[float, float, int]] | None) -> str | None:
    """The report section for a test that failed: its top sites since `before`."""
    after = totals()
    if before is None or after is None:
        return None
    grown = []
    for key, (nbytes, live, samples) in after.items():
        b = before.get(key, (0.0, 0.0, 0))
        if samples > b[2]:
            grown.append((nbytes - b[0], live - b[1], samples - b[2], key))
    if not grown:
        return "no allocation was sampled during the test body"
    grown.sort(key=lambda g: -g[0])
    total = sum(g[0] for g in grown)
    lines = [f"~{format_size(round(total))} allocated during the test body "
             f"({sum(g[2] for g in grown)} samples); the top sites:"]
    for nbytes, live, samples, (path, overflow, frames) in grown[:TOP]:
        where = _where(frames, overflow)
        caller = f"  <- {_frame(frames[1])}" if len(frames) > 1 else ""
        phase = f"  [phase {path}]" if path else ""
        lines.append(f"  {format_size(round(nbytes)):>10} allocated  "
                     f"{format_size(max(round(live), 0)):>10} retained  {samples:>4} samples  "
                     f"{where}{caller}{phase}")
    return "\n".join(lines)


def _frame(f: Any) -> str:
    return f"{f[0]}:{f[1]} {f[2]}"


def _where(frames: Any, overflow: bool) -> str:
    if overflow:
        return "(site table full)"
    return _frame(frames[0]) if frames else "(no Python frame)"
