"""The server's NewWITSVID over real mTLS, and its WIT keys in the published bundle."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator

import grpc
import jwt
import pytest

from api.protos.sigil.agent.v1 import agent_pb2
from identity.bundle import Bundle
from identity.keys import KeyType, generate_private_key, public_key_der, public_keys_equal
from identity.spiffeid import TrustDomain
from identity.witsvid import (
    ReplayCache,
    sign_wpt,
    validate_wit_svid,
    verify_presentation,
)
from tests.integration.conftest import RunningServer
from tests.integration.test_server_agent_api import Agent, _attest, _entry, _token


@pytest.fixture
def agent(sigil_server: RunningServer) -> Iterator[Agent]:
    a = _attest(sigil_server, _token(sigil_server)["token"])
    yield a
    a.channel.close()


def _bundle(server: RunningServer) -> Bundle:
    proc = server.cli("bundle", "show", "--format", "spiffe")
    assert proc.returncode == 0, proc.stderr
    return Bundle.from_jwks(TrustDomain.parse(server.trust_domain), proc.stdout)


def test_new_wit_svid_signs_the_agent_made_key(sigil_server: RunningServer,
                                               agent: Agent) -> None:
    td = sigil_server.trust_domain
    e = _entry(sigil_server, f"spiffe://{td}/web", agent.agent_id, "--selector", "unix:uid:1")
    key = generate_private_key()
    resp = agent.stub.NewWITSVID(agent_pb2.NewWITSVIDRequest(
        entry_id=e["id"], public_key=public_key_der(key.public_key())), timeout=10)  # type: ignore[arg-type]
    assert resp.spiffe_id == f"spiffe://{td}/web"
    header = jwt.get_unverified_header(resp.token)
    assert header["typ"] == "wit+jwt" and header["kid"]
    bundle = _bundle(sigil_server)
    # A WIT key of its own (WIT-SVID §6.1): its kid names only a wit-svid entry.
    doc = bundle.to_jwks()
    uses = [k["use"] for k in doc["keys"] if k.get("kid") == header["kid"]]
    assert uses == ["wit-svid"]
    assert header["alg"] == "ES256"
    show = json.loads(sigil_server.cli("localauthority", "wit", "show", "--output",
                                       "json").stdout)["authorities"]
    assert [a["authority_id"] for a in show if a["status"] == "active"] == [header["kid"]]
    now = dt.datetime.now(dt.UTC)
    wit = validate_wit_svid(resp.token, bundles=bundle, now=now)
    assert public_keys_equal(wit.confirmation_key, key.public_key())
    assert "aud" not in wit.claims and "iss" not in wit.claims  # WIT-SVID §3.7
    assert wit.claims["nbf"] <= wit.claims["iat"]
    assert resp.expires_at - resp.issued_at == 300  # the entry's JWT-SVID TTL
    proof = sign_wpt(wit_token=resp.token, key=key, audience="https://x.example/",
                     expires_at=now + dt.timedelta(seconds=30))
    assert verify_presentation(resp.token, proof, bundles=bundle, audience="https://x.example/",
                               now=now, replay_cache=ReplayCache()).spiffe_id == wit.spiffe_id
    # The Workload API's WIT bundle form: only wit-svid keys, each with its kid.
    assert {k["use"] for k in json.loads(bundle.wit_jwks())["keys"]} == {"wit-svid"}


def test_new_wit_svid_refusals(sigil_server: RunningServer, agent: Agent) -> None:
    td = sigil_server.trust_domain
    other_agent = _token(sigil_server)["agent_id"]
    theirs = _entry(sigil_server, f"spiffe://{td}/db", other_agent, "--selector", "unix:uid:1")
    mine = _entry(sigil_server, f"spiffe://{td}/web", agent.agent_id, "--selector", "unix:uid:1")
    good_key = public_key_der(generate_private_key().public_key())
    weak = public_key_der(generate_private_key(KeyType.RSA_2048).public_key())[:40]
    cases = [
        (theirs["id"], good_key, grpc.StatusCode.PERMISSION_DENIED),  # not authorized
        ("no-such-entry", good_key, grpc.StatusCode.PERMISSION_DENIED),
        (mine["id"], b"", grpc.StatusCode.INVALID_ARGUMENT),
        (mine["id"], b"x" * 4096, grpc.StatusCode.INVALID_ARGUMENT),
        (mine["id"], weak, grpc.StatusCode.INVALID_ARGUMENT),  # truncated: not a key
    ]
    for entry_id, key_der, code in cases:
        with pytest.raises(grpc.RpcError) as err:
            agent.stub.NewWITSVID(agent_pb2.NewWITSVIDRequest(
                entry_id=entry_id, public_key=key_der), timeout=10)  # type: ignore[arg-type]
        assert err.value.code() == code, (entry_id, key_der[:10])
