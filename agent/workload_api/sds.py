"""Envoy's Secret Discovery Service (SDS v3) on the Workload API socket.

Envoy asks for TLS certificates and validation contexts by name over
``/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets``. The agent
answers from the same cache, for the same attested caller, as the Workload API:
the caller is identified by the credentials the front recorded for its
connection (Envoy sends no ``workload.spiffe.io`` header, so none is required
here) and sees only what its entries entitle it to.

The resource names are SPIRE's agent's, so Envoy configs written for SPIRE work
unchanged (docs/envoy.md):

- a SPIFFE ID of the caller: that X.509-SVID as a ``tls_certificate``;
- ``default`` (configurable): the caller's first X.509-SVID in the stable order;
- ``spiffe://<td>`` of our trust domain, or ``ROOTCA`` (configurable): our
  bundle as a ``validation_context`` with ``trusted_ca``;
- ``spiffe://<td>`` of a federated trust domain: its bundle, only when one of
  the caller's entries federates with it;
- ``ALL`` (configurable): every bundle the caller may see, each trust domain
  with its own roots, in Envoy's SPIFFE certificate validator
  (``custom_validator_config``), unless that is disabled;
- no name at all: the caller's SVIDs (by SPIFFE ID) and bundles (by trust
  domain ID), as SPIRE does.

State of the world, as SPIRE: every response carries ``version_info`` and a
``nonce``; a request that only acknowledges (or rejects, ``error_detail`` set:
logged, never answered by a resend) the last response sends nothing; a request
whose nonce is not the last one sent is stale and ignored; a new set of names,
or a change of what the names resolve to, sends the new state at once.

Where Sigil differs from SPIRE, on purpose: a name the caller is not entitled to
(or that names nothing) is logged and left out, and the known ones are answered;
when none is known, nothing is sent until one is (SPIRE ends the stream with
InvalidArgument; Envoy would reject an empty answer); the request's ``type_url`` must be
the Secret type's (or empty), else InvalidArgument (SPIRE does not check it);
``spiffe://<td>`` and ``ROOTCA`` are always ``trusted_ca`` (SPIRE sends Envoy
1.18+ a one-trust-domain SPIFFE validator instead; both verify the same chains,
and Envoy applies ``match_typed_subject_alt_names`` to either).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
from envoy.config.core.v3 import base_pb2, extension_pb2
from envoy.extensions.transport_sockets.tls.v3 import (
    common_pb2,
    secret_pb2,
    tls_spiffe_validator_config_pb2,
)
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2  # type: ignore[import-untyped,unused-ignore]

from agent import log
from agent.cache import Cache, CachedEntry, Identity, Snapshot
from agent.config import SdsSettings
from agent.workload_api.servicer import Caller, WorkloadApiServicer
from identity.bundle import Bundle
from identity.clock import Clock, SystemClock
from identity.errors import InvalidSpiffeIdError
from identity.selectors import Selector
from identity.spiffeid import SpiffeId, TrustDomain

SERVICE_NAME = "envoy.service.secret.v3.SecretDiscoveryService"
SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"  # noqa: S105 (a type name)
SPIFFE_VALIDATOR_NAME = "envoy.tls.cert_validator.spiffe"
# SPIRE's per-Envoy override of disable_spiffe_cert_validation, in the node metadata.
NODE_METADATA_DISABLE_KEY = "disable_spiffe_cert_validation"
# An Envoy asks for a handful of names per stream; a request is also capped in
# bytes by the server (MAX_SDS_REQUEST_BYTES, for Envoy's node description, which
# a stream does not keep). 2048 bytes is the longest SPIFFE ID a party must
# accept. What a stream keeps of its requests is thus at most 64 KiB.
MAX_RESOURCE_NAMES = 1024
MAX_RESOURCE_NAME_BYTES = 2048
MAX_RESOURCE_NAMES_TOTAL_BYTES = 64 * 1024
# SDS streams open at once, in all and per uid: an Envoy may hold one per secret it
# watches (a few per listener and cluster). More get ResourceExhausted.
DEFAULT_MAX_STREAMS = 8192
DEFAULT_MAX_STREAMS_PER_UID = 1024


class SecretDiscoveryServicer:
    """StreamSecrets and FetchSecrets (DeltaSecrets: Unimplemented).

    Args:
        workload: the Workload API servicer, whose caller attestation this shares.
        cache: where SVIDs and bundles come from.
        settings: resource names and switches (the agent's ``[sds]`` table).
        clock: to leave expired X.509-SVIDs out.
        first_response_timeout: how long a stream waits for SVIDs of entitled
            entries that are not signed yet before it answers with what it has.
        max_streams: SDS streams open at once.
        max_streams_per_uid: the same, per connecting uid.
    """

    def __init__(
        self,
        *,
        workload: WorkloadApiServicer,
        cache: Cache,
        settings: SdsSettings,
        clock: Clock | None = None,
        first_response_timeout: float = 5.0,
        max_streams: int = DEFAULT_MAX_STREAMS,
        max_streams_per_uid: int = DEFAULT_MAX_STREAMS_PER_UID,
    ) -> None:
        self._workload = workload
        self._cache = cache
        self._settings = settings
        self._clock = clock or SystemClock()
        self._first_timeout = first_response_timeout
        self._max_streams = max_streams
        self._max_streams_per_uid = max_streams_per_uid
        self._streams_by_uid: dict[int, int] = {}
        self._streams = 0
        # Caller views of the current cache version, by selectors (see _view).
        self._views: dict[frozenset[Selector], CallerView] = {}
        self._views_version = -1

    @property
    def stream_count(self) -> int:
        """SDS streams open now."""
        return self._streams

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler serving ``/envoy.service.secret.v3.SecretDiscoveryService/*``."""
        request = discovery_pb2.DiscoveryRequest.FromString
        response = discovery_pb2.DiscoveryResponse.SerializeToString
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "StreamSecrets": grpc.stream_stream_rpc_method_handler(
                    self.StreamSecrets, request_deserializer=request,
                    response_serializer=response),
                "FetchSecrets": grpc.unary_unary_rpc_method_handler(
                    self.FetchSecrets, request_deserializer=request,
                    response_serializer=response),
                "DeltaSecrets": grpc.stream_stream_rpc_method_handler(
                    self.DeltaSecrets,
                    request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                    response_serializer=discovery_pb2.DeltaDiscoveryResponse.SerializeToString),
            },
        )

    # RPCs ------------------------------------------------------------------------

    async def StreamSecrets(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """Answer the stream's requests, then push every change of what they name."""
        caller = await self._workload.identify(context)
        uid = caller.creds.uid
        held = self._streams_by_uid.get(uid, 0)
        if self._streams >= self._max_streams or held >= self._max_streams_per_uid:
            await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         "too many SDS streams open; close some and retry")
        self._streams += 1
        self._streams_by_uid[uid] = held + 1
        stream = _Stream(spiffe_validation=self._spiffe_validation(None))
        reader = asyncio.ensure_future(self._read(requests, stream))
        # The stream holds its entries' SVIDs in the bounded cache (never evicted,
        # signed on demand) until the RPC ends, however it ends.
        holder = object()
        try:
            await self._serve(caller, stream, reader, holder, context)
        finally:
            reader.cancel()
            self._cache.release(holder)
            self._streams -= 1
            left = self._streams_by_uid[uid] - 1
            if left:
                self._streams_by_uid[uid] = left
            else:
                del self._streams_by_uid[uid]

    async def FetchSecrets(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        """One answer for the request's names (no stream, no version to acknowledge)."""
        caller = await self._workload.identify(context)
        problem = _check_request(request)
        if problem:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        names = _names(request)
        holder = object()
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self._first_timeout
            synced = False
            while True:
                snap = self._cache.snapshot()
                view = self._view(snap, caller.selectors)
                if not view.entitled and not synced:
                    synced = True
                    await self._workload.sync_for_newcomer()
                    continue
                if not view.entitled:
                    await _abort(context, grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
                self._cache.use(holder, view.entry_ids)
                if len(view.identities) == len(view.entitled) or loop.time() >= deadline:
                    break
                await _wait_any(self._cache.wait_for_change(snap.version),
                                timeout=deadline - loop.time())
        finally:
            self._cache.release(holder)
        resolved = resolve(names, view, settings=self._settings,
                           spiffe_validation=self._spiffe_validation(request.node))
        _log_unknown(caller, resolved.unknown)
        await self._workload.check_alive(caller, context)
        return _response(resolved.secrets, version=resolved.digest(), nonce=secrets.token_hex(8))

    async def DeltaSecrets(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """Unimplemented, as in SPIRE: Envoy uses the state-of-the-world stream."""
        await _abort(context, grpc.StatusCode.UNIMPLEMENTED, "DeltaSecrets is not implemented")

    # The stream ------------------------------------------------------------------

    async def _read(self, requests: AsyncIterator[Any], stream: _Stream) -> None:
        """Take each request as it comes: nothing is queued, whatever the client sends."""
        async for request in requests:
            problem = _check_request(request)
            if problem:
                stream.error = problem
                stream.wake.set()
                return
            if request.HasField("node"):
                # Only what it says about ALL: the node itself may be large.
                stream.spiffe_validation = self._spiffe_validation(request.node)
            if stream.last_nonce and request.response_nonce != stream.last_nonce:
                # A reply to an older response: the state it answers is gone.
                log.event("sds request ignored", level=logging.DEBUG,
                          reason="stale nonce", nonce=request.response_nonce)
                continue
            if request.HasField("error_detail") and stream.last_nonce:
                # A NACK: Envoy keeps what it had. Resending the same state would
                # be rejected again, so nothing is sent until it changes.
                log.event("sds secrets rejected by the client", level=logging.WARNING,
                          version=request.version_info, nonce=request.response_nonce,
                          reason=request.error_detail.message[:1024])
            names = _names(request)
            if stream.names is None or set(names) != set(stream.names):
                stream.names = names
                stream.names_changed = True
                stream.wake.set()
        # The client closed its side: nothing more can be acknowledged, so the
        # stream ends (SPIRE does the same).
        stream.wake.set()

    async def _serve(
        self, caller: Caller, stream: _Stream, reader: asyncio.Future[None], holder: object,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        synced = False
        sent: bytes | None = None
        pending = False
        version = 0
        while True:
            if stream.error:
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, stream.error)
            if reader.done():
                error = None if reader.cancelled() else reader.exception()
                if error is not None:
                    raise error
                return
            stream.wake.clear()
            if stream.names is None:
                await _wait_any(stream.wake.wait())
                continue
            if deadline is None:
                deadline = loop.time() + self._first_timeout
            snap = self._cache.snapshot()
            view = self._view(snap, caller.selectors)
            if not view.entitled and not synced and sent is None:
                synced = True
                await self._workload.sync_for_newcomer()
                continue
            if not view.entitled:
                # As the Workload API: no identity (or none left) ends the stream.
                await _abort(context, grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
            self._cache.use(holder, view.entry_ids)
            if (sent is None and len(view.identities) < len(view.entitled)
                    and loop.time() < deadline):
                # SVIDs signed on demand are on their way: answer once with all.
                await _wait_any(self._cache.wait_for_change(snap.version), stream.wake.wait(),
                                timeout=deadline - loop.time())
                continue
            resolved = resolve(stream.names, view, settings=self._settings,
                               spiffe_validation=stream.spiffe_validation)
            content = resolved.key()
            if stream.names_changed:
                stream.names_changed = False
                pending = True
                _log_unknown(caller, resolved.unknown)
            # Never an empty answer to names: Envoy rejects one ("missing SDS
            # resources") and keeps what it has, so it would only cost a NACK.
            # The names are answered when something they name is there.
            if (pending or content != sent) and (resolved.secrets or not stream.names):
                version += 1
                nonce = secrets.token_hex(8)
                # Before the write: the acknowledgement may come back before it returns.
                stream.last_nonce = nonce
                pending = False
                sent = content
                await self._workload.check_alive(caller, context)
                await context.write(_response(resolved.secrets, version=str(version),
                                              nonce=nonce))
                log.event("sds secrets sent", level=logging.DEBUG, pid=caller.creds.pid,
                          version=version, count=len(resolved.secrets))
            await _wait_any(self._cache.wait_for_change(snap.version), stream.wake.wait(),
                            reader)

    def _view(self, snap: Snapshot, selectors: frozenset[Selector]) -> CallerView:
        """The caller view of ``selectors`` at ``snap``, shared by streams alike."""
        now = self._clock.now()
        if snap.version != self._views_version:
            self._views.clear()
            self._views_version = snap.version
        view = self._views.get(selectors)
        if view is None or (view.expires_first is not None and now >= view.expires_first):
            view = caller_view(snap, selectors, now=now)
            # Bounded: one per distinct set of selectors among the open streams.
            if len(self._views) < self._max_streams:
                self._views[selectors] = view
        return view

    def _spiffe_validation(self, node: Any) -> bool:
        """Whether ``ALL`` may be served: the agent's switch, which an Envoy may
        override in its node metadata (SPIRE's ``disable_spiffe_cert_validation``)."""
        disabled = self._settings.disable_spiffe_cert_validation
        if node is not None and node.HasField("metadata"):
            value = node.metadata.fields.get(NODE_METADATA_DISABLE_KEY)
            if value is not None:
                kind = value.WhichOneof("kind")
                if kind == "bool_value":
                    disabled = value.bool_value
                elif kind == "string_value" and value.string_value.lower() in ("true", "false"):
                    disabled = value.string_value.lower() == "true"
        return not disabled


@dataclass
class _Stream:
    """What one StreamSecrets stream has been asked and has sent."""

    names: tuple[str, ...] | None = None
    names_changed: bool = False
    last_nonce: str = ""
    spiffe_validation: bool = True
    """Whether ALL may be served (the agent's switch or the Envoy node's override)."""
    error: str = ""
    wake: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True, slots=True)
class Resolved:
    """The secrets a request's names resolve to, and the names that resolve to nothing."""

    secrets: tuple[Any, ...]
    unknown: tuple[str, ...]

    def key(self) -> bytes:
        """The secrets' deterministic encoding: equal keys, same state."""
        return b"".join(s.SerializeToString(deterministic=True) for s in self.secrets)

    def digest(self) -> str:
        """A short digest of :meth:`key`: FetchSecrets' version_info."""
        return hashlib.sha256(self.key()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class CallerView:
    """What one set of selectors may have at one cache version.

    Streams of callers with the same selectors (an Envoy's streams) share one,
    so a change costs each stream what its names need, not a pass over every
    entry the caller is entitled to.
    """

    trust_domain: TrustDomain
    entitled: tuple[CachedEntry, ...]
    entry_ids: frozenset[str]
    identities: tuple[Identity, ...]
    """Unexpired X.509-SVIDs, in the stable order."""
    by_id: Mapping[str, Identity]
    """The first identity of each SPIFFE ID."""
    bundles: Mapping[TrustDomain, Bundle]
    """Bundles with X.509 authorities the caller may see (own and federated)."""
    expires_first: dt.datetime | None
    """When the first of ``identities`` expires (the view is stale from then)."""


def caller_view(snap: Snapshot, selectors: frozenset[Selector], *, now: dt.datetime
                ) -> CallerView:
    """The :class:`CallerView` of ``selectors`` in ``snap`` at ``now``."""
    entitled = tuple(snap.entitled(selectors))
    # Never an expired SVID, even in the instant before the sync loop drops it.
    identities = tuple(i for i in snap.identities(entitled) if i.svid.expires_at > now)
    by_id: dict[str, Identity] = {}
    for identity in identities:
        # Two entries with one SPIFFE ID: the first in the stable order.
        by_id.setdefault(str(identity.entry.spiffe_id), identity)
    return CallerView(
        trust_domain=snap.trust_domain,
        entitled=entitled,
        entry_ids=frozenset(e.id for e in entitled),
        identities=identities,
        by_id=by_id,
        bundles={td: b for td, b in snap.bundles_for(entitled).items() if b.x509_authorities},
        expires_first=min((i.svid.expires_at for i in identities), default=None),
    )


def resolve(
    names: Sequence[str],
    view: CallerView,
    *,
    settings: SdsSettings,
    spiffe_validation: bool,
) -> Resolved:
    """The Secrets ``names`` ask for (everything the caller may have when empty).

    Args:
        names: resource names, in the order asked, without duplicates.
        view: what the caller may have.
        settings: the configured names and switches.
        spiffe_validation: whether ``ALL`` (the SPIFFE validator) may be served.
    """
    bundles, by_id, identities = view.bundles, view.by_id, view.identities
    own = view.trust_domain
    out: list[Any] = []
    unknown: list[str] = []
    if not names:
        if own in bundles:
            out.append(_trusted_ca(own.id_string(), bundles[own]))
        for td in sorted((t for t in bundles if t != own), key=lambda t: t.name):
            out.append(_trusted_ca(td.id_string(), bundles[td]))
        out.extend(_tls_certificate(name, i) for name, i in by_id.items())
        return Resolved(tuple(out), ())
    for name in names:
        secret: Any = None
        if name in by_id:
            secret = _tls_certificate(name, by_id[name])
        elif name == settings.default_svid_name:
            if identities:
                secret = _tls_certificate(name, identities[0])
        elif name == settings.default_bundle_name:
            if own in bundles:
                secret = _trusted_ca(name, bundles[own])
        elif name == settings.default_all_bundles_name:
            if spiffe_validation and bundles:
                secret = _spiffe_validator(name, bundles)
        else:
            named = _trust_domain_id(name)
            if named is not None and named in bundles:
                secret = _trusted_ca(name, bundles[named])
        if secret is None:
            unknown.append(name)
        else:
            out.append(secret)
    return Resolved(tuple(out), tuple(unknown))


def _trust_domain_id(name: str) -> TrustDomain | None:
    """The trust domain of ``spiffe://<td>`` (no path); None for anything else."""
    try:
        sid = SpiffeId.parse(name)
    except InvalidSpiffeIdError:
        return None
    return None if sid.has_path else sid.trust_domain


def _tls_certificate(name: str, identity: Identity) -> Any:
    return secret_pb2.Secret(
        name=name,
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_bytes=identity.svid.chain_pem()),
            private_key=base_pb2.DataSource(inline_bytes=identity.svid.key_pem()),
        ),
    )


def _trusted_ca(name: str, bundle: Bundle) -> Any:
    return secret_pb2.Secret(
        name=name,
        validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_bytes=bundle.x509_pem())),
    )


