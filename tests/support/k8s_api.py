"""A local Kubernetes API test server: real HTTP(S), real Kubernetes JSON.

No real API server (nor etcd, nor a kubelet) can run on this machine, so tests
of the Kubernetes parts talk to this one instead, through the real ``kubernetes``
Python client over real HTTP. It covers exactly what Sigil uses, in the shapes
the real API server returns (checked against Kubernetes 1.30+ responses):

- ``POST /apis/authentication.k8s.io/v1/tokenreviews``: TokenReview for the
  service-account tokens minted with :meth:`FakeKubeApi.issue_token` (projected
  tokens: audiences, expiry, and the pod/node binding in ``status.user.extra``
  under ``authentication.kubernetes.io/pod-name``, ``pod-uid``, ``node-name``,
  ``node-uid``). An unknown, expired or wrong-audience token yields
  ``authenticated: false`` with the API server's error text, as the real one does.
- Pods (namespaced), Nodes and Namespaces (cluster-scoped), ConfigMaps (namespaced) and the
  custom resource IdentityTemplate (cluster-scoped, ``sigil.dev/v1alpha1``):
  get, list (all namespaces or one), create (POST), replace (PUT, with the
  optimistic-concurrency 409 Conflict on a stale ``metadata.resourceVersion``)
  and delete. Every write bumps one global ``resourceVersion``.
- Watches (``?watch=1``): from ``resourceVersion`` (events after it) or from
  now (synthetic ``ADDED`` for what exists, as the API server does), ``ADDED`` /
  ``MODIFIED`` / ``DELETED`` events as chunked JSON lines, ``BOOKMARK`` events when
  ``allowWatchBookmarks=true`` and the stream is idle, ``timeoutSeconds``, and for a
  resourceVersion older than the last :meth:`FakeKubeApi.compact` the real answer:
  an ``ERROR`` event carrying a 410 Gone ``Status`` ("too old resource version").
  :meth:`FakeKubeApi.drop_watches` cuts every open stream, like an API server
  restart or a load balancer idle timeout.
- Errors as ``Status`` objects with the real codes and reasons: 401 Unauthorized
  (missing or wrong bearer token), 404 NotFound, 405 MethodNotAllowed, 409
  AlreadyExists / Conflict, 400 BadRequest, 413 RequestEntityTooLarge.

Not covered: authorization (RBAC; the deploy tests check the manifests instead),
label and field selectors, server-side apply, pagination (``limit``/``continue``).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import secrets
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.support.tls import LocalCa

MAX_BODY = 1 << 20
DEFAULT_API_AUDIENCES = ("https://kubernetes.default.svc.cluster.local",)


@dataclass(frozen=True)
class Resource:
    """One kind of object the server serves."""

    plural: str
    api_version: str
    kind: str
    namespaced: bool

    @property
    def prefix(self) -> str:
        """The URL prefix of its group/version."""
        return "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"


RESOURCES: Mapping[str, Resource] = {
    r.plural: r for r in (
        Resource("pods", "v1", "Pod", True),
        Resource("nodes", "v1", "Node", False),
        Resource("namespaces", "v1", "Namespace", False),
        Resource("configmaps", "v1", "ConfigMap", True),
        Resource("identitytemplates", "sigil.dev/v1alpha1", "IdentityTemplate", False),
    )
}


def _timestamp(ts: float | None = None) -> str:
    when = dt.datetime.fromtimestamp(time.time() if ts is None else ts, dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def status_object(code: int, reason: str, message: str,
                  details: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A ``Status`` failure as the API server returns it."""
    out: dict[str, Any] = {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    }
    if details is not None:
        out["details"] = dict(details)
    return out


# ---- object builders (shared with the fake kubelet) ------------------------------------


def container_id(seed: str) -> str:
    """A deterministic 64-hex container ID, as containerd, CRI-O and Docker use."""
    return uuid.uuid5(uuid.NAMESPACE_OID, seed).hex + uuid.uuid5(uuid.NAMESPACE_URL, seed).hex


