"""The HTTP server of ``memtrack serve``: standard library only (``http.server``).

Routes (a fixed table; nothing in a URL ever becomes a file path):

    /                 the live page
    /events           Server-Sent Events that feed the page
    /metrics          Prometheus text exposition of the source, read at each scrape
    /api/workers      the same reading as JSON
    /assets/<name>    the page's scripts: chart.min.js, report.js, live.js (package files)

It listens on 127.0.0.1 unless told otherwise; any other address needs ``public=True``
and a token, which every request then carries (``Authorization: Bearer TOKEN`` or
``?token=TOKEN``; compared in constant time).
"""

from __future__ import annotations

import errno
import hmac
import html
import ipaddress
import json
import re
import secrets
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from .. import __version__
from ..report.html import PALETTE
from .live import History
from .metrics import CONTENT_TYPE as METRICS_TYPE
from .metrics import render_metrics
from .source import Reading, Source

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
#: Page feeds open at once; one more is refused with 503 (each holds a thread).
MAX_STREAMS = 32
#: Seconds without a round before a stream sends a comment, so proxies keep it open.
KEEPALIVE = 15.0


class ServeError(ValueError):
    """The server cannot start as asked (address in use, not loopback without --public...)."""


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT``, ``:PORT`` or ``PORT`` -> (host, port)."""
    if not isinstance(text, str) or not text.strip():
        raise ServeError(f"bad address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8765")
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]")
        port = port[1:] if port.startswith(":") else (None if port else "")
        if not sep or port is None:
            raise ServeError(f"bad address {text!r}: expected [IPv6]:PORT")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    elif text.isdigit():
        host, port = "", text
    else:
        raise ServeError(f"bad address {text!r}: expected HOST:PORT (IPv6 as [::1]:PORT)")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ServeError(f"bad port in {text!r}: expected 0..65535 (0: any free port)")
    return host or DEFAULT_HOST, int(port)


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback one (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def _asset(package: str, *parts: str) -> bytes:
    return resources.files(package).joinpath(*parts).read_bytes()


def _load_assets() -> dict[str, tuple[bytes, str]]:
    """The only files the server sends, read once: route -> (bytes, content type)."""
    js = "text/javascript; charset=utf-8"
    return {
        "/assets/chart.min.js": (_asset("memtrack.report", "assets", "chart.min.js"), js),
        "/assets/report.js": (_asset("memtrack.report", "assets", "report.js"), js),
        "/assets/live.js": (_asset("memtrack.serve", "assets", "live.js"), js),
    }


def _page(source: Source, token_query: str) -> bytes:
    report_page = _asset("memtrack.report", "assets", "report.html").decode()
    style = re.search(r"<style>.*?</style>", report_page, re.S)
    template = _asset("memtrack.serve", "assets", "live.html").decode()
    values = {
        "STYLE": style.group(0) if style else "",
        "NAME": html.escape(source.name),
        "KIND": html.escape(source.kind),
        "VERSION": html.escape(__version__),
        "Q": html.escape(token_query),
    }
    return re.sub(r"\{\{([A-Z]+)\}\}", lambda m: values[m.group(1)], template).encode()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    #: close() does not wait for request threads: a feed whose client stopped reading
    #: would hold it for the socket timeout. The feeds end on their own (History.close).
    block_on_close = False
    app: Server

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away is normal; anything else is said in one line, and the
        # server goes on serving the others.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return
        print(f"memtrack serve: error while answering {client_address[0]}: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = f"memtrack/{__version__}"
    #: Seconds a client may take to send its request (or to read what we send).
    timeout = 30
    #: Headers and body go out as separate writes: without this, Nagle's algorithm holds
    #: the body back until the client's delayed ACK (tens of ms per scrape).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.app.verbose:
            super().log_message(format, *args)

    def do_GET(self) -> None:
        self._dispatch(send_body=True)

    def do_HEAD(self) -> None:
        self._dispatch(send_body=False)

    def _refuse_method(self) -> None:
        self._send(405, b"only GET and HEAD\n", "text/plain; charset=utf-8",
                   {"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method

    def _send(self, code: int, body: bytes, content_type: str,
              headers: dict[str, str] | None = None, send_body: bool = True) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy",
                         "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                         "frame-ancestors 'none'")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _error(self, code: int, message: str, send_body: bool = True,
               headers: dict[str, str] | None = None) -> None:
        self._send(code, (message + "\n").encode(), "text/plain; charset=utf-8", headers,
                   send_body)

    def _authorised(self, query: dict[str, list[str]]) -> bool:
        app = self.server.app
        if app.token is None:
            # No token: only a loopback name in Host, so a page elsewhere cannot reach us
            # through a DNS name that it rebinds to 127.0.0.1.
            host = self.headers.get("Host") or ""
            host = host[1:].partition("]")[0] if host.startswith("[") else host.partition(":")[0]
            return host in ("localhost", "") or _is_ip_loopback(host)
        given = self.headers.get("Authorization", "")
        offered = given[7:].strip() if given.lower().startswith("bearer ") else None
        if offered is None:
            values = query.get("token")
            offered = values[0] if values else ""
        return hmac.compare_digest(offered.encode(), app.token.encode())

    def _dispatch(self, send_body: bool) -> None:
        app = self.server.app
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        if not self._authorised(query):
            if app.token is None:
                self._error(403, "memtrack serve: this Host is not allowed (loopback only)",
                            send_body)
            else:
                self._error(401, "memtrack serve: token required (?token=TOKEN or "
                            "Authorization: Bearer TOKEN)", send_body,
                            {"WWW-Authenticate": 'Bearer realm="memtrack"'})
            return
        route = parts.path
        if route in app.assets:
            body, content_type = app.assets[route]
            self._send(200, body, content_type, send_body=send_body)
        elif route == "/":
            self._send(200, app.page, "text/html; charset=utf-8", send_body=send_body)
        elif route == "/metrics":
            self._send(200, app.metrics().encode(), METRICS_TYPE, send_body=send_body)
        elif route == "/api/workers":
            body = json.dumps(app.api(), allow_nan=False).encode()
            self._send(200, body, "application/json", send_body=send_body)
        elif route == "/events":
            self._stream(send_body)
        else:
            self._error(404, f"memtrack serve: no such page {route!r}; try / /metrics "
                        "/api/workers", send_body)

    def _stream(self, send_body: bool) -> None:
        app = self.server.app
        if not app.enter_stream():
            self._error(503, f"memtrack serve: too many open pages (at most {MAX_STREAMS})",
                        send_body, {"Retry-After": "10"})
            return
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Accel-Buffering", "no")
            self.end_headers()
            if not send_body:
                return
            history = app.history
            seq, event = history.snapshot(app.info())
            self.wfile.write(b"retry: 2000\n\n" + event)
            self.wfile.flush()
            while True:
                with history.changed:
                    history.changed.wait_for(
                        lambda last=seq: history.seq != last or history.closed,
                        timeout=KEEPALIVE)
                    if history.closed:
                        return
                    fresh = history.seq != seq
                    seq, event = history.seq, history.tick
                self.wfile.write(event if fresh else b": keep-alive\n\n")
                self.wfile.flush()
        except (ConnectionError, TimeoutError, OSError):
            # The page was closed, hidden or went away mid-stream: nothing to do, and
            # nothing else depends on this connection.
            app.count_disconnect()
        finally:
            app.leave_stream()
            self.close_connection = True


def _is_ip_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_token(token: str) -> str:
    if not isinstance(token, str) or len(token) < 16 or not token.isprintable() \
            or any(c.isspace() for c in token) or not token.isascii():
        raise ServeError("the token must be at least 16 printable ASCII characters without "
                         "spaces (e.g. python -c 'import secrets; print(secrets.token_urlsafe())')")
    return token


def default_interval(source: Source) -> float:
    """The table's own rate (its heartbeat), kept between 0.25 and 5 seconds."""
    heartbeat = getattr(source, "heartbeat", None)
    if not heartbeat:
        return 1.0
    return min(max(heartbeat, 0.25), 5.0)


