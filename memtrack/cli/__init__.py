"""The memtrack command line: ``memtrack [info | workers | top ...]``.

With no subcommand it prints this process's readings and capabilities, a quick check
that the C core works on this machine.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .. import __version__, _core
from .._sizes import format_size

# Subcommands register here: name -> (add_arguments, run). Each module that owns a
# command provides both, so this file stays a dispatcher.
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None],
                           Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None],
            run: Callable[[argparse.Namespace], int]) -> None:
    _COMMANDS[name] = (help, add_arguments, run)


def _table(rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def info_text() -> str:
    s = _core.snapshot()
    caps = _core.capabilities()
    try:
        f = _core.footprint()
        uss, pss, shared = format_size(f.uss), format_size(f.pss), format_size(f.shared)
    except OSError as e:
        uss = pss = shared = f"unavailable ({e.strerror})"
    readings = [
        ("rss", format_size(s.rss)), ("peak_rss", format_size(s.peak_rss)),
        ("vms", format_size(s.vms)), ("rss_anon", format_size(s.rss_anon)),
        ("rss_file", format_size(s.rss_file)), ("rss_shmem", format_size(s.rss_shmem)),
        ("swap", format_size(s.swap)), ("heap_used", format_size(s.heap_used)),
        ("heap_free", format_size(s.heap_free)), ("uss", uss), ("pss", pss), ("shared", shared),
        ("minor_faults", str(s.minor_faults)), ("major_faults", str(s.major_faults)),
    ]
    method = caps["peak_method"]
    if method == "kernel":
        method += " (exact: high-water mark reset per phase)"
    else:
        method += (f" (bounded error, {caps['sampler_interval'] * 1000:g} ms interval; "
                   f"{caps['peak_fallback_reason']})")
    capabilities = [
        ("platform", caps["platform"]), ("peak method", method),
        ("lacks", ", ".join(caps["lacks"]) or "nothing"),
        ("phases", "disabled (MEMTRACK_DISABLE)" if caps["disabled"] else "enabled"),
    ]
    return (f"memtrack {__version__}: this process\n{_table(readings)}\n\n"
            f"capabilities\n{_table(capabilities)}")


def _add_info(parser: argparse.ArgumentParser) -> None:
    pass


def _run_info(args: argparse.Namespace) -> int:
    print(info_text())
    return 0


command("info", "this process's readings and capabilities (the default)", _add_info, _run_info)


def _register_commands() -> None:
    from . import demo, report, run, serve, top, workers

    command("report", "turn a profile into a report: text, json, csv, prometheus or html",
            report.add_report_arguments, report.run_report_command)
    command("demo", "index a source tree on a worker pool and show where its memory went",
            demo.add_demo_arguments, demo.run_demo_command)
    command("run", "run a command and record the memory of all its processes",
            run.add_run_arguments, run.run_run_command)
    command("top", "live view of a worker table", top.add_top_arguments, top.run_top_command)
    command("serve", "a worker table live over HTTP: page, Prometheus /metrics, JSON",
            serve.add_serve_arguments, serve.run_serve_command)
    command("workers", "how many workers this machine can afford",
            workers.add_workers_parser, workers.run_workers_command)


def build_parser() -> argparse.ArgumentParser:
    _register_commands()
    parser = argparse.ArgumentParser(
        prog="memtrack", description="Where the memory of a Python worker pool goes.")
    parser.add_argument("--version", action="version", version=f"memtrack {__version__}")
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND")
    for name, (help, add_arguments, _run) in _COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help, description=help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    name = args.subcommand or "info"
    try:
        return _COMMANDS[name][2](args)
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError) as e:
        print(f"memtrack {name}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
