"""The agent's client of the server's agent API (``sigil.agent.v1.Agent``).

Transport: TLS to the server's bind address, verified against the trust bundle.
grpcio checks host names, not SPIFFE IDs, so we verify the server certificate's
DNS SAN ``server.sigil.invalid`` (docs/internals.md) via
``grpc.ssl_target_name_override``. AttestAgent runs over plain server-verified
TLS; every other call presents the agent's SVID as client certificate (mTLS).
When the agent SVID is renewed or the bundle changes, :meth:`ServerClient.configure`
rebuilds the channel.

Server messages are parsed here, at the edge, into identity types and
:class:`~agent.cache.CachedEntry`; a malformed one raises :class:`ServerCallError`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from cryptography import x509

from agent import log
from agent.cache import CachedEntry
from agent.config import parse_host_port
from agent.errors import BootstrapError, ServerCallError
from api.protos.sigil.agent.v1 import agent_pb2 as apb
from api.protos.sigil.types.v1 import types_pb2 as tpb
from identity.bundle import Bundle, JwtAuthority
from identity.errors import SigilError
from identity.jwtsvid import JwtSvid, parse_insecure
from identity.keys import (
    PrivateKey,
    PublicKey,
    load_jwt_public_key_der,
    private_key_to_pem,
    public_key_der,
    public_keys_equal,
)
from identity.refusal import reason_from_metadata
from identity.revocation import Revocation, RevocationList, verify_revocation_list
from identity.selectors import Selector
from identity.spiffeid import SpiffeId, TrustDomain
from identity.witsvid import WitSvid, parse_wit_svid_insecure
from identity.x509svid import X509Svid, certificates_to_pem, validate_leaf

SERVER_NAME = "server.sigil.invalid"
SERVICE = "/sigil.agent.v1.Agent/"
CALL_TIMEOUT = 30.0
# Responses carry every authorized entry and bundle: allow more than grpc's 4 MiB
# default, but stay bounded.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class AttestResult:
    """What AttestAgent returned."""

    svid: X509Svid
    bundle: Bundle


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What a sync returned: the complete set (``full``) or the changes since the
    revision we presented (``entries`` new or changed, ``removed`` ids)."""

    entries: tuple[CachedEntry, ...]
    bundles: dict[TrustDomain, Bundle]
    revision: int
    # DER signing certificates of our trust domain an operator tainted (agent/taint.py).
    tainted_x509: tuple[bytes, ...] = ()
    full: bool = True
    removed: tuple[str, ...] = ()
    generation: str = ""
    # Revocations new since the known_revocation_id presented (all of them when
    # revocations_full), and the id to present next (docs/internals.md, "Revocations").
    revocations: tuple[Revocation, ...] = ()
    revocation_id: int = 0
    revocations_full: bool = False


@dataclass(frozen=True, slots=True)
class SignResult:
    """One result of BatchNewX509SVID: a chain, or why there is none."""

    entry_id: str
    chain: tuple[x509.Certificate, ...] = ()
    error: str = ""


_HeldBundle = tuple[str, tpb.Bundle, Bundle | None]
MAX_KNOWN_BUNDLES = 1024
"""How many bundle digests the server accepts in one request (ca/api/sync.py)."""


def _held(digest: str, name: str, message: tpb.Bundle) -> _HeldBundle:
    try:
        return digest, message, bundle_from_proto(message)
    except SigilError as exc:
        log.event("bundle skipped", level=logging.WARNING, trust_domain=name, reason=str(exc))
        return digest, message, None


