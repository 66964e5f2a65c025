"""The memory of a pool: one definition, for the executor's pause gate and the pytest plugin.

A worker publishes its RSS at every heartbeat but its PSS only at every tenth (PSS reads
``smaps_rollup``, which is slow). PSS alone would miss a spike between two readings, and
RSS alone counts every shared page once per worker. So each live worker counts as its
fresh RSS less the shared part (RSS - PSS) of its latest PSS reading; before its first PSS
reading, as its RSS. The sum is the C table's (``WorkerTable.totals().fresh_memory``,
csrc/table/reader.c); this module is the one place Python asks for it.
"""

from __future__ import annotations

from .table import WorkerTable


class PoolMemory:
    """What the live workers of ``table`` hold together, read afresh at every call."""

    #: What the executor's events and docs call this figure.
    source = "pool pss"

    def __init__(self, table: WorkerTable) -> None:
        self._table = table

    def now(self) -> int | None:
        """The sum over live workers, or None when none is alive."""
        totals = self._table.totals()
        return totals.fresh_memory if totals.live else None

    def __call__(self) -> int:
        """The executor's probe: bytes, 0 when no worker is alive."""
        return self.now() or 0