@dataclass
class ContainerSpec:
    """A container of a test pod; ``runtime`` is the containerID scheme."""

    name: str
    image: str
    id: str = ""
    runtime: str = "containerd"
    image_id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            self.id = container_id(self.name + self.image + secrets.token_hex(4))


def pod_object(
    name: str, namespace: str = "default", *, node_name: str, uid: str | None = None,
    service_account: str = "default", labels: Mapping[str, str] | None = None,
    owner: tuple[str, str] | None = None, containers: Sequence[ContainerSpec] = (),
    phase: str = "Running", with_container_statuses: bool = True,
) -> dict[str, Any]:
    """A Pod as the API server (or the kubelet's ``/pods``) returns it."""
    containers = list(containers) or [ContainerSpec("main", "registry.example/app:1.0")]
    meta: dict[str, Any] = {
        "name": name, "namespace": namespace, "uid": uid or str(uuid.uuid4()),
        "creationTimestamp": _timestamp(), "labels": dict(labels or {}),
    }
    if owner is not None:
        meta["ownerReferences"] = [{
            "apiVersion": "apps/v1", "kind": owner[0], "name": owner[1],
            "uid": str(uuid.uuid4()), "controller": True, "blockOwnerDeletion": True,
        }]
    statuses = [{
        "name": c.name, "image": c.image,
        "imageID": c.image_id or f"{c.image.split(':')[0]}@sha256:{container_id(c.image)}",
        "containerID": f"{c.runtime}://{c.id}", "ready": True, "restartCount": 0,
        "started": True, "state": {"running": {"startedAt": _timestamp()}},
    } for c in containers]
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": meta,
        "spec": {
            "nodeName": node_name, "serviceAccountName": service_account,
            "serviceAccount": service_account, "restartPolicy": "Always",
            "containers": [{"name": c.name, "image": c.image, "resources": {}}
                           for c in containers],
        },
        "status": {
            "phase": phase, "hostIP": "10.0.0.10", "podIP": "10.244.0.7",
            "startTime": _timestamp(), "qosClass": "BestEffort",
            **({"containerStatuses": statuses} if with_container_statuses else {}),
        },
    }


def node_object(name: str, *, uid: str | None = None,
                labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A Node as the API server returns it."""
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": name, "uid": uid or str(uuid.uuid4()), "creationTimestamp": _timestamp(),
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                       **dict(labels or {})},
        },
        "spec": {"podCIDR": "10.244.0.0/24"},
        "status": {
            "addresses": [{"type": "InternalIP", "address": "10.0.0.10"},
                          {"type": "Hostname", "address": name}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
            "nodeInfo": {
                "machineID": uuid.uuid4().hex, "systemUUID": str(uuid.uuid4()),
                "bootID": str(uuid.uuid4()), "kernelVersion": "6.8.0-45-generic",
                "osImage": "Ubuntu 24.04.1 LTS", "containerRuntimeVersion": "containerd://1.7.20",
                "kubeletVersion": "v1.31.0", "kubeProxyVersion": "v1.31.0",
                "operatingSystem": "linux", "architecture": "amd64",
            },
        },
    }


def namespace_object(name: str, *, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A Namespace as the API server returns it (with the label it sets itself)."""
    return {
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name,
                                              **dict(labels or {})}},
        "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"},
    }


