"""SDS against a real ``sigil-server`` and ``sigil-agent``: CA rotation, federation, off.

An Envoy-like SDS client (tests/support/sds_client.py) keeps a StreamSecrets
stream open on the agent's socket for its SVID and ``ROOTCA``, acknowledging
every response as Envoy does. The test then drives ``sigil-server localauthority
x509 prepare`` and ``activate``: the stream must be pushed the bundle holding
both CAs, then an SVID signed by the new CA (at the rotation of its 20-second
SVID), each time with a key that matches its certificate. A foreign bundle
reaches a stream only once one of the caller's entries federates with it; and
``[sds] enabled = false`` turns SDS off.
"""

from __future__ import annotations

import json
import time
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from identity.spiffeid import TrustDomain
from tests.e2e.conftest import running_stack
from tests.integration.workload_api_harness import TestCA
from tests.support import sds_client as sds
from tests.support.sds_client import SdsStream, secrets_of

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TRUST_DOMAIN = "e2e.sigil.test"
ENVOY_ID = f"spiffe://{TRUST_DOMAIN}/envoy"
SERVER_CONFIG = """\
x509_svid_ttl = "20s"
# The test forces every step itself; the automatic schedule must not race it.
ca_rotation_interval = "1h"
"""
# The machine may be busy: generous, and never the reason to fail.
TIMEOUT = 120.0


def _ski(cert: x509.Certificate) -> str:
    return cert.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier).value.digest.hex()


def _aki(cert: x509.Certificate) -> str:
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier is not None
    return aki.key_identifier.hex()


def _der(certs: list[x509.Certificate]) -> list[bytes]:
    return [c.public_bytes(serialization.Encoding.DER) for c in certs]


class Follower:
    """Reads and acknowledges responses, as Envoy does, keeping the latest secrets."""

    def __init__(self, stream: SdsStream, names: list[str]) -> None:
        self.stream = stream
        self.names = names
        self.secrets: dict[str, Any] = {}
        self.versions: list[str] = []

    def next(self, timeout: float) -> None:
        response = self.stream.recv(timeout=timeout)
        self.stream.ack(response, self.names)
        self.versions.append(response.version_info)
        self.secrets = secrets_of(response)

    def until(self, check: Any, what: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not check():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}")
            self.next(left)

    def leaf(self) -> x509.Certificate:
        return sds.check_key_matches(self.secrets[ENVOY_ID])

    def roots(self) -> set[str]:
        return {_ski(c) for c in sds.trusted_ca(self.secrets["ROOTCA"])}


def _step(st: Any, *args: str) -> dict[str, Any]:
    out = st.server_cli("localauthority", "x509", *args, "--output", "json").stdout
    return json.loads(out)  # type: ignore[no-any-return]


def test_sds_stream_follows_prepare_and_activate(uid_selector: str) -> None:
    with running_stack(server_config=SERVER_CONFIG) as st:
        st.create_entry(ENVOY_ID, uid_selector, extra=("--x509-svid-ttl", "20"))
        (first,) = json.loads(st.server_cli(
            "localauthority", "x509", "show", "--output", "json").stdout)["authorities"]
        old = first["authority_id"]

        deadline = time.monotonic() + TIMEOUT
        while True:  # PermissionDenied until the agent has synced the entry
            try:
                sds.fetch(st.agent_socket, [ENVOY_ID])
                break
            except grpc.RpcError as exc:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no SVID over SDS: {exc}") from None
                time.sleep(0.5)

        names = [ENVOY_ID, "ROOTCA"]
        with SdsStream(st.agent_socket) as stream:
            stream.send(names)
            follow = Follower(stream, names)
            follow.next(TIMEOUT)
            assert set(follow.secrets) == set(names)
            assert follow.roots() == {old}
            assert _aki(follow.leaf()) == old
            assert sds.uri_san(follow.leaf()) == ENVOY_ID

            new = _step(st, "prepare")["authority_id"]
            follow.until(lambda: follow.roots() == {old, new}, "the prepared CA in ROOTCA")
            # Prepared, not active: SVIDs are still signed by the old CA.
            assert _aki(follow.leaf()) == old

            assert _step(st, "activate")["authority_id"] == new
            follow.until(lambda: _aki(follow.leaf()) == new, "an SVID signed by the new CA")
            assert follow.roots() == {old, new}
            # The new SVID chains to the new CA the stream was given.
            (new_root,) = [c for c in sds.trusted_ca(follow.secrets["ROOTCA"])
                           if _ski(c) == new]
            follow.leaf().verify_directly_issued_by(new_root)
        assert len(set(follow.versions)) == len(follow.versions), "a version was reused"


def test_sds_off_in_the_agents_config(uid_selector: str) -> None:
    with running_stack(agent_config='\n[sds]\nenabled = false\n') as st:
        st.create_entry(ENVOY_ID, uid_selector)
        deadline = time.monotonic() + TIMEOUT
        while st.agent_cli("api", "fetch", "x509", check=False).returncode != 0:
            assert time.monotonic() < deadline, "the Workload API never served the entry"
            time.sleep(0.5)
        with pytest.raises(grpc.RpcError) as err:
            sds.fetch(st.agent_socket, [ENVOY_ID])
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_federated_bundle_only_for_a_caller_whose_entry_federates(uid_selector: str) -> None:
    """partner.test's bundle (set by hand) reaches an SDS stream only once one of
    the caller's entries federates with it, and is pushed then."""

    partner = TestCA(TrustDomain("partner.test"))
    pem = partner.cert.public_bytes(serialization.Encoding.PEM)
    with running_stack() as st:
        (st.root / "partner.pem").write_bytes(pem)
        st.server_cli("bundle", "set", "--trust-domain", "partner.test",
                      "--path", str(st.root / "partner.pem"))
        st.create_entry(ENVOY_ID, uid_selector)
        deadline = time.monotonic() + TIMEOUT
        while True:  # PermissionDenied until the agent has synced the entry
            try:
                sds.fetch(st.agent_socket, [ENVOY_ID])
                break
            except grpc.RpcError as exc:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no SVID over SDS: {exc}") from None
                time.sleep(0.5)
        names = ["spiffe://partner.test", ENVOY_ID]
        with SdsStream(st.agent_socket) as stream:
            stream.send(names)
            follow = Follower(stream, names)
            follow.next(TIMEOUT)
            assert set(follow.secrets) == {ENVOY_ID}, "partner.test without federation"
            # A second entry of the same caller federates with partner.test.
            st.create_entry(f"{ENVOY_ID}-federated", uid_selector,
                            extra=("--federates-with", "partner.test"))
            follow.until(lambda: "spiffe://partner.test" in follow.secrets,
                         "partner.test's bundle once an entry federates with it")
            assert _der(sds.trusted_ca(follow.secrets["spiffe://partner.test"])) == \
                _der([partner.cert])
