"""A fake kubelet ``/pods`` endpoint over real HTTP(S).

The kubelet's secure port (10250) serves HTTPS with a certificate from the
cluster's CA and wants a bearer token (the agent's service-account token; the real
kubelet then checks ``nodes/proxy`` through a SubjectAccessReview, which this fake
reduces to "the token is one we accept"). The read-only port (10255, off by
default in current Kubernetes) serves plain HTTP to anyone. Both answer
``GET /pods`` with a ``PodList`` in the API server's shape; anything else is 404,
a missing or wrong token 401 ``Unauthorized`` as plain text, as the kubelet does.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support.tls import LocalCa


class FakeKubelet:
    """A kubelet ``/pods`` server: HTTPS with ``tls`` and ``tokens``, else read-only HTTP.

    Attributes:
        pods: what ``/pods`` returns (Pod objects, as :func:`tests.support.k8s_api.pod_object`
            builds them).
        hide_statuses_for: that many next ``/pods`` answers omit every pod's
            ``containerStatuses``, as while a container is still starting.
        calls: how many ``/pods`` requests were answered.
    """

    def __init__(self, *, tls: LocalCa | None = None, tokens: Iterable[str] = ()) -> None:
        self.tls = tls
        self.tokens = set(tokens)
        self.pods: list[dict[str, Any]] = []
        self.hide_statuses_for = 0
        self.calls = 0
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    def start(self) -> FakeKubelet:
        """Listen on a free port of 127.0.0.1."""
        kubelet = self

        class Handler(_Handler):
            owner = kubelet

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        if self.tls is not None:
            httpd.socket = self.tls.server_context().wrap_socket(httpd.socket, server_side=True)
        self._httpd = httpd
        threading.Thread(target=httpd.serve_forever, name="fake-kubelet", daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    def __enter__(self) -> FakeKubelet:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The TCP port."""
        assert self._httpd is not None, "not started"
        return int(self._httpd.server_address[1])

    def pod_list(self) -> dict[str, Any]:
        """The next ``/pods`` answer."""
        with self._lock:
            self.calls += 1
            items = copy.deepcopy(self.pods)
            if self.hide_statuses_for > 0:
                self.hide_statuses_for -= 1
                for pod in items:
                    pod.get("status", {}).pop("containerStatuses", None)
        return {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FakeKubelet

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        owner = self.owner
        if owner.tls is not None:
            auth = self.headers.get("Authorization", "")
            token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
            if token is None or token not in owner.tokens:
                self._reply(401, b"Unauthorized", "text/plain; charset=utf-8")
                return
        if self.path.split("?")[0] != "/pods":
            self._reply(404, b"404 page not found\n", "text/plain; charset=utf-8")
            return
        body: Mapping[str, Any] = owner.pod_list()
        self._reply(200, json.dumps(body).encode(), "application/json")
