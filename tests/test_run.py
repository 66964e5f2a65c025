"""memtrack run: any command, measured through /proc and the worker table."""

import os
import signal
import subprocess
import sys

from conftest import MB, wait_for

import memtrack

LEAK = """
import memtrack, time
keep = []
for i in range(6):
    with memtrack.phase("task"):
        keep.append(bytearray(30 << 20))
    time.sleep(0.05)
"""


def run(tmp_path, *command, timeout=120):
    out = tmp_path / "run.mtp"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "memtrack",
            "run",
            "-o",
            str(out),
            "--interval",
            "0.02",
            "--",
            *command,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
    )
    return proc, out


def test_a_leaking_memtrack_aware_child_is_measured_and_flagged(tmp_path):
    proc, out = run(tmp_path, sys.executable, "-c", LEAK)
    assert proc.returncode == 0, proc.stderr
    p = memtrack.load(out)
    assert p.header["command"][0] == sys.executable
    # The command imports memtrack, so it joined the table through MEMTRACK_TABLE: as the
    # root (the command), not as a worker of its own pool.
    assert p.workers == []
    (root,) = [w for w in p.processes if w["source"] == "table"]
    assert root["role"] == "root" and root["pid"] == p.processes[0]["pid"]
    assert root["tasks"] == 6 and root["phases"]["task"]["count"] == 6
    retained = [e["retained"] for e in p.events if e["kind"] == "task"]
    assert retained[-1] - retained[0] >= 120 * MB
    assert "profile:" in proc.stdout and "Insights" in proc.stdout


def test_programs_that_never_import_memtrack_are_measured(tmp_path):
    code = (
        "b = bytearray(80 << 20)\n"
        "for i in range(0, len(b), 4096): b[i] = 1\nimport time; time.sleep(0.5)"
    )
    proc, out = run(tmp_path, "sh", "-c", f"{sys.executable} -c '{code}'")
    assert proc.returncode == 0, proc.stderr
    p = memtrack.load(out)
    # The shell is the command (the root); the python it starts is its worker, measured
    # through /proc, and has a final record like a table's worker.
    assert max(s["rss"] for s in p.samples if s["role"] == "worker") >= 80 * MB
    (worker,) = p.workers
    assert worker["source"] == "proc" and worker["peak_rss"] >= 80 * MB
    assert [w["role"] for w in p.processes] == ["root"]


def test_the_exit_code_of_a_failing_command_is_kept(tmp_path):
    proc, out = run(tmp_path, "sh", "-c", "exit 3")
    assert proc.returncode == 3
    assert memtrack.load(out).truncated is None


def test_a_killed_command_reports_its_signal(tmp_path):
    proc, out = run(
        tmp_path, sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    )
    assert proc.returncode == 128 + signal.SIGKILL
    assert memtrack.load(out).header["kind"] == "recording"


def test_a_killed_worker_is_a_death_event(tmp_path):
    code = (
        "import memtrack, os, signal, time\nwith memtrack.phase('doomed'):\n"
        "    b = bytearray(20 << 20); time.sleep(0.2); os.kill(os.getpid(), signal.SIGKILL)"
    )
    proc, out = run(tmp_path, "sh", "-c", f'{sys.executable} -c "{code}"; exit 0')
    assert proc.returncode == 0
    p = memtrack.load(out)
    deaths = [e for e in p.events if e["kind"] == "death"]
    assert len(deaths) == 1 and deaths[0]["phase"] == "doomed"
    (w,) = p.workers
    assert w["state"] == "killed" and w["phase"] == "doomed"


def test_command_not_found(tmp_path):
    proc, out = run(tmp_path, "no-such-command-xyz")
    assert proc.returncode == 127 and "command not found" in proc.stderr


def test_no_command_is_a_usage_error(tmp_path):
    proc, _ = run(tmp_path)
    assert proc.returncode == 1 and "no command to run" in proc.stderr


def test_ctrl_c_stops_the_command_and_still_writes_the_profile(tmp_path):
    out = tmp_path / "int.mtp"
    # own session: the SIGINT goes to memtrack and the command, as a terminal's would
    proc = subprocess.Popen(
        [sys.executable, "-m", "memtrack", "run", "-o", str(out), "--", "sleep", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    # interrupt once more than 10 samples reached the file (an event, not a 1 s window)
    wait_for(lambda: out.exists() and out.stat().st_size
             and len(memtrack.load(out, partial=True).samples) > 10, timeout=120,
             what="11 samples in the profile")
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert "interrupted" in stderr
    p = memtrack.load(out)
    assert p.truncated is None and len(p.samples) > 10


def test_compileall_over_a_real_tree(tmp_path):
    # A real program nobody here wrote: the standard library's byte-compiler, -j 0. The
    # tree is big enough (a few hundred files) for its workers to outlive many samples.
    import shutil

    src = tmp_path / "src"
    for package in ("json", "email", "xml", "http", "unittest", "asyncio", "multiprocessing",
                    "concurrent", "logging", "importlib", "urllib", "sqlite3"):
        shutil.copytree(os.path.dirname(__import__(package).__file__), src / package)
    proc, out = run(tmp_path, sys.executable, "-m", "compileall", "-q", "-j", "0", str(src))
    assert proc.returncode == 0, proc.stderr
    p = memtrack.load(out)
    roots = {s["pid"] for s in p.samples if s["source"] == "root"}
    procs = {s["pid"] for s in p.samples if s["source"] == "proc"}
    assert len(roots) == 1 and len(procs) >= 1  # the pool's workers, seen through /proc
    assert len(list(src.rglob("*.pyc"))) >= 200
