"""Writing a file so that a reader sees the old one or the new one, never a part."""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterable


def write_atomically(path: str | os.PathLike[str], chunks: Iterable[bytes]) -> None:
    """Write `chunks` to a temporary file of this writer's own beside `path` (no clash
    between processes or sessions), flush it to disk, then os.replace() it over `path`.
    An existing file keeps its mode; a new one gets the umask's. Nothing is left behind
    on error."""
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the mode umask gives
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        except FileNotFoundError:
            pass
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
