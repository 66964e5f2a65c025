"""The command line: python -m memtrack, memtrack top."""

import os
import pty
import select
import subprocess
import sys
import time

import pytest

import memtrack

HOLD = (
    "import memtrack, time\nwith memtrack.phase('index'):\n  with memtrack.phase('parse'):\n"
    "    b = bytearray(24 << 20)\n    print(1, flush=True)\n    time.sleep(30)"
)


def memtrack_cli(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "memtrack", *args], capture_output=True, text=True, timeout=60, **kw
    )


@pytest.fixture
def busy_table():
    with memtrack.WorkerTable(capacity=4, heartbeat=0.05) as table:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", HOLD],
                env={**os.environ, **table.environ()},
                stdout=subprocess.PIPE,
            )
            for _ in range(2)
        ]
        for p in procs:
            p.stdout.readline()
        yield table, procs
        for p in procs:
            p.kill()
            p.wait()


def test_info_prints_readings_and_capabilities():
    out = memtrack_cli()
    assert out.returncode == 0
    for word in (
        "rss",
        "peak_rss",
        "uss",
        "pss",
        "heap_used",
        "major_faults",
        "peak method",
        "kernel (exact",
    ):
        assert word in out.stdout
    info = memtrack_cli("info")
    assert info.returncode == 0 and "peak method" in info.stdout


def test_console_script_is_installed():
    out = subprocess.run(["memtrack", "--version"], capture_output=True, text=True)
    assert out.stdout.strip() == f"memtrack {memtrack.__version__}"


def test_top_once_shows_every_worker_and_the_totals(busy_table):
    table, procs = busy_table
    out = memtrack_cli("top", "--once", table.name)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert table.name in lines[0]
    rows = [line for line in lines if line.strip().split(" ")[0].isdigit()]
    assert sorted(int(r.split()[0]) for r in rows) == sorted(p.pid for p in procs)
    assert all("running" in r and r.endswith("index/parse") for r in rows)
    assert lines[-1].startswith("pool: 2 live (0 dead)")


def test_top_finds_the_single_live_table():
    # In a private /dev/shm (a mount namespace), so that other tables on this machine
    # (a parallel test run, a user's pool) cannot make the choice ambiguous.
    import shutil

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for a private /dev/shm")
    script = (
        "import memtrack, subprocess, sys\nt = memtrack.WorkerTable(2)\n"
        "out = subprocess.run([sys.executable, '-m', 'memtrack', 'top', '--once'], "
        "capture_output=True, text=True)\nprint(t.name in out.stdout, out.returncode)"
    )
    out = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            f'mount -t tmpfs tmpfs /dev/shm && {sys.executable} -c "$0"',
            script,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "mount" in out.stderr and out.returncode != 0:
        pytest.skip(f"cannot mount a private /dev/shm here: {out.stderr.strip()}")
    assert out.stdout.split() == ["True", "0"], out.stderr


def test_top_refuses_to_guess_between_tables(busy_table):
    with memtrack.WorkerTable(capacity=2) as other:
        out = memtrack_cli("top", "--once")
    assert out.returncode == 1
    assert "several live worker tables" in out.stderr and other.name in out.stderr


def test_top_with_no_table_says_what_to_do():
    out = memtrack_cli("top", "--once", "/memtrack-nonexistent")
    assert out.returncode == 1 and "No such file" in out.stderr


def test_top_refreshes_live_on_a_terminal(busy_table):
    table, _ = busy_table
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(
            sys.executable,
            [sys.executable, "-m", "memtrack", "top", table.name, "--interval", "0.2"],
        )
    chunks = []
    deadline = time.monotonic() + 2.0
    try:
        while time.monotonic() < deadline:
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    chunks.append(os.read(fd, 65536))
                except OSError:
                    break
    finally:
        os.kill(pid, 2)  # ctrl-c ends it cleanly
        # Keep reading until the child closes the terminal: a child blocked writing a frame
        # to a full pty at exit would otherwise never end (seen under load).
        drain_until = time.monotonic() + 60
        while time.monotonic() < drain_until:
            if not select.select([fd], [], [], 1.0)[0]:
                continue
            try:
                if not os.read(fd, 65536):
                    break
            except OSError:  # EIO: the child closed the terminal
                break
        _, status = os.waitpid(pid, 0)
    screen = b"".join(chunks).decode(errors="replace")
    assert screen.count("\x1b[2J") >= 3  # redrawn several times
    assert "index/parse" in screen and "ctrl-c to quit" in screen
    assert os.waitstatus_to_exitcode(status) == 0
