"""Revoked SVIDs: the admin RPCs, what syncs carry, and the signed list.

``sigil-server svid revoke`` records a revocation (:class:`RevocationMethods`, a
mixin of the admin servicer). Agents learn revocations at their next sync, by
revision as entries are (:meth:`ServerRevocations.delta`), and anyone holding an
agent SVID may fetch the whole list signed with the server's JWT key
(:class:`RevocationListMethods`, a mixin of the agent servicer). Format and
timings: docs/internals.md, "Revocations".
"""

from __future__ import annotations

import datetime as dt
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from api.protos.sigil.admin.v1 import admin_pb2
from api.protos.sigil.agent.v1 import agent_pb2
from api.protos.sigil.types.v1 import types_pb2
from ca.api.deps import ApiDeps
from ca.api.status import grpc_method
from ca.authority import BACKDATE
from ca.errors import InvalidArgumentError
from ca.log import event
from ca.registry import validate
from identity import revocation as rv
from identity.errors import InvalidValueError
from identity.spiffeid import TrustDomain

POLL_SECONDS = 1.0
"""How often a process re-reads the newest revocation id (one indexed MAX query)."""
RECENT = dt.timedelta(minutes=5)
"""Revocations this young are sent again to agents that have seen a later id: ids
are not commit order on PostgreSQL and MariaDB, and a transaction that committed a
lower id after a higher one was read is not missed (the entry index's GAP_TIMEOUT)."""
PRUNE_EVERY = dt.timedelta(minutes=10)
MAX_VALUE_LENGTH = 2048


def revocation_to_proto(r: rv.Revocation) -> types_pb2.Revocation:
    """A revocation as the APIs send it (0 for an absent time)."""
    return types_pb2.Revocation(id=r.id, kind=r.kind, value=r.value,
                                not_before_max=r.not_before_max or 0,
                                expires_at=r.expires_at or 0, created_at=r.created_at)


@dataclass(frozen=True, slots=True)
class RevocationDelta:
    """What one sync sends: ``full`` replaces what the agent holds."""

    revocations: tuple[rv.Revocation, ...]
    version: int
    full: bool


