"""Build memtrack._core: csrc/*.c, csrc/table/*.c and csrc/platform/<os>/*.c, linked to msgpack-c."""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup

PLATFORMS = {"linux": "linux", "darwin": "macos", "win32": "windows"}
#: Platforms whose extension has not run its test suite (docs/platforms.md says what each has).
UNTESTED = {
    "windows": "the platform layer's C tests pass under wine (cross-compiled with mingw-w64), "
    "but this extension has not run on a Windows CPython",
    "macos": "csrc/platform/macos/macos.c has never been compiled against the macOS SDK "
    "nor run",
}
#: System libraries each platform layer calls, beyond the C library.
LIBRARIES = {"linux": [], "macos": [], "windows": ["psapi", "bcrypt", "advapi32"]}


def platform_folder():
    for prefix, folder in PLATFORMS.items():
        if sys.platform.startswith(prefix):
            if folder in UNTESTED:
                print(f"memtrack: building for {folder}: UNTESTED — {UNTESTED[folder]}; "
                      "capabilities()['platform_tested'] is False", file=sys.stderr)
            return folder
    sys.exit(f"memtrack: unsupported platform {sys.platform!r}")


def msgpack_flags():
    """Compile and link flags for msgpack-c from pkg-config (msgpack-c >= 6, or msgpack)."""
    if shutil.which("pkg-config") is None:
        sys.exit("memtrack: pkg-config is missing; install it: apt-get install pkg-config libmsgpack-dev")
    for name in ("msgpack-c", "msgpack"):
        probe = subprocess.run(["pkg-config", "--exists", name])
        if probe.returncode == 0:
            out = subprocess.run(
                ["pkg-config", "--cflags", "--libs", name], capture_output=True, text=True, check=True
            ).stdout.split()
            return out
    sys.exit("memtrack: msgpack-c is missing; install it: apt-get install libmsgpack-dev")


folder = platform_folder()
flags = msgpack_flags()
if folder == "windows":  # MSVC: C11 atomics are still behind a switch (VS 2022 17.5+)
    compile_args = ["/std:c11", "/experimental:c11atomics", "/W3"]
else:
    compile_args = ["-std=c11", "-Wall", "-Wextra", "-Wno-missing-field-initializers",
                    "-Wno-unused-parameter"]  # CPython method signatures
compile_args += [f for f in flags if f.startswith("-I")]
if os.environ.get("MEMTRACK_STRICT") == "1":
    compile_args.append("/WX" if folder == "windows" else "-Werror")
if os.environ.get("MEMTRACK_SANITIZE") == "1":
    compile_args += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1", "-g"]

platform_sources = sorted(glob.glob(f"csrc/platform/{folder}/*.c"))
if not platform_sources:
    sys.exit(f"memtrack: csrc/platform/{folder}/ has no platform layer to build")

core = Extension(
    "memtrack._core",
    sources=sorted(glob.glob("csrc/*.c")) + sorted(glob.glob("csrc/table/*.c")) + platform_sources,
    depends=["csrc/memtrack.h", "csrc/platform/platform.h", "csrc/table/layout.h",
             "csrc/table/table.h"],
    define_macros=[(f"MEMTRACK_{folder.upper()}", "1")],
    extra_compile_args=compile_args,
    libraries=LIBRARIES[folder],
    extra_link_args=[f for f in flags if not f.startswith("-I")]
    + (["-fsanitize=address,undefined"] if os.environ.get("MEMTRACK_SANITIZE") == "1" else []),
)

setup(ext_modules=[core])
