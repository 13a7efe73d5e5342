"""The agent API servicer: node attestation, agent SVID renewal, sync and signing.

Served over TLS on the bind address. AttestAgent needs no client certificate; every
other method authenticates the agent from its client certificate (see
:meth:`AgentServicer.authenticate`).
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging
import time
from collections.abc import Callable, Iterable, Iterator

import grpc
from cryptography import x509

from api.protos.sigil.agent.v1 import agent_pb2, agent_pb2_grpc
from attestation.node import join_token, pop
from attestation.node.errors import UnknownAttestorError
from attestation.node.pop import CHALLENGE_ATTESTORS, issue_nonce
from ca.api.convert import (
    entry_to_proto,
    own_bundle_to_proto,
    selector_to_proto,
    svid_to_proto,
)
from ca.api.deps import ApiDeps
from ca.api.node_cache import LeafIds, NodeCache
from ca.api.revocations import RevocationListMethods
from ca.api.status import grpc_method
from ca.api.sync import SyncBundles, sync_pages
from ca.config.policy import Scope
from ca.datastore import EntryRecord, NodeRecord
from ca.datastore.feed import DatastoreFeed
from ca.datastore.hot_reads import NodeStateReader
from ca.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from ca.log import event
from ca.metrics import count_svid, observe_sync_seconds
from ca.ratelimit import RateLimiter
from ca.registry.entry_index import EntryIndex
from identity.errors import InvalidKeyError, X509SvidError
from identity.keys import PublicKey, load_public_key_der
from identity.refusal import RefusalReason
from identity.selectors import Selector
from identity.spiffeid import SpiffeId
from identity.x509svid import csr_public_key

MAX_BATCH = 500
MAX_AUDIENCES = 32
MAX_AUDIENCE_LENGTH = 256
# An RSA-4096 SubjectPublicKeyInfo is about 550 bytes.
MAX_WIT_KEY_BYTES = 2048
AGENT_PATH_PREFIX = "/sigil/agent/"


def _public_key_from_csr(der: bytes) -> PublicKey:
    try:
        return csr_public_key(der)  # unsupported and weak keys already rejected
    except X509SvidError as exc:
        raise InvalidArgumentError(f"invalid CSR: {exc}") from None


PeerCertificate = Callable[[str], tuple[bool, x509.Certificate | None]]
PeerAddress = Callable[[str], str | None]


def _ts(value: dt.datetime) -> int:
    return int(value.timestamp())


class AgentServicer(RevocationListMethods, agent_pb2_grpc.AgentServicer):
    """The Agent service."""

    def __init__(self, deps: ApiDeps, *, peer_certificate: PeerCertificate,
                 peer_address: PeerAddress | None = None,
                 rate_limiter: RateLimiter | None = None,
                 entry_index: EntryIndex | None = None) -> None:
        """Args:
            deps: datastore, CA, config, clock.
            peer_certificate: maps ``context.peer()`` to (came through the TLS front,
                client certificate or None); see :class:`ca.api.tls_front.TlsFront`.
            peer_address: maps ``context.peer()`` to the client's IP address.
            rate_limiter: per-caller limits (None: the limits of ``deps.config``).
            entry_index: who may have which entry (None: built now from the
                datastore, and told of this process's own entry changes).
        """
        self._d = deps
        self._peer_certificate = peer_certificate
        self._peer_address = peer_address or (lambda _peer: None)
        ops = deps.config.ops
        self._rate = rate_limiter or RateLimiter(attestation=ops.attestation_limit,
                                                 signing=ops.signing_limit)
        if entry_index is None:
            feed = DatastoreFeed(deps.datastore)
            entry_index = EntryIndex(feed, server_id=deps.server_id, clock=deps.clock)
            feed.on_local_change(entry_index.notify_local_change)
            entry_index.build()
        self._index = entry_index
        self._bundles = SyncBundles(deps.authority, deps.datastore,
                                    version=lambda: self._index.bundles_version)
        self._nodes = NodeCache(NodeStateReader(deps.datastore.read_engine).read,
                                deps.datastore.get_node)
        self._leaf_ids = LeafIds()

    # ---- authentication ----------------------------------------------------------

    def authenticate(self, context: grpc.ServicerContext) -> NodeRecord:
        """The attested node behind the call's client certificate.

        The TLS front verified the certificate chain against the current bundle
        during the handshake; here we check that it is an agent's *current* SVID,
        against the node's row as the datastore holds it at this call (a ban, an
        eviction or a renewal by any process applies at once; see
        :mod:`ca.api.node_cache` for what is kept between calls).

        Raises:
            UnauthenticatedError: no client certificate.
            PermissionDeniedError: not an agent ID, unknown or banned agent, or an
                SVID that is not the agent's current one.
        """
        known, cert = self._peer_certificate(context.peer())
        if not known:
            raise UnauthenticatedError("the connection did not come through the TLS listener")
        if cert is None:
            raise UnauthenticatedError("a client certificate (the agent's SVID) is required")
        try:
            agent_id = self._leaf_ids.validate(cert)
        except X509SvidError as exc:
            raise UnauthenticatedError(f"client certificate is not an X.509-SVID: {exc}") from None
        td = self._d.config.trust_domain
        if not agent_id.is_member_of(td) or not agent_id.path.startswith(AGENT_PATH_PREFIX):
            raise PermissionDeniedError(f"{agent_id} is not an agent of {td}")
        node = self._nodes.get(agent_id)
        if node is None:
            # Never attested, or evicted: it must attest again.
            raise PermissionDeniedError(f"agent is not attested (or was evicted): {agent_id}",
                                        reason=RefusalReason.AGENT_NOT_ATTESTED)
        if node.banned:
            raise PermissionDeniedError(f"agent is banned: {agent_id}",
                                        reason=RefusalReason.AGENT_BANNED)
        serial = cert.serial_number
        if serial == node.new_serial:
            # First use of a renewed SVID: from now on only it is current.
            self._d.datastore.promote_node_serial(agent_id, now=self._d.clock.now())
        elif serial != node.serial:
            raise PermissionDeniedError(
                f"the client certificate is not the current SVID of agent {agent_id}",
                reason=RefusalReason.SVID_NOT_CURRENT,
            )
        return node

    def _authorized(self, node: NodeRecord, entry_ids: Iterable[str]) -> dict[str, EntryRecord]:
        """Those of ``entry_ids`` that are authorized for the node, by id."""
        self._index.catch_up()
        found: dict[str, EntryRecord] = {}
        wanted = list(entry_ids)
        for attempt in range(2):
            for entry_id in wanted:
                entry = self._index.is_authorized(
                    entry_id, agent_id=node.spiffe_id, node_selectors=node.selectors)
                if entry is not None:
                    found[entry_id] = entry
            wanted = [i for i in wanted if i not in found]
            if not wanted or attempt:
                break
            # Another process (the main one's admin API, another worker or server)
            # may have written the entry since our last poll: before refusing, ask
            # the datastore, the source of truth. Only a miss pays for this.
            self._index.poll()
        return found

    @staticmethod
    def _refuse_banned(node: NodeRecord | None) -> None:
        if node is not None and node.banned:
            raise PermissionDeniedError(f"agent is banned: {node.spiffe_id}",
                                        reason=RefusalReason.AGENT_BANNED)

    # ---- methods ---------------------------------------------------------------------

    @grpc_method("agent")
    def AttestAgent(
        self, request: agent_pb2.AttestAgentRequest, context: grpc.ServicerContext
    ) -> agent_pb2.AttestAgentResponse:
        """Verify attestation data, sign the agent's SVID, store the node."""
        # Before anything else: a flood of bad attestations is what the limit is for.
        peer = context.peer()
        self._rate.check_attestation(self._peer_address(peer) or peer)
        attestor = request.data.type
        if not attestor:
            raise InvalidArgumentError("attestation data type is required")
        verifier = self._d.node_verifiers.get(attestor)
        if attestor != join_token.NAME and verifier is None:
            raise UnknownAttestorError(f"node attestor {attestor!r} is not enabled")
        # Parse the CSR before touching the token: a bad request must consume nothing.
        public_key = _public_key_from_csr(request.csr)
        cfg = self._d.config
        # Attestors that ask another system (k8s_psat: the cluster's API) do so before
        # the transaction, so no database transaction waits on the network.
        verified = verifier(request.data.payload) if verifier is not None else None
        if verified is not None:
            # A proof of possession (x509pop, sshpop) signs the CSR's key: one made for
            # another attestation cannot be relayed with this CSR.
            if (verified.csr_binding is not None
                    and not hmac.compare_digest(verified.csr_binding,
                                                pop.csr_binding(request.csr))):
                raise PermissionDeniedError(
                    f"{attestor}: the proof was made for another CSR key")
            agent_id = verified.agent_id
        else:
            # Read-only: a token the transaction would refuse costs no signature.
            token_id = join_token.precheck(request.data.payload,
                                           self._d.datastore.get_join_token,
                                           now=self._d.clock.now())
            agent_id = join_token.agent_id(cfg.trust_domain, token_id)
        # Nothing is signed for a banned agent (checked again in the transaction).
        self._refuse_banned(self._d.datastore.get_node(agent_id))
        # Sign before the transaction, never inside one: signing may move the CA's
        # signed_until watermark, a write in a session of its own, which on SQLite
        # would wait for this transaction's write lock until the busy timeout. If the
        # transaction refuses, the certificate is simply never handed out.
        chain = self._d.authority.sign_agent_svid(agent_id, public_key,
                                                  ttl=cfg.agent_svid_ttl)
        now = self._d.clock.now()
        with self._d.datastore.transaction() as tx:
            result = verified or join_token.verify(
                request.data.payload, tx, trust_domain=cfg.trust_domain, now=now
            )
            if result.agent_id != agent_id:  # pragma: no cover - the same token id
                raise PermissionDeniedError("attestation yielded another agent ID")
            self._refuse_banned(tx.get_node(agent_id))
            selectors = tuple(result.selectors)
            tx.put_node(NodeRecord(
                spiffe_id=agent_id, attestor=attestor, serial=chain[0].serial_number,
                expires_at=_ts(chain[0].not_valid_after_utc), selectors=selectors,
            ), now=now)
            if result.alias is not None:
                try:
                    # Within a savepoint (see _create_entry): a lost race to insert
                    # the same alias leaves this transaction usable.
                    tx.create_entry(EntryRecord(
                        spiffe_id=result.alias, parent_id=self._d.server_id,
                        selectors=(Selector("spiffe_id", str(agent_id)),),
                    ), now=now)
                except AlreadyExistsError:
                    pass  # the same alias for the same agent: already there is fine
        count_svid("agent")
        event("agent attested", agent_id=result.agent_id, attestor=attestor,
              alias=result.alias or "", serial=format(chain[0].serial_number, "x"))
        return agent_pb2.AttestAgentResponse(
            svid=svid_to_proto(result.agent_id, chain),
            bundle=own_bundle_to_proto(self._d.authority),
            node_selectors=[selector_to_proto(s) for s in selectors],
        )

    @grpc_method("agent")
    def RenewAgent(
        self, request: agent_pb2.RenewAgentRequest, context: grpc.ServicerContext
    ) -> agent_pb2.RenewAgentResponse:
        """Sign a new SVID for the calling agent; it becomes current on first use."""
        node = self.authenticate(context)
        self._rate.check_signing(str(node.spiffe_id), 1)
        public_key = _public_key_from_csr(request.csr)
        chain = self._d.authority.sign_agent_svid(
            node.spiffe_id, public_key, ttl=self._d.config.agent_svid_ttl
        )
        self._d.datastore.set_node_new_serial(
            node.spiffe_id, serial=chain[0].serial_number,
            expires_at=_ts(chain[0].not_valid_after_utc), now=self._d.clock.now(),
        )
        count_svid("agent")
        event("agent renewed", agent_id=node.spiffe_id,
              serial=format(chain[0].serial_number, "x"))
        return agent_pb2.RenewAgentResponse(svid=svid_to_proto(node.spiffe_id, chain))

    @grpc_method("agent")
    def SyncAuthorized(
        self, request: agent_pb2.SyncAuthorizedRequest, context: grpc.ServicerContext
    ) -> agent_pb2.SyncAuthorizedResponse:
        """Every entry authorized for the agent in one message, and the bundles they need.

        Kept for simple clients; an agent with many entries needs
        SyncAuthorizedEntries, whose pages fit any message size limit.
        """
        node = self.authenticate(context)
        started = time.perf_counter()
        # Read the revision first: a change landing during the sync then shows up
        # as a newer revision next time instead of being missed.
        revision = self._d.datastore.current_revision()
        self._index.catch_up()
        entries = self._index.authorized_entries(
            agent_id=node.spiffe_id, node_selectors=node.selectors)
        bundles = self._bundles(
            sorted({td for e in entries for td in e.federates_with}, key=str))
        response = agent_pb2.SyncAuthorizedResponse(
            entries=[entry_to_proto(e) for e in entries],
            bundles={name: b.message for name, b in bundles.items()}, revision=revision
        )
        observe_sync_seconds(time.perf_counter() - started)
        return response

    @grpc_method("agent")
    def SyncAuthorizedEntries(
        self, request: agent_pb2.SyncAuthorizedRequest, context: grpc.ServicerContext
    ) -> Iterator[agent_pb2.SyncAuthorizedEntriesPage]:
        """What changed for the agent since the revision it holds, in pages."""
        node = self.authenticate(context)
        pages = sync_pages(self._index, request, agent_id=node.spiffe_id,
                           node_selectors=node.selectors, bundles_for=self._bundles)
        self.revocations.add_to_page(pages[0], request.known_revocation_id)
        return iter(pages)

    @grpc_method("agent")
    def BatchNewX509SVID(
        self, request: agent_pb2.BatchNewX509SVIDRequest, context: grpc.ServicerContext
    ) -> agent_pb2.BatchNewX509SVIDResponse:
        """Sign one X.509-SVID per (authorized entry, CSR); identity only from the entry."""
        node = self.authenticate(context)
        if len(request.params) > MAX_BATCH:
            raise InvalidArgumentError(
                f"a batch may hold at most {MAX_BATCH} CSRs, not {len(request.params)}"
            )
        self._rate.check_signing(str(node.spiffe_id), len(request.params))
        authorized = self._authorized(node, {p.entry_id for p in request.params})
        policy = self._d.config.policy.scope(node.spiffe_id, node.selectors)
        # Results are filled in place in the response: a message built apart and
        # then passed to its parent would be copied into it.
        response = agent_pb2.BatchNewX509SVIDResponse()
        issued = 0
        for param in request.params:
            issued += self._sign_one(node.spiffe_id, authorized, param, policy,
                                     response.results.add())
        count_svid("x509", issued)
        return response

    def _sign_one(
        self, agent_id: SpiffeId, authorized: dict[str, EntryRecord],
        param: agent_pb2.NewX509SVIDParams, policy: Scope,
        result: agent_pb2.BatchNewX509SVIDResult,
    ) -> bool:
        """Fill ``result`` with the SVID, or with why it is refused; True if signed."""
        def refused(code: grpc.StatusCode, message: str) -> bool:
            event("svid refused", level=logging.WARNING, agent_id=agent_id,
                  entry_id=param.entry_id, code=code.name, reason=message)
            result.entry_id = param.entry_id
            result.status.code = code.value[0]
            result.status.message = message
            return False

        entry = authorized.get(param.entry_id)
        if entry is None:
            return refused(grpc.StatusCode.PERMISSION_DENIED,
                           f"entry {param.entry_id!r} is not authorized for {agent_id}")
        try:
            public_key = _public_key_from_csr(param.csr)
        except InvalidArgumentError as exc:
            return refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        # The issuance policy (ca/config/policy.py), with this agent's ID and selectors:
        # cached per entry revision. A default TTL above its maximum is clamped.
        verdict = policy.verdict(entry)
        if verdict.violation is not None:
            return refused(grpc.StatusCode.PERMISSION_DENIED, str(verdict.violation))
        ttl = verdict.x509_ttl(entry.x509_svid_ttl, self._d.config.x509_svid_ttl)
        # Any name in the CSR is ignored: the entry alone decides the identity.
        chain = self._d.authority.sign_x509_svid(
            entry.spiffe_id, public_key, ttl=ttl, dns_names=entry.dns_names
        )
        result.entry_id = entry.id
        result.status.code = 0
        svid_to_proto(entry.spiffe_id, chain, into=result.svid)
        return True

    @grpc_method("agent")
    def NewJWTSVID(
        self, request: agent_pb2.NewJWTSVIDRequest, context: grpc.ServicerContext
    ) -> agent_pb2.NewJWTSVIDResponse:
        """Sign a JWT-SVID for an authorized entry."""
        node = self.authenticate(context)
        self._rate.check_signing(str(node.spiffe_id), 1)
        audience = list(request.audience)
        if not audience:
            raise InvalidArgumentError("at least one audience is required")
        if len(audience) > MAX_AUDIENCES:
            raise InvalidArgumentError(f"at most {MAX_AUDIENCES} audiences are allowed")
        for aud in audience:
            if not aud or len(aud) > MAX_AUDIENCE_LENGTH:
                raise InvalidArgumentError(
                    f"each audience must be 1 to {MAX_AUDIENCE_LENGTH} characters"
                )
        entry, ttl = self._token_entry(node, request.entry_id)
        signed = self._d.authority.sign_jwt_svid(entry.spiffe_id, audience, ttl=ttl)
        count_svid("jwt")
        return agent_pb2.NewJWTSVIDResponse(
            token=signed.token, spiffe_id=str(entry.spiffe_id),
            issued_at=_ts(signed.issued_at), expires_at=_ts(signed.expires_at),
        )

    def _token_entry(self, node: NodeRecord, entry_id: str) -> tuple[EntryRecord, dt.timedelta]:
        """The authorized entry a JWT- or WIT-SVID is asked for, and the token's TTL.

        Raises:
            PermissionDeniedError: the entry is not authorized for the node, or the
                issuance policy refuses it.
        """
        entry = self._authorized(node, [entry_id]).get(entry_id)
        if entry is None:
            raise PermissionDeniedError(
                f"entry {entry_id!r} is not authorized for {node.spiffe_id}")
        verdict = self._d.config.policy.scope(node.spiffe_id, node.selectors).verdict(entry)
        if verdict.violation is not None:
            raise PermissionDeniedError(str(verdict.violation))
        return entry, verdict.jwt_ttl(entry.jwt_svid_ttl, self._d.config.jwt_svid_ttl)

    @grpc_method("agent")
    def GetAttestationChallenge(
        self, request: agent_pb2.AttestationChallengeRequest, context: grpc.ServicerContext
    ) -> agent_pb2.AttestationChallengeResponse:
        """A fresh single-use nonce for a challenge-response attestor (x509pop, sshpop).

        Unauthenticated, like AttestAgent, so it shares AttestAgent's per-address
        rate limit: each nonce is a datastore row until answered or expired.
        """
        peer = context.peer()
        self._rate.check_attestation(self._peer_address(peer) or peer)
        attestor = request.type
        if attestor not in CHALLENGE_ATTESTORS or attestor not in self._d.node_verifiers:
            raise UnknownAttestorError(
                f"node attestor {attestor!r} is not enabled or takes no challenge")
        nonce, expires_at = issue_nonce(self._d.datastore, attestor=attestor,
                                        now=self._d.clock.now())
        return agent_pb2.AttestationChallengeResponse(nonce=nonce, expires_at=_ts(expires_at))

    @grpc_method("agent")
    def NewWITSVID(
        self, request: agent_pb2.NewWITSVIDRequest, context: grpc.ServicerContext
    ) -> agent_pb2.NewWITSVIDResponse:
        """Sign a WIT-SVID for an authorized entry, bound to the agent-made workload key.

        Authenticated, rate-limited and authorized exactly as NewJWTSVID; its
        lifetime is the entry's JWT-SVID TTL (both are short-lived tokens).
        """
        node = self.authenticate(context)
        self._rate.check_signing(str(node.spiffe_id), 1)
        if not request.public_key or len(request.public_key) > MAX_WIT_KEY_BYTES:
            raise InvalidArgumentError(
                f"public_key must be 1 to {MAX_WIT_KEY_BYTES} bytes of SubjectPublicKeyInfo")
        try:
            workload_key = load_public_key_der(request.public_key)  # weak keys refused
        except InvalidKeyError as exc:
            raise InvalidArgumentError(f"invalid workload public key: {exc}") from None
        entry, ttl = self._token_entry(node, request.entry_id)
        signed = self._d.authority.sign_wit_svid(entry.spiffe_id, workload_key, ttl=ttl)
        count_svid("wit")
        return agent_pb2.NewWITSVIDResponse(
            token=signed.token, spiffe_id=str(entry.spiffe_id),
            issued_at=_ts(signed.issued_at), expires_at=_ts(signed.expires_at),
        )
