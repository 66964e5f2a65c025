"""memtrack serve: the live page, /metrics and /api/workers of a real worker pool.

Every test starts a real server on a free loopback port and talks HTTP to it; the pools
are real ProcessPoolExecutor workers that joined a real table. The page is checked in
headless Chromium (driven over the DevTools pipe, tests/cdp.py) while the pool runs.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import pytest
import serve_tasks
from cdp import CHROMIUM, Browser

import memtrack
from memtrack.serve import ServeError, Server, TableSource, parse_address, serve
from memtrack.serve.server import MAX_STREAMS

PROMTOOL = shutil.which("promtool")


def request(server: Server, path: str, *, method: str = "GET", headers: dict | None = None,
            host: str | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(host or server.host, server.port, timeout=30)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def metrics_of(text: str) -> dict[tuple[str, frozenset], float]:
    """{(name, labels): value} of an exposition (a strict reader: a bad line fails)."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP|TYPE) [a-z_]+ .+", line), line
            continue
        m = re.fullmatch(r'([a-z_]+)(?:\{(.*)\})? (\S+)', line)
        assert m, line
        labels = frozenset(re.findall(r'([a-z_]+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


@pytest.fixture
def pool_table():
    with memtrack.WorkerTable(capacity=8) as table, ProcessPoolExecutor(
            2, initializer=memtrack.init_worker, initargs=(table.name,)) as pool:
        yield table, pool


def run_in_background(pool, tasks):
    """Submit tasks now; the test reads the server while they run."""
    return [pool.submit(serve_tasks.load_then_parse, mib, 0.4) for mib in tasks]


# --------------------------------------------------------------------------- addresses


def test_addresses_parse_and_default_to_loopback():
    assert parse_address("127.0.0.1:8000") == ("127.0.0.1", 8000)
    assert parse_address(":9000") == ("127.0.0.1", 9000)
    assert parse_address("9000") == ("127.0.0.1", 9000)
    assert parse_address("[::1]:0") == ("::1", 0)
    for bad in ("", "host", "host:port", "1.2.3.4:70000", "::1:80", "[::1]80"):
        with pytest.raises(ServeError, match="bad"):
            parse_address(bad)


def test_a_public_address_needs_the_flag_and_then_a_token():
    with memtrack.WorkerTable(capacity=2) as table:
        with pytest.raises(ServeError, match="not a loopback address.*--public"):
            Server(TableSource(table), "0.0.0.0:0")
        with pytest.raises(ServeError, match="at least 16"):
            Server(TableSource(table), "0.0.0.0:0", public=True, token="short")
        server = Server(TableSource(table), "0.0.0.0:0", public=True)
        try:
            assert server.token and len(server.token) >= 16
            assert f"?token={server.token}" in server.url
        finally:
            server.close()


def test_with_a_token_every_request_carries_it():
    token = "a-token-of-thirty-two-characters"
    with memtrack.WorkerTable(capacity=2) as table, \
            serve(table, "0.0.0.0:0", public=True, token=token) as server:
        for path in ("/", "/metrics", "/api/workers", "/events", "/assets/live.js"):
            status, headers, body = request(server, path, host="127.0.0.1")
            assert status == 401, path
            assert headers["WWW-Authenticate"].startswith("Bearer")
        assert request(server, "/metrics?token=wrong-token-of-the-same-size-xx",
                       host="127.0.0.1")[0] == 401
        assert request(server, "/metrics", host="127.0.0.1",
                       headers={"Authorization": "Bearer " + token[:-1]})[0] == 401
        assert request(server, f"/metrics?token={token}", host="127.0.0.1")[0] == 200
        assert request(server, "/api/workers", host="127.0.0.1",
                       headers={"Authorization": f"Bearer {token}"})[0] == 200
        # The page carries the token to its scripts and its feed.
        page = request(server, f"/?token={token}", host="127.0.0.1")[2].decode()
        assert f'src="/assets/live.js?token={token}"' in page


def test_without_a_token_only_a_loopback_host_header_is_answered():
    with memtrack.WorkerTable(capacity=2) as table, serve(table) as server:
        assert request(server, "/metrics")[0] == 200
        assert request(server, "/metrics", headers={"Host": f"localhost:{server.port}"})[0] \
            == 200
        # A page on another site that rebinds its DNS name to 127.0.0.1 sends its own Host.
        status, _, body = request(server, "/api/workers",
                                  headers={"Host": f"attacker.example:{server.port}"})
        assert status == 403 and b"loopback only" in body


def test_only_the_fixed_routes_are_served():
    with memtrack.WorkerTable(capacity=2) as table, serve(table) as server:
        for path in ("/assets/chart.min.js", "/assets/report.js", "/assets/live.js"):
            status, headers, body = request(server, path)
            assert status == 200 and headers["Content-Type"].startswith("text/javascript")
            assert len(body) > 1000
        for path in ("/etc/passwd", "/../../../../etc/passwd", "/assets/../server.py",
                     "/assets/%2e%2e/server.py", "/assets/", "/assets/live.html",
                     "/memtrack/serve/server.py", "/__init__.py", "//etc/passwd"):
            status, _, body = request(server, path)
            assert status == 404, path
            assert b"root:" not in body and b"import" not in body
        assert request(server, "/metrics", method="POST")[0] == 405
        status, headers, body = request(server, "/", method="HEAD")
        assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0


# --------------------------------------------------------------------------- a real pool


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: prometheus)")
def test_metrics_of_a_running_pool_pass_promtool(pool_table):
    table, pool = pool_table
    with serve(table, interval=0.25) as server:
        futures = run_in_background(pool, [40, 60, 40, 60, 40, 60])
        texts = []
        while not all(f.done() for f in futures):
            texts.append(request(server, "/metrics")[2].decode())
            time.sleep(0.1)
        pids = {f.result() for f in futures}
        texts.append(request(server, "/metrics")[2].decode())
    assert len(texts) >= 5
    for text in texts[::max(1, len(texts) // 4)] + texts[-1:]:
        check = subprocess.run([PROMTOOL, "check", "metrics"], input=text, text=True,
                               capture_output=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
    # While the pool ran, some scrape saw a worker in 'parse' holding its 40-60 MiB.
    seen_parse = [v for text in texts for (name, labels), v in metrics_of(text).items()
                  if name == "memtrack_worker_rss_bytes" and ("phase", "parse") in labels]
    assert seen_parse and max(seen_parse) > 40 * 2**20
    final = metrics_of(texts[-1])
    for pid in pids:
        assert final[("memtrack_worker_alive", frozenset({("pid", str(pid))}))] == 1
        assert final[("memtrack_worker_phase_peak_rss_bytes",
                      frozenset({("pid", str(pid)), ("phase", "parse")}))] > 40 * 2**20
    assert final[("memtrack_phase_runs_total", frozenset({("phase", "parse")}))] == 6
    assert final[("memtrack_workers", frozenset({("state", "idle")}))] == 2
    assert final[("memtrack_table_up", frozenset())] == 1


def test_api_workers_is_the_table_as_json(pool_table):
    table, pool = pool_table
    pids = {f.result() for f in run_in_background(pool, [10, 10, 10, 10])}
    with serve(table) as server:
        status, headers, body = request(server, "/api/workers")
    assert status == 200 and headers["Content-Type"] == "application/json"
    data = json.loads(body)
    assert data["source"] == "table" and data["name"] == table.name and data["gone"] is None
    assert {w["pid"] for w in data["workers"]} == pids
    for w in data["workers"]:
        assert w["state"] == "idle" and w["rss"] > 0 and w["peak_rss"] >= w["rss"]
        assert w["phases"]["parse"]["count"] >= 1
        assert set(w["phases"]["parse"]) == {"count", "total_time", "max_peak_rss",
                                              "max_peak_delta", "total_rss_delta"}
    assert data["totals"]["live"] == 2


# --------------------------------------------------------------------------- bad input


def test_a_port_in_use_is_a_clear_error_and_the_first_server_keeps_serving():
    with memtrack.WorkerTable(capacity=2) as table, serve(table) as first:
        with pytest.raises(ServeError, match=f"127.0.0.1:{first.port}: the port is already "
                                             "in use"):
            serve(table, ("127.0.0.1", first.port))
        assert request(first, "/metrics")[0] == 200


def test_a_table_that_vanishes_while_served_keeps_its_final_state(capfd):
    table = memtrack.WorkerTable(capacity=4)
    with ProcessPoolExecutor(2, initializer=memtrack.init_worker,
                             initargs=(table.name,)) as pool:
        pids = {f.result() for f in run_in_background(pool, [10, 10])}
        server = serve(table.name, interval=0.25)  # attached by name, as the CLI does
        try:
            assert json.loads(request(server, "/api/workers")[2])["gone"] is None
            table.close()  # the creator removes the segment while it is served
            data = json.loads(request(server, "/api/workers")[2])
            assert data["gone"] == "the worker table was removed by its creator"
            assert pids <= {w["pid"] for w in data["workers"]}
            text = request(server, "/metrics")[2].decode()
            assert metrics_of(text)[("memtrack_table_up", frozenset())] == 0
            assert "memtrack_worker_rss_bytes{pid=" in text
            time.sleep(0.6)  # the sampler goes on, and the server goes on answering
            assert request(server, "/")[0] == 200
        finally:
            server.close()
    err = capfd.readouterr().err
    assert err.count("was removed by its creator") == 1 and "serving its final state" in err


def test_a_client_that_disconnects_mid_stream_leaves_the_server_running():
    with memtrack.WorkerTable(capacity=2) as table, serve(table, interval=0.25) as server:
        for _ in range(5):
            sock = socket.create_connection((server.host, server.port), timeout=10)
            sock.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            received = b""
            while b"event: snapshot" not in received:
                chunk = sock.recv(4096)
                assert chunk, received
                received += chunk
            sock.close()  # gone mid-stream, without a word
        # a client that stops reading but keeps its socket open does not block others
        stalled = socket.create_connection((server.host, server.port), timeout=10)
        stalled.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        deadline = time.monotonic() + 10
        while server.stats["disconnects"] < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.stats["disconnects"] == 5
        assert server.stats["streams"] == 1  # the stalled one
        assert request(server, "/metrics")[0] == 200
        status, _, body = request(server, "/events?probe", method="HEAD")
        assert status == 200
        stalled.close()


def test_too_many_open_pages_are_refused_not_queued():
    with memtrack.WorkerTable(capacity=2) as table, serve(table) as server:
        socks = []
        try:
            for _ in range(MAX_STREAMS):
                s = socket.create_connection((server.host, server.port), timeout=10)
                s.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert s.recv(15).startswith(b"HTTP/1.0 200")
                socks.append(s)
            assert request(server, "/events")[0] == 503
            assert request(server, "/metrics")[0] == 200
        finally:
            for s in socks:
                s.close()


# --------------------------------------------------------------------------- the command


def test_serve_command_says_when_the_port_is_taken(capsys):
    from memtrack.cli import main

    with memtrack.WorkerTable(capacity=2) as table, serve(table) as first:
        code = main(["serve", table.name, "--address", f"127.0.0.1:{first.port}"])
    assert code == 2
    assert "the port is already in use" in capsys.readouterr().err


def test_serve_command_serves_a_table_by_name_until_ctrl_c():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMTRACK_")}
    with memtrack.WorkerTable(capacity=2) as table:
        proc = subprocess.Popen(
            [sys.executable, "-m", "memtrack", "serve", table.name, "--address",
             "127.0.0.1:0"], stderr=subprocess.PIPE, text=True, env=env)
        try:
            line = proc.stderr.readline()
            m = re.search(r"serving table (\S+) at http://127\.0\.0\.1:(\d+)/", line)
            assert m and m.group(1) == table.name, line
            assert "Prometheus: http://127.0.0.1:" in proc.stderr.readline()
            conn = http.client.HTTPConnection("127.0.0.1", int(m.group(2)), timeout=30)
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            assert response.status == 200
            assert response.getheader("Content-Type").startswith("text/plain; version=0.0.4")
            assert f'name="{table.name}"' in response.read().decode()
            conn.close()
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.stderr.close()


def test_run_serve_serves_the_run_while_it_runs(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "import serve_tasks\n"
        "with ProcessPoolExecutor(2) as pool:\n"
        "    list(pool.map(serve_tasks.load_then_parse, [20] * 12, [0.3] * 12))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMTRACK_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "memtrack", "run", "--quiet", "-o", str(tmp_path / "r.mtp"),
         "--serve", "127.0.0.1:0", "--", sys.executable, str(script)],
        stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        m = re.search(r"at (http://127\.0\.0\.1:(\d+)/)", line)
        assert m, line
        port = int(m.group(2))
        seen = set()
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("GET", "/api/workers")
                data = json.loads(conn.getresponse().read())
                conn.close()
            except OSError:
                break  # the run ended and took its server with it
            seen |= {w["pid"] for w in data["workers"] if w["phase"] == "parse"}
            time.sleep(0.1)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert len(seen) == 2  # both pool workers were seen in 'parse' through the server


# --------------------------------------------------------------------------- the page


@pytest.mark.skipif(CHROMIUM is None,
                    reason="headless Chromium not installed (apt-get install chromium)")
def test_live_page_updates_while_a_pool_runs_and_pauses_when_hidden(pool_table, tmp_path):
    from test_report import count_colour, read_png

    from memtrack.report.html import PALETTE

    table, pool = pool_table
    browser = Browser(str(tmp_path / "profile"))
    try:
        with serve(table, interval=0.25) as server:
            futures = run_in_background(pool, [30, 50] * 8)
            browser.open(server.url)
            browser.wait_for("document.body.dataset.charts === 'ready'")
            first = int(browser.evaluate("document.body.dataset.updates"))
            points = browser.wait_for(
                "Chart.getChart('timeline').data.datasets.filter("
                "d => d.label.startsWith('worker ')).length === 2 && "
                "Chart.getChart('lanes') && Chart.getChart('lanes').data.datasets.length >= 2"
                " && Chart.getChart('timeline').data.datasets[0].data.length")
            assert points >= 2
            # Each round that arrives redraws the page, while the pool still runs.
            browser.wait_for(f"document.body.dataset.updates >= {first + 3}")
            assert not all(f.done() for f in futures)
            rows = browser.evaluate(
                "Array.from(document.querySelectorAll('#workers tbody tr')).length")
            assert rows == 2
            phases = browser.evaluate("Chart.getChart('phase-bars').data.labels")
            assert {"load", "parse"} <= set(phases)
            png = browser.screenshot()

            # Hidden tab: the page closes its feed; visible again: it reconnects.
            assert server.stats["streams"] == 1
            browser.evaluate("Object.defineProperty(document, 'hidden', {value: true, "
                             "configurable: true}); "
                             "document.dispatchEvent(new Event('visibilitychange'))")
            deadline = time.monotonic() + 10
            while server.stats["streams"] and time.monotonic() < deadline:
                time.sleep(0.1)
            assert server.stats["streams"] == 0
            paused = int(browser.evaluate("document.body.dataset.updates"))
            time.sleep(1.0)
            assert int(browser.evaluate("document.body.dataset.updates")) == paused
            assert "paused" in browser.evaluate("document.getElementById('status').textContent")
            browser.evaluate("Object.defineProperty(document, 'hidden', {value: false, "
                             "configurable: true}); "
                             "document.dispatchEvent(new Event('visibilitychange'))")
            browser.wait_for(f"document.body.dataset.updates > {paused + 1}")
            for f in futures:
                f.result()
    finally:
        browser.close()
    (tmp_path / "live.png").write_bytes(png)
    width, height, bpp, pixels = read_png(png)
    assert (width, height) == (1400, 2000)
    assert count_colour(pixels, bpp, PALETTE[0]) > 2000, "no 'load' bars (blue)"
    assert count_colour(pixels, bpp, PALETTE[1]) > 2000, "no 'parse' bars (orange)"
    assert count_colour(pixels, bpp, "#555555") > 100, "no pool RSS line"


def test_threads_left_behind_by_a_closed_server_are_gone():
    before = {t.name for t in threading.enumerate()}
    with memtrack.WorkerTable(capacity=2) as table:
        server = serve(table, interval=0.25)
        request(server, "/metrics")
        server.close()
        server.close()  # twice is fine
    left = {t.name for t in threading.enumerate()} - before
    assert not {n for n in left if n.startswith("memtrack-serve")}