class ServerClient:
    """Calls the server's agent API over TLS / mTLS.

    Args:
        address: the server's ``HOST:PORT``.
        trust_domain: ours; every SPIFFE ID the server returns must be in it.
    """

    def __init__(self, *, address: str, trust_domain: TrustDomain) -> None:
        parse_host_port(address)
        self.address = address
        self.trust_domain = trust_domain
        self._channel: grpc.aio.Channel | None = None
        self._retired: set[grpc.aio.Channel] = set()
        # Bundles from the last sync, trust domain name -> (digest, message, parsed
        # or None if unusable): the server sends only those whose digest changed.
        self._held_bundles: dict[str, _HeldBundle] = {}

    def configure(self, *, roots_pem: bytes, svid: X509Svid | None = None) -> None:
        """(Re)build the channel: server-verified TLS, plus our SVID when given.

        The old channel is closed in the background: an in-flight call on it may
        finish, new calls use the new credentials.
        """
        if svid is not None:
            key: PrivateKey | None = svid.private_key
            assert key is not None
            creds = grpc.ssl_channel_credentials(
                root_certificates=roots_pem,
                private_key=private_key_to_pem(key),
                certificate_chain=svid.chain_pem(),
            )
        else:
            creds = grpc.ssl_channel_credentials(root_certificates=roots_pem)
        old = self._channel
        self._channel = grpc.aio.secure_channel(
            self.address,
            creds,
            options=[
                ("grpc.ssl_target_name_override", SERVER_NAME),
                ("grpc.default_authority", SERVER_NAME),
                ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
                # grpc shares connections between channels to the same target by
                # default; a connection made before we had an SVID would then be
                # reused without a client certificate. Each channel gets its own.
                ("grpc.use_local_subchannel_pool", 1),
            ],
        )
        if old is not None:
            self._retire(old)

    def _retire(self, channel: grpc.aio.Channel) -> None:
        # Calls already running on the old channel may finish; close it a little
        # later so renewals do not leak one channel each.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._retired.add(channel)

        def close() -> None:
            task = loop.create_task(channel.close(grace=None))
            task.add_done_callback(lambda _t: self._retired.discard(channel))

        loop.call_later(CALL_TIMEOUT, close)

    async def close(self) -> None:
        """Close the channel(s)."""
        for ch in (self._channel, *self._retired):
            if ch is not None:
                await ch.close()
        self._channel = None
        self._retired.clear()

    async def _call(self, method: str, request: object, response_type: type[object]) -> object:
        if self._channel is None:
            raise ServerCallError("the server client is not configured")
        call = self._channel.unary_unary(
            SERVICE + method,
            request_serializer=type(request).SerializeToString,  # type: ignore[attr-defined]
            response_deserializer=response_type.FromString,  # type: ignore[attr-defined]
        )
        try:
            return await call(request, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            raise _call_error(method, exc) from None

    async def server_trust_domain(self, *, roots_pem: bytes,
                                  bundle_path: str | None = None) -> TrustDomain:
        """The trust domain the server's SVID names (:func:`server_trust_domain`).

        Raises:
            BootstrapError: unreachable, not verified by ``roots_pem`` (read from
                ``bundle_path``, named in the message with the fix), or no SVID.
        """
        return await asyncio.to_thread(server_trust_domain, self.address, roots_pem=roots_pem,
                                       bundle_path=bundle_path)

    # Calls -------------------------------------------------------------------

    async def attestation_challenge(self, attestation_type: str) -> bytes:
        """GetAttestationChallenge: a fresh nonce for x509pop or sshpop.

        Raises:
            ServerCallError: refused (attestor not enabled) or unreachable.
        """
        request = apb.AttestationChallengeRequest(type=attestation_type)
        resp: apb.AttestationChallengeResponse = await self._call(  # type: ignore[assignment]
            "GetAttestationChallenge", request, apb.AttestationChallengeResponse
        )
        return resp.nonce

    async def attest(
        self, *, attestation_type: str, payload: bytes, csr: bytes, key: PrivateKey
    ) -> AttestResult:
        """AttestAgent: prove the node, get the agent SVID and the bundle.

        Raises:
            ServerCallError: refused (e.g. a used join token) or unreachable.
        """
        request = apb.AttestAgentRequest(
            data=apb.AttestationData(type=attestation_type, payload=payload), csr=csr
        )
        resp: apb.AttestAgentResponse = await self._call(  # type: ignore[assignment]
            "AttestAgent", request, apb.AttestAgentResponse
        )
        svid = self._svid(resp.svid, key)
        bundle = bundle_from_proto(resp.bundle)
        if bundle.trust_domain != self.trust_domain:
            raise ServerCallError(
                f"server returned the bundle of {bundle.trust_domain}, not {self.trust_domain}"
            )
        return AttestResult(svid=svid, bundle=bundle)

    async def renew(self, *, csr: bytes, key: PrivateKey) -> X509Svid:
        """RenewAgent: a new agent SVID for ``key``."""
        resp: apb.RenewAgentResponse = await self._call(  # type: ignore[assignment]
            "RenewAgent", apb.RenewAgentRequest(csr=csr), apb.RenewAgentResponse
        )
        return self._svid(resp.svid, key)

    async def sync(self, *, known_generation: str = "", known_revision: int = 0,
                   known_revocation_id: int = 0) -> SyncResult:
        """SyncAuthorizedEntries: what changed for us since the revision we hold.

        The server streams pages; they are applied only once the last one has
        arrived, so a stream cut short changes nothing. With no known revision, or
        one the server does not know (a restart, another server), the answer is
        the complete set (``full``).

        Bundles come by digest: the request names those held, the first page names
        every bundle to hold now and carries only the new or changed ones.

        Raises:
            ServerCallError: the call failed, the stream ended without its last
                page, or it kept a bundle version this agent does not hold.
        """
        if self._channel is None:
            raise ServerCallError("the server client is not configured")
        call = self._channel.unary_stream(
            SERVICE + "SyncAuthorizedEntries",
            request_serializer=apb.SyncAuthorizedRequest.SerializeToString,
            response_deserializer=apb.SyncAuthorizedEntriesPage.FromString,
        )
        request = apb.SyncAuthorizedRequest(
            known_generation=known_generation, known_revision=known_revision,
            known_bundle_digests=self.known_bundle_digests(),
            known_revocation_id=known_revocation_id)
        pages: list[apb.SyncAuthorizedEntriesPage] = []
        try:
            async for page in call(request, timeout=CALL_TIMEOUT):
                pages.append(page)
                if page.last:
                    break
        except grpc.aio.AioRpcError as exc:
            raise _call_error("SyncAuthorizedEntries", exc) from None
        if not pages or not pages[-1].last:
            raise ServerCallError("SyncAuthorizedEntries ended before its last page")
        first = pages[0]
        held = self._bundle_messages(first)
        entries = []
        removed: list[str] = []
        for page in pages:
            removed.extend(page.removed_entry_ids)
            for e in page.entries:
                try:
                    entries.append(entry_from_proto(e))
                except SigilError as exc:
                    # One bad entry must not stop every other workload's rotation.
                    log.event("entry skipped", level=logging.WARNING, entry_id=e.id,
                              reason=str(exc))
        bundles = {h[2].trust_domain: h[2] for h in held.values() if h[2] is not None}
        self._held_bundles = held
        own = held.get(self.trust_domain.name)
        tainted = tuple(own[1].tainted_x509_authorities) if own is not None else ()
        revocations = []
        for r in first.revocations:
            try:
                revocations.append(revocation_from_proto(r))
            except SigilError as exc:
                log.event("revocation skipped", level=logging.WARNING, revocation_id=r.id,
                          reason=str(exc))
        return SyncResult(tuple(entries), bundles, pages[-1].revision, tainted,
                          full=first.full_resync, removed=tuple(removed),
                          generation=pages[-1].generation, revocations=tuple(revocations),
                          revocation_id=first.revocation_id,
                          revocations_full=first.revocations_full)

    def known_bundle_digests(self) -> dict[str, str]:
        """What the next sync presents: the digest of every bundle held.

        Past the server's limit (:data:`MAX_KNOWN_BUNDLES`) none: it then sends
        every bundle, rather than refusing the request.
        """
        known = {n: h[0] for n, h in self._held_bundles.items() if h[0]}
        return known if len(known) <= MAX_KNOWN_BUNDLES else {}

    def _bundle_messages(self, first: apb.SyncAuthorizedEntriesPage) -> dict[str, _HeldBundle]:
        """Every bundle to hold after this sync: sent ones, and held ones named unchanged.

        Raises:
            ServerCallError: the page names a bundle by a digest we do not hold and
                does not send it (we then forget what we hold, so the next sync
                asks for every bundle).
        """
        if not first.bundle_digests:  # an older server: the bundles are the whole set
            return {name: _held("", name, b) for name, b in first.bundles.items()}
        held: dict[str, _HeldBundle] = {}
        for name, digest in first.bundle_digests.items():
            if name in first.bundles:
                held[name] = _held(digest, name, first.bundles[name])
                continue
            ours = self._held_bundles.get(name)
            if ours is None or ours[0] != digest:
                self._held_bundles = {}
                raise ServerCallError(
                    f"SyncAuthorizedEntries kept the bundle of {name} as held, but this "
                    "agent does not hold that version")
            held[name] = ours
        return held

    async def batch_new_x509_svid(
        self, params: Sequence[tuple[str, bytes]]
    ) -> list[SignResult]:
        """BatchNewX509SVID for (entry id, CSR DER) pairs."""
        request = apb.BatchNewX509SVIDRequest(
            params=[apb.NewX509SVIDParams(entry_id=i, csr=c) for i, c in params]
        )
        resp: apb.BatchNewX509SVIDResponse = await self._call(  # type: ignore[assignment]
            "BatchNewX509SVID", request, apb.BatchNewX509SVIDResponse
        )
        out = []
        for r in resp.results:
            if r.status.code != 0:
                out.append(SignResult(r.entry_id, error=r.status.message or str(r.status.code)))
                continue
            try:
                chain = tuple(x509.load_der_x509_certificate(d) for d in r.svid.cert_chain)
            except ValueError as exc:
                out.append(SignResult(r.entry_id, error=f"bad certificate: {exc}"))
                continue
            out.append(SignResult(r.entry_id, chain=chain))
        return out

    async def new_jwt_svid(self, entry_id: str, audience: Sequence[str]) -> JwtSvid:
        """NewJWTSVID for one entry."""
        resp: apb.NewJWTSVIDResponse = await self._call(  # type: ignore[assignment]
            "NewJWTSVID",
            apb.NewJWTSVIDRequest(entry_id=entry_id, audience=list(audience)),
            apb.NewJWTSVIDResponse,
        )
        try:
            return parse_insecure(resp.token, audience=list(audience))
        except SigilError as exc:
            raise ServerCallError(f"server returned an unusable JWT-SVID: {exc}") from None

    async def revocation_list(self, bundle: Bundle) -> RevocationList:
        """GetRevocationList: every unexpired revocation, verified with ``bundle``
        (our trust domain's: the list is signed with one of its JWT keys).

        Raises:
            ServerCallError: the call failed, or the list does not verify.
        """
        resp: apb.RevocationListResponse = await self._call(  # type: ignore[assignment]
            "GetRevocationList", apb.RevocationListRequest(), apb.RevocationListResponse)
        try:
            return verify_revocation_list(resp.signed_list, bundle=bundle)
        except SigilError as exc:
            raise ServerCallError(f"server returned an unusable revocation list: {exc}") from None

    async def new_wit_svid(self, entry: CachedEntry, public_key: PublicKey) -> WitSvid:
        """NewWITSVID for one entry and the workload key the agent made for it.

        Raises:
            ServerCallError: the call failed, or the token is not a WIT-SVID for
                this entry and key.
        """
        resp: apb.NewWITSVIDResponse = await self._call(  # type: ignore[assignment]
            "NewWITSVID",
            apb.NewWITSVIDRequest(entry_id=entry.id, public_key=public_key_der(public_key)),
            apb.NewWITSVIDResponse,
        )
        try:
            svid = parse_wit_svid_insecure(resp.token)
        except SigilError as exc:
            raise ServerCallError(f"server returned an unusable WIT-SVID: {exc}") from None
        if svid.spiffe_id != entry.spiffe_id:
            raise ServerCallError(
                f"server returned a WIT-SVID for {svid.spiffe_id}, not {entry.spiffe_id}")
        if not public_keys_equal(svid.confirmation_key, public_key):
            raise ServerCallError("server returned a WIT-SVID for another key")
        return svid

    def _svid(self, proto: tpb.X509SVID, key: PrivateKey) -> X509Svid:
        try:
            chain = tuple(x509.load_der_x509_certificate(d) for d in proto.cert_chain)
            if not chain:
                raise ServerCallError("server returned an empty certificate chain")
            spiffe_id = validate_leaf(chain[0])
        except (ValueError, SigilError) as exc:
            raise ServerCallError(f"server returned a bad SVID: {exc}") from None
        if not public_keys_equal(chain[0].public_key(), key.public_key()):
            raise ServerCallError("server returned an SVID for another key")
        if not spiffe_id.is_member_of(self.trust_domain):
            raise ServerCallError(f"server returned an SVID of another trust domain: {spiffe_id}")
        return X509Svid(spiffe_id, chain, key)


def _call_error(method: str, exc: grpc.aio.AioRpcError) -> ServerCallError:
    """A failed call as a ServerCallError, with the refusal reason the server sent."""
    code = exc.code()
    name = code.name if code else "UNKNOWN"
    details = exc.details() or ""
    if name == "UNAVAILABLE" and "CERTIFICATE_VERIFY_FAILED" in details:
        # grpc's text is a page of TLS internals; the cause is nearly always that the
        # server's CA changed (a new data directory, another server at that address).
        details = ("the server's CA is not in the agent's bundle (did the server get a new "
                   "CA?): fetch it with `sigil-server bundle show --format pem > bundle.pem`, "
                   "then restart the agent with --trust-bundle bundle.pem (and a new join "
                   "token if the server no longer knows it)")
    elif name == "UNAVAILABLE" and "Connection refused" in details:
        details = "cannot reach the server: connection refused (is it running?)"
    return ServerCallError(f"{method} failed: {name}: {details}", code=name,
                           reason=reason_from_metadata(exc.trailing_metadata()))


# Conversions -------------------------------------------------------------------------


def _unix_time(seconds: int) -> dt.datetime | None:
    return dt.datetime.fromtimestamp(seconds, dt.UTC) if seconds > 0 else None


def revocation_from_proto(r: tpb.Revocation) -> Revocation:
    """A revocation as a sync sends it (0 for an absent time).

    Raises:
        InvalidValueError: an unknown kind, an empty or oversized value.
    """
    return Revocation.from_json({
        "id": r.id, "kind": r.kind, "value": r.value,
        "not_before_max": r.not_before_max or None, "expires_at": r.expires_at or None,
        "created_at": r.created_at})


def bundle_from_proto(b: tpb.Bundle) -> Bundle:
    """A :class:`Bundle` from the server's message.

    Raises:
        SigilError: a bad trust domain, certificate or key.
    """
    try:
        certs = tuple(x509.load_der_x509_certificate(d) for d in b.x509_authorities)
    except ValueError as exc:
        raise ServerCallError(f"bundle of {b.trust_domain!r} has a bad certificate") from exc
    return Bundle(
        trust_domain=TrustDomain.parse(b.trust_domain),
        x509_authorities=certs,
        jwt_authorities=tuple(
            JwtAuthority(k.key_id, load_jwt_public_key_der(k.public_key),
                         _unix_time(k.expires_at))
            for k in b.jwt_authorities
        ),
        sequence_number=b.sequence_number or None,
        refresh_hint=b.refresh_hint or None,
        wit_authorities=tuple(
            JwtAuthority(k.key_id, load_jwt_public_key_der(k.public_key),
                         _unix_time(k.expires_at))
            for k in b.wit_authorities
        ),
    )


def entry_from_proto(e: tpb.Entry) -> CachedEntry:
    """A :class:`CachedEntry` from the server's message.

    Raises:
        SigilError: a bad SPIFFE ID, selector or trust domain.
    """
    return CachedEntry(
        id=e.id,
        spiffe_id=SpiffeId.parse(e.spiffe_id),
        parent_id=SpiffeId.parse(e.parent_id),
        selectors=frozenset(Selector(s.type, s.value) for s in e.selectors),
        x509_svid_ttl=e.x509_svid_ttl,
        jwt_svid_ttl=e.jwt_svid_ttl,
        dns_names=tuple(e.dns_names),
        federates_with=tuple(TrustDomain.parse(td) for td in e.federates_with),
        hint=e.hint,
        revision=e.revision,
    )


# Bootstrap ---------------------------------------------------------------------------


def fetch_bootstrap_root(address: str, *, timeout: float = 10.0) -> x509.Certificate:
    """Trust on first use: the self-signed CA the server presents, unverified.

    Only for ``--insecure-bootstrap``: anyone who can intercept this connection can
    make the agent trust them. The server sends its leaf and the CA root; we take
    the self-signed CA certificate of that chain.

    Raises:
        BootstrapError: unreachable, or no self-signed CA in the chain.
    """
    host, port = parse_host_port(address)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=SERVER_NAME) as tls:
            # ssl has no public API for the unverified chain before 3.13; this one
            # exists since 3.10.
            chain = tls._sslobj.get_unverified_chain()  # type: ignore[attr-defined]
            ders = [c.public_bytes(ssl._ssl.ENCODING_DER) for c in chain or ()]  # type: ignore[attr-defined]
    except OSError as exc:
        raise _unreachable(address, exc) from None
    for der in ders:
        cert = x509.load_der_x509_certificate(der)
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            continue
        if bc.ca and cert.issuer == cert.subject:
            return cert
    raise BootstrapError(
        f"the server at {address} did not present a self-signed CA certificate; "
        "pass its bundle with --trust-bundle"
    )


