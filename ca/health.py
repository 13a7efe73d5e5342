"""HTTP health and metrics: ``/live``, ``/ready`` and ``/metrics`` on ``health_address``.

- ``GET /live``: 200 while the process runs (it answers, so it runs).
- ``GET /ready``: 200 once the datastore answers and the CA is loaded (and, with
  worker processes, while the supervisor keeps every worker running: see
  :meth:`ca.workers.WorkerPool.not_ready`), else 503 with the reason in the body.
- ``GET /metrics``: Prometheus text format (:mod:`ca.metrics`).

Anything else: an unknown path is 404, a method other than GET is 405. The server
is plain HTTP and meant for a loopback or cluster-internal address (the default is
``127.0.0.1:8080``): it exposes no key, token or entry, only counts and times.

Probes must be answered while anybody else holds connections open, so a connection
costs a thread only once it has sent something (:class:`_WaitingRoom`): until then
it waits, one descriptor, at most :data:`IDLE_TIMEOUT`, and at most
:data:`MAX_WAITING` wait (a new one displaces the longest-waiting). Requests are
answered by at most :data:`MAX_HANDLERS` threads, each request within
:data:`REQUEST_TIMEOUT` of its accept however slowly it arrives.
"""

from __future__ import annotations

import contextlib
import errno
import io
import selectors
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ca.authority import CertificateAuthority
from ca.config.server import parse_host_port
from ca.datastore import Datastore
from ca.errors import ConfigError
from ca.log import event
from ca.metrics import StateSnapshot

Readiness = Callable[[], str | None]
"""Returns None when ready, else the reason it is not."""

MAX_PATH = 256
IDLE_TIMEOUT = 10.0  # accept to the first byte of the request
REQUEST_TIMEOUT = 10.0  # accept to the whole request read; also each write of the answer
MAX_HANDLERS = 8  # threads answering requests at once
MAX_WAITING = 256  # connections held before their first byte (or for a free thread)


def datastore_ready(datastore: Callable[[], Datastore | None],
                    authority: Callable[[], CertificateAuthority | None]) -> Readiness:
    """The usual readiness check: the datastore answers a query and the CA is loaded."""

    def check() -> str | None:
        ds, ca = datastore(), authority()
        if ds is None:
            return "datastore not open"
        try:
            ds.current_revision()
        except Exception as exc:  # any driver error means "not ready", with its type
            return f"datastore does not answer: {type(exc).__name__}"
        if ca is None:
            return "CA not loaded"
        try:
            ca.ca_certificate()
        except Exception:
            return "CA not loaded"
        return None

    return check


class ReadinessChecks:
    """Several readiness checks as one: ready when each is; the first reason wins.

    Parts that start after the health server (the worker pool) add their check
    with :meth:`add`.
    """

    def __init__(self, *checks: Readiness) -> None:
        self._checks = list(checks)

    def add(self, check: Readiness) -> None:
        """Consult ``check`` too from now on."""
        self._checks = [*self._checks, check]  # a new list: a scrape may be iterating

    def __call__(self) -> str | None:
        for check in self._checks:
            reason = check()
            if reason is not None:
                return reason
        return None


def read_state(datastore: Datastore) -> StateSnapshot:
    """The datastore-derived gauges: entry and agent counts, CA key expiry times."""
    expiry: dict[tuple[str, str], int] = {}
    for rec in datastore.list_ca_keys():
        key = (rec.kind, rec.status)
        expiry[key] = max(expiry.get(key, 0), rec.not_after)
    return StateSnapshot(entries=datastore.count_entries(), agents=datastore.count_nodes(),
                         key_expiry=expiry)


