"""Allocation sites in reports: top-N tables, the flame graph's tree, speedscope export.

The sites come from a profile's ``site`` records (:class:`memtrack.AllocationSite`), one per
call stack, phase and process (docs/allocations.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from .. import __version__
from .._alloc import AllocationSite
from .._sizes import format_size

#: Sites shown per phase and per worker in the text report.
TOP_SITES = 10
#: Nodes of the HTML flame graph: the largest stacks first, the rest merged into "(other)".
MAX_STACKS = 2000
SPEEDSCOPE_SCHEMA = "https://www.speedscope.app/file-format-schema.json"


def merge(sites: Iterable[AllocationSite]) -> list[dict[str, Any]]:
    """Sites of one phase with the same line and caller (the two frames a table shows)
    summed, over deeper callers and over processes; largest first."""
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for s in sites:
        key = (s.phase, s.overflow, s.frames[:2])
        row = merged.setdefault(key, {"phase": s.phase, "location": s.location,
                                      "frames": s.frames, "allocated": 0, "allocations": 0,
                                      "retained": 0, "samples": 0, "pids": set()})
        row["allocated"] += s.allocated
        row["allocations"] += s.allocations
        row["retained"] += s.retained
        row["samples"] += s.samples
        row["pids"].add(s.pid)
    return sorted(merged.values(), key=lambda r: (-r["allocated"], r["location"]))


def top_by(sites: Sequence[AllocationSite], field: str, n: int = TOP_SITES
           ) -> dict[Any, list[dict[str, Any]]]:
    """{phase path or pid: its top `n` merged sites}, the groups largest first."""
    groups: dict[Any, list[AllocationSite]] = {}
    for s in sites:
        groups.setdefault(getattr(s, field), []).append(s)
    ranked = sorted(groups.items(),
                    key=lambda kv: (-sum(s.allocated for s in kv[1]), str(kv[0])))
    return {key: merge(group)[:n] for key, group in ranked}


def _caller(frames: Sequence[Any]) -> str:
    return str(frames[1]) if len(frames) > 1 else ""


def text_lines(sites: Sequence[AllocationSite], roles: dict[int, str], *,
               n: int = TOP_SITES) -> list[str]:
    """The text report's allocation section (empty without sites)."""
    from .text import _table

    if not sites:
        return []
    total = sum(s.allocated for s in sites)
    retained = sum(s.retained for s in sites)
    samples = sum(s.samples for s in sites)
    out = ["", f"Allocation sites (sampled: {samples} samples, ~{format_size(total)} "
               f"allocated, ~{format_size(retained)} still live at the end)"]
    headers = ["allocated", "share", "retained", "allocs", "samples", "site", "called from"]
    right = [True, True, True, True, True, False, False]

    def rows(group: list[dict[str, Any]], whole: int) -> list[list[str]]:
        return [[format_size(r["allocated"]), f"{100 * r['allocated'] / whole:.0f}%" if whole
                 else "-", format_size(r["retained"]), str(r["allocations"]), str(r["samples"]),
                 r["location"], _caller(r["frames"])] for r in group]

    for phase, group in top_by(sites, "phase", n).items():
        whole = sum(s.allocated for s in sites if s.phase == phase)
        out += ["", f"  phase {phase or '(no phase)'}: ~{format_size(whole)} allocated"]
        out += _table(headers, rows(group, whole), right)
    pids = {s.pid for s in sites}
    if len(pids) > 1:
        for pid, group in top_by(sites, "pid", n).items():
            whole = sum(s.allocated for s in sites if s.pid == pid)
            out += ["", f"  {roles.get(pid, 'process')} {pid}: ~{format_size(whole)} allocated"]
            out += _table(headers, rows(group, whole), right)
    return out


def flame_tree(sites: Sequence[AllocationSite], field: str = "allocated") -> dict[str, Any]:
    """The tree d3-flame-graph draws: root -> phase -> frames, outermost first."""
    root: dict[str, Any] = {"name": "all", "value": 0, "children": []}
    index: dict[int, dict[str, dict[str, Any]]] = {}

    def child(node: dict[str, Any], name: str) -> dict[str, Any]:
        kids = index.setdefault(id(node), {})
        if name not in kids:
            kids[name] = {"name": name, "value": 0, "children": []}
            node["children"].append(kids[name])
        return kids[name]

    ranked = sorted(sites, key=lambda s: -getattr(s, field))
    for i, s in enumerate(ranked):
        value = getattr(s, field)
        if value <= 0:
            continue
        node = child(root, f"phase {s.phase}" if s.phase else "(no phase)")
        if i >= MAX_STACKS:
            node = child(node, "(other sites)")
        else:
            for f in reversed(s.frames):
                node = child(node, f"{f.function} ({f.filename}:{f.line})")
            if not s.frames:
                node = child(node, s.location)
        node["value"] += value
    _fill(root)
    return root


def _fill(node: dict[str, Any]) -> int:
    """d3-flame-graph wants each node's value to include its children's."""
    node["value"] += sum(_fill(c) for c in node["children"])
    return node["value"]


def speedscope(sites: Sequence[AllocationSite], name: str,
               roles: dict[int, str] | None = None) -> dict[str, Any]:
    """The sites as a speedscope file: per process, a "sampled" profile of the bytes
    allocated and one of the bytes retained, each stack rooted at its phase."""
    roles = roles or {}
    frames: list[dict[str, Any]] = []
    frame_index: dict[tuple[str, str, int], int] = {}

    def frame(name: str, file: str = "", line: int = 0) -> int:
        key = (name, file, line)
        if key not in frame_index:
            frame_index[key] = len(frames)
            entry: dict[str, Any] = {"name": name}
            if file:
                entry.update(file=file, line=line)
            frames.append(entry)
        return frame_index[key]

    profiles = []
    for pid in sorted({s.pid for s in sites}):
        mine = [s for s in sites if s.pid == pid]
        for field, label in (("allocated", "allocated"), ("retained", "retained")):
            stacks, weights = [], []
            for s in mine:
                value = getattr(s, field)
                if value <= 0:
                    continue
                stack = [frame(f"phase {s.phase}" if s.phase else "(no phase)")]
                stack += [frame(f.function, f.filename, f.line) for f in reversed(s.frames)]
                if not s.frames:
                    stack.append(frame(s.location))
                stacks.append(stack)
                weights.append(value)
            if stacks:
                profiles.append({
                    "type": "sampled", "name": f"{roles.get(pid, 'process')} {pid}: bytes {label}",
                    "unit": "bytes", "startValue": 0, "endValue": sum(weights),
                    "samples": stacks, "weights": weights})
    return {"$schema": SPEEDSCOPE_SCHEMA, "name": name, "exporter": f"memtrack {__version__}",
            "activeProfileIndex": 0, "shared": {"frames": frames}, "profiles": profiles}