class ServerRevocations:
    """The unexpired revocations, read from the datastore at most every poll.

    Every process serving agents holds one; a revocation written by any server
    reaches its syncs within :data:`POLL_SECONDS`. Thread-safe.
    """

    def __init__(self, deps: ApiDeps, *, poll_seconds: float = POLL_SECONDS,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._d = deps
        self._poll = poll_seconds
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._checked = -math.inf
        self._version = -1
        self._held: tuple[rv.Revocation, ...] = ()
        self._signed: tuple[int, str, str] | None = None  # version, kid, token
        self._pruned_at: dt.datetime | None = None

    def current(self) -> tuple[int, tuple[rv.Revocation, ...]]:
        """The newest revocation id and every unexpired revocation, by id."""
        with self._lock:
            started = self._monotonic()
            if started - self._checked >= self._poll:
                self._checked = started
                self._maybe_prune()
                version = self._d.datastore.last_revocation_id()
                if version != self._version:
                    self._held = tuple(self._d.datastore.list_revocations(
                        now=self._d.clock.now()))
                    self._version = version
            now = self._d.clock.now().timestamp()
            return self._version, tuple(r for r in self._held
                                        if r.expires_at is None or r.expires_at > now)

    def _maybe_prune(self) -> None:
        now = self._d.clock.now()
        if self._pruned_at is None or now - self._pruned_at >= PRUNE_EVERY:
            self._pruned_at = now
            pruned = self._d.datastore.prune_revocations(now=now)
            if pruned:
                event("revocations pruned", count=pruned)

    def delta(self, known: int) -> RevocationDelta:
        """What an agent that holds revocations up to id ``known`` needs.

        Raises:
            InvalidArgumentError: a negative ``known``.
        """
        if known < 0:
            raise InvalidArgumentError(f"known_revocation_id must not be negative, not {known}")
        version, held = self.current()
        if known == 0 or known > version:
            # First sync, or an id this datastore never issued (another database).
            return RevocationDelta(held, version, True)
        recent = int((self._d.clock.now() - RECENT).timestamp())
        return RevocationDelta(
            tuple(r for r in held if r.id > known or r.created_at >= recent), version, False)

    def add_to_page(self, page: agent_pb2.SyncAuthorizedEntriesPage, known: int) -> None:
        """Put the revocations an agent needs on the first page of its sync."""
        found = self.delta(known)
        page.revocation_id = found.version
        page.revocations_full = found.full
        page.revocations.extend(revocation_to_proto(r) for r in found.revocations)

    def signed_list(self) -> tuple[int, str]:
        """The list signed with the active JWT key; signed again when it changes."""
        version, held = self.current()
        key, key_id = self._d.authority.jwt_signing_key()
        with self._lock:
            cached = self._signed
            if cached is not None and cached[0] == version and cached[1] == key_id:
                return version, cached[2]
        token = rv.sign_revocation_list(
            trust_domain=self._d.config.trust_domain.name, version=version,
            issued_at=self._d.clock.now(), revocations=held, key=key, key_id=key_id)
        with self._lock:
            self._signed = (version, key_id, token)
        return version, token


def parse_target(request: admin_pb2.RevokeSVIDRequest,
                 trust_domain: TrustDomain) -> tuple[str, str]:
    """The kind and canonical value a revoke request names.

    Raises:
        InvalidArgumentError: no target, an empty or oversized value, a serial that
            is not hex, a SPIFFE ID that is not a workload ID of ``trust_domain``
            (agents' own SVIDs are cut off with ``agent ban``, not here).
    """
    which = request.WhichOneof("target")
    if which is None:
        raise InvalidArgumentError(
            "name what to revoke: x509_serial, spiffe_id, jwt_id or jwt_key_id")
    value = str(getattr(request, which))
    if not value or len(value) > MAX_VALUE_LENGTH:
        raise InvalidArgumentError(f"{which} must be 1 to {MAX_VALUE_LENGTH} characters")
    try:
        if which == "x509_serial":
            return rv.X509_SERIAL, rv.serial_text(rv.parse_serial(value))
        if which == "spiffe_id":
            return rv.X509_SPIFFE_ID, str(validate.workload_id(value, "spiffe_id",
                                                               trust_domain))
    except InvalidValueError as exc:
        raise InvalidArgumentError(str(exc)) from None
    return (rv.JWT_ID if which == "jwt_id" else rv.JWT_KEY_ID), value


class RevocationMethods:
    """RevokeSVID and ListRevokedSVIDs (admin API)."""

    _d: ApiDeps

    def _keep_for(self, kind: str) -> dt.timedelta | None:
        """How long a revocation of ``kind`` must be kept: the longest TTL that
        anything it names may have (None: a key id, kept until pruned by hand)."""
        cfg, ds = self._d.config, self._d.datastore
        if kind in (rv.X509_SERIAL, rv.X509_SPIFFE_ID):
            seconds = ds.max_x509_svid_ttl_seconds()
            return max(cfg.x509_svid_ttl, dt.timedelta(seconds=seconds)) + BACKDATE
        if kind == rv.JWT_ID:
            return max(cfg.jwt_svid_ttl, dt.timedelta(seconds=ds.max_jwt_svid_ttl_seconds()))
        return None

    @grpc_method("admin")
    def RevokeSVID(
        self, request: admin_pb2.RevokeSVIDRequest, context: grpc.ServicerContext
    ) -> types_pb2.Revocation:
        """Record a revocation; agents stop serving what it names at their next sync."""
        kind, value = parse_target(request, self._d.config.trust_domain)
        now = self._d.clock.now()
        keep = self._keep_for(kind)
        cutoff: int | None = None
        if kind == rv.X509_SPIFFE_ID:
            # An SVID signed at t has notBefore floor(t) - BACKDATE (certificates
            # count whole seconds), so this cutoff revokes every SVID signed before
            # now, and also those signed later within the same second (they are
            # replaced once more, harmlessly); none signed in a later second.
            cutoff = math.floor(now.timestamp()) - int(BACKDATE.total_seconds())
        found = self._d.datastore.add_revocation(
            kind, value, now=now, expires_at=None if keep is None else now + keep,
            not_before_max=cutoff)
        event("svid revoked", kind=kind, value=value, revocation_id=found.id)
        return revocation_to_proto(found)

    @grpc_method("admin")
    def ListRevokedSVIDs(
        self, request: admin_pb2.ListRevokedSVIDsRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListRevokedSVIDsResponse:
        """Every revocation not yet past its expiry."""
        found = self._d.datastore.list_revocations(now=self._d.clock.now())
        return admin_pb2.ListRevokedSVIDsResponse(
            revocations=[revocation_to_proto(r) for r in found],
            version=self._d.datastore.last_revocation_id())


class RevocationListMethods:
    """GetRevocationList (agent API, mTLS with an agent SVID)."""

    _d: ApiDeps
    _revocations_held: ServerRevocations | None = None

    def authenticate(self, context: grpc.ServicerContext) -> object:
        raise NotImplementedError  # provided by AgentServicer

    @property
    def revocations(self) -> ServerRevocations:
        """This servicer's revocations (made on first use)."""
        if self._revocations_held is None:
            self._revocations_held = ServerRevocations(self._d)
        return self._revocations_held

    @grpc_method("agent")
    def GetRevocationList(
        self, request: agent_pb2.RevocationListRequest, context: grpc.ServicerContext
    ) -> agent_pb2.RevocationListResponse:
        """The unexpired revocations, signed with the server's JWT key."""
        self.authenticate(context)
        version, token = self.revocations.signed_list()
        return agent_pb2.RevocationListResponse(signed_list=token, version=version)
