"""The pytest plugin, run the way users run it: pytest in a fresh process (pytester).

Each run is a subprocess: memtrack's phase registry and peak mark are process-wide, so a
run inside this process would share them with the outer test session.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import stat
import textwrap

import pytest

pytest_plugins = ["pytester"]

# pytest-benchmark (when installed) warns under xdist; the cache would write into tmp dirs.
QUIET = ("-p", "no:cacheprovider", "-p", "no:benchmark")

# Anonymous mmap, not bytearray: glibc serves blocks below its (moving) mmap threshold from
# the heap and keeps them after free, so a later spike would reuse them and look smaller.
TOUCH = '''
import mmap

def touch(mib):
    """`mib` MiB made resident; freed (unmapped) when the object goes."""
    buf = mmap.mmap(-1, mib * 1024 * 1024)
    for i in range(0, len(buf), 4096):
        buf[i] = 1
    return buf
'''


@pytest.fixture
def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    """Run pytest in a subprocess on the files of `pytester`, without any MEMTRACK_ setting
    of ours leaking in, and with the `touch` helper importable."""
    for name in ("MEMTRACK_TABLE", "MEMTRACK_DISABLE", "MEMTRACK_PEAK"):
        monkeypatch.delenv(name, raising=False)
    pytester.makepyfile(helpers=TOUCH)

    def runner(*args: str) -> pytest.RunResult:
        return pytester.runpytest_subprocess(*QUIET, *args, timeout=120)

    return runner


def expect_lines(result: pytest.RunResult, patterns: list[str], rel: float = 0.06) -> None:
    """``fnmatch_lines(patterns)``, where ``~80`` stands for a number within `rel` of 80
    (the text around the measured values is exact, the values are checked as numbers),
    and ``[`` is itself (``*`` and ``?`` are wildcards as in fnmatch)."""
    globs = [re.sub(r"~[0-9.]+", "*", p.replace("[", "[[]")) for p in patterns]
    result.stdout.fnmatch_lines(globs)  # pytest's own report of what did not match
    lines, at = result.stdout.lines, 0
    for pattern, glob in zip(patterns, globs, strict=True):
        while not fnmatch.fnmatch(lines[at], glob):
            at += 1
        expected = [float(x) for x in re.findall(r"~([0-9.]+)", pattern)]
        if expected:
            regex = "".join(
                r"([0-9.]+)" if part.startswith("~") else
                re.escape(part).replace(r"\*", ".*").replace(r"\?", ".")
                for part in re.split(r"(~[0-9.]+)", pattern))
            seen = [float(x) for x in re.fullmatch(regex, lines[at]).groups()]
            assert seen == pytest.approx(expected, rel=rel), lines[at]
        at += 1


# --------------------------------------------------------------------------- registration

def test_options_markers_and_ini_are_registered(run):
    help_text = run("--help")
    help_text.stdout.fnmatch_lines([
        "memtrack: memory limits, leak checks and baselines:",
        "  --memtrack *measure every test and print the tests with the largest*",
        "  --memtrack-top=N *",
        "  --memtrack-baseline=FILE",
        "  --memtrack-update-baseline",
        "  --memtrack-tolerance=PERCENT",
        "  --memtrack-floor=SIZE",
        "  --memtrack-repeat=N *",
    ])
    for ini in ("memtrack (bool)", "memtrack_top (string)", "memtrack_baseline (string)",
                "memtrack_update_baseline (bool)", "memtrack_tolerance (string)",
                "memtrack_floor (string)", "memtrack_repeat (string)"):
        help_text.stdout.fnmatch_lines([f"  {ini}:*"])
    run("--markers").stdout.fnmatch_lines(
        ["@pytest.mark.memtrack(peak=None, retained=None, worker_peak=None, pool_peak=None, "
         "phases=None): fail the test when its memory goes over a limit*"])


def test_a_marked_test_raises_no_unknown_marker_warning(pytester, run):
    pytester.makepyfile(test_marked="""
        import pytest

        @pytest.mark.memtrack(peak="1 GB")
        def test_marked():
            pass
    """)
    result = run("--strict-markers", "-W", "error")
    result.assert_outcomes(passed=1)
    assert "PytestUnknownMarkWarning" not in result.stdout.str()


INERT_TESTS = """
    import os, threading
    import memtrack
    from helpers import touch

    def test_1_spike():
        buf = touch(64)
        del buf

    def test_2_nothing_was_measured_or_reset():
        # the spike of the previous test is still the process's peak: nobody reset it
        assert memtrack.peak_rss() - memtrack.rss() > 60 * 1024 * 1024
        assert "MEMTRACK_TABLE" not in os.environ
        assert memtrack._core.counters()["open"] == 0       # no phase held open
        assert memtrack.summary() == {} and list(memtrack.records()) == []
        assert not [t for t in threading.enumerate() if t.name.startswith("memtrack")]

    def test_3_fails():
        assert 1 == 2

    def test_4_skipped():
        import pytest
        pytest.skip("no")
"""


def test_the_plugin_is_inert_when_unused(pytester, run):
    # given tests that use neither the fixture, nor the marker, nor an option
    pytester.makepyfile(test_inert=INERT_TESTS)
    # when they run with the plugin loaded and without it
    loaded = run("-v", "--trace-config")
    blocked = run("-v", "-p", "no:memtrack")
    # then the outcomes are the same, and nothing was measured (test_2's asserts)
    loaded.assert_outcomes(passed=2, failed=1, skipped=1)
    blocked.assert_outcomes(passed=2, failed=1, skipped=1)
    assert "largest peaks" not in loaded.stdout.str()
    # and the plugin was loaded, through its entry point, in the first run only
    loaded.stdout.fnmatch_lines(["*registered third-party plugins:*", "*memtrack-0.1.0*"])
    assert "memtrack-0.1.0" not in blocked.stdout.str()


# --------------------------------------------------------------------------- limits

LIMITS_TESTS = """
    import pytest
    import memtrack
    from helpers import touch

    keep = []

    @pytest.mark.memtrack(peak="100 MB")
    def test_peak_under():
        buf = touch(40)
        del buf

    @pytest.mark.memtrack(peak="50 MB")
    def test_peak_over():
        with memtrack.phase("load"):
            buf = touch(80)
            del buf
        with memtrack.phase("index"):
            with memtrack.phase("parse"):
                buf = touch(30)
                del buf
        with memtrack.phase("small"):
            buf = touch(4)
            del buf

    @pytest.mark.memtrack(peak=50 * 1024 * 1024)
    def test_peak_over_int_limit():
        buf = touch(64)
        del buf

    @pytest.mark.memtrack(retained="30 MiB")
    def test_retained_under():
        keep.append(touch(16))

    @pytest.mark.memtrack(retained="30 MiB")
    def test_retained_over():
        with memtrack.phase("cache"):
            keep.append(touch(40))

    @pytest.mark.memtrack(phases={"index/parse": "50 MB", "load": "10 MB"})
    def test_phase_limits():
        with memtrack.phase("index"):
            with memtrack.phase("parse"):
                buf = touch(20)
                del buf
        with memtrack.phase("load"):
            buf = touch(30)
            del buf

    @pytest.mark.memtrack(phases={"parse": "1 GB"})
    def test_phase_that_never_ran():
        with memtrack.phase("load"):
            pass

    @pytest.mark.memtrack(peek="1 MB")
    def test_unknown_limit():
        pass

    @pytest.mark.memtrack(peak="lots")
    def test_unreadable_size():
        pass

    @pytest.mark.memtrack(peak="10 MB")
    class TestClassLimit:
        @pytest.mark.memtrack(retained="1 GB")
        def test_class_limit_applies(self):
            buf = touch(20)
            del buf

    @pytest.mark.memtrack(peak="1 MB")
    def test_failing_body_is_not_blamed_on_memory():
        buf = touch(20)
        assert buf is None
"""


def test_limits_pass_and_fail_with_exact_messages(pytester, run):
    pytester.makepyfile(test_limits=LIMITS_TESTS)
    result = run("-v", "-rfE")
    out = result.stdout
    out.fnmatch_lines([
        "*::test_peak_under PASSED*",
        "*::test_peak_over FAILED*",
        "*::test_peak_over_int_limit FAILED*",
        "*::test_retained_under PASSED*",
        "*::test_retained_over FAILED*",
        "*::test_phase_limits FAILED*",
        "*::test_phase_that_never_ran FAILED*",
        "*::test_unknown_limit ERROR*",
        "*::test_unreadable_size ERROR*",
        "*::TestClassLimit::test_class_limit_applies FAILED*",
        "*::test_failing_body_is_not_blamed_on_memory FAILED*",
    ])
    # peak: the measured value, the limit as bytes and as written, the 3 largest phases
    expect_lines(result, [
        "*_ test_peak_over _*",
        "memtrack: peak ~80 MiB is over the limit 47.7 MiB (peak='50 MB')",
        "  largest phases: load +~80 MiB, index +~30 MiB, index/parse +~30 MiB",
    ])
    expect_lines(result, [
        "*_ test_peak_over_int_limit _*",
        "memtrack: peak ~64 MiB is over the limit 50.0 MiB (peak=52428800)",
        "  largest phases: (no phases ran)",
    ])
    expect_lines(result, [
        "*_ test_retained_over _*",
        "memtrack: retained ~40 MiB is over the limit 30.0 MiB (retained='30 MiB')",
        "  largest phases: cache +~40 MiB",
    ])
    expect_lines(result, [
        "*_ test_phase_limits _*",
        "memtrack: phase load peaked at +~30 MiB, over the limit 9.5 MiB (phases['load']='10 MB')",
        "  largest phases: load +~30 MiB, index +~20 MiB, index/parse +~20 MiB",
    ])
    assert "phases['index/parse']" not in out.str()  # 20 MiB is under its 50 MB
    expect_lines(result, [
        "*_ test_phase_that_never_ran _*",
        "memtrack: phase parse never ran in this test (limit phases['parse']='1 GB'); "
        "phases that ran: load",
    ])
    out.fnmatch_lines([
        "*_ ERROR at setup of test_unknown_limit _*",
        "memtrack marker: unknown limit peek=; use peak, retained, worker_peak, pool_peak, phases",
    ])
    out.fnmatch_lines([
        "*_ ERROR at setup of test_unreadable_size _*",
        "memtrack marker: peak: cannot read 'lots' as a size; use bytes or a unit such as "
        "'300 MB', '1.2 GB', '512 MiB'",
    ])
    # a class marker and a method marker combine
    expect_lines(result, [
        "*_ TestClassLimit.test_class_limit_applies _*",
        "memtrack: peak ~20 MiB is over the limit 9.5 MiB (peak='10 MB')",
    ])
    # a body that failed on its own is reported as such, without a memory message
    out.fnmatch_lines(["*_ test_failing_body_is_not_blamed_on_memory _*", "*assert buf is None*"])
    failing_body = out.str().split("test_failing_body_is_not_blamed_on_memory _")[1]
    assert "memtrack: peak" not in failing_body.split("short test summary")[0]
    result.assert_outcomes(passed=2, failed=7, errors=2)


POOL_TESTS = """
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor

    import pytest
    import memtrack
    from helpers import touch

    def analyze(mib):
        with memtrack.phase("index"):
            with memtrack.phase("parse"):
                buf = touch(mib)
                import time; time.sleep(0.15)   # long enough for the heartbeat and sampler
                del buf
        return os.getpid()

    def spawn_pool():
        return ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"))

    @pytest.mark.memtrack(worker_peak="120 MB")
    def test_worker_over_its_peak():
        with spawn_pool() as ex:
            assert ex.submit(analyze, 150).result() != os.getpid()

    @pytest.mark.memtrack(worker_peak="400 MB", pool_peak="300 MB")
    def test_pool_within_limits():
        with spawn_pool() as ex:
            ex.submit(analyze, 40).result()

    @pytest.mark.memtrack(pool_peak="80 MB")
    def test_pool_over_its_peak():
        with spawn_pool() as ex:
            ex.submit(analyze, 120).result()

    @pytest.mark.memtrack(worker_peak="1 GB")
    def test_no_worker_joined():
        pass
"""


def test_a_spawned_pool_worker_over_worker_peak_fails_the_test(pytester, run):
    # given ProcessPoolExecutors under spawn, started with no initializer: the workers
    # join the test's table through MEMTRACK_TABLE, which the marker set for the test
    pytester.makepyfile(test_pool=POOL_TESTS)
    result = run("-v", "--memtrack")
    out = result.stdout
    out.fnmatch_lines([
        "*::test_worker_over_its_peak FAILED*",
        "*::test_pool_within_limits PASSED*",
        "*::test_pool_over_its_peak FAILED*",
        "*::test_no_worker_joined FAILED*",
    ])
    # the worker's peak is its whole RSS: the 150 MiB it touched plus its interpreter
    expect_lines(result, [
        "*_ test_worker_over_its_peak _*",
        "memtrack: worker * peaked at ~175 MiB, over the limit 114.4 MiB (worker_peak='120 MB')",
        "  largest phases of worker *: index +~150 MiB, index/parse +~150 MiB",
    ], rel=0.15)
    expect_lines(result, [
        "*_ test_pool_over_its_peak _*",
        "memtrack: pool peak ~145 MiB is over the limit 76.3 MiB (pool_peak='80 MB')",
        "  largest worker phases: index +~120 MiB, index/parse +~120 MiB",
    ], rel=0.2)
    out.fnmatch_lines([
        "*_ test_no_worker_joined _*",
        "memtrack: worker_peak='1 GB' is set, but no worker joined the test's table: pools "
        "started inside the test join it through MEMTRACK_TABLE (a forkserver started "
        "before the test does not)",
    ])
    # and the summary names the workers of each test
    expect_lines(result, [
        "*memtrack: largest peaks (4 of 4 measured tests)*",
        "*test_pool.py::test_worker_over_its_peak",
        "*workers: 1, largest peak ~175 MiB (pid *), pool peak *",
        "*worker phases: index +~150 MiB, index/parse +~150 MiB",
    ], rel=0.15)
    result.assert_outcomes(passed=1, failed=3)


FIXTURE_TESTS = """
    import os, subprocess, sys, time
    import pytest
    from helpers import touch

    seen = {}

    @pytest.fixture
    def report_after(memtrack):
        yield memtrack
        # after the body: the test's measurements
        seen["peak"] = memtrack.peak_delta
        seen["retained"] = memtrack.retained
        seen["phases"] = {p: s.max_peak_delta for p, s in memtrack.phases.items()}
        seen["pool_peak"] = memtrack.pool_peak
        seen["workers"] = [(w.pid, w.tasks, w.state) for w in memtrack.workers()]
        seen["env"] = os.environ.get("MEMTRACK_TABLE")
        seen["table"] = memtrack.table.name

    keep = []

    def test_body(report_after):
        memtrack = report_after
        assert os.environ["MEMTRACK_TABLE"] == memtrack.table.name
        with pytest.raises(RuntimeError, match="measured when the body ends"):
            memtrack.peak_delta
        with memtrack.phase("load"):
            with memtrack.phase("parse"):
                buf = touch(48)
                del buf
        keep.append(touch(12))
        # a plain subprocess joins the test's table through the environment; it holds its
        # 30 MiB until the fixture's pool sampler has seen them (an event, not a window)
        code = ("import memtrack, sys\\n"
                "with memtrack.phase('child'):\\n"
                "    b = bytearray(30 << 20); b[::4096] = b'x' * len(b[::4096])\\n"
                "    print('ready', flush=True); sys.stdin.readline()\\n")
        child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline() == "ready\\n"
        deadline = time.monotonic() + 60
        while (memtrack.pool_peak or 0) <= 30 << 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        child.communicate("\\n")
        assert child.returncode == 0

    def test_after():
        mib = 1024 * 1024
        assert 47 * mib < seen["peak"] < 64 * mib, seen
        assert 11 * mib < seen["retained"] < 14 * mib, seen
        assert seen["phases"].keys() == {"load", "load/parse"}
        assert seen["phases"]["load/parse"] > 47 * mib
        assert [(tasks, state) for _, tasks, state in seen["workers"]] == [(1, "exited")]
        assert seen["pool_peak"] > 30 * mib
        assert seen["env"] == seen["table"]                   # set until teardown ends
        assert "MEMTRACK_TABLE" not in os.environ             # and removed after it

    def test_leak_check_on_the_fixture(memtrack):
        leaked = []
        with pytest.raises(AssertionError, match=r"keeps (9\\d|10\\d)\\.\\d KiB per call"):
            memtrack.assert_no_growth(lambda: leaked.append(bytes(range(256)) * 400),
                                      iterations=30)
        growth = memtrack.assert_no_growth(lambda: bytes(range(256)) * 400, iterations=20)
        assert growth.per_call < 4096
"""


def test_the_fixture_measures_the_body_and_gives_pools_a_table(pytester, run):
    pytester.makepyfile(test_fixture=FIXTURE_TESTS)
    result = run("-v", "-p", "no:randomly")
    result.assert_outcomes(passed=3)


# --------------------------------------------------------------------------- baselines

BASELINE_TESTS = """
    import mmap
    import os
    import pytest
    import memtrack
    from helpers import touch

    def test_grow():
        with memtrack.phase("parse"):
            buf = touch(int(os.environ["GROW_MIB"]))
            del buf

    @pytest.mark.memtrack(phases={"parse": "1 GB"})
    def test_marked_phase():
        with memtrack.phase("parse"):
            buf = touch(int(os.environ["PHASE_MIB"]))
            del buf
        assert os.environ.get("BREAK_PHASE") != "1"

    def test_tiny():
        # its own mapping, every page touched: malloc could hand back pages already resident
        buf = mmap.mmap(-1, int(os.environ.get("TINY_KIB", "8")) * 1024)
        buf[::4096] = b"x" * len(buf[::4096])
        del buf

    def test_sometimes_failing():
        assert os.environ.get("BREAK") != "1"
"""


def test_baseline_create_compare_tolerance_and_update(pytester, run, monkeypatch):
    pytester.makepyfile(test_base=BASELINE_TESTS)
    base = pytester.path / "memory-baseline.json"
    opts = (f"--memtrack-baseline={base.name}",)
    monkeypatch.setenv("GROW_MIB", "40")
    monkeypatch.setenv("PHASE_MIB", "20")

    # a missing baseline: nothing to compare, and a hint how to write one
    first = run(*opts)
    first.assert_outcomes(passed=4)
    first.stdout.fnmatch_lines([
        f"{base}: 0 within tolerance, 0 over, 0 improved, 4 not in the baseline",
        f"no baseline at {base} yet: write it with --memtrack-update-baseline",
    ])
    assert not base.exists()

    # create it, but never from a failing test
    monkeypatch.setenv("BREAK", "1")
    created = run(*opts, "--memtrack-update-baseline")
    created.assert_outcomes(passed=3, failed=1)
    created.stdout.fnmatch_lines([f"wrote {base}: 3 tests (3 new, 0 changed); "
                                  "1 failing tests not written"])
    text = base.read_text()
    data = json.loads(text)
    assert data["format"] == "memtrack-baseline/1"
    assert list(data["tests"]) == ["test_base.py::test_grow", "test_base.py::test_marked_phase",
                                   "test_base.py::test_tiny"]   # sorted; the failure left out
    assert text == json.dumps(data, indent=2, sort_keys=True) + "\n"   # one diff-friendly form
    mib = 1024 * 1024
    assert data["tests"]["test_base.py::test_grow"]["peak"] == pytest.approx(40 * mib, rel=0.03)
    assert set(data["tests"]["test_base.py::test_grow"]) == {"peak"}
    phase = data["tests"]["test_base.py::test_marked_phase"]["phases"]["parse"]
    assert phase == pytest.approx(20 * mib, rel=0.05)
    monkeypatch.delenv("BREAK")

    # within the tolerance (10%): passes; and so does a small test far over its baseline
    # in percent (8 KiB -> 600 KiB) but under the 1 MB floor, unless the floor is lower
    monkeypatch.setenv("GROW_MIB", "42")
    monkeypatch.setenv("TINY_KIB", "600")
    run(*opts).assert_outcomes(passed=4)
    run(*opts, "--memtrack-floor=100 kB").assert_outcomes(passed=3, failed=1)
    monkeypatch.delenv("TINY_KIB")

    # over the tolerance and the floor: fails, saying by how much
    monkeypatch.setenv("GROW_MIB", "60")
    monkeypatch.setenv("PHASE_MIB", "30")
    over = run(*opts)
    over.assert_outcomes(passed=2, failed=2)
    expect_lines(over, [
        "*_ test_grow _*",
        "memtrack: peak ~60 MiB is ~20 MiB over the baseline ~40 MiB (+~50%; "
        "allowed 10% and 976.6 KiB)",
        "  largest phases: parse +~60 MiB",
    ])
    expect_lines(over, [
        "*_ test_marked_phase _*",
        "memtrack: phase parse ~30 MiB is ~10 MiB over the baseline ~20 MiB (+~50%; "
        "allowed 10% and 976.6 KiB)",
    ])
    over.stdout.fnmatch_lines(  # test_sometimes_failing never got into the baseline
        [f"{base}: 1 within tolerance, 2 over, 0 improved, 1 not in the baseline"])

    # a wider tolerance lets it pass
    run(*opts, "--memtrack-tolerance=60%").assert_outcomes(passed=4)

    # an improvement passes and is reported
    monkeypatch.setenv("GROW_MIB", "10")
    monkeypatch.setenv("PHASE_MIB", "20")
    better = run(*opts)
    better.assert_outcomes(passed=4)
    expect_lines(better, [
        f"{base}: 2 within tolerance, 0 over, 1 improved, 1 not in the baseline",
        "  improved test_base.py::test_grow: peak ~40 MiB -> ~10 MiB (-~75%)",
        "record the new numbers with --memtrack-update-baseline",
    ])

    # an update within the tolerance leaves the entry as it was (no churn in the diff)
    monkeypatch.setenv("GROW_MIB", "41")
    before = json.loads(base.read_text())["tests"]
    kept = run(*opts, "--memtrack-update-baseline", "-k", "test_grow")
    kept.stdout.fnmatch_lines([f"wrote {base}: 3 tests (0 new, 0 changed); 0 failing tests *"])
    assert json.loads(base.read_text())["tests"] == before

    # updating records an improvement and a growth (reported as accepted); a failing
    # test keeps its old entry, whatever it measured
    monkeypatch.setenv("GROW_MIB", "10")
    monkeypatch.setenv("TINY_KIB", "2000")
    monkeypatch.setenv("PHASE_MIB", "40")
    monkeypatch.setenv("BREAK_PHASE", "1")
    monkeypatch.setenv("BREAK", "1")
    updated = run(*opts, "--memtrack-update-baseline")
    updated.assert_outcomes(passed=2, failed=2)
    after = json.loads(base.read_text())["tests"]
    assert after["test_base.py::test_grow"]["peak"] == pytest.approx(10 * mib, rel=0.05)
    assert after["test_base.py::test_tiny"]["peak"] > before["test_base.py::test_tiny"]["peak"]
    assert after["test_base.py::test_marked_phase"] == before["test_base.py::test_marked_phase"]
    assert "test_base.py::test_sometimes_failing" not in after
    updated.stdout.fnmatch_lines([
        "  accepted test_base.py::test_tiny: peak * over the baseline *",
        f"wrote {base}: 3 tests (0 new, 2 changed); 2 failing tests not written",
    ])


def test_repeat_keeps_the_median_so_one_noisy_run_does_not_fail(pytester, run):
    # given a test whose first run spikes to 80 MiB and whose other runs take 20 MiB
    pytester.makepyfile(test_repeat="""
        from helpers import touch
        runs = []

        def test_noisy():
            runs.append(1)
            buf = touch(80 if len(runs) == 1 else 20)
            del buf

        def test_ran_three_times():
            assert len(runs) == 3
    """)
    base = pytester.path / "b.json"
    base.write_text(json.dumps({"format": "memtrack-baseline/1", "tests": {
        "test_repeat.py::test_noisy": {"peak": 20 * 1024 * 1024}}}))
    # once, the spike fails the gate; the median of three runs does not
    run(f"--memtrack-baseline={base}", "-k", "test_noisy").assert_outcomes(failed=1)
    repeated = run(f"--memtrack-baseline={base}", "--memtrack-repeat=3", "--memtrack", "-v")
    repeated.assert_outcomes(passed=2)
    expect_lines(repeated, ["*median of 3 runs*", "  ~20 MiB * test_repeat.py::test_noisy"])


def test_ini_options_mirror_the_command_line(pytester, run):
    pytester.makeini("""
        [pytest]
        memtrack = true
        memtrack_top = 1
        memtrack_baseline = base/memory.json
        memtrack_update_baseline = true
        memtrack_tolerance = 25%
        memtrack_floor = 2 MB
    """)
    pytester.makepyfile(test_two="""
        from helpers import touch

        def test_big():
            buf = touch(30)

        def test_small():
            pass
    """)
    result = run()
    result.assert_outcomes(passed=2)
    out = result.stdout
    expect_lines(result, [
        "memtrack: peaks exact (kernel high-water mark); baseline */base/memory.json "
        "(tolerance 25% and 1.9 MiB, updating)",
        "*memtrack: largest peaks (1 of 2 measured tests)*",
        "  ~30 MiB * test_two.py::test_big",
    ])
    assert "test_two.py::test_small" not in out.str().split("largest peaks")[1]
    assert set(json.loads((pytester.path / "base" / "memory.json").read_text())["tests"]) == {
        "test_two.py::test_big", "test_two.py::test_small"}


def test_bad_option_values_are_usage_errors(pytester, run):
    pytester.makepyfile(test_x="def test_x(): pass")
    result = run("--memtrack-tolerance=lots")
    result.stderr.fnmatch_lines(
        ["ERROR: --memtrack-tolerance: cannot read 'lots' as a percentage such as '10%'"])
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result = run("--memtrack-update-baseline")
    result.stderr.fnmatch_lines(
        ["ERROR: --memtrack-update-baseline needs --memtrack-baseline=FILE"])
    (pytester.path / "broken.json").write_text("{not json")
    result = run("--memtrack-baseline=broken.json")
    result.stderr.fnmatch_lines(["ERROR: memtrack: baseline */broken.json: cannot read it as "
                                 "JSON: *"])


# --------------------------------------------------------------------------- bad baselines

GATED_TEST = """
    import pathlib

    def test_x():
        pathlib.Path("ran").write_text("yes")   # never, when the baseline is refused
"""


def _baseline(tests: object, **top: object) -> bytes:
    return json.dumps({"format": "memtrack-baseline/1", "tests": tests, **top}).encode()


def _entry(entry: object) -> bytes:
    return _baseline({"test_x.py::test_x": entry})


def assert_usage_error(result: pytest.RunResult, message: str) -> None:
    """pytest refused to start with exactly one error line, `message`, and no traceback."""
    out = result.stdout.str() + "\n" + result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR, out
    assert [line for line in result.stderr.lines if line.startswith("ERROR")] == [
        f"ERROR: {message}"], out
    assert "INTERNALERROR" not in out and "Traceback" not in out, out


LATIN1 = b'{"format": "memtrack-baseline/1", "tests": {"test_x.py::test_caf\xe9": {"peak": 1}}}'
TOP = 'an object {"format": "memtrack-baseline/1", "tests": {...}}'
ENTRY = ", entry 'test_x.py::test_x'"
SIZE = ": expected a whole number of bytes (0 to 2**63 - 1), got"
UNKNOWN = (": unknown field; memtrack-baseline/1 has only 'format' and 'tests', an entry only "
           "'peak' and 'phases' (remove it: an update would not keep it)")
#: id: (the file's bytes, the error after "memtrack: baseline FILE")
MALFORMED = {
    "not_utf8": (LATIN1, f": not UTF-8 text (byte 0xe9 at offset {LATIN1.index(0xE9)})"),
    "empty": (b"", f": the file is empty; expected {TOP}"),
    "blank": (b"\n  \n", f": the file is empty; expected {TOP}"),
    "not_json": (b"{not json", ": cannot read it as JSON: Expecting property name enclosed in "
                               "double quotes: line 1 column 2 (char 1)"),
    "nested_too_deep": (b"[" * 100_000, ": cannot read it as JSON: maximum recursion depth "
                                        "exceeded while decoding a JSON array from a unicode "
                                        "string"),
    "too_many_digits": (_entry({"peak": 0}).replace(b"0", b"9" * 5000),
                        ": cannot read it as JSON: Exceeds the limit (4300 digits) for integer "
                        "string conversion: value has 5000 digits; use "
                        "sys.set_int_max_str_digits() to increase the limit"),
    "top_level_array": (b"[1, 2]", f": expected {TOP}, got [1, 2] (array)"),
    "format_missing": (b'{"tests": {}}', ", field 'format': expected \"memtrack-baseline/1\", "
                                         "but the field is missing"),
    "format_wrong": (b'{"format": "memtrack-baseline/2", "tests": {}}',
                     ", field 'format': expected \"memtrack-baseline/1\", got "
                     "\"memtrack-baseline/2\" (string)"),
    "tests_missing": (b'{"format": "memtrack-baseline/1"}',
                      ", field 'tests': expected an object {test id: entry}, but the field is "
                      "missing"),
    "tests_array": (_baseline([]),
                    ", field 'tests': expected an object {test id: entry}, got [] (array)"),
    "unknown_top_field": (_baseline({}, comment="x"), ", field 'comment'" + UNKNOWN),
    "entry_number": (_entry(5),
                     ENTRY + ': expected an object such as {"peak": 1048576}, got 5 (integer)'),
    "entry_null": (_entry(None),
                   ENTRY + ': expected an object such as {"peak": 1048576}, got null'),
    "peak_missing": (_entry({}), ENTRY + ", field 'peak': expected a whole number of bytes "
                                         "(0 to 2**63 - 1), but the field is missing"),
    "peak_float": (_entry({"peak": 1.5}), ENTRY + ", field 'peak'" + SIZE + " 1.5 (float)"),
    "peak_whole_float": (_entry({"peak": 1048576.0}),
                         ENTRY + ", field 'peak'" + SIZE + " 1048576.0 (float)"),
    "peak_nan": (_entry({"peak": float("nan")}), ENTRY + ", field 'peak'" + SIZE + " NaN (float)"),
    "peak_bool": (_entry({"peak": True}), ENTRY + ", field 'peak'" + SIZE + " true (boolean)"),
    "peak_string": (_entry({"peak": "40 MB"}),
                    ENTRY + ", field 'peak'" + SIZE + ' "40 MB" (string)'),
    "peak_null": (_entry({"peak": None}), ENTRY + ", field 'peak'" + SIZE + " null"),
    "peak_negative": (_entry({"peak": -1}), ENTRY + ", field 'peak'" + SIZE + " -1 (integer)"),
    "peak_2_to_63": (_entry({"peak": 2**63}),
                     ENTRY + ", field 'peak'" + SIZE + " 9223372036854775808 (integer)"),
    "phases_array": (_entry({"peak": 1, "phases": [1]}), ENTRY + ", field 'phases': expected "
                                                         "an object {phase path: bytes}, got "
                                                         "[1] (array)"),
    "phase_float": (_entry({"peak": 1, "phases": {"parse": 1.5}}),
                    ENTRY + ", field \"phases['parse']\"" + SIZE + " 1.5 (float)"),
    "unknown_entry_field": (_entry({"peak": 1, "peek": 2}), ENTRY + ", field 'peek'" + UNKNOWN),
}


@pytest.mark.parametrize("content, message", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_baseline_is_one_usage_error_before_any_test_runs(
        pytester, run, content, message):
    pytester.makepyfile(test_x=GATED_TEST)
    base = pytester.path / "baseline.json"
    base.write_bytes(content)
    # the gate refuses the file, and so does an update, which leaves it as it was
    for update in ((), ("--memtrack-update-baseline",)):
        result = run(f"--memtrack-baseline={base.name}", *update)
        assert_usage_error(result, f"memtrack: baseline {base}{message}")
        assert not (pytester.path / "ran").exists()
        assert base.read_bytes() == content
    assert sorted(p.name for p in pytester.path.glob("baseline*")) == ["baseline.json"]


def test_a_directory_as_the_baseline_is_a_usage_error(pytester, run):
    pytester.makepyfile(test_x=GATED_TEST)
    (pytester.path / "ci" / "baseline.json").mkdir(parents=True)
    base = pytester.path / "ci" / "baseline.json"
    expected = f"memtrack: baseline {base}: cannot read it: Is a directory"
    assert_usage_error(run("--memtrack-baseline=ci/baseline.json"), expected)
    pytester.makeini("[pytest]\nmemtrack_baseline = ci/baseline.json\n")
    assert_usage_error(run("--memtrack-update-baseline"), expected)
    assert base.is_dir() and not list(base.iterdir())
    assert not (pytester.path / "ran").exists()


def test_a_well_formed_baseline_at_the_limits_is_accepted(pytester, run):
    pytester.makepyfile(test_x=GATED_TEST)
    base = pytester.path / "baseline.json"
    base.write_bytes(_baseline({
        "test_x.py::test_x": {"peak": 2**63 - 1, "phases": {}},
        "test_gone.py::test_zero": {"peak": 0, "phases": {"a/b": 0, "c": 2**63 - 1}},
    }))
    result = run(f"--memtrack-baseline={base.name}")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"{base}: 0 within tolerance, 0 over, 1 improved, "
                                 "0 not in the baseline"])


def test_the_update_replaces_the_file_whole_and_keeps_its_mode(pytester, run):
    pytester.makepyfile(test_x=GATED_TEST)
    base = pytester.path / "baseline.json"
    umask = os.umask(0o022)
    os.umask(umask)
    # a new file: the mode the umask gives any new file (not a temporary file's 0600)
    run(f"--memtrack-baseline={base.name}", "--memtrack-update-baseline").assert_outcomes(
        passed=1)
    assert stat.S_IMODE(base.stat().st_mode) == 0o666 & ~umask
    # an existing file keeps its mode; it is replaced (a new inode), not written in place
    base.write_bytes(_baseline({"test_x.py::test_x": {"peak": 2**40}}))
    base.chmod(0o640)
    inode = base.stat().st_ino
    run(f"--memtrack-baseline={base.name}", "--memtrack-update-baseline").assert_outcomes(
        passed=1)
    assert stat.S_IMODE(base.stat().st_mode) == 0o640
    assert base.stat().st_ino != inode
    assert json.loads(base.read_text())["tests"]["test_x.py::test_x"]["peak"] < 2**40
    assert sorted(p.name for p in pytester.path.glob("baseline*")) == ["baseline.json"]


# --------------------------------------------------------------------------- xdist

def test_xdist_workers_measure_and_the_controller_merges(pytester, run):
    pytest.importorskip("xdist")
    pytester.makepyfile(test_spread=textwrap.dedent("""
        import pytest
        import memtrack
        from helpers import touch

        @pytest.mark.parametrize("mib", [10, 20, 30, 40])
        def test_size(mib):
            with memtrack.phase(f"p{mib}"):
                buf = touch(mib)
                del buf
    """))
    base = pytester.path / "b.json"
    result = run("-n", "2", "-v", "--memtrack", "--memtrack-top=3",
                 f"--memtrack-baseline={base}", "--memtrack-update-baseline")
    result.assert_outcomes(passed=4)
    out = result.stdout
    expect_lines(result, [
        "*memtrack: largest peaks (3 of 4 measured tests)*",
        "  ~40 MiB * test_spread.py::test_size?40?",
        "* phases: p40 +~40 MiB",
        "  ~30 MiB * test_spread.py::test_size?30?",
        "* phases: p30 +~30 MiB",
        "  ~20 MiB * test_spread.py::test_size?20?",
        f"wrote {base}: 4 tests (4 new, 0 changed); 0 failing tests not written",
    ])
    # both workers ran (and measured) tests; the merged baseline has all four
    out.fnmatch_lines(["[[]gw0[]]*PASSED test_spread.py::*"])
    out.fnmatch_lines(["[[]gw1[]]*PASSED test_spread.py::*"])
    tests = json.loads(base.read_text())["tests"]
    mib = 1024 * 1024
    assert {k: round(v["peak"] / mib) for k, v in tests.items()} == {
        f"test_spread.py::test_size[{n}]": n for n in (10, 20, 30, 40)}


def test_phases_are_still_the_tests_after_it_calls_memtrack_reset(pytester, run):
    # reset() clears the record ring, so counting ring entries would lose the test's
    # phases when as many records existed before it as it makes: the plugin counts
    # completed phases instead, which reset() never clears.
    pytester.makepyfile(test_reset="""
        import pytest
        import memtrack as mt

        @pytest.fixture
        def show_phases(memtrack):
            yield
            print("PHASES", sorted((p, s.count) for p, s in memtrack.phases.items()))

        def test_1_earlier_phases():
            for _ in range(3):
                with mt.phase("earlier"):
                    pass

        def test_2_reset_then_phases(memtrack, show_phases):
            mt.reset()
            for _ in range(3):
                with memtrack.phase("after"):
                    pass
    """)
    result = run("-s")
    result.assert_outcomes(passed=2)
    assert "PHASES [('after', 3)]" in result.stdout.str()


def test_always_on_reads_retained_without_collecting_unless_it_rose(pytester, run):
    # given a suite under --memtrack: tests that keep nothing, one that keeps 24 MiB, one
    # that leaves 24 MiB of garbage in a reference cycle, and one with a retained= limit
    pytester.makeconftest("""
        import gc

        FULL = []
        gc.callbacks.append(lambda phase, info: phase == "start" and info["generation"] == 2
                            and FULL.append(1))

        def pytest_terminal_summary(terminalreporter):
            terminalreporter.write_line(f"FULL COLLECTIONS {len(FULL)}")
    """)
    pytester.makepyfile(test_retained="""
        import gc
        import pytest
        from helpers import touch

        KEPT = []

        @pytest.mark.parametrize("i", range(20))
        def test_keeps_nothing(i):
            pass

        def test_keeps_24_mib():
            KEPT.append(touch(24))

        def test_leaves_a_cycle_of_24_mib():
            gc.disable()  # only the plugin's collection may free it
            cycle = [touch(24)]
            cycle.append(cycle)

        @pytest.mark.memtrack(retained="100 MB")
        def test_with_a_retained_limit():
            gc.enable()
    """)
    result = run("--memtrack", "--memtrack-top=30")
    result.assert_outcomes(passed=23)
    # then the kept memory is retained and the garbage is not (the rise was confirmed by
    # a collection), both ranked in the summary by their peaks as before
    rows = {}
    for line in result.stdout.lines:
        m = re.fullmatch(r"\s*([0-9.]+ [KMG]?i?B)\s+([-+]?[0-9.]+ [KMG]?i?B)\s+(\S+)", line)
        if m:
            rows[m.group(3).split("::")[-1]] = (m.group(1), m.group(2))
    ranked = [name for name in rows]
    assert ranked[:2] == ["test_keeps_24_mib", "test_leaves_a_cycle_of_24_mib"] or \
        ranked[:2] == ["test_leaves_a_cycle_of_24_mib", "test_keeps_24_mib"], ranked
    size = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}

    def number(text):
        value, unit = text.split()
        return float(value) * size[unit]

    assert 20 << 20 < number(rows["test_keeps_24_mib"][1]) < 26 << 20  # less what gc freed
    assert number(rows["test_leaves_a_cycle_of_24_mib"][0]) > 23 << 20
    assert number(rows["test_leaves_a_cycle_of_24_mib"][1]) < 1 << 20
    # and the 20 quiet tests were read without a full collection: only the two rises that
    # needed confirming and the limited test's two collections, not two per test
    full = int(re.search(r"FULL COLLECTIONS (\d+)", result.stdout.str()).group(1))
    assert full <= 6, full