def identity_template_object(name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """An IdentityTemplate custom resource."""
    return {"apiVersion": "sigil.dev/v1alpha1", "kind": "IdentityTemplate",
            "metadata": {"name": name}, "spec": dict(spec)}


# ---- the server ------------------------------------------------------------------------


@dataclass
class IssuedToken:
    """A service-account token the fake API server will vouch for in a TokenReview."""

    namespace: str
    service_account: str
    audiences: tuple[str, ...]
    expires_at: float
    pod_name: str | None = None
    pod_uid: str | None = None
    node_name: str | None = None
    node_uid: str | None = None
    sa_uid: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass
class _Event:
    rv: int
    type: str
    resource: str
    namespace: str
    obj: dict[str, Any]


class FakeKubeApi:
    """The test API server. Use as a context manager; :attr:`url` is its address.

    Args:
        tls: serve HTTPS with this CA's server certificate (else plain HTTP).
        token: the bearer token every request must carry (None: no authentication).
        bookmark_interval: idle seconds between BOOKMARK events on watches that
            asked for them.
    """

    def __init__(self, *, tls: LocalCa | None = None, token: str | None = "test-api-token",
                 bookmark_interval: float = 0.5) -> None:
        self.tls = tls
        self.token = token
        self.bookmark_interval = bookmark_interval
        self.requests: list[tuple[str, str]] = []
        self.token_reviews: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._rv = 100
        self._objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._events: list[_Event] = []
        self._compacted = 0
        self._watch_generation = 0
        self._tokens: dict[str, IssuedToken] = {}
        self._closing = False
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle --------------------------------------------------------------------

    def start(self) -> FakeKubeApi:
        """Listen on a free port of 127.0.0.1 and serve in a thread."""
        api = self

        class Handler(_Handler):
            server_api = api

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        if self.tls is not None:
            httpd.socket = self.tls.server_context().wrap_socket(httpd.socket, server_side=True)
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, name="fake-kube-api",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """End every watch and stop serving."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    def __enter__(self) -> FakeKubeApi:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http(s)://127.0.0.1:<port>``."""
        assert self._httpd is not None, "not started"
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self._httpd.server_address[1]}"

    # ---- state, for tests -------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        """The latest resourceVersion."""
        with self._cond:
            return self._rv

    def put(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create or replace an object (its kind picks the resource); returns the stored copy."""
        resource = _resource_of(obj)
        meta = obj.get("metadata", {})
        namespace = meta.get("namespace", "") if resource.namespaced else ""
        with self._cond:
            existing = self._objects.get((resource.plural, namespace, meta["name"]))
            return self._store(resource, namespace, obj,
                               "ADDED" if existing is None else "MODIFIED")

    def delete(self, kind_plural: str, name: str, namespace: str = "") -> None:
        """Delete an object (a DELETED event follows); a missing one is ignored."""
        with self._cond:
            self._delete(RESOURCES[kind_plural], namespace, name)

    def get(self, kind_plural: str, name: str, namespace: str = "") -> dict[str, Any] | None:
        """A copy of a stored object, or None."""
        with self._cond:
            found = self._objects.get((kind_plural, namespace, name))
            return copy.deepcopy(found) if found is not None else None

    def compact(self) -> None:
        """Forget the event history: watches from an older resourceVersion get 410 Gone."""
        with self._cond:
            self._compacted = self._rv
            self._events.clear()

    def drop_watches(self) -> None:
        """Cut every open watch stream (the client sees the connection end)."""
        with self._cond:
            self._watch_generation += 1
            self._cond.notify_all()

    def issue_token(
        self, *, namespace: str, service_account: str, pod: Mapping[str, Any] | None = None,
        node: Mapping[str, Any] | None = None, audiences: Iterable[str] = ("sigil-server",),
        expires_in: float = 3600.0,
    ) -> str:
        """Mint a projected service-account token bound to ``pod`` (and ``node``).

        The token is an opaque random string: only this server can review it, which is
        all a TokenReview client may assume anyway.
        """
        token = "eyJhbGciOiJSUzI1NiJ9." + secrets.token_urlsafe(32)
        self._tokens[token] = IssuedToken(
            namespace=namespace, service_account=service_account,
            audiences=tuple(audiences), expires_at=time.time() + expires_in,
            pod_name=pod["metadata"]["name"] if pod else None,
            pod_uid=pod["metadata"]["uid"] if pod else None,
            node_name=node["metadata"]["name"] if node else None,
            node_uid=node["metadata"]["uid"] if node else None,
        )
        return token

    # ---- internals (called with the condition held) -----------------------------------

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _store(self, resource: Resource, namespace: str, obj: Mapping[str, Any],
               event_type: str) -> dict[str, Any]:
        stored = copy.deepcopy(dict(obj))
        stored["apiVersion"] = resource.api_version
        stored["kind"] = resource.kind
        meta = stored.setdefault("metadata", {})
        old = self._objects.get((resource.plural, namespace, meta["name"]))
        meta.setdefault("uid", old["metadata"]["uid"] if old else str(uuid.uuid4()))
        meta.setdefault("creationTimestamp",
                        old["metadata"]["creationTimestamp"] if old else _timestamp())
        if resource.namespaced:
            meta["namespace"] = namespace
        rv = self._next_rv()
        meta["resourceVersion"] = str(rv)
        self._objects[(resource.plural, namespace, meta["name"])] = stored
        self._events.append(_Event(rv, event_type, resource.plural, namespace,
                                   copy.deepcopy(stored)))
        self._cond.notify_all()
        return copy.deepcopy(stored)

    def _delete(self, resource: Resource, namespace: str, name: str) -> dict[str, Any] | None:
        obj = self._objects.pop((resource.plural, namespace, name), None)
        if obj is None:
            return None
        rv = self._next_rv()
        obj["metadata"]["resourceVersion"] = str(rv)
        self._events.append(_Event(rv, "DELETED", resource.plural, namespace,
                                   copy.deepcopy(obj)))
        self._cond.notify_all()
        return obj

    def _list(self, resource: Resource, namespace: str | None) -> list[dict[str, Any]]:
        return [copy.deepcopy(o) for (plural, ns, _), o in sorted(self._objects.items())
                if plural == resource.plural and (namespace is None or ns == namespace)]

    def review(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """The ``status`` of a TokenReview for ``spec`` (see the module docstring)."""
        token = spec.get("token")
        wanted = [a for a in spec.get("audiences") or [] if isinstance(a, str)]
        issued = self._tokens.get(token) if isinstance(token, str) else None
        if issued is None:
            return {"authenticated": False, "user": {},
                    "error": "[invalid bearer token, square/go-jose: error in cryptographic "
                             "primitive, token lookup failed]"}
        if issued.expires_at <= time.time():
            return {"authenticated": False, "user": {},
                    "error": "[invalid bearer token, service account token has expired]"}
        targets = wanted or list(DEFAULT_API_AUDIENCES)
        matched = [a for a in targets if a in issued.audiences]
        if not matched:
            return {"authenticated": False, "user": {},
                    "error": "[invalid bearer token, token audiences "
                             f"{json.dumps(list(issued.audiences))} is invalid for the target "
                             f"audiences {json.dumps(targets)}]"}
        extra: dict[str, list[str]] = {}
        for key, value in (("pod-name", issued.pod_name), ("pod-uid", issued.pod_uid),
                           ("node-name", issued.node_name), ("node-uid", issued.node_uid)):
            if value is not None:
                extra[f"authentication.kubernetes.io/{key}"] = [value]
        user: dict[str, Any] = {
            "username": f"system:serviceaccount:{issued.namespace}:{issued.service_account}",
            "uid": issued.sa_uid,
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{issued.namespace}",
                       "system:authenticated"],
            "extra": extra,
        }
        return {"authenticated": True, "user": user, "audiences": matched}

    def _watch(self, resource: Resource, namespace: str | None, since: str | None,
               bookmarks: bool, timeout: float | None) -> Iterator[dict[str, Any]]:
        """Yield watch events; ends on timeout, drop_watches, stop, or a 410.

        The lock is never held across a ``yield``: a slow reader must not stall writers.
        """
        deadline = time.monotonic() + timeout if timeout else None
        batch: list[dict[str, Any]] = []
        with self._cond:
            generation = self._watch_generation
            if since in (None, "", "0"):
                batch = [{"type": "ADDED", "object": obj}
                         for obj in self._list(resource, namespace)]
                cursor = self._rv
            else:
                try:
                    cursor = int(since)  # type: ignore[arg-type]
                except ValueError:
                    cursor = -1
                if cursor < 0:
                    batch = [{"type": "ERROR", "object": status_object(
                        400, "BadRequest", f"invalid resource version {since!r}")}]
                elif cursor < self._compacted:
                    batch = [{"type": "ERROR", "object": status_object(
                        410, "Expired",
                        f"too old resource version: {cursor} ({self._compacted})")}]
                if batch:
                    cursor = -1
        yield from batch
        if cursor < 0:
            return
        last_sent = time.monotonic()
        while True:
            with self._cond:
                if self._closing or self._watch_generation != generation:
                    return
                batch = [{"type": e.type, "object": copy.deepcopy(e.obj)}
                         for e in self._events if e.rv > cursor
                         and e.resource == resource.plural
                         and (namespace is None or e.namespace == namespace)]
                # Events of other resources advance the cursor too.
                cursor = self._rv
                now = time.monotonic()
                if not batch:
                    if deadline is not None and now >= deadline:
                        return
                    if bookmarks and now - last_sent >= self.bookmark_interval:
                        batch = [{"type": "BOOKMARK", "object": {
                            "kind": resource.kind, "apiVersion": resource.api_version,
                            "metadata": {"resourceVersion": str(cursor)}}}]
                    else:
                        wait = self.bookmark_interval if bookmarks else 1.0
                        if deadline is not None:
                            wait = min(wait, deadline - now)
                        self._cond.wait(timeout=max(wait, 0.01))
                        continue
            yield from batch
            last_sent = time.monotonic()


def _resource_of(obj: Mapping[str, Any]) -> Resource:
    for resource in RESOURCES.values():
        if resource.kind == obj.get("kind"):
            return resource
    raise ValueError(f"the fake API server does not serve kind {obj.get('kind')!r}")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_api: FakeKubeApi

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # ---- plumbing ---------------------------------------------------------------------

    def _send(self, code: int, body: Mapping[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _fail(self, code: int, reason: str, message: str,
              details: Mapping[str, Any] | None = None) -> None:
        self._send(code, status_object(code, reason, message, details))

    def _authorized(self) -> bool:
        api = self.server_api
        if api.token is None:
            return True
        if self.headers.get("Authorization") == f"Bearer {api.token}":
            return True
        self._fail(401, "Unauthorized", "Unauthorized")
        return False

    def _body(self) -> dict[str, Any] | None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.close_connection = True
            self._fail(413, "RequestEntityTooLarge", "the request body is too large")
            return None
        try:
            doc = json.loads(self.rfile.read(length) or b"null")
        except ValueError:
            self._fail(400, "BadRequest", "the request body is not valid JSON")
            return None
        if not isinstance(doc, dict):
            self._fail(400, "BadRequest", "the request body must be a JSON object")
            return None
        return doc

    def _route(self) -> tuple[Resource, str | None, str | None] | None:
        """(resource, namespace or None for all, name or None)."""
        parts = [p for p in urlsplit(self.path).path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            rest = parts[2:]
            api_version = "v1"
        elif len(parts) >= 3 and parts[0] == "apis":
            rest = parts[3:]
            api_version = f"{parts[1]}/{parts[2]}"
        else:
            return None
        namespace: str | None = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 2:
            return None
        resource = RESOURCES.get(rest[0])
        if resource is None or resource.api_version != api_version:
            return None
        if namespace is not None and not resource.namespaced:
            return None
        name = rest[1] if len(rest) == 2 else None
        if name is not None and resource.namespaced and namespace is None:
            return None
        return resource, namespace, name

    def _handle(self, method: str) -> None:
        api = self.server_api
        api.requests.append((method, self.path))
        if not self._authorized():
            return
        path = urlsplit(self.path).path
        if path == "/apis/authentication.k8s.io/v1/tokenreviews":
            if method != "POST":
                self._fail(405, "MethodNotAllowed", f"{method} is not supported on tokenreviews")
                return
            body = self._body()
            if body is None:
                return
            spec = body.get("spec")
            if not isinstance(spec, dict) or not isinstance(spec.get("token"), str):
                self._fail(400, "BadRequest", "TokenReview spec.token is required")
                return
            api.token_reviews.append(copy.deepcopy(spec))
            with api._cond:
                status = api.review(spec)
            self._send(201, {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                             "metadata": {"creationTimestamp": None},
                             "spec": spec, "status": status})
            return
        route = self._route()
        if route is None:
            self._fail(404, "NotFound", "the server could not find the requested resource")
            return
        resource, namespace, name = route
        getattr(self, f"_{method.lower()}")(resource, namespace, name)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    # ---- verbs ------------------------------------------------------------------------

    def _not_found(self, resource: Resource, name: str) -> None:
        self._fail(404, "NotFound", f'{resource.plural} "{name}" not found',
                   {"name": name, "kind": resource.plural})

    def _get(self, resource: Resource, namespace: str | None, name: str | None) -> None:
        api = self.server_api
        query = parse_qs(urlsplit(self.path).query)
        if name is not None:
            found = api.get(resource.plural, name, namespace or "")
            if found is None:
                self._not_found(resource, name)
            else:
                self._send(200, found)
            return
        if query.get("watch", [""])[0] in ("1", "true"):
            self._stream_watch(resource, namespace, query)
            return
        with api._cond:
            items = api._list(resource, namespace)
            rv = api._rv
        for item in items:
            # List items carry no apiVersion/kind: the list's kind says it.
            item.pop("apiVersion", None)
            item.pop("kind", None)
        self._send(200, {"kind": f"{resource.kind}List", "apiVersion": resource.api_version,
                         "metadata": {"resourceVersion": str(rv)}, "items": items})

    def _stream_watch(self, resource: Resource, namespace: str | None,
                      query: Mapping[str, list[str]]) -> None:
        since = query.get("resourceVersion", [None])[0]
        bookmarks = query.get("allowWatchBookmarks", [""])[0] == "true"
        timeout_text = query.get("timeoutSeconds", [""])[0]
        timeout = float(timeout_text) if timeout_text.isdigit() else None
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.close_connection = True
        try:
            for ev in self.server_api._watch(resource, namespace, since, bookmarks, timeout):
                line = json.dumps(ev).encode() + b"\n"
                self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _post(self, resource: Resource, namespace: str | None, name: str | None) -> None:
        api = self.server_api
        if name is not None or (resource.namespaced and namespace is None):
            self._fail(405, "MethodNotAllowed", "POST is not supported on this path")
            return
        body = self._body()
        if body is None:
            return
        obj_name = (body.get("metadata") or {}).get("name")
        # Like the API server, take a missing kind from the URL but refuse another one.
        if not isinstance(obj_name, str) or not obj_name or body.get("kind", resource.kind) != (
            resource.kind
        ):
            self._fail(400, "BadRequest", f"a {resource.kind} with metadata.name is required")
            return
        with api._cond:
            if (resource.plural, namespace or "", obj_name) in api._objects:
                self._fail(409, "AlreadyExists",
                           f'{resource.plural} "{obj_name}" already exists',
                           {"name": obj_name, "kind": resource.plural})
                return
            body.get("metadata", {}).pop("resourceVersion", None)
            stored = api._store(resource, namespace or "", body, "ADDED")
        self._send(201, stored)

    def _put(self, resource: Resource, namespace: str | None, name: str | None) -> None:
        api = self.server_api
        if name is None:
            self._fail(405, "MethodNotAllowed", "PUT needs an object name")
            return
        body = self._body()
        if body is None:
            return
        meta = body.get("metadata") or {}
        if meta.get("name") != name or body.get("kind", resource.kind) != resource.kind:
            self._fail(400, "BadRequest",
                       f"the name in the body must be {name!r} and the kind {resource.kind}")
            return
        with api._cond:
            current = api._objects.get((resource.plural, namespace or "", name))
            if current is None:
                self._not_found(resource, name)
                return
            sent_rv = meta.get("resourceVersion")
            if sent_rv and sent_rv != current["metadata"]["resourceVersion"]:
                self._fail(409, "Conflict",
                           f'Operation cannot be fulfilled on {resource.plural} "{name}": the '
                           "object has been modified; please apply your changes to the latest "
                           "version and try again", {"name": name, "kind": resource.plural})
                return
            stored = api._store(resource, namespace or "", body, "MODIFIED")
        self._send(200, stored)

    def _delete(self, resource: Resource, namespace: str | None, name: str | None) -> None:
        api = self.server_api
        if name is None:
            self._fail(405, "MethodNotAllowed", "DELETE needs an object name")
            return
        with api._cond:
            gone = api._delete(resource, namespace or "", name)
        if gone is None:
            self._not_found(resource, name)
        else:
            self._send(200, gone)
