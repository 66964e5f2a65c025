"""Run the test suite on every other CPython this machine has (3.12, 3.13 under pyenv).

The README's test command runs the suite on the default interpreter and then this
script: for each of MINORS found (``pyenv`` versions, or ``python3.N`` on PATH) it makes
a venv under build/venvs/, installs memtrack there editable with its test extra (a
``MEMTRACK_STRICT=1`` build: -Werror) and runs ``python -m pytest``. It exits non-zero
when any run fails; an interpreter that is not installed is reported and skipped.

    python tools/test_other_pythons.py [pytest args...]
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MINORS = ("3.12", "3.13")


def find_python(minor: str) -> str | None:
    """The newest pyenv build of `minor`, else python<minor> on PATH."""
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    builds = sorted(glob.glob(os.path.join(root, "versions", f"{minor}.*", "bin", "python3")),
                    key=lambda p: [int(x) for x in Path(p).parts[-3].split(".") if x.isdigit()])
    if builds:
        return builds[-1]
    return shutil.which(f"python{minor}")


def run(minor: str, python: str, pytest_args: list[str]) -> int:
    env_dir = ROOT / "build" / "venvs" / f"py{minor}"
    if not (env_dir / "bin" / "python").exists():
        subprocess.run([python, "-m", "venv", str(env_dir)], check=True)
    py = str(env_dir / "bin" / "python")
    env = {**os.environ, "MEMTRACK_STRICT": "1"}
    env.pop("VIRTUAL_ENV", None)
    print(f"== Python {minor}: {python}", flush=True)
    install = subprocess.run([py, "-m", "pip", "install", "-q", "-e", ".[test]"],
                             cwd=ROOT, env=env)
    if install.returncode != 0:
        print(f"== Python {minor}: the install failed ({install.returncode})", flush=True)
        return install.returncode
    return subprocess.run([py, "-m", "pytest", *pytest_args], cwd=ROOT, env=env).returncode


def main(argv: list[str]) -> int:
    failed = []
    for minor in MINORS:
        python = find_python(minor)
        if python is None:
            print(f"== Python {minor}: not installed here, skipped", flush=True)
            continue
        code = run(minor, python, argv)
        print(f"== Python {minor}: pytest exit status {code}", flush=True)
        if code != 0:
            failed.append(minor)
    if failed:
        print(f"== failed on Python {', '.join(failed)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
