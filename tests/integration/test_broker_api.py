"""The SPIFFE Broker API on a real socket: a broker process asks for another
process's SVIDs by PID (agent/workload_api/broker.py).

Selectors come from a test attestor reading ``SIGIL_TEST_WORKLOAD`` in each
process's environment, so the broker (a Python child) and the referenced workload
(a ``sleep`` child) are told apart although both run as the test's user.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.workload_api import broker as broker_module
from agent.workload_api.broker import K8S_REFERENCE, PID_REFERENCE, BrokerApiServer
from attestation.workload import ProcessInfo, WorkloadAttestationError
from attestation.workload.k8s import K8sAttestor
from identity.selectors import Selector
from identity.spiffeid import SpiffeId
from tests.integration.workload_api_harness import Harness, entry

REPO = Path(__file__).resolve().parents[2]
CLIENT = REPO / "tests" / "support" / "broker_client.py"
PID_URL = "type.googleapis.com/" + PID_REFERENCE
BROKER_ID = "spiffe://example.org/broker"
APP_ID = "spiffe://example.org/app"


class EnvAttestor:
    """``test:workload:<name>`` from SIGIL_TEST_WORKLOAD in the process's environment."""

    name = "test"

    def attest(self, process: ProcessInfo) -> list[Selector]:
        try:
            env = Path(f"/proc/{process.pid}/environ").read_bytes().split(b"\0")
        except OSError as exc:
            raise WorkloadAttestationError(str(exc)) from exc
        for item in env:
            if item.startswith(b"SIGIL_TEST_WORKLOAD="):
                return [Selector("test", "workload:" + item.split(b"=", 1)[1].decode())]
        return []


class Setup:
    def __init__(self, harness: Harness, server: BrokerApiServer) -> None:
        self.harness = harness
        self.server = server
        self.children: list[subprocess.Popen[str]] = []

    def workload(self, name: str) -> subprocess.Popen[str]:
        """A real process to reference (its selector: test:workload:<name>)."""
        proc = subprocess.Popen(["sleep", "60"], env=dict(os.environ, SIGIL_TEST_WORKLOAD=name),
                                text=True)
        self.children.append(proc)
        return proc

    def broker(self, *args: str, name: str = "broker") -> subprocess.Popen[str]:
        """The broker client, as a process whose selector is test:workload:<name>."""
        env = dict(os.environ, SIGIL_TEST_WORKLOAD=name, PYTHONPATH=str(REPO))
        proc = subprocess.Popen(
            [sys.executable, str(CLIENT), str(self.server.socket_path), *args],
            env=env, stdout=subprocess.PIPE, text=True)
        self.children.append(proc)
        return proc

    def call(self, *args: str, name: str = "broker") -> dict[str, object]:
        proc = self.broker(*args, name=name)
        out, _ = proc.communicate(timeout=60)
        lines = out.strip().splitlines()
        assert len(lines) == 1, out
        result: dict[str, object] = json.loads(lines[0])
        return result


@pytest.fixture
def setup() -> Iterator[Setup]:
    harness = Harness(attestors=[EnvAttestor()])
    harness.set_state([
        entry("e-broker", BROKER_ID, "test:workload:broker"),
        entry("e-other", "spiffe://example.org/other", "test:workload:other"),
        entry("e-app", APP_ID, "test:workload:app"),
    ])
    server = BrokerApiServer(
        socket_path=harness.root / "broker" / "broker.sock", cache=harness.cache,
        attestors=[EnvAttestor()], authorized=[SpiffeId.parse(BROKER_ID)],
        first_response_timeout=2.0,
    )
    harness.run(server.start())
    s = Setup(harness, server)
    try:
        yield s
    finally:
        for child in s.children:
            if child.poll() is None:
                child.kill()
            child.wait()
        harness.run(server.stop(grace=0.1))
        harness.close()


def test_broker_fetches_the_referenced_workloads_x509_svid(setup: Setup) -> None:
    app = setup.workload("app")
    assert setup.call("SubscribeToX509SVID", PID_URL, str(app.pid)) == {
        "ids": [APP_ID], "keys": True}


