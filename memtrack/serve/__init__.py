"""``memtrack serve``: a worker table (or a Dask cluster) over HTTP, live.

``serve(table)`` starts a server in background threads and returns it; ``.url`` is the
page, ``/metrics`` the Prometheus exposition, ``/api/workers`` the JSON. See docs/serve.md.
The standard library's ``http.server`` does the HTTP; nothing here parses it by hand.
"""

from __future__ import annotations

from ..pool.table import WorkerTable
from .server import DEFAULT_HOST, DEFAULT_PORT, ServeError, Server, parse_address
from .source import Reading, Source, TableSource

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "Reading", "ServeError", "Server", "Source",
           "TableSource", "parse_address", "serve"]


def serve(table: WorkerTable | str, address: str | tuple[str, int] = (DEFAULT_HOST, 0), *,
          public: bool = False, token: str | None = None, interval: float | None = None,
          window: float = 300.0) -> Server:
    """Serve `table` (a :class:`WorkerTable` or a table name) and return the running server.

    ``address``: ``"HOST:PORT"`` or ``(host, port)``; the default is 127.0.0.1 on any free
    port. Non-loopback hosts need ``public=True`` and a token (made when not given).
    ``interval``: seconds between the page's updates (default: the table's heartbeat, kept
    within 0.25..5 s); ``window``: seconds of history the page shows. Stop it with
    ``.close()`` or a ``with`` block.
    """
    source = TableSource(table)
    try:
        server = Server(source, address, public=public, token=token, interval=interval,
                        window=window)
    except BaseException:
        source.close()
        raise
    return server.start()
