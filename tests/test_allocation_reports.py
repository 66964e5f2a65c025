"""Allocation sites in reports: the text tables, the HTML flame graph, the speedscope export,
and the pytest plugin's section for a failing test."""

from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys

import pytest

import memtrack
from memtrack.report import render

pytest_plugins = ["pytester"]

KIB = 1024


@pytest.fixture(scope="module")
def pool_profile(tmp_path_factory):
    """A recording of a 2-worker fork pool with allocation tracking on (made once)."""
    from pool_tasks import allocate_in_phases

    path = tmp_path_factory.mktemp("alloc") / "pool.mtp"
    memtrack.allocations.stop()
    memtrack.allocations.clear()
    memtrack.allocations.start(interval=64 * KIB, seed=3)
    try:
        with memtrack.WorkerTable(capacity=8) as table, memtrack.record(path, table=table):
            with mp.get_context("fork").Pool(
                    2, initializer=memtrack.init_worker, initargs=(table.name,)) as pool:
                pids = set(pool.map(allocate_in_phases, [1, 1], chunksize=1))
                pool.close()
                pool.join()
    finally:
        memtrack.allocations.stop()
        memtrack.allocations.clear()
    return path, pids


def test_the_text_report_has_the_top_sites_per_phase_and_per_worker(pool_profile):
    path, pids = pool_profile
    text = render(memtrack.load(path), "text")
    assert "Allocation sites (sampled:" in text
    lines = text.splitlines()
    # a table per phase, the worker function's line at its top
    load = lines.index(next(line for line in lines if line.startswith("  phase load:")))
    assert "pool_tasks.py" in lines[load + 3] and "allocate_in_phases" in lines[load + 3]
    assert any(line.startswith("  phase parse:") for line in lines)
    # and a table per worker
    for pid in pids:
        assert any(line.startswith(f"  worker {pid}:") for line in lines), text


def test_the_html_report_draws_a_flame_graph_with_the_vendored_library(pool_profile):
    path, _ = pool_profile
    page = render(memtrack.load(path), "html")
    assert '<div id="flame" class="flame"></div>' in page
    assert "<h2>Allocation sites</h2>" in page
    data = page.split('<script type="application/json" id="memtrack-flame">', 1)[1]
    tree = json.loads(data.split("</script>", 1)[0])
    phases = {c["name"]: c["value"] for c in tree["allocated"]["children"]}
    assert phases["phase load"] > phases["phase parse"] > 0
    assert tree["allocated"]["value"] == sum(c["value"] for c in tree["allocated"]["children"])
    # the library itself is inlined (no network), and its license ships beside it
    assert "d3-flame-graph" in page and 'version="7.9.0"' in page
    from importlib import resources

    assets = resources.files("memtrack.report").joinpath("assets")
    assert "Apache License" in assets.joinpath("d3-flamegraph.LICENSE.txt").read_text()
    assert "ISC" in assets.joinpath("d3.LICENSE.txt").read_text()


def test_a_profile_without_sites_has_no_allocation_section(tmp_path):
    path = tmp_path / "plain.mtp"
    with memtrack.phase("x"):
        pass
    memtrack.dump(path)
    profile = memtrack.load(path)
    assert "Allocation sites" not in render(profile, "text")
    assert 'id="flame"' not in render(profile, "html")


def test_the_speedscope_export_is_a_valid_sampled_profile_per_process(pool_profile, tmp_path):
    path, pids = pool_profile
    out = tmp_path / "sites.speedscope.json"
    subprocess.run([sys.executable, "-m", "memtrack", "report", str(path), "-f", "speedscope",
                    "-o", str(out)], check=True, capture_output=True)
    doc = json.loads(out.read_text())
    assert doc["$schema"] == "https://www.speedscope.app/file-format-schema.json"
    frames = doc["shared"]["frames"]
    names = {p["name"] for p in doc["profiles"]}
    for pid in pids:
        assert f"worker {pid}: bytes allocated" in names
    sites = memtrack.load(path).sites
    for p in doc["profiles"]:
        assert p["type"] == "sampled" and p["unit"] == "bytes"
        assert len(p["samples"]) == len(p["weights"])
        assert p["endValue"] == sum(p["weights"])
        assert all(0 <= i < len(frames) for stack in p["samples"] for i in stack)
        # every stack starts at its phase and ends at the allocating frame
        assert all(frames[stack[0]]["name"].startswith(("phase ", "(no phase)"))
                   for stack in p["samples"])
    allocated = sum(p["endValue"] for p in doc["profiles"] if p["name"].endswith("allocated"))
    assert allocated == sum(s.allocated for s in sites)


def test_a_failing_test_shows_its_top_allocation_sites(pytester, monkeypatch):
    monkeypatch.setenv("MEMTRACK_ALLOCATIONS", "1")
    monkeypatch.setenv("MEMTRACK_ALLOC_INTERVAL", "64 KiB")
    for name in ("MEMTRACK_TABLE", "MEMTRACK_DISABLE"):
        monkeypatch.delenv(name, raising=False)
    pytester.makepyfile(test_allocating="""
        def build():
            blocks = []
            for _ in range(3000):
                blocks.append(bytearray(10_000))
            return blocks

        def test_fails():
            keep = build()
            assert len(keep) == 0

        def test_passes():
            keep = build()
            assert keep
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*Captured memtrack allocation sites call*",
        "~* allocated during the test body (* samples); the top sites:",
        "* allocated * retained * samples  *test_allocating.py:4 build  <- *test_allocating.py:8 "
        "test_fails",
    ])
    assert result.stdout.str().count("memtrack allocation sites") == 1  # not for the pass