def _unreachable(address: str, exc: OSError) -> BootstrapError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    return BootstrapError(
        f"cannot reach the server at {address}: {reason.lower()}: is the server running, and "
        "is --server-address (server_address) its agent API's HOST:PORT?")


def _handshake_failed(address: str, exc: ssl.SSLError,
                      bundle_path: str | None) -> BootstrapError:
    """One line naming the cause and the fix of a failed TLS handshake with the server."""
    if bundle_path:
        bundle_source = bundle_path
        fetch = f"fetch it again with `sigil-server bundle show --format pem > {bundle_path}`"
    else:
        bundle_source = "the bundle the agent saved"
        fetch = ("fetch it with `sigil-server bundle show --format pem > bundle.pem` and pass "
                 "--trust-bundle bundle.pem")
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code == 62:  # X509_V_ERR_HOSTNAME_MISMATCH
            return BootstrapError(
                f"the service at {address} is not a Sigil server (its certificate is not "
                f"for {SERVER_NAME}): check --server-address")
        return BootstrapError(
            f"the server's CA is not in {bundle_source}: {fetch} (the server at {address}: "
            f"{exc.verify_message})")
    return BootstrapError(
        f"TLS handshake with the server at {address} failed ({exc.reason or exc}): is "
        "--server-address the server's agent API (bind_address), not another port?")


