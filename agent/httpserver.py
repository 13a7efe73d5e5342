"""The agent's HTTP health and metrics listener: ``/live``, ``/ready``, ``/metrics``.

Off unless ``health_address`` is set (docs/configuration.md): every node runs an
agent, and an open port on each node is a choice for the operator, who then
usually picks a loopback address (``127.0.0.1:8089``) or the pod's for probes.

- ``GET /live``: 200 while the process runs.
- ``GET /ready``: 200 once the Workload API is served and while the last sync with
  the server succeeded; else 503 with the reason (as ``sigil-agent healthcheck``).
- ``GET /metrics``: Prometheus text format (agent/metrics.py).

It exposes no key, token or SVID, only counts and times; any other path is 404,
any method but GET 405.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from agent import log
from agent.errors import ConfigError
from identity.configvalues import parse_host_port
from identity.errors import InvalidValueError

Readiness = Callable[[], str | None]
"""None when ready, else the reason it is not."""


class HealthServer:
    """A small threaded HTTP server; :meth:`start` and :meth:`stop`."""

    def __init__(self, address: str, *, ready: Readiness, registry: CollectorRegistry) -> None:
        try:
            host, port = parse_host_port(address, allow_port_zero=True)
        except InvalidValueError as exc:
            raise ConfigError(f"health_address: {exc}") from None
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
        try:
            self._httpd = ThreadingHTTPServer((self._host, self._port),
                                              _handler(self._ready, self._registry))
        except OSError as exc:
            raise ConfigError(f"cannot listen on health_address {self._host}:{self._port}: "
                              f"{exc.strerror}") from None
        self._httpd.daemon_threads = True
        host = self._host if ":" not in self._host else f"[{self._host}]"
        self.bound_address = f"{host}:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name="agent-health-http", daemon=True)
        self._thread.start()
        log.event("health listening", health_address=self.bound_address)

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


def _handler(ready: Readiness, registry: CollectorRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "sigil-agent-health"
        sys_version = ""

        def log_message(self, format: str, *args: object) -> None:
            pass  # a scrape every few seconds would drown the event log

        def _send(self, code: int, body: bytes,
                  content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            if code == 405:
                self.send_header("Allow", "GET")
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
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            else:
                self._send(404, b"not found\n")

        def _not_allowed(self) -> None:
            self._send(405, f"method {self.command} not allowed; use GET\n".encode())

        do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _not_allowed

    return Handler
