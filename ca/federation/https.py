"""A small HTTPS server for public, read-only documents (bundle endpoint, OIDC discovery).

``http.server.ThreadingHTTPServer`` with TLS done per connection: each accepted
socket is wrapped with the *current* ``SSLContext`` (so a renewed SVID or a
replaced certificate file applies to the next handshake without a restart), and
the handshake runs in the connection's thread. GET only, small request headers
(http.server's own limits), no client authentication (SPIFFE Federation §5.1: the
endpoint MUST NOT require it). Bounded (:class:`Limits`), because anybody can
connect and a slot held is a fetch refused:

- at most ``max_connections`` connections (threads) at once, and at most
  ``max_per_ip`` from one client address; more are closed at accept;
- a deadline for the whole request, from accept through the TLS handshake to the
  last header line: a client that drips a byte now and then (slowloris) is cut at
  the deadline, not kept alive by every byte as a per-read timeout would;
- refusals and cut connections are logged as one summary line a minute.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ca.errors import ConfigError
from ca.log import event
from identity import configvalues
from identity.errors import InvalidValueError

MAX_CONNECTIONS = 64
MAX_PER_IP = 8
REQUEST_TIMEOUT = 10.0
IO_TIMEOUT = 10.0  # each write of the answer, once the request is read
LOG_INTERVAL = 60.0


@dataclass(frozen=True, slots=True)
class Limits:
    """How much of the server one client, and all clients, may hold.

    Attributes:
        max_connections: connections at once; more are closed at accept.
        max_per_ip: connections at once from one client address (0: no limit).
        request_timeout: seconds from accept to the end of the request's headers,
            TLS handshake included.
    """

    max_connections: int = MAX_CONNECTIONS
    max_per_ip: int = MAX_PER_IP
    request_timeout: float = REQUEST_TIMEOUT


@dataclass(frozen=True, slots=True)
class Document:
    """What a route answers: status, content type and body."""

    body: bytes
    content_type: str = "application/json"
    status: int = 200


Route = Callable[[], Document]


def server_context() -> ssl.SSLContext:
    """A server-side context: TLS 1.2 or later, no client certificate asked for."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class FileContextSource:
    """An ``SSLContext`` from a certificate and key file, rebuilt when either changes.

    Each handshake asks for the context; a ``stat`` of both files tells whether they
    changed (mtime, size, inode), so a renewed certificate (e.g. by an ACME client)
    applies to the next connection. A change that does not load (a half-written
    file) keeps the previous context and is logged; it is tried again next time.
    """

    def __init__(self, cert_file: Path, key_file: Path, *, what: str) -> None:
        self._cert_file = cert_file
        self._key_file = key_file
        self._what = what
        self._lock = threading.Lock()
        self._context: ssl.SSLContext | None = None
        self._stamp: tuple[object, ...] | None = None

    def _read_stamp(self) -> tuple[object, ...]:
        out: list[object] = []
        for p in (self._cert_file, self._key_file):
            st = os.stat(p)
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(out)

    def current(self) -> ssl.SSLContext:
        """The context for the next handshake.

        Raises:
            ConfigError: the files cannot be loaded and there is no earlier context.
        """
        with self._lock:
            try:
                stamp = self._read_stamp()
                if self._context is None or stamp != self._stamp:
                    ctx = server_context()
                    ctx.load_cert_chain(self._cert_file, self._key_file)
                    if self._context is not None:
                        event("tls certificate reloaded", endpoint=self._what,
                              cert_file=self._cert_file)
                    self._context, self._stamp = ctx, stamp
            except (OSError, ssl.SSLError) as exc:
                if self._context is None:
                    raise ConfigError(f"{self._what}: cannot load cert_file {self._cert_file} "
                                      f"and key_file {self._key_file}: {exc}") from None
                event("tls certificate reload failed", level=logging.WARNING,
                      endpoint=self._what, error=str(exc))
            return self._context


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = IO_TIMEOUT

    def setup(self) -> None:
        super().setup()
        conn = self.connection
        if isinstance(conn, ssl.SSLSocket):
            conn.do_handshake()  # under self.timeout (set by StreamRequestHandler.setup)

    def handle(self) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            super().handle()

    def parse_request(self) -> bool:
        parsed = super().parse_request()  # reads the headers
        # The request line and headers are in (a GET has no body): the deadline
        # has done its job; the answer's writes have IO_TIMEOUT each.
        self.server.deadlines.request_read(self.connection)
        return parsed

    def _send(self, status: int, body: bytes, content_type: str,
              extra: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.close_connection = True

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        route = self.server.routes.get(path)
        if route is None:
            self._send(404, b"not found\n", "text/plain; charset=utf-8")
            return
        try:
            doc = route()
        except Exception as exc:  # the edge: log with the traceback, answer 500
            event("https request failed", level=logging.ERROR, exc_info=True,
                  endpoint=self.server.name, error=f"{exc.__class__.__name__}")
            self._send(500, b"internal error\n", "text/plain; charset=utf-8")
            return
        self._send(doc.status, doc.body, doc.content_type)

    def _not_allowed(self) -> None:
        self._send(405, b"method is not allowed\n", "text/plain; charset=utf-8",
                   {"Allow": "GET"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _not_allowed

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one structured line per failure is enough; no access log


class _Deadlines:
    """Cuts connections whose request is not read by their deadline.

    One thread for the server, not one timer per connection: it sleeps until the
    earliest deadline, then shuts the late sockets down, which wakes the
    connection's thread from its blocked read with an end of file.
    """

    def __init__(self, timeout: float, on_cut: Callable[[], None]) -> None:
        self._timeout = timeout
        self._on_cut = on_cut
        self._cond = threading.Condition()
        self._due: dict[socket.socket, float] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="https-deadlines",
                                        daemon=True)
        self._thread.start()

    def watch(self, sock: socket.socket) -> None:
        with self._cond:
            self._due[sock] = time.monotonic() + self._timeout
            self._cond.notify()

    def request_read(self, sock: socket.socket) -> None:
        with self._cond:
            self._due.pop(sock, None)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                late = [s for s, due in self._due.items() if due <= now]
                for sock in late:
                    del self._due[sock]
                    # The plain socket's shutdown, not SSLSocket's: that one also
                    # drops the TLS object under the thread that is reading it.
                    with contextlib.suppress(OSError):
                        socket.socket.shutdown(sock, socket.SHUT_RDWR)
                    self._on_cut()
                wait = min(self._due.values(), default=now + 3600) - now
                self._cond.wait(timeout=max(wait, 0.01))


class _Tally:
    """Counts connections closed unserved, by reason; a log line per reason per interval.

    The first in an interval is logged at once; later ones are added to the count
    the next line reports (or :meth:`flush`, at stop).
    """

    def __init__(self, name: str, interval: float = LOG_INTERVAL) -> None:
        self._name = name
        self._interval = interval
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._last: dict[str, float] = {}

    def count(self, reason: str) -> None:
        with self._lock:
            self._counts[reason] += 1
            now = time.monotonic()
            if now - self._last.get(reason, -self._interval) < self._interval:
                return
            self._last[reason] = now
            n = self._counts.pop(reason)
        event("https connections closed", level=logging.WARNING, endpoint=self._name,
              reason=reason, count=n)

    def flush(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, Counter()
        for reason, n in counts.items():
            event("https connections closed", level=logging.WARNING, endpoint=self._name,
                  reason=reason, count=n)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], *, name: str,
                 contexts: Callable[[], ssl.SSLContext], routes: Mapping[str, Route],
                 limits: Limits) -> None:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        self.name = name
        self.contexts = contexts
        self.routes = dict(routes)
        self.limits = limits
        self.tally = _Tally(name)
        self.deadlines = _Deadlines(limits.request_timeout,
                                    lambda: self.tally.count("request deadline"))
        self._lock = threading.Lock()
        self._open = 0
        self._per_ip: Counter[str] = Counter()
        super().__init__(address, _Handler)  # binds; server_close() on failure

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            sock, addr = self.socket.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                # Out of descriptors: the listening socket stays readable; pause
                # rather than spin on it until one is freed.
                time.sleep(0.1)
            raise
        try:
            ctx = self.contexts()
        except Exception:
            sock.close()
            raise
        # The handshake happens in the connection's own thread (setup), under the
        # request's deadline.
        return ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def verify_request(self, request: Any, client_address: Any) -> bool:
        ip = str(client_address[0]) if client_address else ""
        with self._lock:
            if self._open >= self.limits.max_connections:
                reason = "connection limit"
            elif self.limits.max_per_ip and self._per_ip[ip] >= self.limits.max_per_ip:
                reason = "per-address limit"
            else:
                self._open += 1
                self._per_ip[ip] += 1
                self.deadlines.watch(request)
                return True
        self.tally.count(reason)
        return False

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)  # starts the thread
        except Exception:
            self._release(request, client_address)  # no thread: its slot is free again
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request, client_address)

    def _release(self, request: Any, client_address: Any) -> None:
        self.deadlines.request_read(request)
        ip = str(client_address[0]) if client_address else ""
        with self._lock:
            self._open -= 1
            self._per_ip[ip] -= 1
            if self._per_ip[ip] <= 0:
                del self._per_ip[ip]

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away or failed its handshake is not our error

    def server_close(self) -> None:
        super().server_close()
        self.deadlines.stop()
        self.tally.flush()


