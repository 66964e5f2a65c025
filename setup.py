"""Build memtrack._core: csrc/*.c, csrc/table/*.c and csrc/platform/<os>/*.c, linked to msgpack-c."""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup

PLATFORMS = {"linux": "linux", "darwin": "macos", "win32": "windows"}
BUILT = {"linux"}  # macos/ and windows/ are reserved behind the same interface


def platform_folder():
    for prefix, folder in PLATFORMS.items():
        if sys.platform.startswith(prefix):
            if folder not in BUILT:
                sys.exit(f"memtrack: {folder} is not supported yet (Linux only for now)")
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
compile_args = ["-std=c11", "-Wall", "-Wextra", "-Wno-missing-field-initializers",
                "-Wno-unused-parameter"]  # CPython method signatures
compile_args += [f for f in flags if f.startswith("-I")]
if os.environ.get("MEMTRACK_STRICT") == "1":
    compile_args.append("-Werror")
if os.environ.get("MEMTRACK_SANITIZE") == "1":
    compile_args += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1", "-g"]

core = Extension(
    "memtrack._core",
    sources=sorted(glob.glob("csrc/*.c")) + sorted(glob.glob("csrc/table/*.c"))
    + sorted(glob.glob(f"csrc/platform/{folder}/*.c")),
    depends=["csrc/memtrack.h", "csrc/platform/platform.h", "csrc/table/layout.h",
             "csrc/table/table.h"],
    define_macros=[(f"MEMTRACK_{folder.upper()}", "1")],
    extra_compile_args=compile_args,
    extra_link_args=[f for f in flags if not f.startswith("-I")]
    + (["-fsanitize=address,undefined"] if os.environ.get("MEMTRACK_SANITIZE") == "1" else []),
)

setup(ext_modules=[core])
