"""The few Kubernetes API calls Sigil makes, over the official ``kubernetes`` client.

Objects come back as plain JSON dicts (as the API server sent them), so the
callers read ``pod["spec"]["nodeName"]`` exactly as the API documents it, with no
model classes in between. Connection settings are one of: an explicit API URL
(with a token file and a CA file), a kubeconfig file, or the in-cluster service
account (the default when running in a pod).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from identity.errors import SigilError

REQUEST_TIMEOUT = 10.0
"""Seconds a single API call may take before it counts as failed."""
WATCH_TIMEOUT = 300
"""Seconds the API server keeps a watch open before the client opens the next one."""
IDENTITY_TEMPLATE_GROUP = "sigil.dev"
IDENTITY_TEMPLATE_VERSION = "v1alpha1"

JsonObject = Mapping[str, Any]


class KubeApiError(SigilError):
    """The Kubernetes API could not be reached or answered with an unexpected error."""


@dataclass(frozen=True, slots=True)
class KubeConnection:
    """How to reach one cluster's API server.

    Attributes:
        api_server: an explicit API URL (``https://10.0.0.1:6443``); needs ``token_path``.
        token_path: a file holding the bearer token, re-read on every call (tokens
            rotate).
        ca_path: PEM CA certificates to verify the API server with.
        kube_config: a kubeconfig file (used when ``api_server`` is not set).
        When none of them is set: the in-cluster service account.
    """

    api_server: str | None = None
    token_path: Path | None = None
    ca_path: Path | None = None
    kube_config: Path | None = None


@dataclass(frozen=True, slots=True)
class TokenReviewStatus:
    """The parts of a TokenReview status we use."""

    authenticated: bool
    username: str
    audiences: tuple[str, ...]
    extra: Mapping[str, tuple[str, ...]]
    error: str


class KubeApi:
    """Typed, dict-returning wrappers around the API calls Sigil needs."""

    def __init__(self, connection: KubeConnection) -> None:
        """Build the client. Raises KubeApiError when the settings cannot be loaded."""
        # Imported here (it is heavy, and only Kubernetes deployments need it), and as
        # Any: the client's generated signatures are partly untyped.
        client: Any = importlib.import_module("kubernetes.client")
        config: Any = importlib.import_module("kubernetes.config")
        self._client_mod = client
        cfg = client.Configuration()
        try:
            if connection.api_server:
                cfg.host = connection.api_server.rstrip("/")
                if connection.ca_path is not None:
                    cfg.ssl_ca_cert = str(connection.ca_path)
                token_path = connection.token_path
                if token_path is not None:
                    def refresh(c: Any) -> None:
                        c.api_key["authorization"] = "Bearer " + _read_token(token_path)

                    cfg.refresh_api_key_hook = refresh
                    refresh(cfg)
            elif connection.kube_config is not None:
                config.load_kube_config(config_file=str(connection.kube_config),
                                        client_configuration=cfg)
            else:
                config.load_incluster_config(client_configuration=cfg)
        except (config.ConfigException, OSError, ValueError) as exc:
            raise KubeApiError(f"cannot load the Kubernetes client settings: {exc}") from None
        self._api = client.ApiClient(cfg)

    def close(self) -> None:
        """Release the client's connection pool."""
        self._api.close()

    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> JsonObject | None:
        """Call one API method of the client; the decoded JSON, or None for 404.

        ``_preload_content=False`` keeps the client's models out: we read the JSON the
        API server sent, which is stable across client versions.

        Raises:
            KubeApiError: transport failure or any other non-2xx answer.
        """
        rest = self._client_mod.rest
        try:
            resp = fn(*args, _preload_content=False, _request_timeout=REQUEST_TIMEOUT)
            data = resp.data
        except rest.ApiException as exc:
            if exc.status == 404:
                return None
            reason = _status_message(exc.body or b"")
            raise KubeApiError(f"Kubernetes API: {what} answered {exc.status}: {reason}") from None
        except Exception as exc:  # urllib3's errors share no base we can name here
            raise KubeApiError(f"Kubernetes API: {what} failed: {exc}") from None
        try:
            doc = json.loads(data)
        except ValueError:
            raise KubeApiError(f"Kubernetes API: {what} answered non-JSON") from None
        if not isinstance(doc, dict):
            raise KubeApiError(f"Kubernetes API: {what} answered a non-object")
        return doc

    def token_review(self, token: str, audiences: Sequence[str]) -> TokenReviewStatus:
        """Ask the API server whether ``token`` is valid for one of ``audiences``."""
        api = self._client_mod.AuthenticationV1Api(self._api)
        doc = self._call("create tokenreview", api.create_token_review, {
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "spec": {"token": token, "audiences": list(audiences)},
        })
        status = (doc or {}).get("status") or {}
        user = status.get("user") or {}
        extra = user.get("extra") or {}
        return TokenReviewStatus(
            authenticated=status.get("authenticated") is True,
            username=str(user.get("username") or ""),
            audiences=tuple(str(a) for a in status.get("audiences") or ()),
            extra={str(k): tuple(str(x) for x in v) for k, v in extra.items()
                   if isinstance(v, list)},
            error=str(status.get("error") or ""),
        )

    def get_pod(self, namespace: str, name: str) -> JsonObject | None:
        """The pod, or None when it does not exist."""
        core = self._client_mod.CoreV1Api(self._api)
        return self._call(f"get pod {namespace}/{name}", core.read_namespaced_pod,
                          _name(name), _name(namespace))

    def get_node(self, name: str) -> JsonObject | None:
        """The node, or None when it does not exist."""
        core = self._client_mod.CoreV1Api(self._api)
        return self._call(f"get node {name}", core.read_node, _name(name))


    # ---- lists and watches (the registration controller) ------------------------------

    def _lister(self, kind: str) -> Callable[..., Any]:
        if kind == "pods":
            return self._client_mod.CoreV1Api(self._api).list_pod_for_all_namespaces  # type: ignore[no-any-return]
        if kind == "namespaces":
            return self._client_mod.CoreV1Api(self._api).list_namespace  # type: ignore[no-any-return]
        if kind == "identitytemplates":
            custom = self._client_mod.CustomObjectsApi(self._api)

            def templates(**kwargs: Any) -> Any:
                return custom.list_cluster_custom_object(
                    IDENTITY_TEMPLATE_GROUP, IDENTITY_TEMPLATE_VERSION, "identitytemplates",
                    **kwargs)

            return templates
        raise ValueError(f"no lister for {kind!r}")

    def list_objects(self, kind: str) -> tuple[list[JsonObject], str]:
        """Every object of ``kind`` (``pods``, ``namespaces``, ``identitytemplates``).

        Returns:
            The items and the list's resourceVersion (where a watch resumes).

        Raises:
            KubeApiError: the list failed (a missing CRD answers 404: an empty list).
        """
        doc = self._call(f"list {kind}", self._lister(kind))
        if doc is None:
            return [], ""
        items = doc.get("items") or []
        rv = str((doc.get("metadata") or {}).get("resourceVersion") or "")
        return [i for i in items if isinstance(i, dict)], rv

    def watch_objects(self, kind: str, resource_version: str, *,
                      timeout_seconds: int = WATCH_TIMEOUT) -> WatchStream:
        """Open a watch of ``kind`` from ``resource_version`` (with BOOKMARKs).

        Raises:
            KubeApiError: the watch could not be opened.
        """
        rest = self._client_mod.rest
        try:
            resp = self._lister(kind)(
                watch=True, resource_version=resource_version or None,
                allow_watch_bookmarks=True, timeout_seconds=timeout_seconds,
                _preload_content=False,
                # Connect fast; reads may idle until the next BOOKMARK or the timeout.
                _request_timeout=(REQUEST_TIMEOUT, timeout_seconds + REQUEST_TIMEOUT),
            )
        except rest.ApiException as exc:
            raise KubeApiError(f"Kubernetes API: watch {kind} answered {exc.status}: "
                               f"{_status_message(exc.body or b'')}") from None
        except Exception as exc:  # urllib3's errors share no base we can name here
            raise KubeApiError(f"Kubernetes API: watch {kind} failed: {exc}") from None
        return WatchStream(kind, resp)

    # ---- ConfigMaps (the bundle notifier) ---------------------------------------------

    def get_config_map(self, namespace: str, name: str) -> JsonObject | None:
        """The ConfigMap, or None when it does not exist."""
        core = self._client_mod.CoreV1Api(self._api)
        return self._call(f"get configmap {namespace}/{name}", core.read_namespaced_config_map,
                          _name(name), _name(namespace))

    def write_config_map(self, namespace: str, body: JsonObject, *, replace: bool) -> bool:
        """Create (``replace=False``) or replace a ConfigMap.

        Returns:
            False when the API server answered 409 (it exists already, or
            ``metadata.resourceVersion`` is stale): read it again and retry. True when
            written.

        Raises:
            KubeApiError: any other failure (404 on replace included).
        """
        core = self._client_mod.CoreV1Api(self._api)
        name = _name(str((body.get("metadata") or {}).get("name") or ""))
        rest = self._client_mod.rest
        try:
            if replace:
                core.replace_namespaced_config_map(name, _name(namespace), dict(body),
                                                   _preload_content=False,
                                                   _request_timeout=REQUEST_TIMEOUT)
            else:
                core.create_namespaced_config_map(_name(namespace), dict(body),
                                                  _preload_content=False,
                                                  _request_timeout=REQUEST_TIMEOUT)
        except rest.ApiException as exc:
            if exc.status == 409:
                return False
            raise KubeApiError(f"Kubernetes API: write configmap {namespace}/{name} answered "
                               f"{exc.status}: {_status_message(exc.body or b'')}") from None
        except Exception as exc:  # urllib3's errors share no base we can name here
            raise KubeApiError(
                f"Kubernetes API: write configmap {namespace}/{name} failed: {exc}") from None
        return True


class WatchStream:
    """An open watch: iterate for ``(type, object)`` events; ``close()`` from any thread.

    The iteration ends when the API server ends the stream (its timeout, a restart, a
    load balancer); the caller resumes from the last resourceVersion it saw.
    """

    def __init__(self, kind: str, response: Any) -> None:
        self._kind = kind
        self._resp = response

    def __iter__(self) -> Iterator[tuple[str, JsonObject]]:
        lines: Any = importlib.import_module("kubernetes.watch.watch").iter_resp_lines
        try:
            for line in lines(self._resp):
                try:
                    doc = json.loads(line)
                except ValueError:
                    raise KubeApiError(f"Kubernetes API: watch {self._kind} sent non-JSON"
                                       ) from None
                if not isinstance(doc, dict) or not isinstance(doc.get("object"), dict):
                    raise KubeApiError(f"Kubernetes API: watch {self._kind} sent a "
                                       "malformed event")
                yield str(doc.get("type") or ""), doc["object"]
        except KubeApiError:
            raise
        except Exception as exc:  # a cut connection, or close() from another thread
            raise KubeApiError(f"Kubernetes API: watch {self._kind} ended: {exc}") from None

    def close(self) -> None:
        """End the stream (the iterating thread sees it end)."""
        try:
            self._resp.close()
            self._resp.release_conn()
        except Exception:  # noqa: S110 - closing a connection that is already gone
            pass


_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-.")


def _name(value: str) -> str:
    # Names come from tokens and payloads: only what Kubernetes allows in a name
    # (RFC 1123 subdomain), so none can change the request path.
    if not value or len(value) > 253 or not set(value) <= _NAME_CHARS or value in (".", ".."):
        raise KubeApiError(f"{value!r} is not a valid Kubernetes object name")
    return value


def _read_token(path: Path) -> str:
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"token file {path} is empty")
    return token


def _status_message(data: bytes) -> str:
    try:
        doc = json.loads(data)
    except ValueError:
        return data[:200].decode(errors="replace")
    if isinstance(doc, dict) and isinstance(doc.get("message"), str):
        return str(doc["message"])
    return "unexpected answer"