class HttpsServer:
    """Serves ``routes`` (path -> document) over HTTPS on a background thread."""

    def __init__(self, address: str, *, name: str, contexts: Callable[[], ssl.SSLContext],
                 routes: Mapping[str, Route], limits: Limits | None = None) -> None:
        """Args:
            address: ``HOST:PORT``; port 0 picks a free one (see :attr:`bound_address`).
            name: for logs (``bundle_endpoint``, ``oidc_discovery``).
            contexts: the TLS context for the next handshake.
            routes: exact paths and what they answer.
            limits: connection caps and the request deadline (default: :class:`Limits`).
        """
        self._limits = limits or Limits()
        try:
            host, port = configvalues.parse_host_port(address, allow_port_zero=True)
        except InvalidValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None
        self._address = (host.strip("[]"), port)
        self._name = name
        self._contexts = contexts
        self._routes = routes
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.bound_address = ""

    def start(self) -> None:
        """Check the TLS context, bind and serve.

        Raises:
            ConfigError: the certificate does not load or the address is taken.
        """
        self._contexts()  # fail at start, not at the first handshake
        try:
            self._server = _Server(self._address, name=self._name, contexts=self._contexts,
                                   routes=self._routes, limits=self._limits)
        except OSError as exc:
            raise ConfigError(f"{self._name}: cannot listen on {self._address[0]}:"
                              f"{self._address[1]}: {exc.strerror}") from None
        bound = self._server.server_address
        host, port = str(bound[0]), int(bound[1])
        shown = f"[{host}]" if ":" in host else host
        self.bound_address = f"{shown}:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.2},
                                        name=f"{self._name}-https", daemon=True)
        self._thread.start()
        event("https endpoint listening", endpoint=self._name, address=self.bound_address)

    def stop(self) -> None:
        """Stop accepting, close the socket, wait for the serving thread."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> HttpsServer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