class HealthServer:
    """A small HTTP server with bounded threads; start() and stop(), or a context manager."""

    def __init__(self, address: str, *, ready: Readiness,
                 registry: Callable[[], CollectorRegistry],
                 idle_timeout: float | None = None,
                 request_timeout: float | None = None) -> None:
        """Args:
            address: ``HOST:PORT`` (port 0 picks one; see :attr:`bound_address`).
            ready: the readiness check.
            registry: the registry to serve at ``/metrics`` (called per scrape).
            idle_timeout: seconds a connection may wait before sending anything
                (default :data:`IDLE_TIMEOUT`).
            request_timeout: seconds from accept to the whole request (default
                :data:`REQUEST_TIMEOUT`).
        """
        host, port = parse_host_port(address, key="health_address")
        self._host = host.strip("[]")
        self._port = port
        self._ready = ready
        self._registry = registry
        self._idle_timeout = IDLE_TIMEOUT if idle_timeout is None else idle_timeout
        self._request_timeout = REQUEST_TIMEOUT if request_timeout is None else request_timeout
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self.bound_address = ""

    def start(self) -> None:
        """Listen and serve in a background thread.

        Raises:
            ConfigError: the address cannot be bound.
        """
        handler = _handler(self._ready, self._registry)
        try:
            self._httpd = _Server((self._host, self._port), handler,
                                  idle_timeout=self._idle_timeout,
                                  request_timeout=self._request_timeout)
        except OSError as exc:
            raise ConfigError(f"cannot listen on health_address {self._host}:{self._port}: "
                              f"{exc.strerror}") from None
        host = self._host if ":" not in self._host else f"[{self._host}]"
        self.bound_address = f"{host}:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="health-http",
                                        daemon=True)
        self._thread.start()
        event("health listening", health_address=self.bound_address)

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> HealthServer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


class _Server(HTTPServer):
    """Accepts in serve_forever's thread; the waiting room and a pool do the rest."""

    allow_reuse_address = True
    # socketserver's 5 overflows under a burst of connects (the client then retries
    # its SYN a second later): a probe must not queue behind a burst.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *,
                 idle_timeout: float, request_timeout: float) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.request_timeout = request_timeout
        self._pool = ThreadPoolExecutor(max_workers=MAX_HANDLERS,
                                        thread_name_prefix="health-handler")
        self._room = _WaitingRoom(idle_timeout, self._dispatch)
        super().__init__(address, handler)  # binds; server_close() on failure

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            return self.socket.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                time.sleep(0.1)  # out of descriptors: pause rather than spin on accept
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        self._room.admit(request, client_address)

    def _dispatch(self, sock: socket.socket, client_address: Any, accepted: float) -> None:
        try:
            self._pool.submit(self._answer, sock, client_address, accepted)
        except RuntimeError:  # stopping
            sock.close()

    def _answer(self, sock: socket.socket, client_address: Any, accepted: float) -> None:
        try:
            self.RequestHandlerClass(sock, client_address, self)  # type: ignore[arg-type]
        except Exception:  # noqa: S110 - a client that went away is not our error
            pass
        finally:
            self._room.answered(sock)
            self.shutdown_request(sock)

    def deadline(self, sock: socket.socket) -> float:
        """When the request on ``sock`` must have been read (monotonic seconds)."""
        return self._room.accepted_at(sock) + self.request_timeout

    def server_close(self) -> None:
        super().server_close()
        self._room.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)