def _spiffe_validator(name: str, bundles: Mapping[TrustDomain, Bundle]) -> Any:
    """One validation context, each trust domain with its own roots: Envoy picks
    the roots by the trust domain of the peer's SPIFFE ID, never pooling them."""
    config = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig(
        trust_domains=[
            tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig.TrustDomain(
                name=td.name, trust_bundle=base_pb2.DataSource(inline_bytes=b.x509_pem()))
            for td, b in sorted(bundles.items(), key=lambda item: item[0].name)
        ]
    )
    typed = any_pb2.Any()
    typed.Pack(config)
    return secret_pb2.Secret(
        name=name,
        validation_context=common_pb2.CertificateValidationContext(
            custom_validator_config=extension_pb2.TypedExtensionConfig(
                name=SPIFFE_VALIDATOR_NAME, typed_config=typed)),
    )


def _response(resources: Sequence[Any], *, version: str, nonce: str) -> Any:
    response = discovery_pb2.DiscoveryResponse(
        version_info=version, type_url=SECRET_TYPE_URL, nonce=nonce)
    for secret in resources:
        response.resources.add().Pack(secret)
    return response


def _check_request(request: Any) -> str:
    """Why ``request`` is refused (InvalidArgument), or "" when it is acceptable."""
    if request.type_url not in ("", SECRET_TYPE_URL):
        return f"type_url must be {SECRET_TYPE_URL}, not {request.type_url[:200]!r}"
    if len(request.resource_names) > MAX_RESOURCE_NAMES:
        return (f"too many resource names: {len(request.resource_names)} "
                f"(at most {MAX_RESOURCE_NAMES})")
    total = 0
    for name in request.resource_names:
        size = len(name.encode())
        if size > MAX_RESOURCE_NAME_BYTES:
            return f"resource name longer than {MAX_RESOURCE_NAME_BYTES} bytes"
        total += size
    if total > MAX_RESOURCE_NAMES_TOTAL_BYTES:
        return f"resource names longer than {MAX_RESOURCE_NAMES_TOTAL_BYTES} bytes in all"
    return ""


def _names(request: Any) -> tuple[str, ...]:
    return tuple(dict.fromkeys(n for n in request.resource_names if n))


def _log_unknown(caller: Caller, unknown: Sequence[str]) -> None:
    if unknown:
        log.event("sds resources not available to the caller", level=logging.WARNING,
                  pid=caller.creds.pid, names=",".join(unknown)[:1024])


async def _wait_any(*waits: Any, timeout: float | None = None) -> None:
    """Until the first of ``waits`` (coroutines or futures) is done, or ``timeout``.

    Coroutines are wrapped here and cancelled when another one wins; futures passed
    in (the stream's reader) are left running.
    """
    owned = [asyncio.ensure_future(w) for w in waits if asyncio.iscoroutine(w)]
    others = [w for w in waits if not asyncio.iscoroutine(w)]
    try:
        await asyncio.wait([*owned, *others], timeout=timeout,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in owned:
            task.cancel()


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, details: str
) -> NoReturn:
    await context.abort(code, details)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover
