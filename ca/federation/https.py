"""A small HTTPS server for public, read-only documents (bundle endpoint, OIDC discovery).

``http.server.ThreadingHTTPServer`` with TLS done per connection: each accepted
socket is wrapped with the *current* ``SSLContext`` (so a renewed SVID or a
replaced certificate file applies to the next handshake without a restart), and
the handshake runs in the connection's thread under a timeout. Bounded: at most
:data:`MAX_CONNECTIONS` connections at once (more are closed at once), a timeout
on every read, GET only, and small request headers (http.server's own limits).
No client authentication (SPIFFE Federation §5.1: the endpoint MUST NOT require it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import threading
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
IO_TIMEOUT = 10.0


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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], *, name: str,
                 contexts: Callable[[], ssl.SSLContext], routes: Mapping[str, Route]) -> None:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, _Handler)
        self.name = name
        self.contexts = contexts
        self.routes = dict(routes)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = self.socket.accept()
        try:
            ctx = self.contexts()
        except Exception:
            sock.close()
            raise
        # The handshake happens in the connection's own thread (setup), under a timeout.
        return ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self._slots.acquire(blocking=False)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away or failed its handshake is not our error


class HttpsServer:
    """Serves ``routes`` (path -> document) over HTTPS on a background thread."""

    def __init__(self, address: str, *, name: str, contexts: Callable[[], ssl.SSLContext],
                 routes: Mapping[str, Route]) -> None:
        """Args:
            address: ``HOST:PORT``; port 0 picks a free one (see :attr:`bound_address`).
            name: for logs (``bundle_endpoint``, ``oidc_discovery``).
            contexts: the TLS context for the next handshake.
            routes: exact paths and what they answer.
        """
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
                                   routes=self._routes)
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
