"""The bundle ConfigMap through a real sigil-server, against the Kubernetes API test server."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ca.kubernetes.bundle_configmap import write_config_map
from identity.bundle import Bundle
from identity.spiffeid import TrustDomain
from identity.x509svid import load_certificates_pem
from tests.integration.conftest import RunningServer
from tests.support.k8s_api import FakeKubeApi

TD = "it.sigil.test"


@pytest.fixture
def kube() -> Iterator[FakeKubeApi]:
    with FakeKubeApi() as api:
        yield api


@pytest.fixture
def server(server_root: Path, kube: FakeKubeApi) -> Iterator[RunningServer]:
    (server_root / "api-token").write_text(kube.token or "")
    config = server_root / "server.toml"
    config.write_text(f"""
[kubernetes.bundle_configmap]
namespaces = ["sigil", "apps"]
api_server = "{kube.url}"
token_path = "{server_root / 'api-token'}"
resync_interval = "1s"
""")
    srv = RunningServer(trust_domain=TD, data_dir=server_root / "data",
                        socket_path=server_root / "admin" / "admin.sock",
                        extra_args=("--config", str(config)))
    srv.start()
    try:
        yield srv
    finally:
        code = srv.stop()
    assert code == 0, srv.log
    assert "Traceback" not in srv.log, srv.log


def _wait_for(get: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = get()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_written_rewritten_on_change_and_recreated(server: RunningServer,
                                                   kube: FakeKubeApi) -> None:
    shown = server.cli("bundle", "show", "--format", "pem")
    assert shown.returncode == 0, shown.stderr
    for ns in ("sigil", "apps"):
        cm = _wait_for(lambda ns=ns: kube.get("configmaps", "sigil-bundle", ns))
        assert set(cm["data"]) == {"bundle.pem", "bundle.spiffe"}
        assert cm["data"]["bundle.pem"] == shown.stdout
        assert cm["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "sigil-server"}
        bundle = Bundle.from_jwks(TrustDomain(TD), cm["data"]["bundle.spiffe"])
        assert len(bundle.x509_authorities) == 1
        assert len(bundle.jwt_authorities) == 1
    first_seq = json.loads(kube.get("configmaps", "sigil-bundle", "apps")["data"][
        "bundle.spiffe"])["spiffe_sequence"]

    prepared = server.cli("localauthority", "x509", "prepare")
    assert prepared.returncode == 0, prepared.stderr

    def rewritten(ns: str) -> dict[str, Any] | None:
        cm = kube.get("configmaps", "sigil-bundle", ns)
        if cm is None or "bundle.spiffe" not in cm["data"]:
            return None
        bundle = Bundle.from_jwks(TrustDomain(TD), cm["data"]["bundle.spiffe"])
        return cm if len(bundle.x509_authorities) == 2 else None

    for ns in ("sigil", "apps"):
        cm = _wait_for(lambda ns=ns: rewritten(ns))
        assert len(load_certificates_pem(cm["data"]["bundle.pem"].encode())) == 2
        assert json.loads(cm["data"]["bundle.spiffe"])["spiffe_sequence"] > first_seq
        assert cm["data"]["bundle.pem"] == server.cli("bundle", "show", "--format",
                                                      "pem").stdout

    kube.delete("configmaps", "sigil-bundle", "apps")
    cm = _wait_for(lambda: rewritten("apps"))
    assert set(cm["data"]) == {"bundle.pem", "bundle.spiffe"}


class _RacingApi:
    """A ConfigMap API where someone else writes between our read and our write."""

    def __init__(self, conflicts: int) -> None:
        self.conflicts = conflicts
        self.stored: dict[str, Any] | None = {
            "metadata": {"name": "sigil-bundle", "namespace": "sigil", "resourceVersion": "1",
                         "annotations": {"note": "kept"}},
            "data": {"other": "kept", "bundle.pem": "old"}}
        self.writes: list[dict[str, Any]] = []

    def get_config_map(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.stored

    def write_config_map(self, namespace: str, body: Any, *, replace: bool) -> bool:
        self.writes.append(body)
        if self.conflicts:
            self.conflicts -= 1
            return False
        self.stored = body
        return True


def test_conflicts_are_retried_and_other_keys_kept() -> None:
    api = _RacingApi(conflicts=2)
    data = {"bundle.pem": "new", "bundle.spiffe": "{}"}
    assert write_config_map(api, "sigil", "sigil-bundle", data) is True
    assert len(api.writes) == 3
    assert api.stored is not None
    assert api.stored["data"] == {"other": "kept", "bundle.pem": "new", "bundle.spiffe": "{}"}
    assert api.stored["metadata"]["annotations"] == {"note": "kept"}
    assert api.stored["metadata"]["resourceVersion"] == "1"
    # Nothing to change: no write.
    assert write_config_map(api, "sigil", "sigil-bundle", data) is False
    assert len(api.writes) == 3


def test_conflicts_forever_give_up_with_an_error() -> None:
    from attestation.kubeapi import KubeApiError

    api = _RacingApi(conflicts=100)
    with pytest.raises(KubeApiError, match="kept changing while being written"):
        write_config_map(api, "sigil", "sigil-bundle", {"bundle.pem": "new"})
    assert len(api.writes) == 5
