"""The trust bundle in a ConfigMap, for workloads that cannot use the Workload API.

In each configured namespace the server keeps a ConfigMap (``sigil-bundle`` by
default) with two keys: ``bundle.pem`` (the X.509 authorities, PEM) and
``bundle.spiffe`` (the SPIFFE bundle JSON: X.509 and JWT authorities, sequence
number). It is written when the server starts, whenever the bundle's sequence
number changes (read from the datastore every second, so another server's CA
rotation reaches it too), and checked every ``resync_interval``, which recreates a
deleted one and repairs an edited one. A write that loses a race (409 Conflict)
reads the ConfigMap again and retries.

Needs, per namespace: get, create and update on ``configmaps`` (see
``deploy/kubernetes/base/server-rbac.yaml``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from attestation.kubeapi import JsonObject, KubeApiError
from ca.datastore import Datastore
from ca.log import event
from identity.bundle import Bundle
from identity.errors import SigilError
from identity.spiffeid import TrustDomain

PEM_KEY = "bundle.pem"
SPIFFE_KEY = "bundle.spiffe"
MANAGED_BY = {"app.kubernetes.io/managed-by": "sigil-server"}
WRITE_ATTEMPTS = 5
BUNDLE_POLL_SECONDS = 1.0


class ConfigMapApi(Protocol):
    """The API calls the notifier makes (:class:`attestation.kubeapi.KubeApi`)."""

    def get_config_map(self, namespace: str, name: str) -> JsonObject | None:
        """The ConfigMap, or None."""
        ...

    def write_config_map(self, namespace: str, body: JsonObject, *, replace: bool) -> bool:
        """Create or replace; False on 409 Conflict."""
        ...


def bundle_data(bundle: Bundle) -> dict[str, str]:
    """The ConfigMap's ``data``: ``bundle.pem`` and ``bundle.spiffe``."""
    return {PEM_KEY: bundle.x509_pem().decode(), SPIFFE_KEY: bundle.to_json().decode()}


def write_config_map(api: ConfigMapApi, namespace: str, name: str,
                     data: Mapping[str, str]) -> bool:
    """Make the ConfigMap hold ``data``: create it, or replace it when it differs.

    Other keys, labels and annotations someone added are kept.

    Returns:
        True when something was written, False when it already held ``data``.

    Raises:
        KubeApiError: the API failed, or the write lost a race WRITE_ATTEMPTS times.
    """
    for _attempt in range(WRITE_ATTEMPTS):
        current = api.get_config_map(namespace, name)
        if current is None:
            body: dict[str, Any] = {
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": name, "namespace": namespace, "labels": dict(MANAGED_BY)},
                "data": dict(data),
            }
            if api.write_config_map(namespace, body, replace=False):
                return True
            continue  # created by someone else meanwhile: read it and replace
        old = current.get("data") or {}
        if all(old.get(k) == v for k, v in data.items()):
            return False
        meta = dict(current.get("metadata") or {})
        body = {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {k: meta[k] for k in ("name", "namespace", "labels",
                                                  "annotations", "resourceVersion")
                             if k in meta},
                "data": {**old, **data}}
        if current.get("binaryData"):
            body["binaryData"] = current["binaryData"]
        # resourceVersion makes this a compare-and-swap: a 409 means it changed.
        if api.write_config_map(namespace, body, replace=True):
            return True
    raise KubeApiError(f"configmap {namespace}/{name} kept changing while being written "
                       f"({WRITE_ATTEMPTS} attempts)")


class BundleConfigMapNotifier:
    """Keeps the bundle ConfigMaps current (see the module docstring)."""

    def __init__(self, api: ConfigMapApi, datastore: Datastore, trust_domain: TrustDomain, *,
                 namespaces: Sequence[str], name: str, resync_interval: float,
                 poll_interval: float = BUNDLE_POLL_SECONDS) -> None:
        self._api = api
        self._datastore = datastore
        self._trust_domain = trust_domain
        self._namespaces = tuple(namespaces)
        self._name = name
        self._resync = resync_interval
        self._poll = poll_interval
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._written: dict[str, int] = {}
        self.writes = 0

    def start(self) -> None:
        """Write now (failures are retried) and keep watching in a thread."""
        self._thread = threading.Thread(target=self._run, daemon=True, name="k8s-bundle")
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (a write in progress finishes first)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(15.0)
            self._thread = None

    def sync(self, *, force: bool = False) -> int:
        """Write every namespace whose ConfigMap has not seen the current bundle.

        Args:
            force: check every namespace, even those already written at this sequence.

        Returns:
            How many ConfigMaps were written.

        Raises:
            KubeApiError: a namespace failed (the others were still tried).
        """
        stored = self._datastore.get_bundle(self._trust_domain)
        if stored is None:
            return 0
        bundle = Bundle.from_jwks(self._trust_domain, stored.data)
        data = bundle_data(bundle)
        written = 0
        failed: list[str] = []
        for ns in self._namespaces:
            if not force and self._written.get(ns) == stored.sequence:
                continue
            try:
                if write_config_map(self._api, ns, self._name, data):
                    written += 1
                    event("bundle configmap written", namespace=ns, name=self._name,
                          sequence=stored.sequence)
                self._written[ns] = stored.sequence
            except KubeApiError as exc:
                self._written.pop(ns, None)
                failed.append(f"{ns}: {exc}")
        self.writes += written
        if failed:
            raise KubeApiError("; ".join(failed))
        return written

    def _run(self) -> None:
        next_check = 0.0
        while not self._stopping.is_set():
            force = time.monotonic() >= next_check
            try:
                self.sync(force=force)
                if force:
                    next_check = time.monotonic() + self._resync
            except (SigilError, KubeApiError) as exc:
                event("bundle configmap not written", level=logging.WARNING, error=str(exc))
            except Exception as exc:  # keep going; the traceback says what broke
                event("bundle configmap not written", level=logging.ERROR,
                      error=f"{exc.__class__.__name__}: {exc}", exc_info=True)
            self._stopping.wait(self._poll)
