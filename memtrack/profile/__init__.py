"""Profiles: the files (:mod:`.files`: :class:`Profile`, ``dump``/``load``), the timeline
recorder (:mod:`.recording`) and what a profile says (:mod:`.insights`)."""

from __future__ import annotations

from .files import (
    FORMAT_VERSION,
    MAGIC,
    PhaseStats,
    PhaseSummary,
    Profile,
    ProfileError,
    dump,
    load,
    parse,
    summarise,
    summarise_by_path,
)

__all__ = [
    "FORMAT_VERSION", "MAGIC", "PhaseStats", "PhaseSummary", "Profile", "ProfileError", "dump",
    "load", "parse", "summarise", "summarise_by_path",
]
