"""One status region on a terminal, redrawn in place; plain lines elsewhere.

``memtrack demo`` and ``memtrack run`` show their progress through a :class:`StatusRegion`:
on a terminal each :meth:`~StatusRegion.update` moves the cursor back to the top of what
the previous one drew and writes over it (lines that got shorter are cleared, nothing
above the region is touched, no frame piles up in the scrollback); elsewhere (a pipe, a
log file, CI) it writes a plain line at most every `every` seconds. :meth:`close` draws
the final state once, so a finished run always ends on its last figures (100%).
"""

from __future__ import annotations

import shutil
import threading
import time
from typing import TextIO

#: Cursor to the start of the line N lines up; clear from the cursor to the screen's end.
_UP = "\x1b[{}F"
_CLEAR_DOWN = "\x1b[J"


class StatusRegion:
    """A block of lines at the bottom of the output that is rewritten, never appended."""

    def __init__(self, stream: TextIO, *, tty: bool | None = None, every: float = 5.0) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.every = every
        self._lines = 0  # how many lines the region holds on the screen now
        self._last_plain = -float("inf")
        self._lock = threading.Lock()
        self.closed = False

    def _width(self) -> int:
        return max(20, shutil.get_terminal_size().columns - 1)

    def _draw(self, text: str) -> None:
        width = self._width()
        # Cut each line to the width: a wrapped line would take two rows and the next
        # redraw would go up one row too few.
        lines = [line[:width] for line in text.splitlines()] or [""]
        out = _UP.format(self._lines) if self._lines else ""
        out += _CLEAR_DOWN + "\n".join(lines) + "\n"
        self.stream.write(out)
        self.stream.flush()
        self._lines = len(lines)

    def update(self, text: str) -> None:
        """Show `text` (one or more lines) as the current state."""
        with self._lock:
            if self.closed:
                return
            if self.tty:
                self._draw(text)
            elif time.monotonic() - self._last_plain >= self.every:
                self._last_plain = time.monotonic()
                self.stream.write(text.splitlines()[-1] + "\n" if text else "\n")
                self.stream.flush()

    def close(self, text: str | None = None) -> None:
        """Draw the final state (`text`) once and leave it; later updates are ignored."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if text is None:
                return
            if self.tty:
                self._draw(text)
            else:
                self.stream.write(text.splitlines()[-1] + "\n" if text else "\n")
                self.stream.flush()
