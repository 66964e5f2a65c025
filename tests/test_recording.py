"""memtrack.record: the timeline recorder, its records, and files cut short by SIGKILL."""

import errno
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import pool_tasks
import pytest
from conftest import MB, touch, wait_for

import memtrack
from memtrack import _core

HERE = os.path.dirname(__file__)


def test_recording_of_a_pool_has_every_record_kind(tmp_path):
    path = tmp_path / "pool.mtp"
    with memtrack.WorkerTable(capacity=4, heartbeat=0.02) as table:
        with memtrack.record(path, interval=0.02) as rec:
            with memtrack.phase("setup"):
                spike = touch(48 * MB)
                del spike
            with ProcessPoolExecutor(
                2,
                mp_context=mp.get_context("fork"),
                initializer=memtrack.init_worker,
                initargs=(table.name,),
            ) as ex:
                pids = set(ex.map(pool_tasks.analyze, [16, 32, 16, 32]))
    p = memtrack.load(path)
    assert p.header["kind"] == "recording" and p.header["table"] == table.name
    assert p.header["interval"] == 0.02 and "limits" in p.header and p.header["cpu_limit"] >= 1
    assert p.truncated is None
    sources = Counter(s["source"] for s in p.samples)
    assert sources["self"] >= 3 and sources["worker"] >= 1
    kinds = Counter(e["kind"] for e in p.events)
    assert kinds["join"] == 2 and kinds["exit"] == 2 and kinds["task"] >= 2
    assert {w["pid"] for w in p.workers} == pids
    assert sum(w["tasks"] for w in p.workers) == 4
    assert all(w["phases"]["index/parse"]["count"] >= 1 for w in p.workers)
    assert [s.path for s in p.phases] == ["setup"]
    assert p.summary["setup"].count == 1
    # the exact peak of this process between two samples caught the 48 MiB spike
    self_samples = [s for s in p.samples if s["source"] == "self"]
    assert max(s["peak_rss"] - s["rss"] for s in self_samples) >= 40 * MB
    assert rec.status["samples"] == sources["self"]


def test_task_events_carry_retained_memory(tmp_path):
    path = tmp_path / "tasks.mtp"
    with memtrack.WorkerTable(capacity=2) as table:
        with memtrack.record(path, interval=0.01):
            code = textwrap.dedent("""
                import memtrack, time
                keep = []
                for i in range(5):
                    with memtrack.phase("task"):
                        keep.append(bytearray(40 << 20))
                    time.sleep(0.05)
            """)
            subprocess.run(
                [sys.executable, "-c", code], env={**os.environ, **table.environ()}, check=True
            )
    p = memtrack.load(path)
    tasks = [e for e in p.events if e["kind"] == "task"]
    assert [e["tasks"] for e in tasks] == [1, 2, 3, 4, 5]
    retained = [e["retained"] for e in tasks]
    assert all(b - a >= 35 * MB for a, b in zip(retained, retained[1:], strict=False))


