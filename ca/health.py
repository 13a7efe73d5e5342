"""HTTP health and metrics: ``/live``, ``/ready`` and ``/metrics`` on ``health_address``.

- ``GET /live``: 200 while the process runs (it answers, so it runs).
- ``GET /ready``: 200 once the datastore answers and the CA is loaded (and, with
  worker processes, while the supervisor keeps every worker running: see
  :meth:`ca.workers.WorkerPool.not_ready`), else 503 with the reason in the body.
- ``GET /metrics``: Prometheus text format (:mod:`ca.metrics`).

Anything else: an unknown path is 404, a method other than GET is 405. The server
is plain HTTP and meant for a loopback or cluster-internal address (the default is
``127.0.0.1:8080``): it exposes no key, token or entry, only counts and times.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ca.authority import CertificateAuthority
from ca.config import parse_host_port
from ca.datastore import Datastore
from ca.errors import ConfigError
from ca.log import event
from ca.metrics import StateSnapshot

Readiness = Callable[[], str | None]
"""Returns None when ready, else the reason it is not."""

MAX_PATH = 256


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
    """A small threaded HTTP server; start() and stop(), or use as a context manager."""

    def __init__(self, address: str, *, ready: Readiness,
                 registry: Callable[[], CollectorRegistry]) -> None:
        """Args:
            address: ``HOST:PORT`` (port 0 picks one; see :attr:`bound_address`).
            ready: the readiness check.
            registry: the registry to serve at ``/metrics`` (called per scrape).
        """
        host, port = parse_host_port(address, key="health_address")
        self._host = host.strip("[]")
        self._port = port
        self._ready = ready
        self._registry = registry
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.bound_address = ""

    def start(self) -> None:
        """Listen and serve in a background thread.

        Raises:
            ConfigError: the address cannot be bound.
        """
        handler = _handler(self._ready, self._registry)
        try:
            self._httpd = ThreadingHTTPServer((self._host, self._port), handler)
        except OSError as exc:
            raise ConfigError(f"cannot listen on health_address {self._host}:{self._port}: "
                              f"{exc.strerror}") from None
        self._httpd.daemon_threads = True
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


def _handler(ready: Readiness, registry: Callable[[], CollectorRegistry]
             ) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "sigil-health"
        sys_version = ""

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
