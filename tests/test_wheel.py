"""The shipped wheel: self-contained, manylinux, and working in a clean venv.

CI runs the suite once per Python (3.11, 3.12, 3.13), so each run builds and checks the
wheel of its own interpreter with tools/build_wheels.py (one build, ~10 s).
"""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import memtrack

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("build_wheels", ROOT / "tools" / "build_wheels.py")
build_wheels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_wheels)

SMOKE = """\
import concurrent.futures
import multiprocessing
import sys

import memtrack


def work(n):
    with memtrack.phase("work"):
        data = bytearray(n)
        for i in range(0, n, 4096):
            data[i] = 1
    return len(data)


if __name__ == "__main__":
    assert memtrack.__file__.startswith(sys.prefix), memtrack.__file__
    assert memtrack.rss() > 0
    with memtrack.phase("smoke") as p:
        buf = bytearray(32 << 20)
        for i in range(0, len(buf), 4096):
            buf[i] = 1
        del buf
    assert p.stats.peak_delta >= 16 << 20, p.stats
    with memtrack.WorkerTable(capacity=4) as table:
        with concurrent.futures.ProcessPoolExecutor(
                2, mp_context=multiprocessing.get_context("spawn"),
                initializer=memtrack.init_worker, initargs=(table.name,)) as pool:
            assert list(pool.map(work, [1 << 20] * 4)) == [1 << 20] * 4
        workers = table.workers()
        assert len(workers) == 2, workers
        assert sum(w.tasks for w in workers) == 4, workers
        assert sum(w.phases["work"].count for w in workers if "work" in w.phases) == 4
    print("smoke ok", memtrack.__version__)
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel of this interpreter, built and repaired as a release is."""
    out = tmp_path_factory.mktemp("wheelhouse")
    build = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "build_wheels.py"), "--python", sys.executable,
         "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    (built,) = out.glob("memtrack-*.whl")
    return built


@pytest.fixture(scope="module")
def clean_venv(wheel, tmp_path_factory):
    """A fresh venv (no pip, nothing else) with only the wheel installed in it."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "--disable-pip-version-check", "-q", str(wheel)],
        capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    return python


def run_in(python: Path, code_or_script: str | Path, cwd: Path):
    """Run in the venv, away from the source tree, with no PYTHONPATH or MEMTRACK_*."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MEMTRACK_", "PYTHON", "VIRTUAL_ENV"))}
    args = [str(code_or_script)] if isinstance(code_or_script, Path) else ["-c", code_or_script]
    return subprocess.run([str(python), "-E", "-s", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_wheel_is_manylinux_and_self_contained(wheel):
    # Given the wheel the release script built for this Python
    # Then it is tagged manylinux for this interpreter, and its extension needs no
    # msgpack library and no RPATH/RUNPATH (check_wheel raises otherwise)
    tag = build_wheels.check_wheel(wheel)
    assert tag.startswith("manylinux_2_") and tag.endswith("_x86_64" if os.uname().machine ==
                                                          "x86_64" else os.uname().machine)
    assert f"-cp{sys.version_info[0]}{sys.version_info[1]}-" in wheel.name


def test_check_wheel_refuses_an_unrepaired_wheel(wheel, tmp_path):
    # Given the same wheel renamed to the plain linux tag auditwheel replaces
    plain = tmp_path / wheel.name.replace(build_wheels.check_wheel(wheel), "linux_x86_64")
    plain.write_bytes(wheel.read_bytes())
    # Then the check says so
    with pytest.raises(build_wheels.WheelError, match="not tagged manylinux"):
        build_wheels.check_wheel(plain)


def test_wheel_works_in_a_clean_venv(clean_venv, tmp_path):
    # Given a clean venv with only the wheel installed
    script = tmp_path / "smoke.py"
    script.write_text(SMOKE)
    # When a program imports memtrack, reads rss(), runs a phase and a 2-worker pool
    result = run_in(clean_venv, script, tmp_path)
    # Then all of it works from the installed wheel
    assert result.returncode == 0, result.stdout + result.stderr
    assert "smoke ok" in result.stdout


def test_a_missing_extension_says_what_to_install(clean_venv, tmp_path):
    # Given the installed wheel without its C extension (a broken or foreign install)
    code = textwrap.dedent("""
        import importlib.util, pathlib, shutil, sys
        spec = importlib.util.find_spec("memtrack")
        pkg = pathlib.Path(spec.origin).parent
        (core,) = pkg.glob("_core.*.so")
        core.rename(core.with_suffix(".hidden"))
        try:
            import memtrack
        except ImportError as exc:
            print(exc)
        finally:
            core.with_suffix(".hidden").rename(core)
    """)
    result = run_in(clean_venv, code, tmp_path)
    # Then the import error names the extension and what to install or rebuild
    assert result.returncode == 0, result.stdout + result.stderr
    assert "memtrack._core could not be loaded" in result.stdout
    assert "pip install" in result.stdout and "libmsgpack-dev" in result.stdout


def test_source_build_links_msgpack_statically_without_runpath():
    # Given the extension this suite runs on, built from source by `pip install -e .`
    core = Path(memtrack._core.__file__)
    entries = build_wheels.dynamic_section(core)
    archive = subprocess.run(["cc", "-print-file-name=libmsgpackc.a"], capture_output=True,
                             text=True).stdout.strip()
    if os.environ.get("MEMTRACK_MSGPACK") == "shared" or not os.path.isabs(archive):
        pytest.skip("built with the shared msgpack-c (no libmsgpackc.a here)")
    # Then msgpack-c is inside it (static by default) and no RUNPATH points at the
    # build machine's interpreter
    assert not [n for n in entries["NEEDED"] if "msgpack" in n], entries
    assert entries["RPATH"] == [] and entries["RUNPATH"] == [], entries
