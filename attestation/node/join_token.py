"""The join_token node attestor, both halves.

A join token is ``<token-id>.<secret>``: the operator creates it on the server
(which keeps the id and the SHA-256 of the secret, never the token), hands it to
the agent, and the agent presents it once. The agent gets the ID
``spiffe://<td>/sigil/agent/join_token/<token-id>`` and the node selectors
``join_token:<token-id>`` and ``spiffe_id:<agent-id>``; the second lets node-alias
entries select the agent, as SPIRE's join token aliases do.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from attestation.node import AttestationResult
from attestation.node.errors import AttestationError, MalformedAttestationError
from attestation.node.payload import load_json
from identity.errors import InvalidSpiffeIdError
from identity.selectors import Selector
from identity.spiffeid import SpiffeId, TrustDomain

NAME = "join_token"
"""The attestor's name: ``AttestationData.type`` and the selector type."""

MAX_PAYLOAD_BYTES = 1024
_HEX = frozenset("0123456789abcdef")


class UnknownJoinTokenError(AttestationError):
    """No join token with that id exists, or its secret does not match."""


class ExpiredJoinTokenError(AttestationError):
    """The join token has expired."""


class UsedJoinTokenError(AttestationError):
    """The join token was already used; tokens are single use."""


@dataclass(frozen=True, slots=True)
class StoredJoinToken:
    """A join token as the server stores it (the secret only as a SHA-256 hex)."""

    token_id: str
    secret_sha256: str
    alias: str | None
    expires_at: dt.datetime
    used_at: dt.datetime | None


class JoinTokenStore(Protocol):
    """Where the server half finds tokens. The datastore implements it.

    The store must be transactional: when :func:`verify` raises after a claim,
    the caller rolls the transaction back, which undoes the claim.
    """

    def claim_join_token(self, token_id: str, *, now: dt.datetime) -> StoredJoinToken | None:
        """Atomically mark the token used if it is unused.

        Args:
            token_id: the token's id.
            now: the time to record as its use.

        Returns:
            None when no such token exists; otherwise the token as it was *before*
            this call (``used_at`` is None exactly when this call claimed it). Of two
            concurrent claims, at most one sees ``used_at`` None.
        """
        ...


def new_token() -> tuple[str, str]:
    """Make a fresh token.

    Returns:
        ``(token_id, token)`` where ``token`` is ``<token_id>.<secret>``.
    """
    token_id = secrets.token_hex(8)
    return token_id, f"{token_id}.{secrets.token_urlsafe(24)}"


def secret_sha256(secret: str) -> str:
    """The stored form of a token secret: lowercase hex SHA-256."""
    return hashlib.sha256(secret.encode()).hexdigest()


def split_token(token: str) -> tuple[str, str]:
    """Split ``<token-id>.<secret>``.

    Raises:
        MalformedAttestationError: not of that form.
    """
    token_id, sep, secret = token.strip().partition(".")
    if not sep or not secret or not token_id or not set(token_id) <= _HEX or len(token_id) > 64:
        raise MalformedAttestationError(
            "join token must have the form <token-id>.<secret> as printed by "
            "'sigil-server token generate'"
        )
    return token_id, secret


def agent_id(trust_domain: TrustDomain, token_id: str) -> SpiffeId:
    """The SPIFFE ID an agent attested with this token id gets."""
    return SpiffeId.from_segments(trust_domain, "sigil", "agent", NAME, token_id)


# ---- agent half -----------------------------------------------------------------------


def make_attestation(token: str) -> tuple[str, bytes]:
    """Build the attestation data an agent sends for a join token.

    Args:
        token: the token as printed by ``sigil-server token generate``.

    Returns:
        ``("join_token", payload)`` for ``AttestationData(type, payload)``.

    Raises:
        MalformedAttestationError: the token is not of the form ``<id>.<secret>``.
    """
    split_token(token)
    return NAME, json.dumps({"token": token.strip()}).encode()


# ---- server half ----------------------------------------------------------------------


def _parse_payload(payload: bytes) -> tuple[str, str]:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise MalformedAttestationError(
            f"join_token payload is larger than {MAX_PAYLOAD_BYTES} bytes"
        )
    doc = load_json(payload, "join_token")
    if not isinstance(doc, dict) or not isinstance(doc.get("token"), str):
        raise MalformedAttestationError('join_token payload must be {"token": "<token>"}')
    return split_token(doc["token"])


def _check(stored: StoredJoinToken | None, token_id: str, secret: str, *,
           now: dt.datetime) -> None:
    if stored is None:
        raise UnknownJoinTokenError(f"join token {token_id} is unknown")
    # Constant-time compare: the hash of a guessed secret must not leak how close it is.
    if not hmac.compare_digest(stored.secret_sha256, secret_sha256(secret)):
        raise UnknownJoinTokenError(f"join token {token_id} is unknown")
    if stored.used_at is not None:
        raise UsedJoinTokenError(f"join token {token_id} was already used")
    if stored.expires_at <= now:
        raise ExpiredJoinTokenError(f"join token {token_id} has expired")


def precheck(
    payload: bytes, lookup: Callable[[str], StoredJoinToken | None], *, now: dt.datetime
) -> str:
    """Refuse, without consuming anything, a token that :func:`verify` would refuse now.

    The server runs it before it signs the agent's SVID (which happens outside,
    and before, the transaction that consumes the token), so an unknown, wrong,
    used or expired token costs no signature. Only :func:`verify` decides: a
    token may be used by someone else between the two.

    Args:
        payload: the agent's ``AttestationData.payload``.
        lookup: reads a stored token by id without changing it (None: no such token).
        now: the current time (aware UTC).

    Returns:
        The token id.

    Raises:
        The same errors as :func:`verify`.
    """
    token_id, secret = _parse_payload(payload)
    _check(lookup(token_id), token_id, secret, now=now)
    return token_id


def verify(
    payload: bytes, store: JoinTokenStore, *, trust_domain: TrustDomain, now: dt.datetime
) -> AttestationResult:
    """Verify a join token and consume it.

    Args:
        payload: the agent's ``AttestationData.payload``.
        store: where tokens live; claimed within the caller's transaction.
        trust_domain: the server's trust domain.
        now: the current time (aware UTC).

    Returns:
        The agent ID, its node selectors and the token's alias, if any.

    Raises:
        MalformedAttestationError: the payload is not a join token.
        UnknownJoinTokenError: no such token, or the secret does not match.
        UsedJoinTokenError: the token was already used.
        ExpiredJoinTokenError: the token has expired.
    """
    token_id, secret = _parse_payload(payload)
    stored = store.claim_join_token(token_id, now=now)
    _check(stored, token_id, secret, now=now)
    assert stored is not None  # _check refused a missing token
    agent = agent_id(trust_domain, token_id)
    alias: SpiffeId | None = None
    if stored.alias:
        try:
            alias = SpiffeId.parse(stored.alias)
        except InvalidSpiffeIdError:
            # Validated when the token was created; a bad stored value means tampering.
            raise UnknownJoinTokenError(f"join token {token_id} has an invalid alias") from None
    selectors = (Selector(NAME, token_id), Selector("spiffe_id", str(agent)))
    return AttestationResult(agent_id=agent, selectors=selectors, alias=alias)