def server_trust_domain(address: str, *, roots_pem: bytes, timeout: float = 10.0,
                        bundle_path: str | None = None) -> TrustDomain:
    """The trust domain of the server at ``address``, from its SVID.

    A TLS handshake only (nothing is sent over it), verified like the agent API's
    channel: against ``roots_pem``, for the name ``server.sigil.invalid``. The
    agent calls this before attesting, so that it never hands attestation data
    (a single-use join token) to the server of another trust domain.

    Raises:
        BootstrapError: unreachable, the handshake failed (the bundle does not
            verify the server), or its certificate is not an X.509-SVID.
    """
    host, port = parse_host_port(address)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_alpn_protocols(["h2"])
    try:
        ctx.load_verify_locations(cadata=roots_pem.decode("ascii"))
        with socket.create_connection((host.strip("[]"), port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=SERVER_NAME) as tls:
            der = tls.getpeercert(binary_form=True)
    except ssl.SSLError as exc:
        raise _handshake_failed(address, exc, bundle_path) from None
    except OSError as exc:
        raise _unreachable(address, exc) from None
    if der is None:
        raise BootstrapError(f"the server at {address} presented no certificate")
    try:
        return validate_leaf(x509.load_der_x509_certificate(der)).trust_domain
    except (ValueError, SigilError) as exc:
        raise BootstrapError(
            f"the server at {address} presented a certificate that is not an SVID: {exc}"
        ) from None


def roots_pem(bundle: Bundle) -> bytes:
    """The X.509 authorities of a bundle as PEM, for grpc's root certificates."""
    return certificates_to_pem(bundle.x509_authorities)