def test_broker_fetches_the_referenced_workloads_jwt_svid(setup: Setup) -> None:
    app = setup.workload("app")
    assert setup.call("FetchJWTSVID", PID_URL, str(app.pid)) == {"ids": [APP_ID]}


def test_workload_gets_only_its_own_identities_never_the_brokers(setup: Setup) -> None:
    # A workload with no entry of its own gets nothing, though the broker has one.
    stranger = setup.workload("stranger")
    result = setup.call("SubscribeToX509SVID", PID_URL, str(stranger.pid))
    assert result["code"] == "PERMISSION_DENIED"
    assert result["reason"] == "WORKLOAD_NOT_ENTITLED"
    # A workload with one gets exactly its own: the broker's identity is not added.
    app = setup.workload("app")
    assert setup.call("SubscribeToX509SVID", PID_URL, str(app.pid))["ids"] == [APP_ID]


def test_broker_not_on_the_list_is_refused(setup: Setup) -> None:
    app = setup.workload("app")
    # "other" has an identity, but not one listed in [broker] authorized.
    result = setup.call("SubscribeToX509SVID", PID_URL, str(app.pid), name="other")
    assert result["code"] == "PERMISSION_DENIED"
    assert "not an authorized broker" in str(result["details"])
    assert result["reason"] == ""  # not a workload situation: no ErrorInfo
    # No identity at all: refused too.
    result = setup.call("SubscribeToX509SVID", PID_URL, str(app.pid), name="nobody")
    assert result["code"] == "PERMISSION_DENIED"


def test_missing_header_is_refused(setup: Setup) -> None:
    app = setup.workload("app")
    result = setup.call("SubscribeToX509SVID", PID_URL, str(app.pid), "--no-header")
    assert result["code"] == "INVALID_ARGUMENT"
    assert "header" in str(result["details"])


def test_exited_pid_is_not_found(setup: Setup) -> None:
    app = setup.workload("app")
    app.kill()
    app.wait()
    result = setup.call("SubscribeToX509SVID", PID_URL, str(app.pid))
    assert result["code"] == "NOT_FOUND"
    assert result["reason"] == "WORKLOAD_NOT_FOUND"


def test_stream_ends_with_not_found_when_the_workload_exits(setup: Setup) -> None:
    # The pinned process must still be the one attested when answering: once it
    # exits, its PID may be reused, so the stream ends rather than answer again.
    app = setup.workload("app")
    broker = setup.broker("SubscribeToX509SVID", PID_URL, str(app.pid), "--follow")
    assert broker.stdout is not None
    first = json.loads(broker.stdout.readline())
    assert first["ids"] == [APP_ID]
    app.kill()
    app.wait()
    last = json.loads(broker.stdout.readline())
    assert last["code"] == "NOT_FOUND"
    broker.wait(timeout=30)


@pytest.mark.parametrize(("type_url", "pid", "code"), [
    ("type.googleapis.com/example.com.CustomReference", "1", "INVALID_ARGUMENT"),
    # Known type, but no k8s workload attestor to resolve it with.
    ("type.googleapis.com/" + K8S_REFERENCE, '{"plural": "pods", "group": "core", "uid": "u"}',
     "UNIMPLEMENTED"),
    ("-", "1", "INVALID_ARGUMENT"),
    (PID_URL, "0", "INVALID_ARGUMENT"),
    (PID_URL, "-5", "INVALID_ARGUMENT"),
])
def test_bad_references_are_refused(setup: Setup, type_url: str, pid: str, code: str) -> None:
    result = setup.call("SubscribeToX509SVID", type_url, pid)
    assert result["code"] == code
    assert result["reason"] == ("WORKLOAD_REFERENCE_INVALID" if code == "INVALID_ARGUMENT" else "")


# Kubernetes object references (pods, through the k8s attestor's kubelet list) --

K8S_URL = "type.googleapis.com/" + K8S_REFERENCE
POD_UID = "a1b2c3d4-e5f6-7890-abcd-ef1234567890"
SHOP_ID = "spiffe://example.org/ns/shop/sa/checkout"


def _pod(uid: str = POD_UID, name: str = "checkout-7c9f") -> dict[str, object]:
    return {
        "metadata": {"name": name, "namespace": "shop", "uid": uid,
                     "labels": {"app": "checkout"}},
        "spec": {"serviceAccountName": "checkout", "nodeName": "node-1",
                 "containers": [{"name": "main", "image": "shop/checkout:1"}]},
        "status": {"phase": "Running"},
    }


