#!/usr/bin/env python3
"""Benchmarks of memtrack serve (issue 15): what one /metrics scrape costs at 64 workers.

    python benchmarks/bench_serve.py            # ~20 s, updates benchmarks/RESULTS.md
    python benchmarks/bench_serve.py --quick    # ~10 s, fewer rounds

What is measured (one run, one machine): a table of 64 real worker processes (forked with
MEMTRACK_TABLE set, so each joins at fork; each has run phases under 4 paths, then blocks on
a pipe), served by ``memtrack.serve.serve``. In interleaved rounds, the order rotated every
round: the table read alone (``table.workers()`` + ``table.totals()``, the floor), the
exposition text alone (``server.metrics()``: read + format), ``/api/workers`` and one whole
``/metrics`` scrape over HTTP (a new loopback connection each time, as Prometheus makes with
HTTP/1.0 servers; the server in a process of its own, serving the table by name), and two
peers: the standard library's http.server in a process of its own sending a fixed body of
the same size (the HTTP floor on this machine), and one frame of ``memtrack top``
(``render_frame``) of the same table. Medians, 90th percentiles and the largest time are
reported. The 10-minute soak is a separate script (benchmarks/soak_serve.py). The script
asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import Section, fmt_ns, say, standalone_main, status  # noqa: E402
from _timing import table as md_table  # noqa: E402

import memtrack  # noqa: E402
from memtrack.cli.top import render_frame  # noqa: E402
from memtrack.serve import serve  # noqa: E402

WORKERS = 64
SERVER_CHILD = """
import sys, threading
from memtrack.serve import serve
server = serve(sys.argv[1], interval=5.0)
print(server.port, flush=True)
threading.Event().wait()
"""
#: The HTTP floor: the standard library's server sending a fixed body of the same size.
FLOOR_CHILD = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
body = b"x" * int(sys.argv[1])
class Handler(BaseHTTPRequestHandler):
    disable_nagle_algorithm = True
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
print(server.server_address[1], flush=True)
server.serve_forever()
"""
PATHS = ("init", "index", "index/parse", "index/extract")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--serve-rounds", type=int, default=None,
                    help="rounds of the scrape benchmark (default 400, --quick 150)")


def _worker(release_fd: int) -> None:
    """A forked child: joined at fork (MEMTRACK_TABLE); runs a few phases, then waits."""
    for _ in range(3):
        with memtrack.phase("init"):
            pass
        with memtrack.phase("index"):
            with memtrack.phase("parse"):
                bytearray(256 * 1024)
            with memtrack.phase("extract"):
                pass
    os.read(release_fd, 1)
    os._exit(0)


def _start_workers(table: memtrack.WorkerTable) -> tuple[list[int], int]:
    os.environ["MEMTRACK_TABLE"] = table.name
    read_fd, write_fd = os.pipe()
    pids = []
    try:
        for _ in range(WORKERS):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                os.close(write_fd)
                _worker(read_fd)
            pids.append(pid)
    finally:
        del os.environ["MEMTRACK_TABLE"]
        os.close(read_fd)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ws = table.workers()
        if len(ws) == WORKERS and all(len(w.phases) == len(PATHS) for w in ws):
            break
        time.sleep(0.05)
    return pids, write_fd


def _get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, response.status
        return body
    finally:
        conn.close()


