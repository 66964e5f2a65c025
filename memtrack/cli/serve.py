"""``memtrack serve [TABLE]``: a worker table live over HTTP (and ``memtrack run --serve``).

The page at ``/``, Prometheus at ``/metrics``, JSON at ``/api/workers``; see docs/serve.md.
``--dask SCHEDULER`` serves a Dask cluster's workers instead (memtrack.dask, docs/dask.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from .top import find_table

if TYPE_CHECKING:
    from ..pool.table import WorkerTable
    from ..serve import Server

# memtrack.serve (http.server and all it imports) is loaded only when a server starts, so
# that building the parser for every other command stays cheap; these match its defaults.
ENV_TOKEN = "MEMTRACK_SERVE_TOKEN"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


def add_address_arguments(parser: argparse.ArgumentParser, *, option: str) -> None:
    """--public and --token, shared by ``serve`` and ``run --serve``."""
    parser.add_argument("--public", action="store_true",
                        help=f"allow a non-loopback address in {option} (a token is then "
                             "required: --token, MEMTRACK_SERVE_TOKEN, or one is made)")
    parser.add_argument("--token", default=None,
                        help=f"token every request must carry (default: ${ENV_TOKEN}); "
                             "better in the environment than on a command line")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", metavar="TABLE",
                        help="worker table name (default: the single live table)")
    parser.add_argument("--address", "-a", default=f"{DEFAULT_HOST}:{DEFAULT_PORT}",
                        metavar="HOST:PORT",
                        help=f"where to listen (default {DEFAULT_HOST}:{DEFAULT_PORT}; "
                             "port 0: any free port)")
    add_address_arguments(parser, option="--address")
    parser.add_argument("--interval", type=float, default=None,
                        help="seconds between page updates (default: the table's heartbeat, "
                             "0.25..5 s)")
    parser.add_argument("--window", type=float, default=300.0,
                        help="seconds of history the page keeps (default 300)")
    parser.add_argument("--dask", metavar="SCHEDULER", default=None,
                        help="serve the memtrack workers of this Dask scheduler "
                             "(tcp://host:8786; see memtrack.dask.install) instead of a table")
    parser.add_argument("--verbose", action="store_true", help="log every request")


def _token(args: argparse.Namespace) -> str | None:
    return args.token if args.token is not None else (os.environ.get(ENV_TOKEN) or None)


def announce(server: Server, prog: str) -> None:
    """Say where the server listens (with the token in the URL when there is one)."""
    base = server.url.split("?")[0]
    print(f"{prog}: serving {server.source.kind} {server.source.name} at {server.url}\n"
          f"{prog}:   Prometheus: {base}metrics   JSON: {base}api/workers", file=sys.stderr,
          flush=True)
    if server.token and not server.loopback:
        print(f"{prog}:   requests need the token (?token=... or Authorization: Bearer ...)",
              file=sys.stderr, flush=True)


def start_for_run(table: WorkerTable, address: str, *, public: bool,
                  token: str | None) -> Server:
    """``memtrack run --serve HOST:PORT``: serve the run's table while the command runs."""
    from ..serve import Server, TableSource

    server = Server(TableSource(table), address, public=public,
                    token=token if token is not None else (os.environ.get(ENV_TOKEN) or None))
    announce(server, "memtrack run")
    return server.start()


def run_serve_command(args: argparse.Namespace) -> int:
    from ..serve import ServeError, Server, TableSource

    if args.dask is not None:
        if args.name:
            raise ValueError("give a TABLE or --dask SCHEDULER, not both")
        from ..dask import cluster_source

        source = cluster_source(args.dask)
    else:
        source = TableSource(find_table(args.name))
    try:
        server = Server(source, args.address, public=args.public, token=_token(args),
                        interval=args.interval, window=args.window, verbose=args.verbose)
    except ServeError as e:
        source.close()
        print(f"memtrack serve: {e}", file=sys.stderr)
        return 2
    announce(server, "memtrack serve")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0
