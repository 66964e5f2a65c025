"""Build memtrack._core: csrc/*.c, csrc/table/*.c and csrc/platform/<os>/*.c, linked to msgpack-c.

msgpack-c is linked statically when its archive (libmsgpackc.a, or libmsgpack-c.a from
msgpack-c >= 6) is installed, so a built wheel needs no msgpack library at run time;
otherwise it is linked as a shared library and the build says so. MEMTRACK_MSGPACK=static
or =shared forces one way. The extension never carries a RUNPATH: an interpreter built
with ``-Wl,-rpath`` in its LDSHARED (pyenv does that) would otherwise stamp its own lib
directory into every wheel.
"""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

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


def pkg_config(*args):
    return subprocess.run(["pkg-config", *args], capture_output=True, text=True,
                          check=True).stdout.split()


def compiler_finds(filename):
    """Where the C compiler's linker would find ``filename`` (its multiarch directories
    included, which a .pc file's libdir may not name), or None."""
    compiler = (os.environ.get("CC") or "cc").split()
    try:
        found = subprocess.run([*compiler, f"-print-file-name={filename}"],
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return None
    return found if os.path.isabs(found) else None


def msgpack_flags():
    """(compile flags, link flags) for msgpack-c, static when its archive is there."""
    if shutil.which("pkg-config") is None:
        sys.exit("memtrack: pkg-config is missing; install it: "
                 "apt-get install pkg-config libmsgpack-dev")
    name = next((n for n in ("msgpack-c", "msgpack")
                 if subprocess.run(["pkg-config", "--exists", n]).returncode == 0), None)
    if name is None:
        sys.exit("memtrack: msgpack-c is missing; install it: apt-get install libmsgpack-dev")
    cflags = pkg_config("--cflags", name)
    libs = pkg_config("--libs", name)
    want = os.environ.get("MEMTRACK_MSGPACK", "")
    if want not in ("", "static", "shared"):
        sys.exit(f"memtrack: MEMTRACK_MSGPACK must be 'static' or 'shared', not {want!r}")
    if want == "shared":
        return cflags, libs
    archive, archives = None, []
    dirs = [f[2:] for f in libs if f.startswith("-L")] + pkg_config("--variable=libdir", name)
    for lib in (f"lib{f[2:]}.a" for f in libs if f.startswith("-l")):
        archives += [os.path.join(d, lib) for d in dirs] + [compiler_finds(lib)]
    archive = next((a for a in archives if a and os.path.isfile(a)), None)
    archives = [a for a in archives if a]
    if archive is None:
        if want == "static":
            sys.exit(f"memtrack: MEMTRACK_MSGPACK=static but no msgpack-c archive was found "
                     f"(looked for {', '.join(archives) or 'lib<name>.a'}); install "
                     "libmsgpack-dev (Debian/Ubuntu), or build with MEMTRACK_MSGPACK=shared")
        print(f"memtrack: no static msgpack-c ({', '.join(archives)}): linking the shared "
              "library, so this build of memtrack needs libmsgpackc at run time (a wheel "
              "built so is not self-contained)", file=sys.stderr)
        return cflags, libs
    # --exclude-libs keeps msgpack's symbols private to _core: another extension that
    # brings its own msgpack-c cannot bind to ours, nor we to its.
    others = [f for f in libs if not f.startswith(("-l", "-L"))]
    return cflags, [archive, "-Wl,--exclude-libs,ALL", *others]


def without_rpath(command):
    """The link command without -rpath / -R options (and their separate arguments)."""
    out, skip = [], False
    for arg in command:
        if skip:
            skip = False
            continue
        if arg in ("-Wl,-rpath", "-Wl,-R", "-Wl,--enable-new-dtags"):
            skip = arg != "-Wl,--enable-new-dtags"
            continue
        if arg.startswith(("-Wl,-rpath,", "-Wl,-rpath=", "-Wl,-R,", "-Wl,--rpath")):
            continue
        out.append(arg)
    return out


class BuildExt(build_ext):
    def build_extensions(self):
        for attr in ("linker_so", "linker_so_cxx"):
            command = getattr(self.compiler, attr, None)
            if command:
                setattr(self.compiler, attr, without_rpath(command))
        super().build_extensions()


folder = platform_folder()
msgpack_cflags, msgpack_libs = msgpack_flags()
if folder == "windows":  # MSVC: C11 atomics are still behind a switch (VS 2022 17.5+)
    compile_args = ["/std:c11", "/experimental:c11atomics", "/W3"]
else:
    compile_args = ["-std=c11", "-Wall", "-Wextra", "-Wno-missing-field-initializers",
                    "-Wno-unused-parameter",  # CPython method signatures
                    "-fvisibility=hidden"]  # only PyInit__core is exported (PyMODINIT_FUNC)
compile_args += msgpack_cflags
if os.environ.get("MEMTRACK_STRICT") == "1":
    compile_args.append("/WX" if folder == "windows" else "-Werror")
sanitize = os.environ.get("MEMTRACK_SANITIZE") == "1"
if sanitize:
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
    extra_link_args=msgpack_libs + (["-fsanitize=address,undefined"] if sanitize else []),
)

setup(ext_modules=[core], cmdclass={"build_ext": BuildExt})