@pytest.fixture
def k8s_setup(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Setup, list[dict[str, object]]]]:
    monkeypatch.setattr(broker_module, "POD_RECHECK_INTERVAL", 0.2)
    pods: list[dict[str, object]] = [_pod()]
    attestors = [EnvAttestor(), K8sAttestor(pods=lambda: list(pods))]
    harness = Harness(attestors=attestors)
    harness.set_state([
        entry("e-broker", BROKER_ID, "test:workload:broker"),
        entry("e-shop", SHOP_ID, "k8s:ns:shop", "k8s:sa:checkout"),
        # A container-level entry: a pod reference has no container selectors.
        entry("e-main", "spiffe://example.org/container", "k8s:ns:shop",
              "k8s:container-name:main"),
    ])
    server = BrokerApiServer(
        socket_path=harness.root / "broker" / "broker.sock", cache=harness.cache,
        attestors=attestors, authorized=[SpiffeId.parse(BROKER_ID)],
        first_response_timeout=2.0,
    )
    harness.run(server.start())
    s = Setup(harness, server)
    try:
        yield s, pods
    finally:
        for child in s.children:
            if child.poll() is None:
                child.kill()
            child.wait()
        harness.run(server.stop(grace=0.1))
        harness.close()


def _ref(**fields: str) -> str:
    return json.dumps({"plural": "pods", "group": "core", **fields})


@pytest.mark.parametrize("ref", [
    _ref(uid=POD_UID),
    _ref(namespace="shop", name="checkout-7c9f"),
    _ref(namespace="shop", name="checkout-7c9f", uid=POD_UID),
])
def test_pod_reference_gets_the_pods_identity(
    k8s_setup: tuple[Setup, list[dict[str, object]]], ref: str
) -> None:
    setup, _pods = k8s_setup
    assert setup.call("SubscribeToX509SVID", K8S_URL, ref) == {"ids": [SHOP_ID], "keys": True}


@pytest.mark.parametrize(("ref", "code"), [
    (_ref(uid="0fa1b2c3-4d5e-6f70-8192-a3b4c5d6e7f8"), "NOT_FOUND"),
    # Name and UID both given, and the named pod has another UID.
    (_ref(namespace="shop", name="checkout-7c9f",
          uid="0fa1b2c3-4d5e-6f70-8192-a3b4c5d6e7f8"), "NOT_FOUND"),
    (_ref(namespace="other", name="checkout-7c9f"), "NOT_FOUND"),
    (json.dumps({"plural": "deployments", "group": "apps", "namespace": "shop",
                 "name": "checkout"}), "UNIMPLEMENTED"),
    (_ref(name="checkout-7c9f"), "INVALID_ARGUMENT"),  # pods are namespaced
    (_ref(), "INVALID_ARGUMENT"),  # neither key nor uid
    (json.dumps({"uid": POD_UID}), "INVALID_ARGUMENT"),  # no type
])
def test_bad_or_unknown_pod_references_are_refused(
    k8s_setup: tuple[Setup, list[dict[str, object]]], ref: str, code: str
) -> None:
    setup, _pods = k8s_setup
    assert setup.call("SubscribeToX509SVID", K8S_URL, ref)["code"] == code


def test_pod_stream_ends_with_not_found_when_the_pod_is_gone(
    k8s_setup: tuple[Setup, list[dict[str, object]]]
) -> None:
    setup, pods = k8s_setup
    broker = setup.broker("SubscribeToX509SVID", K8S_URL, _ref(namespace="shop",
                          name="checkout-7c9f"), "--follow")
    assert broker.stdout is not None
    assert json.loads(broker.stdout.readline())["ids"] == [SHOP_ID]
    # Recreated under the same name: another object, so the stream ends.
    new_uid = "0fa1b2c3-4d5e-6f70-8192-a3b4c5d6e7f8"
    setup.harness.call(lambda: pods.__setitem__(0, _pod(uid=new_uid)))
    assert json.loads(broker.stdout.readline())["code"] == "NOT_FOUND"
    broker.wait(timeout=30)
