"""The sampler fallback, for machines where the kernel refuses the high-water-mark reset."""

import os
import subprocess
import sys

import pytest
from conftest import run_python

# A process that is not dumpable and not root cannot open its own /proc/self/clear_refs
# (the kernel makes the file root's): the same refusal a seccomp policy or a hardened
# container gives. The stdlib is imported before dropping to nobody, who cannot read it.


def _modules_memtrack_imports():
    """The stdlib modules `import memtrack` loads: the child imports them while it is
    still root, because nobody cannot read this interpreter's library."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; before = set(sys.modules); import memtrack; "
            "print(' '.join(sorted(m for m in set(sys.modules) - before "
            "if not m.startswith('memtrack'))))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


REFUSED = f"""
import ctypes, os, importlib
for name in {_modules_memtrack_imports()!r}:
    try:
        importlib.import_module(name)
    except ImportError:
        pass  # a private module that is not importable by name
os.setgid(65534); os.setuid(65534)
ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 0
import memtrack, time
"""

SPIKE = """
with memtrack.phase("spike") as p:
    b = bytearray(100_000_000)
    for i in range(0, len(b), 4096):
        b[i] = 1
    time.sleep(0.05)   # longer than the sampling interval
    del b
caps = memtrack.capabilities()
print(caps["peak_method"], "peak_reset" in caps["lacks"], p.stats.peak_delta)
print(caps["peak_fallback_reason"])
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to nobody")
def test_a_refused_reset_falls_back_to_the_sampler():
    out = run_python(REFUSED + SPIKE).stdout.splitlines()
    method, lacks, peak = out[0].split()
    assert (method, lacks) == ("sampler", "True")
    assert int(peak) >= 95_000_000  # bounded error: the spike outlived the interval
    assert "clear_refs" in out[1] and "Permission denied" in out[1]


def test_memtrack_peak_sampler_forces_the_fallback():
    out = run_python("import memtrack, time\n" + SPIKE, env={"MEMTRACK_PEAK": "sampler"})
    method, lacks, peak = out.stdout.splitlines()[0].split()
    assert (method, lacks) == ("sampler", "True")
    assert int(peak) >= 95_000_000
    assert out.stdout.splitlines()[1] == "MEMTRACK_PEAK=sampler"


def test_sampler_survives_fork():
    out = run_python(
        """
        import memtrack, os, time
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            with memtrack.phase("child") as p:
                b = bytearray(50_000_000)
                for i in range(0, len(b), 4096):
                    b[i] = 1
                time.sleep(0.05)
                del b
            os.write(w, str(p.stats.peak_delta).encode())
            os._exit(0)
        os.close(w)
        print(os.read(r, 100).decode())
        os.waitpid(pid, 0)
        """,
        env={"MEMTRACK_PEAK": "sampler"},
    )
    assert int(out.stdout) >= 47_000_000