def test_a_killed_run_leaves_a_file_readable_to_its_last_chunk(tmp_path):
    path = tmp_path / "killed.mtp"
    code = textwrap.dedent(f"""
        import memtrack, time
        with memtrack.record({str(path)!r}, interval=0.01):
            print("recording", flush=True)
            time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    p.stdout.readline()
    # at least two chunk flushes (one a second) that hold 50 samples: wait for them on disk
    wait_for(lambda: path.stat().st_size and
             len(memtrack.load(path, partial=True).samples) >= 50, timeout=120,
             what="50 samples flushed to the file")
    p.send_signal(signal.SIGKILL)
    p.wait()
    with pytest.raises(memtrack.ProfileError, match="no end record|truncated"):
        memtrack.load(path)
    prof = memtrack.load(path, partial=True)
    assert prof.truncated is not None
    assert len(prof.samples) >= 50  # a second of 10 ms samples at least
    times = [s["time"] for s in prof.samples]
    assert times == sorted(times)


def test_a_file_cut_inside_a_record_reads_up_to_that_record(tmp_path):
    path = tmp_path / "cut.mtp"
    with memtrack.record(path, interval=0.005) as rec:
        wait_for(lambda: rec.live_status()["samples"] >= 20, what="20 samples")
    data = path.read_bytes()
    whole = memtrack.load(path)
    cut = memtrack.profile.parse(data[: len(data) // 2], partial=True)
    assert "truncated" in cut.truncated
    assert 0 < len(cut.samples) < len(whole.samples)


def test_memtrack_run_style_recording_of_descendants(tmp_path):
    # root_pid: every descendant is sampled through /proc, memtrack-aware or not
    path = tmp_path / "tree.mtp"
    code = (
        "import time\nb = bytearray(64 << 20)\n"
        "for i in range(0, len(b), 4096): b[i] = 1\ntime.sleep(0.6)"
    )
    child = subprocess.Popen(["sh", "-c", f"{sys.executable} -c '{code}' & wait"])
    with memtrack.record(path, interval=0.02, root_pid=child.pid):
        child.wait()
    p = memtrack.load(path)
    procs = [s for s in p.samples if s["source"] == "proc"]
    assert [s["source"] for s in p.samples if s["pid"] == child.pid][0] == "root"
    assert max(s["rss"] for s in procs) >= 64 * MB  # the grandchild
    assert any(s["pss"] is not None for s in procs)
    kinds = Counter(e["kind"] for e in p.events)
    assert kinds["join"] >= 2 and kinds["exit"] >= 1


def test_memtrack_profile_records_a_whole_process(tmp_path):
    path = tmp_path / "env.mtp"
    code = "import memtrack, time\nwith memtrack.phase('work'):\n    time.sleep(0.2)"
    subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "MEMTRACK_PROFILE": str(path), "MEMTRACK_INTERVAL": "0.01"},
        check=True,
    )
    p = memtrack.load(path)
    assert p.header["interval"] == 0.01
    assert len(p.samples) >= 10
    assert [s.path for s in p.phases] == ["work"]


def test_memtrack_profile_with_pid_records_each_process(tmp_path):
    pattern = str(tmp_path / "p-{pid}.mtp")
    code = (
        "import memtrack, subprocess, sys\n"
        "subprocess.run([sys.executable, '-c', 'import memtrack'])"
    )
    subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "MEMTRACK_PROFILE": pattern}, check=True
    )
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2 and all(memtrack.load(tmp_path / f).samples for f in files)


@pytest.mark.parametrize("bad, words", [("x", "not a number"), ("0", "between"), ("-1", "between")])
def test_bad_interval_in_the_environment(bad, words, monkeypatch):
    monkeypatch.setenv("MEMTRACK_INTERVAL", bad)
    with pytest.raises(ValueError, match=words):
        memtrack.record("/dev/null")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="interval"):
        memtrack.record(tmp_path / "x", interval=0)
    with pytest.raises(ValueError, match="pss_every"):
        memtrack.record(tmp_path / "x", pss_every=0)
    with pytest.raises(FileNotFoundError):
        memtrack.record(tmp_path / "missing-dir" / "x").start()
    r = memtrack.record(tmp_path / "twice")
    with r:
        with pytest.raises(RuntimeError, match="already running"):
            r.start()


def test_a_header_that_cannot_be_written_fails_the_start(tmp_path):
    # /dev/full refuses every write with ENOSPC: the header write fails at once.
    with pytest.raises(OSError) as info:
        memtrack.record("/dev/full").start()
    assert info.value.errno == errno.ENOSPC


def test_the_sampling_threads_write_error_surfaces_when_stopping():
    # The native thread's own writes fail (here every one, on /dev/full): the recorder
    # keeps sampling, and stop() raises the first error, naming the call.
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        rec = _core.Recorder(fd, 0.001)
        rec.start()
        wait_for(lambda: rec.status()["samples"] >= 3, what="three samples")
        with pytest.raises(OSError) as info:
            rec.stop()
    finally:
        os.close(fd)
    assert info.value.errno == errno.ENOSPC and info.value.syscall == "write"


def test_a_recording_that_fills_its_filesystem_says_so_when_it_stops(tmp_path):
    # A real full filesystem: a 64 KiB tmpfs. The header fits, the samples do not.
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        rec = memtrack.record(mount / "run.mtp", interval=0.001)
        rec.start()
        wait_for(lambda: os.statvfs(mount).f_bavail == 0, what="the tmpfs to fill")
        with pytest.raises(OSError) as info:
            rec.stop()
        assert info.value.errno == errno.ENOSPC
        # what reached the disk is still a readable, if cut, profile
        assert memtrack.load(mount / "run.mtp", partial=True).truncated
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_forked_child_does_not_touch_the_parents_recording(tmp_path):
    path = tmp_path / "fork.mtp"
    code = textwrap.dedent("""
        import memtrack, os, time
        time.sleep(0.1)
        pid = os.fork()
        if pid == 0:
            time.sleep(0.1)
            raise SystemExit(0)  # a normal exit: atexit hooks run in the child
        os.waitpid(pid, 0)
        time.sleep(0.1)
    """)
    subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "MEMTRACK_PROFILE": str(path)}, check=True
    )
    p = memtrack.load(path)  # one tail, one end record: "data after the end record" before
    assert p.truncated is None and len(p.samples) >= 3


@pytest.mark.parametrize(
    "env", [{"MEMTRACK_INTERVAL": "soon"}, {"MEMTRACK_PROFILE": "/nonexistent-dir/x.mtp"}]
)
def test_a_misconfigured_environment_warns_and_imports(env):
    out = subprocess.run(
        [sys.executable, "-c", "import memtrack; print('imported')"],
        env={**os.environ, "MEMTRACK_PROFILE": "/tmp/unused-{pid}.mtp", **env},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and out.stdout.strip() == "imported"
    assert "not recording" in out.stderr