class _WaitingRoom:
    """Connections that have not sent anything yet: a selector in one thread.

    A connection leaves for the handler pool once it is readable (its request has
    begun, or it closed), or is closed after ``idle_timeout``. At most
    :data:`MAX_WAITING` are held, waiting here or queued for a handler: a newcomer
    closes the one that has waited longest, so a flood of idle connections cannot
    keep a probe out, and a probe, which speaks at once, is not here long enough
    to be displaced. Only this room's thread touches the selector and closes a
    waiting socket: a socket closed elsewhere could free its descriptor number for
    the next accept while the selector still holds it.
    """

    def __init__(self, idle_timeout: float,
                 dispatch: Callable[[socket.socket, Any, float], None]) -> None:
        self._idle_timeout = idle_timeout
        self._dispatch = dispatch
        self._lock = threading.Lock()
        self._incoming: list[tuple[socket.socket, Any, float]] = []
        self._accepted: dict[socket.socket, float] = {}
        self._queued = 0  # handed to the pool and not yet answered
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="health-waiting", daemon=True)
        self._thread.start()

    def admit(self, sock: socket.socket, client_address: Any) -> None:
        """Hold a just-accepted connection until it speaks (accepting thread)."""
        now = time.monotonic()
        with self._lock:
            stopped = self._stopped
            if not stopped:
                self._incoming.append((sock, client_address, now))
                self._accepted[sock] = now
        if stopped:
            _close(sock)
        else:
            self._wake()

    def accepted_at(self, sock: socket.socket) -> float:
        """When ``sock`` was accepted (monotonic seconds)."""
        with self._lock:
            return self._accepted.get(sock, time.monotonic())

    def answered(self, sock: socket.socket) -> None:
        """A handler is done with ``sock`` (handler thread)."""
        with self._lock:
            self._queued -= 1
            self._accepted.pop(sock, None)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
        self._wake()
        self._thread.join(timeout=5)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # already woken (the buffer is full), or stopping

    def _drop(self, sock: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(sock)
        with self._lock:
            self._accepted.pop(sock, None)
        _close(sock)

    def _run(self) -> None:
        # Accept order is deadline order: the oldest is first, to expire or displace.
        waiting: OrderedDict[socket.socket, tuple[Any, float]] = OrderedDict()
        try:
            while True:
                with self._lock:
                    if self._stopped:
                        break
                    incoming, self._incoming = self._incoming, []
                    queued = self._queued
                for sock, address, accepted in incoming:
                    if queued >= MAX_WAITING:
                        self._drop(sock)  # every slot waits for a thread: no room
                        continue
                    while waiting and len(waiting) + queued >= MAX_WAITING:
                        self._drop(waiting.popitem(last=False)[0])
                    try:
                        self._selector.register(sock, selectors.EVENT_READ)
                    except (KeyError, ValueError, OSError):
                        self._drop(sock)
                        continue
                    waiting[sock] = (address, accepted)
                now = time.monotonic()
                while waiting:
                    sock, (_address, accepted) = next(iter(waiting.items()))
                    if accepted + self._idle_timeout > now:
                        break
                    del waiting[sock]
                    self._drop(sock)
                timeout = 3600.0
                if waiting:
                    first = next(iter(waiting.values()))[1]
                    timeout = max(0.0, first + self._idle_timeout - now)
                for key, _events in self._selector.select(timeout):
                    if key.fileobj is self._wake_r:
                        with contextlib.suppress(OSError):
                            while self._wake_r.recv(4096):
                                pass
                        continue
                    if not isinstance(key.fileobj, socket.socket):
                        continue
                    sock = key.fileobj
                    self._selector.unregister(sock)
                    item = waiting.pop(sock, None)
                    if item is None:
                        continue
                    with self._lock:
                        self._queued += 1
                    self._dispatch(sock, item[0], item[1])
        finally:
            with self._lock:
                left = [s for s, _a, _t in self._incoming]
                self._incoming = []
            for sock in [*waiting, *left]:
                self._drop(sock)
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class _DeadlineReader(io.RawIOBase):
    """Reads a socket until a deadline: each read may wait only for what time is left.

    A per-read timeout alone lets a client that sends a byte now and then keep a
    thread forever; this bounds the whole request.
    """

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request deadline passed")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


def _handler(ready: Readiness, registry: Callable[[], CollectorRegistry]
             ) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "sigil-health"
        sys_version = ""
        timeout = REQUEST_TIMEOUT  # each write of the answer
        server: _Server

        def setup(self) -> None:
            super().setup()
            # The whole request, from accept, not each read (see _DeadlineReader).
            self.rfile.close()  # the socket's own file: it would keep the socket open
            self.rfile = io.BufferedReader(
                _DeadlineReader(self.connection, self.server.deadline(self.connection)))

        def parse_request(self) -> bool:
            parsed = super().parse_request()  # reads the headers
            # Read: the answer's writes get their own timeout, not what the
            # request's deadline left of it.
            self.connection.settimeout(self.timeout)
            return parsed

        def log_message(self, format: str, *args: object) -> None:
            pass  # scrapes every few seconds would drown the event log

        def _send(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
                  headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/live":
                self._send(200, b"live\n")
            elif path == "/ready":
                reason = ready()
                if reason is None:
                    self._send(200, b"ready\n")
                else:
                    self._send(503, f"not ready: {reason}\n".encode())
            elif path == "/metrics":
                try:
                    body = generate_latest(registry())
                except Exception as exc:
                    event("metrics failed", error=type(exc).__name__)
                    self._send(503, b"metrics unavailable\n")
                    return
                self._send(200, body, CONTENT_TYPE_LATEST)
            else:
                shown = path[:MAX_PATH].encode("ascii", "replace")
                self._send(404, b"not found: " + shown + b"\n")

        def _not_allowed(self) -> None:
            self._send(405, f"method {self.command} not allowed; use GET\n".encode(),
                       headers={"Allow": "GET"})

        do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _not_allowed

    return Handler
