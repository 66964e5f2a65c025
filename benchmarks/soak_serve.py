#!/usr/bin/env python3
"""Soak test of memtrack serve (issue 15): does the server's memory stay flat?

    python benchmarks/soak_serve.py                 # 10 minutes; updates benchmarks/RESULTS.md
    python benchmarks/soak_serve.py --minutes 2 --output /tmp/RESULTS.md

For `--minutes`, a real pool runs tasks without a pause (ProcessPoolExecutor, 2 workers,
each replaced after 20 tasks, so pids churn and dead slots are reused; every task in a
'load' then a 'parse' phase of 10-60 MiB), while `memtrack serve TABLE` runs as its own
process (the command a user runs, --window 60 so its history is full after a minute), the
live page is open in headless Chromium (driven over the DevTools pipe, tests/cdp.py) and a
scraper reads /metrics and /api/workers once a second. The server's RSS (/proc/PID/status)
is read every 5 seconds. Growth is measured from the first reading after the history is
full (90 s) to the end; the growth from the first reading is shown too. Not part of the
test suite (it takes minutes); it asserts nothing, it reports.
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from _timing import Section, say, status, write_results  # noqa: E402
from _timing import table as md_table  # noqa: E402
from cdp import CHROMIUM, Browser  # noqa: E402
from serve_tasks import load_then_parse  # noqa: E402

import memtrack  # noqa: E402

WINDOW = 60.0
BASELINE_AT = 90.0


def rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def scrape(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    args = ap.parse_args(argv)
    if CHROMIUM is None:
        print("soak_serve.py needs headless Chromium (apt-get install chromium)",
              file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    duration = args.minutes * 60
    stop = threading.Event()
    scrapes = {"ok": 0, "failed": 0}
    readings: list[tuple[float, int]] = []
    tasks_done = 0
    with memtrack.WorkerTable(capacity=16) as table, tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(
            [sys.executable, "-m", "memtrack", "serve", table.name, "--address",
             "127.0.0.1:0", "--window", str(WINDOW)], stderr=subprocess.PIPE, text=True)
        line = server.stderr.readline()
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        say(f"soak: server pid {server.pid} on port {port}; {args.minutes:g} minutes")
        threading.Thread(target=lambda: server.stderr.read(), daemon=True).start()

        def scraper() -> None:
            while not stop.wait(1.0):
                for path in ("/metrics", "/api/workers"):
                    try:
                        ok = scrape(port, path) == 200
                    except OSError:
                        ok = False
                    scrapes["ok" if ok else "failed"] += 1

        browser = Browser(os.path.join(tmp, "profile"))
        browser.open(f"http://127.0.0.1:{port}/")
        threading.Thread(target=scraper, daemon=True).start()
        t0 = time.monotonic()
        rng = random.Random(15)
        with ProcessPoolExecutor(2, initializer=memtrack.init_worker,
                                 initargs=(table.name,), max_tasks_per_child=20) as pool:
            pending = set()
            next_reading = 0.0
            while time.monotonic() - t0 < duration:
                while len(pending) < 4:
                    pending.add(pool.submit(load_then_parse, rng.randint(10, 60), 0.2))
                done = {f for f in pending if f.done()}
                for f in done:
                    f.result()
                tasks_done += len(done)
                pending -= done
                now = time.monotonic() - t0
                if now >= next_reading:
                    readings.append((now, rss_of(server.pid)))
                    next_reading += 5.0
                time.sleep(0.05)
            for f in pending:
                f.result()
        updates = int(browser.evaluate("document.body.dataset.updates"))
        browser.close()
        stop.set()
        alive = server.poll() is None
        server.terminate()
        server.wait(timeout=30)
    first = readings[0][1]
    base_t, base = next((t, r) for t, r in readings if t >= min(BASELINE_AT, duration / 2))
    final = readings[-1][1]
    largest = max(r for _, r in readings)
    growth = (final - base) / base
    met = growth < 0.05 and alive
    mib = 2 ** 20
    elapsed = time.perf_counter() - t_start
    command = "python benchmarks/soak_serve.py" + (
        f" --minutes {args.minutes:g}" if args.minutes != 10 else "")
    rows = [[f"{t:.0f} s", f"{r / mib:.1f} MiB"] for t, r in readings[::12]]
    if readings[-1][0] != readings[::12][-1][0]:
        rows.append([f"{readings[-1][0]:.0f} s", f"{final / mib:.1f} MiB"])
    body = [
        f"{args.minutes:g} minutes: a 2-worker pool ran {tasks_done} tasks (workers replaced "
        "every 20 tasks), `memtrack serve` ran as its own process (--window 60), the live "
        f"page was open in headless Chromium (it redrew {updates} times) and a scraper read "
        f"/metrics and /api/workers once a second ({scrapes['ok']} answers, "
        f"{scrapes['failed']} failures). The server's RSS every minute:",
        "",
        *md_table(rows, ["time", "server RSS"], "rr"),
        "",
        f"From {base_t:.0f} s (history full) to the end: {base / mib:.1f} -> "
        f"{final / mib:.1f} MiB ({growth * 100:+.2f}%); largest {largest / mib:.1f} MiB; "
        f"from the first reading: {first / mib:.1f} -> {final / mib:.1f} MiB "
        f"({(final - first) / first * 100:+.2f}%, the history filling up). The server "
        f"{'was still running' if alive else 'HAD EXITED'} at the end. The load average in "
        "the machine table says how busy the machine was.",
        "",
        "### Target",
        "",
        *md_table([["server RSS growth under 5% over the soak",
                    f"{growth * 100:+.2f}% ({base / mib:.1f} -> {final / mib:.1f} MiB)",
                    status(met)]], ["target", "measured", "status"], "lll"),
        "",
    ]
    section = Section(key="soak", title="memtrack serve soak (issue 15)", command=command,
                      elapsed=elapsed, body=body,
                      headline=[f"server RSS {base / mib:.1f} -> {final / mib:.1f} MiB "
                                f"({growth * 100:+.2f}%) over {args.minutes:g} min"],
                      targets=[["RSS growth < 5%", f"{growth * 100:+.2f}%", status(met)]])
    write_results(args.output, [section], command, elapsed)
    print("\n".join(section.headline))
    print(f"wrote the soak section of {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
