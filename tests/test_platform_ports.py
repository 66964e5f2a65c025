"""Every platform folder implements all of csrc/platform/platform.h.

Linux is built and tested by the whole suite; Windows is linked and run under wine by
test_platform_windows.py. macOS cannot be compiled here (no SDK): its POSIX parts are
syntax-checked with the host compiler, and its Mach, libproc and kqueue parts are
not compiled at all (docs/platforms.md says so).
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLATFORM = ROOT / "csrc" / "platform"
PORTS = {"linux": "linux/linux.c", "windows": "windows/windows.c", "macos": "macos/macos.c"}


def _declared() -> set[str]:
    header = (PLATFORM / "platform.h").read_text()
    return set(re.findall(r"\b(mt_os_\w+)\s*\(", header))


def _defined(source: str) -> set[str]:
    # K&R-style definitions as clang-format writes them: the name at the start of a line.
    return set(re.findall(r"^(mt_os_\w+)\(", source, flags=re.M))


@pytest.mark.parametrize("port", PORTS)
def test_port_defines_every_platform_function(port):
    declared = _declared()
    assert len(declared) > 30  # the header was read
    missing = declared - _defined((PLATFORM / PORTS[port]).read_text())
    assert not missing, f"{PORTS[port]} lacks {sorted(missing)}"


def _parameter_types(params: str) -> list[str]:
    """`uint64_t *hwm, mt_oserr *e` -> ["uint64_t*", "mt_oserr*"]: each type without its name."""
    params = " ".join(params.split())
    if params in ("", "void"):
        return []
    types = []
    for param in params.split(","):
        param = param.strip()
        if "(" in param:  # a function pointer: keep it whole, names dropped
            param = re.sub(r"\(\s*\*\s*\w+\s*\)", "(*)", param)
        else:
            param = re.sub(r"\w+$", "", param)
        types.append(param.replace(" ", ""))
    return types


def _signatures(text: str, definitions: bool) -> dict[str, list[str]]:
    pattern = r"^(mt_os_\w+)\(([^)]*(?:\([^)]*\)[^)]*)*)\)\s*\{" if definitions \
        else r"\b(mt_os_\w+)\(([^)]*(?:\([^)]*\)[^)]*)*)\);"
    return {name: _parameter_types(params)
            for name, params in re.findall(pattern, text, flags=re.M)}


@pytest.mark.parametrize("port", PORTS)
def test_port_definitions_take_the_declared_parameters(port):
    """The macOS parts under __APPLE__ are compiled nowhere here: compare the parameter
    types of every definition with platform.h, so that a changed signature is caught."""
    declared = _signatures((PLATFORM / "platform.h").read_text(), definitions=False)
    defined = _signatures((PLATFORM / PORTS[port]).read_text(), definitions=True)
    assert len(defined) > 30
    wrong = {name: (defined[name], declared[name]) for name in defined
             if name in declared and defined[name] != declared[name]}
    assert not wrong, f"{PORTS[port]}: (defined, declared) differ: {wrong}"


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not found")
def test_macos_posix_parts_parse_warning_free():
    """Only a syntax check, with Linux's headers: the parts under `#ifdef __APPLE__`
    (task_info, proc_pid_rusage, proc_pidinfo, kqueue, malloc zones) are left out."""
    cmd = ["gcc", "-std=c11", "-Wall", "-Wextra", "-Werror", "-Wpedantic", "-fsyntax-only",
           "-DMT_MACOS_SYNTAX_CHECK", str(PLATFORM / "macos" / "macos.c")]
    checked = subprocess.run(cmd, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
