"""``memtrack report FILE``: a profile turned into a report (:mod:`memtrack.report`)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TextIO

from .. import _core
from ..profile import load
from ..report import FORMATS, render

_SUFFIXES = {".txt": "text", ".json": "json", ".csv": "csv", ".prom": "prometheus",
             ".html": "html", ".htm": "html"}


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
