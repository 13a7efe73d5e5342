"""Revocations through a real ``sigil-server``: the CLI, syncs and the signed list."""

from __future__ import annotations

import base64
import json

import grpc
import pytest

from api.protos.sigil.agent.v1 import agent_pb2, agent_pb2_grpc
from identity import revocation as rv
from identity.bundle import Bundle
from identity.errors import JwtSvidError
from identity.spiffeid import TrustDomain
from tests.integration.conftest import RunningServer
from tests.integration.test_server_agent_api import Agent, _attest, _channel, _json, _token

SERIAL = "4F:1A:09:77"


@pytest.fixture
def agent(sigil_server: RunningServer):  # type: ignore[no-untyped-def]
    a = _attest(sigil_server, _token(sigil_server)["token"])
    yield a
    a.channel.close()


def _listed(server: RunningServer) -> dict:  # type: ignore[type-arg]
    return _json(server.cli("svid", "list-revoked", "--output", "json"))  # type: ignore[return-value]


@pytest.mark.parametrize(("args", "error"), [
    ((), "give exactly one of --serial, --spiffe-id, --jti, --key-id"),
    (("--serial", "0a", "--jti", "x"), "not --serial and --jti"),
    (("--serial", "12:g4"), "--serial: serial '12:g4' is not a hex serial number"),
    (("--serial", "0"), "not a positive number"),
    (("--spiffe-id", "https://it.sigil.test/x"), "--spiffe-id:"),
    (("--jti", ""), "--jti must not be empty"),
    (("--spiffe-id", "spiffe://elsewhere.test/w"), "not in the trust domain it.sigil.test"),
    (("--spiffe-id", "spiffe://it.sigil.test/sigil/agent/join_token/x"), "reserved"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    sigil_server: RunningServer, args: tuple[str, ...], error: str,
) -> None:
    proc = sigil_server.cli("svid", "revoke", *args)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("Error: "), proc.stderr
    assert error in proc.stderr
    assert _listed(sigil_server) == {"version": 0, "revocations": []}


def test_revocations_are_listed_and_synced_by_id(
    sigil_server: RunningServer, agent: Agent,
) -> None:
    td = sigil_server.trust_domain
    by_serial = _json(sigil_server.cli("svid", "revoke", "--serial", SERIAL, "--output", "json"))
    by_id = _json(sigil_server.cli("svid", "revoke", "--spiffe-id", f"spiffe://{td}/w",
                                   "--output", "json"))
    by_jti = _json(sigil_server.cli("svid", "revoke", "--jti", "j-1", "--output", "json"))
    by_kid = _json(sigil_server.cli("svid", "revoke", "--key-id", "kid-1", "--output", "json"))
    assert by_serial["kind"] == "x509_serial" and by_serial["value"] == "4f1a0977"  # type: ignore[index]
    assert by_serial["expires_at"] is not None  # type: ignore[index]
    assert by_id["not_before_max"] is not None and by_kid["expires_at"] is None  # type: ignore[index]
    again = _json(sigil_server.cli("svid", "revoke", "--serial", "4f1a0977", "--output", "json"))
    assert again == by_serial
    listed = _listed(sigil_server)
    assert [r["id"] for r in listed["revocations"]] == [
        r["id"] for r in (by_serial, by_id, by_jti, by_kid)]  # type: ignore[index]
    assert listed["version"] == by_kid["id"]  # type: ignore[index]
    text = sigil_server.cli("svid", "list-revoked").stdout
    assert "4 revocations" in text and "x509_serial" in text and "4f1a0977" in text

    def sync(known: int) -> agent_pb2.SyncAuthorizedEntriesPage:
        pages = list(agent.stub.SyncAuthorizedEntries(
            agent_pb2.SyncAuthorizedRequest(known_revocation_id=known), timeout=10))
        return pages[0]

    first = sync(0)
    assert first.revocations_full
    assert first.revocation_id == listed["version"]
    assert [(r.kind, r.value) for r in first.revocations] == [
        ("x509_serial", "4f1a0977"), ("x509_spiffe_id", f"spiffe://{td}/w"),
        ("jwt_id", "j-1"), ("jwt_key_id", "kid-1")]
    later = sync(first.revocation_id)
    assert not later.revocations_full and later.revocation_id == first.revocation_id
    # Only the young ones come again (a late-committed lower id is not missed).
    assert {r.id for r in later.revocations} <= {r.id for r in first.revocations}
    with pytest.raises(grpc.RpcError) as err:
        sync(-1)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _bundle(server: RunningServer) -> Bundle:
    doc = server.cli("bundle", "show", "--format", "spiffe").stdout
    return Bundle.from_jwks(TrustDomain(server.trust_domain), doc)


def _tamper(token: str) -> str:
    header, payload, sig = token.split(".")
    doc = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    doc["revocations"] = []
    forged = base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{sig}"


def test_the_signed_list_verifies_with_the_bundle_and_a_tampered_one_does_not(
    sigil_server: RunningServer, agent: Agent,
) -> None:
    revoked = _json(sigil_server.cli("svid", "revoke", "--serial", SERIAL, "--output", "json"))
    resp = agent.stub.GetRevocationList(agent_pb2.RevocationListRequest(), timeout=10)
    bundle = _bundle(sigil_server)
    got = rv.verify_revocation_list(resp.signed_list, bundle=bundle)
    assert got.version == resp.version == revoked["id"]  # type: ignore[index]
    assert [(r.kind, r.value) for r in got.revocations] == [("x509_serial", "4f1a0977")]
    with pytest.raises(JwtSvidError, match="signature does not verify"):
        rv.verify_revocation_list(_tamper(resp.signed_list), bundle=bundle)


def test_the_signed_list_needs_an_agent_svid(sigil_server: RunningServer) -> None:
    with _channel(sigil_server) as ch, pytest.raises(grpc.RpcError) as err:
        agent_pb2_grpc.AgentStub(ch).GetRevocationList(agent_pb2.RevocationListRequest(),
                                                       timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_agent_client_fetches_and_verifies_the_list(
    sigil_server: RunningServer, agent: Agent,
) -> None:
    import asyncio

    from cryptography import x509

    from agent.client import ServerClient
    from identity.spiffeid import SpiffeId
    from identity.x509svid import X509Svid

    revoked = _json(sigil_server.cli("svid", "revoke", "--jti", "j-9", "--output", "json"))
    svid = X509Svid(SpiffeId.parse(agent.agent_id),
                    tuple(x509.load_der_x509_certificate(d) for d in agent.chain_der),
                    agent.key)
    bundle = _bundle(sigil_server)
    roots = sigil_server.cli("bundle", "show", "--format", "pem").stdout.encode()

    async def fetch() -> rv.RevocationList:
        client = ServerClient(address=sigil_server.address,
                              trust_domain=TrustDomain(sigil_server.trust_domain))
        client.configure(roots_pem=roots, svid=svid)
        try:
            return await client.revocation_list(bundle)
        finally:
            await client.close()

    got = asyncio.run(fetch())
    assert got.version == revoked["id"]  # type: ignore[index]
    assert [(r.kind, r.value) for r in got.revocations] == [("jwt_id", "j-9")]