class Server:
    """Serve `source` (a :class:`~memtrack.serve.source.TableSource`, or a Dask cluster's)
    over HTTP. ``start()`` runs it in background threads; ``serve_forever()`` in this one.

    ``address`` is ``"HOST:PORT"`` or ``(host, port)`` (port 0: any free port). A host other
    than a loopback one needs ``public=True``; it then needs a token too, and one is made
    (``secrets.token_urlsafe``) when none is given: it is in :attr:`url`.
    """

    def __init__(self, source: Source, address: str | tuple[str, int] = (DEFAULT_HOST, 0), *,
                 public: bool = False, token: str | None = None, interval: float | None = None,
                 window: float = 300.0, verbose: bool = False) -> None:
        host, port = parse_address(address) if isinstance(address, str) else address
        if interval is None:
            interval = default_interval(source)
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) \
                or not 0.05 <= interval <= 60:
            raise ServeError(f"interval must be between 0.05 and 60 seconds, not {interval!r}")
        if isinstance(window, bool) or not isinstance(window, (int, float)) \
                or not interval * 2 <= window <= 86400:
            raise ServeError(f"window must be between two intervals and a day, not {window!r}")
        self.loopback = is_loopback(host)
        if not self.loopback and not public:
            raise ServeError(
                f"{host} is not a loopback address: anyone who can reach it could read the "
                "pool's memory; pass --public (public=True) to mean it, with a --token")
        if token is not None:
            token = _check_token(token)
        elif not self.loopback:
            token = secrets.token_urlsafe(24)
        self.source = source
        self.token = token
        self.interval = float(interval)
        self.window = float(window)
        self.verbose = verbose
        self.history = History(self.window, self.interval, self._label)
        self.assets = _load_assets()
        self.page = _page(source, f"?token={quote(token)}" if token else "")
        self._streams = 0
        self._disconnects = 0
        self._lock = threading.Lock()  # protects _streams and _disconnects
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        server_class = _HTTPServer6 if ":" in host else _HTTPServer
        try:
            self._http = server_class((host, port), _Handler)
        except OSError as e:
            raise ServeError(_bind_message(host, port, e)) from None
        self._http.app = self
        self.host, self.port = self._http.server_address[:2]
        self.add_reading()

    # ---------------------------------------------------------------- what is served

    def _label(self, worker: dict[str, Any]) -> str:
        labels = self.source.labels(worker)
        return " ".join(str(v) for k, v in labels.items() if k != "pid") or f"pid {worker['pid']}"

    def add_reading(self) -> None:
        """Read the source once and send the round to every page."""
        reading = self.source.read()
        self._latest = reading
        self.history.add(reading)

    def reading(self) -> Reading:
        """A fresh reading when the source is cheap to read (a table), else the latest."""
        return self.source.read() if self.source.cheap else self._latest

    def metrics(self) -> str:
        return render_metrics(self.reading(), source_name=self.source.name,
                              kind=self.source.kind, labels=self.source.labels)

    def api(self) -> dict[str, Any]:
        reading = self.reading()
        return {"source": self.source.kind, "name": self.source.name, "time": reading.time,
                "gone": reading.gone, "totals": reading.totals, "workers": reading.workers,
                **reading.extra}

    def info(self) -> dict[str, Any]:
        return {"name": self.source.name, "kind": self.source.kind, "interval": self.interval,
                "window": self.window, "palette": PALETTE, "memtrack": __version__}

    # ---------------------------------------------------------------- streams

    def enter_stream(self) -> bool:
        with self._lock:
            if self._streams >= MAX_STREAMS:
                return False
            self._streams += 1
            return True

    def leave_stream(self) -> None:
        with self._lock:
            self._streams -= 1

    def count_disconnect(self) -> None:
        with self._lock:
            self._disconnects += 1

    @property
    def stats(self) -> dict[str, int]:
        """Open page feeds and feeds that ended by the client going away."""
        with self._lock:
            return {"streams": self._streams, "disconnects": self._disconnects}

    # ---------------------------------------------------------------- running

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        query = f"?token={quote(self.token)}" if self.token else ""
        return f"http://{host}:{self.port}/{query}"

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.add_reading()
            except Exception as e:  # a bad reading must not stop the page or the scrapes
                print(f"memtrack serve: reading {self.source.name} failed: "
                      f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)

    def start(self) -> Server:
        """Serve in background threads (daemons); returns self. Once: a second call, or
        a ``with`` block around a started server, changes nothing."""
        if self._threads:
            return self
        for target, name in ((self._sample, "memtrack-serve-sampler"),
                             (self._http.serve_forever, "memtrack-serve-http")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until :meth:`close` (from another thread) or Ctrl-C."""
        if self._threads:
            raise RuntimeError("this server is already running (start() was called)")
        sampler = threading.Thread(target=self._sample, name="memtrack-serve-sampler",
                                   daemon=True)
        sampler.start()
        self._threads.append(sampler)
        try:
            self._http.serve_forever()
        finally:
            self.close()

    def close(self) -> None:
        """Stop serving: the streams end, the port is freed. Safe to call twice."""
        if self._stop.is_set():
            return
        self._stop.set()
        self.history.close()
        if any(t.name == "memtrack-serve-http" for t in self._threads):
            self._http.shutdown()
        self._http.server_close()
        self.source.close()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=5)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _bind_message(host: str, port: int, e: OSError) -> str:
    where = f"{host}:{port}"
    if e.errno == errno.EADDRINUSE:
        return (f"cannot listen on {where}: the port is already in use (another memtrack "
                "serve?); choose another port, or port 0 for any free one")
    if e.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: no network interface of this machine has {host}"
    if e.errno == errno.EACCES:
        return f"cannot listen on {where}: permission denied (ports below 1024 need root)"
    if isinstance(e, socket.gaierror):
        return f"cannot listen on {where}: unknown host {host!r}"
    return f"cannot listen on {where}: {e.strerror or e}"
