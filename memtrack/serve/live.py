"""The live page's feed: a bounded history of readings, sent as Server-Sent Events.

A sampling thread adds one *round* per interval: the time, each live worker's
``[pid, rss, phase id]``, and the pool's RSS sum and memory. A page that connects gets a
``snapshot`` event (every round still in the window, and the current status), then one
``tick`` event per round. Each event is encoded once, however many pages watch. The page
(``assets/live.js``) turns rounds into the report's chart data and draws it with the
report's charts (``report.js``).
"""

from __future__ import annotations

import json
import threading
from collections import deque
from typing import Any

from .metrics import phase_totals
from .source import UNREAD, Reading

#: Distinct phase paths the page colours; later ones show as "(no phase)" grey.
MAX_PHASES = 1000


def sse(event: str, payload: Any) -> bytes:
    """One Server-Sent Event: compact JSON has no newline, so one data line is enough."""
    text = json.dumps(payload, separators=(",", ":"), allow_nan=False)
    return f"event: {event}\ndata: {text}\n\n".encode()


class History:
    """The last `window` seconds of rounds, and the event that announces the newest one."""

    def __init__(self, window: float, interval: float, labeller: Any) -> None:
        self.window = window
        self.interval = interval
        self._labeller = labeller
        self._rounds: deque[dict[str, Any]] = deque(maxlen=max(2, int(window / interval) + 1))
        self._phase_ids: dict[str, int] = {}
        self._phase_names: list[str] = []
        self._t0: float | None = None
        #: Protects every field below and above: the sampler writes, the streams read.
        self.changed = threading.Condition()
        self.seq = 0
        self.tick: bytes = b""
        self.status: dict[str, Any] = {}
        self.closed = False

    def _phase_id(self, path: str | None) -> int:
        if path is None:
            return -1
        found = self._phase_ids.get(path)
        if found is None:
            if len(self._phase_names) >= MAX_PHASES:
                return -1
            found = self._phase_ids[path] = len(self._phase_names)
            self._phase_names.append(path)
        return found

    def add(self, reading: Reading) -> None:
        with self.changed:
            if self._t0 is None:
                self._t0 = reading.time
            t = round(reading.time - self._t0, 3)
            live = [w for w in reading.workers if w["state"] in ("idle", "running")]
            totals = reading.totals
            entry = {
                "t": t,
                "w": [[w["pid"], w["rss"], self._phase_id(w["phase"] or None)] for w in live],
                "pool": [totals["rss"], totals["memory"] if totals["pss"] else None],
            }
            bars = [{"path": p, "peak_delta": s["max_peak_delta"],
                     "retained": s["total_rss_delta"] / s["count"] if s["count"] else 0,
                     "peak_rss": s["max_peak_rss"]}
                    for p, s in sorted(phase_totals(
                        [w for w in reading.workers if w["state"] not in UNREAD]).items())]
            self.status = {
                "time": reading.time, "gone": reading.gone, "totals": totals,
                "phases": list(self._phase_names), "bars": bars,
                "workers": [{"label": self._labeller(w), "pid": w["pid"], "state": w["state"],
                             "phase": w["phase"], "rss": w["rss"], "peak_rss": w["peak_rss"],
                             "uss": w["uss"], "pss": w["pss"], "tasks": w["tasks"],
                             "exit_code": w["exit_code"], "exit_signal": w["exit_signal"],
                             "error": w["error"]} for w in reading.workers],
            }
            self._rounds.append(entry)
            self.seq += 1
            self.tick = sse("tick", {"seq": self.seq, "round": entry, "status": self.status})
            self.changed.notify_all()

    def snapshot(self, info: dict[str, Any]) -> tuple[int, bytes]:
        """(seq, event) of everything in the window, for a page that just connected."""
        with self.changed:  # copied under the lock, encoded outside it
            seq, rounds, status = self.seq, list(self._rounds), self.status
        return seq, sse("snapshot", {"seq": seq, "rounds": rounds, "status": status,
                                     "info": info})

    def close(self) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify_all()
