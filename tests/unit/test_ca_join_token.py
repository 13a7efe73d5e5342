"""attestation.node.join_token: both halves, with an in-memory store."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from attestation.node import join_token as jt
from attestation.node.errors import MalformedAttestationError
from identity.selectors import Selector
from identity.spiffeid import TrustDomain

TD = TrustDomain("example.org")
NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


class MemoryStore:
    def __init__(self) -> None:
        self.tokens: dict[str, jt.StoredJoinToken] = {}

    def add(self, token: str, *, alias: str | None = None,
            expires_at: dt.datetime = NOW + dt.timedelta(minutes=10)) -> str:
        token_id, secret = jt.split_token(token)
        self.tokens[token_id] = jt.StoredJoinToken(token_id, jt.secret_sha256(secret), alias,
                                                   expires_at, None)
        return token_id

    def claim_join_token(self, token_id: str, *, now: dt.datetime) -> jt.StoredJoinToken | None:
        old = self.tokens.get(token_id)
        if old is not None and old.used_at is None:
            self.tokens[token_id] = jt.StoredJoinToken(
                old.token_id, old.secret_sha256, old.alias, old.expires_at, now)
        return old


def test_round_trip() -> None:
    token_id, token = jt.new_token()
    store = MemoryStore()
    store.add(token, alias="spiffe://example.org/node/a")
    kind, payload = jt.make_attestation(token)
    assert kind == "join_token"
    result = jt.verify(payload, store, trust_domain=TD, now=NOW)
    agent = f"spiffe://example.org/sigil/agent/join_token/{token_id}"
    assert str(result.agent_id) == agent
    assert set(result.selectors) == {Selector("join_token", token_id), Selector("spiffe_id", agent)}
    assert str(result.alias) == "spiffe://example.org/node/a"


def test_token_format() -> None:
    token_id, token = jt.new_token()
    assert len(token_id) == 16 and token.startswith(token_id + ".")
    assert len(token.split(".", 1)[1]) == 32


@pytest.mark.parametrize(
    ("setup", "error", "message"),
    [
        ("unknown", jt.UnknownJoinTokenError, "unknown"),
        ("wrong_secret", jt.UnknownJoinTokenError, "unknown"),
        ("expired", jt.ExpiredJoinTokenError, "expired"),
        ("used", jt.UsedJoinTokenError, "already used"),
    ],
)
def test_refusals(setup: str, error: type[Exception], message: str) -> None:
    _, token = jt.new_token()
    store = MemoryStore()
    if setup == "wrong_secret":
        store.add(token.split(".")[0] + ".other")
    elif setup == "expired":
        store.add(token, expires_at=NOW)
    elif setup == "used":
        store.add(token)
        jt.verify(jt.make_attestation(token)[1], store, trust_domain=TD, now=NOW)
    elif setup != "unknown":
        raise AssertionError(setup)
    with pytest.raises(error, match=message) as exc:
        jt.verify(jt.make_attestation(token)[1], store, trust_domain=TD, now=NOW)
    assert token.split(".")[1] not in str(exc.value)


@pytest.mark.parametrize(
    "payload",
    [b"", b"not json", b"[]", b'{"token": 5}', json.dumps({"token": "nodot"}).encode(),
     json.dumps({"token": "XYZ.secret"}).encode(), b"x" * 2000],
)
def test_malformed_payloads(payload: bytes) -> None:
    with pytest.raises(MalformedAttestationError):
        jt.verify(payload, MemoryStore(), trust_domain=TD, now=NOW)


def test_make_attestation_rejects_garbage() -> None:
    with pytest.raises(MalformedAttestationError):
        jt.make_attestation("garbage")
