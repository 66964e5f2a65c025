"""memtrack.dask against a real distributed.LocalCluster(n_workers=2, processes=True).

The workers are nanny-started processes; tasks use memtrack.phase as anywhere else. The
last test lets a nanny kill a worker that allocates past its memory_limit, and checks that
collect() still reports it, in the phase it died in.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import serve_tasks
from conftest import run_python

distributed = pytest.importorskip("distributed")
import dask  # noqa: E402

import memtrack  # noqa: E402
import memtrack.dask as mdask  # noqa: E402
from memtrack.report import render, report_data  # noqa: E402

MiB = 2**20
MEMORY_LIMIT = 600 * MiB


@pytest.fixture(scope="module")
def client():
    # A task whose worker is killed fails at once instead of killing three workers in turn.
    with dask.config.set({"distributed.scheduler.allowed-failures": 0,
                          "distributed.worker.memory.monitor-interval": "50ms",
                          # LocalCluster closes a nanny whose worker has not come back
                          # within this time (15 s by default): on a loaded machine a
                          # restart can take longer, and the nanny holds the table.
                          "distributed.deploy.lost-worker-timeout": "180s"}):
        with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                      memory_limit=MEMORY_LIMIT, dashboard_address=":0",
                                      silence_logs=50) as cluster, \
                distributed.Client(cluster) as c:
            mdask.install(c)
            c.wait_for_workers(2, timeout=60)
            yield c


def worker_pids(client) -> dict[str, int]:
    return client.run(os.getpid)


def test_every_worker_process_joins_and_records_its_phases(client):
    futures = client.map(serve_tasks.load_then_parse, [40, 60, 40, 60], [0.2] * 4, pure=False)
    ran_in = set(client.gather(futures))
    data = mdask.collect(client)
    pids = worker_pids(client)
    live = {a: e for a, e in data.items() if e["state"] in ("idle", "running")}
    assert set(live) == set(pids)  # keyed by the worker's address
    assert {e["pid"] for e in live.values()} == set(pids.values())
    assert ran_in <= set(pids.values())
    for e in live.values():
        assert isinstance(e["pid"], int) and e["rss"] > 20 * MiB and e["peak_rss"] >= e["rss"]
        assert e["nanny"] and e["host"]
    runs = {}
    for e in live.values():
        for path, s in e["phases"].items():
            assert set(s) >= {"count", "max_peak_delta", "max_peak_rss", "total_rss_delta"}
            runs[path] = runs.get(path, 0) + s["count"]
    assert runs["load"] == 4 and runs["parse"] == 4
    largest = max(e["phases"]["parse"]["max_peak_delta"] for e in live.values()
                  if "parse" in e["phases"])
    assert largest > 50 * MiB


def test_a_cluster_run_is_one_profile_that_memtrack_report_reads(client, tmp_path):
    path = tmp_path / "cluster.mtp"
    with mdask.record(client, path, interval=0.2) as rec:
        client.gather(client.map(serve_tasks.load_then_parse, [30, 50] * 4, [0.3] * 8,
                                 pure=False))
    assert rec.error is None
    profile = memtrack.load(path)
    pids = set(worker_pids(client).values())
    data = report_data(profile, name="cluster")
    series = {w["pid"]: w for w in data["workers"]}
    assert pids <= set(series)  # every worker a series
    for pid in pids:
        assert series[pid]["samples"] >= 3
    assert {p["path"] for p in data["phases"]} >= {"load", "parse"}
    assert data["pool"]["max_live"] == 2
    text = render(profile, "text", name="cluster")
    assert "Per worker" in text and "parse" in text
    html = render(profile, "html", name="cluster")
    assert html.startswith("<!doctype html>")


def test_the_cluster_is_served_to_prometheus_from_the_client_side(client):
    server = mdask.serve(client, interval=0.5)
    try:
        client.gather(client.map(serve_tasks.load_then_parse, [20, 20], [0.2] * 2,
                                 pure=False))
        time.sleep(1.2)  # a reading after the tasks
        conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.request("GET", "/api/workers")
        api = json.loads(conn.getresponse().read())
        conn.close()
    finally:
        server.close()
    for address in worker_pids(client):
        assert f'memtrack_worker_alive{{worker="{address}",pid="' in text
    assert 'memtrack_table_info{source="dask"' in text
    assert 'memtrack_phase_runs_total{phase="parse"}' in text
    assert api["source"] == "dask" and len(api["workers"]) >= 2
    promtool = shutil.which("promtool")
    if promtool:
        check = subprocess.run([promtool, "check", "metrics"], input=text, text=True,
                               capture_output=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr


async def _stop_scheduler_server(dask_scheduler):
    plugin = dask_scheduler.plugins[mdask.SCHEDULER_PLUGIN]
    await plugin.close()
    dask_scheduler.remove_plugin(mdask.SCHEDULER_PLUGIN)


def test_the_scheduler_itself_can_serve_the_cluster(client):
    client.register_plugin(mdask.MemtrackSchedulerPlugin("127.0.0.1:0", interval=0.3))
    try:
        url = mdask.scheduler_url(client)
        m = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/", url or "")
        assert m, url
        addresses = set(worker_pids(client))
        deadline = time.monotonic() + 60
        while True:
            conn = http.client.HTTPConnection("127.0.0.1", int(m.group(1)), timeout=30)
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
            conn.close()
            if all(f'memtrack_worker_alive{{worker="{a}"' in text for a in addresses):
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.3)
        assert f'memtrack_table_info{{source="dask",name="{client.scheduler.address}"' in text
    finally:
        client.run_on_scheduler(_stop_scheduler_server)
    assert mdask.scheduler_url(client) is None


def test_serve_command_serves_a_cluster(client):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMTRACK_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "memtrack", "serve", "--dask", client.scheduler.address,
         "--address", "127.0.0.1:0", "--interval", "0.5"],
        stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        m = re.search(r"at http://127\.0\.0\.1:(\d+)/", line)
        assert m, line
        addresses = set(worker_pids(client))
        deadline = time.monotonic() + 60
        while True:
            conn = http.client.HTTPConnection("127.0.0.1", int(m.group(1)), timeout=30)
            conn.request("GET", "/api/workers")
            api = json.loads(conn.getresponse().read())
            conn.close()
            if addresses <= {w["address"] for w in api["workers"]}:
                break
            assert time.monotonic() < deadline, api
            time.sleep(0.3)
        assert api["source"] == "dask" and api["name"] == client.scheduler.address
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()


def test_a_worker_killed_by_its_nanny_for_memory_is_reported_in_its_last_phase(client,
                                                                              tmp_path):
    victim, pid = sorted(worker_pids(client).items())[0]
    with mdask.record(client, tmp_path / "kill.mtp", interval=0.25):
        future = client.submit(serve_tasks.allocate_past, 2 * MEMORY_LIMIT // MiB, 30.0,
                               workers=[victim], pure=False)
        with pytest.raises(distributed.KilledWorker):
            future.result(timeout=120)
        client.wait_for_workers(2, timeout=60)  # the nanny started a replacement
        deadline = time.monotonic() + 60
        while True:
            dead = mdask.collect(client).get(victim)
            if dead is not None and dead["pid"] == pid and dead["state"] in ("killed",
                                                                               "exited"):
                break
            assert time.monotonic() < deadline, f"no record of the killed worker: {dead}"
            time.sleep(0.5)
        time.sleep(0.6)  # a recording round after it
    assert dead["phase"] == "explode"
    assert dead["exit_signal"] is not None or dead["exit_code"] not in (None, 0)
    assert dead["rss"] > MEMORY_LIMIT // 2  # what it held when last seen
    replacement = worker_pids(client)
    assert pid not in replacement.values() and len(replacement) == 2
    # The cluster's profile says so too: a death event, and the report's worker row.
    profile = memtrack.load(tmp_path / "kill.mtp")
    deaths = [e for e in profile.events if e["kind"] in ("death", "exit") and e["pid"] == pid]
    assert deaths and deaths[0]["phase"] == "explode"
    rows = {w["pid"]: w for w in report_data(profile)["workers"]}
    assert rows[pid]["phase"] == "explode" and rows[pid]["state"] in ("killed", "exited")


def test_memtrack_imports_without_distributed():
    run_python("""
        import sys
        sys.modules["distributed"] = None  # as if it were not installed
        import memtrack, memtrack.serve
        from memtrack.cli import main
        try:
            import memtrack.dask
        except ImportError as e:
            assert "pip install distributed" in str(e), e
        else:
            raise AssertionError("memtrack.dask imported without distributed")
    """)
