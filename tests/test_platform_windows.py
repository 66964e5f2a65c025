"""The Windows platform layer, cross-compiled with mingw-w64 and run under wine.

csrc/platform/windows/windows.c implements csrc/platform/platform.h without Python, so
its C tests (csrc/platform/windows/tests/test_windows.c) build into a plain .exe. Here
that exe is compiled with -Wall -Wextra -Werror and run under wine in a wine prefix of
its own; the exe runs its own child processes (a second process attaching the segment,
a process in a job object). Skipped, saying why, where mingw-w64 or wine is missing
(the README's test command installs both).
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WINDOWS = ROOT / "csrc" / "platform" / "windows"
MINGW = "x86_64-w64-mingw32-gcc"
CFLAGS = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-O2"]
LIBS = ["-lpsapi", "-lbcrypt", "-ladvapi32"]


def _wine() -> str | None:
    """wine64 (Debian's wine64 package, without the `wine` wrapper) or wine."""
    for name in ("wine64", "wine"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/lib/wine/wine64" if os.access("/usr/lib/wine/wine64", os.X_OK) else None


needs_mingw = pytest.mark.skipif(
    shutil.which(MINGW) is None,
    reason=f"{MINGW} not found: apt-get install gcc-mingw-w64-x86-64-win32",
)


def _build(tmp_path: Path, *sources: Path, out: str) -> Path:
    exe = tmp_path / out
    cmd = [MINGW, *CFLAGS, "-o", str(exe), *map(str, sources), *LIBS]
    built = subprocess.run(cmd, capture_output=True, text=True)
    assert built.returncode == 0, f"{' '.join(cmd)}\n{built.stderr}"
    return exe


@needs_mingw
def test_windows_layer_compiles_warning_free(tmp_path):
    """Every mt_os_* of platform.h is defined: the C tests link against it, -Werror."""
    exe = _build(tmp_path, WINDOWS / "windows.c", WINDOWS / "tests" / "test_windows.c",
                 out="test_windows.exe")
    assert exe.read_bytes()[:2] == b"MZ"  # a PE executable


@pytest.fixture(scope="module")
def wine_env(tmp_path_factory):
    """A wine prefix of its own (about 700 MB once made), removed afterwards."""
    wine = _wine()
    if wine is None:
        pytest.skip("wine not found: apt-get install --no-install-recommends wine64")
    prefix = tmp_path_factory.mktemp("wineprefix")
    env = dict(os.environ, WINEPREFIX=str(prefix), WINEDEBUG="-all", WINEARCH="win64",
               DISPLAY="")
    yield wine, env
    server = shutil.which("wineserver") or "/usr/lib/wine/wineserver64"
    if os.access(server, os.X_OK):
        subprocess.run([server, "-k"], env=env, capture_output=True, timeout=60)
    shutil.rmtree(prefix, ignore_errors=True)


@needs_mingw
def test_windows_layer_under_wine(tmp_path, wine_env):
    """Readings move when memory is touched, a segment made by one process is read by a
    second one, liveness and exit codes of that process, the owner-only DACL; the checks
    wine cannot back (job limits, other processes' working sets) say SKIPPED."""
    wine, env = wine_env
    exe = _build(tmp_path, WINDOWS / "windows.c", WINDOWS / "tests" / "test_windows.c",
                 out="test_windows.exe")
    run = subprocess.run([wine, str(exe)], capture_output=True, text=True, env=env,
                         timeout=600, cwd=tmp_path)
    report = f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert run.returncode == 0, report
    assert "all Windows platform checks passed" in run.stdout, report
    assert "readings: rss" in run.stdout, report
