import os
import subprocess
import sys
import textwrap

import pytest
from pool_tasks import touch  # noqa: F401  (one copy, importable by spawned workers too)

MB = 1024 * 1024
PAGE = os.sysconf("SC_PAGESIZE")


def run_python(
    code: str, *, env: dict | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter; fail the test with its output if it fails."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MEMTRACK_")}
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        pytest.fail(f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(autouse=True)
def _fresh_records():
    import memtrack

    memtrack.reset()
    yield


def wait_for(condition, *, timeout: float = 30.0, what: str = "the condition"):
    """Poll `condition()` until it returns something true and return that; fail the test
    if `timeout` seconds pass first. For events whose timing a loaded machine stretches
    (a heartbeat published, a death noticed): the deadline is generous, the wait is not
    a fixed window."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout:g} s for {what}; last value: {value!r}")
        time.sleep(0.01)