def run(args: argparse.Namespace, command: str) -> Section:
    t0 = time.perf_counter()
    rounds = args.serve_rounds or (150 if args.quick else 400)
    with memtrack.WorkerTable(capacity=WORKERS) as table:
        pids, release = _start_workers(table)
        try:
            ws = table.workers()
            say(f"serve: {len(ws)} workers joined, {sum(len(w.phases) for w in ws)} phase "
                f"summaries; {rounds} rounds")
            # The scraped server runs in a process of its own, as it does for Prometheus:
            # otherwise the scraper's own Python would share the server's GIL.
            child = subprocess.Popen(
                [sys.executable, "-c", SERVER_CHILD, table.name], stdout=subprocess.PIPE,
                text=True)
            port = int(child.stdout.readline())
            with serve(table, interval=5.0) as server:
                metrics_text = server.metrics()
                floor = subprocess.Popen(
                    [sys.executable, "-c", FLOOR_CHILD, str(len(metrics_text.encode()))],
                    stdout=subprocess.PIPE, text=True)
                floor_port = int(floor.stdout.readline())

                def read() -> None:
                    table.workers()
                    table.totals()

                cases = {
                    "table read (workers() + totals())": read,
                    "exposition text (server.metrics())": server.metrics,
                    "HTTP GET /metrics (new connection)": lambda: _get(port, "/metrics"),
                    "HTTP GET /api/workers (new connection)": lambda: _get(port,
                                                                           "/api/workers"),
                    "peer: stdlib http.server, fixed body of the same size": lambda: _get(
                        floor_port, "/"),
                    "peer: one `memtrack top` frame": lambda: render_frame(table),
                }
                names = list(cases)
                times: dict[str, list[int]] = {n: [] for n in names}
                for n in names:  # warm-up
                    cases[n]()
                for i in range(rounds):
                    order = names[i % len(names):] + names[:i % len(names)]
                    for n in order:
                        start = time.perf_counter_ns()
                        cases[n]()
                        times[n].append(time.perf_counter_ns() - start)
            for process in (child, floor):
                process.terminate()
                process.wait()
        finally:
            os.close(release)
            for pid in pids:
                os.waitpid(pid, 0)

    def stats(n: str) -> tuple[float, float, float]:
        values = sorted(times[n])
        return (statistics.median(values), values[int(len(values) * 0.9)], values[-1])

    floor = stats(names[0])[0]
    peer = stats(names[-1])[0]
    rows = []
    for n in names:
        med, p90, top = stats(n)
        rows.append([n, fmt_ns(med), fmt_ns(p90), fmt_ns(top), f"{med / floor:.1f}x",
                     f"{med / peer:.2f}x"])
    scrape_med, scrape_p90, _ = stats("HTTP GET /metrics (new connection)")
    floor_med = stats("peer: stdlib http.server, fixed body of the same size")[0]
    met = scrape_med < 5e6
    lines = len(metrics_text.splitlines())
    body = [
        f"A table of {WORKERS} real worker processes, each with {len(PATHS)} phase paths; "
        f"the exposition is {lines} lines ({len(metrics_text) / 1024:.0f} KiB). "
        f"{rounds} interleaved rounds (the order rotated each round); the load average in "
        "the machine table says how busy the machine was.",
        "",
        *md_table(rows, ["what", "median", "p90", "max", "vs table read", "vs `top` frame"],
                  "lrrrrr"),
        "",
        f"A whole scrape costs {scrape_med / floor_med:.2f}x the standard library's server "
        f"sending a fixed body of the same size. That floor, {fmt_ns(floor_med)}, is the "
        "connection, a thread, the headers, and two processes scheduled in turn on this "
        f"machine; memtrack's own part of a scrape is the rest, {fmt_ns(scrape_med - floor_med)} "
        "(reading the table and writing the text, as in the exposition row).",
        "",
        "### Target",
        "",
        *md_table([["one scrape under 5 ms at 64 workers",
                    f"median {fmt_ns(scrape_med)}, p90 {fmt_ns(scrape_p90)} (whole HTTP "
                    "request, new connection)", status(met)]],
                  ["target", "measured", "status"], "lll"),
        "",
    ]
    return Section(
        key="serve", title="memtrack serve (issue 15)", command=command,
        elapsed=time.perf_counter() - t0, body=body,
        headline=[f"/metrics at {WORKERS} workers: median {fmt_ns(scrape_med)} per scrape "
                  f"(p90 {fmt_ns(scrape_p90)}); `top` frame {fmt_ns(peer)}"],
        targets=[["scrape < 5 ms at 64 workers", fmt_ns(scrape_med), status(met)]],
    )


if __name__ == "__main__":
    sys.exit(standalone_main(sys.modules[__name__], "fewer rounds (~10 s)"))
