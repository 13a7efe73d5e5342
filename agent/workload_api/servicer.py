"""The SPIFFE Workload API servicer (DESIGN flow 5; SPIFFE-NOTES §6 and §7).

Registered under the bare service name ``SpiffeWorkloadAPI`` with grpc's generic
handlers and our ``sigil.workload.v1`` messages, so calls travel as
``/SpiffeWorkloadAPI/<Method>`` exactly as every SPIFFE client expects, while our
messages never collide with py-spiffe's package-less ones in one process.

Every RPC first checks the ``workload.spiffe.io: true`` header, then identifies
the caller by the credentials the front recorded for its connection, attests it,
and checks that the attested process still owns its PID. Status codes are chosen
here and only here.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import grpc
from google.protobuf import struct_pb2  # type: ignore[import-untyped,unused-ignore]

from agent import log, metrics
from agent.cache import Cache, CachedEntry, Identity, Snapshot
from agent.errors import AgentError, ServerCallError
from agent.workload_api.front import PeerCredentials
from agent.workload_api.names import SECURITY_HEADER as SECURITY_HEADER  # re-exported
from agent.workload_api.names import SERVICE_NAME as SERVICE_NAME  # re-exported
from api.protos import workload_pb2 as pb
from attestation.workload import (
    DEFAULT_PROC_ROOT,
    ProcessInfo,
    WorkloadAttestationError,
    WorkloadAttestor,
    process_start_time,
)
from attestation.workload.peersocket import executable_identity
from identity.bundle import Bundle, BundleSet
from identity.clock import Clock, SystemClock
from identity.errors import InvalidSpiffeIdError, JwtSvidError
from identity.jwtsvid import validate_jwt_svid
from identity.selectors import Selector
from identity.spiffeid import SpiffeId, TrustDomain
from identity.witsvid import private_jwk

NO_IDENTITY = "no identity issued"
HEADER_MISSING = "security header missing from request"
# Bounds on what a caller may ask for, checked before anything goes to the server
# (the whole request is also capped at MAX_REQUEST_BYTES by grpc). 2048 bytes is
# the longest SPIFFE ID a party must accept; audiences are usually SPIFFE IDs.
MAX_AUDIENCES = 32
MAX_AUDIENCE_BYTES = 2048
# After a failed WIT-SVID renewal, an open FetchWITSVID stream tries again this
# soon (the token it already sent is still valid until its end of life).
WIT_RETRY_SECONDS = 5.0

PeerLookup = Callable[[str], PeerCredentials | None]
SyncRequest = Callable[[], Awaitable[None]]


class WorkloadApiServicer:
    """The five Workload API RPCs and the two of the WIT-SVID profile.

    Args:
        cache: where identities, SVIDs and bundles come from.
        peers: maps ``context.peer()`` to the credentials the front recorded.
        attestors: the workload attestors to run on each caller.
        proc_root: the /proc to read (a fixture tree in tests).
        clock: time for JWT validation, and to leave expired X.509-SVIDs out.
        first_response_timeout: how long a stream waits for SVIDs of entitled
            entries that the agent has not had signed yet before it answers with
            what it has (or Unavailable when it has none).
        request_sync: called once per RPC when the caller has no identity, before
            refusing it, so an entry registered since the last sync is found
            (the manager coalesces and rate-limits these).
    """

    def __init__(
        self,
        *,
        cache: Cache,
        peers: PeerLookup,
        attestors: Sequence[WorkloadAttestor],
        proc_root: Path = DEFAULT_PROC_ROOT,
        clock: Clock | None = None,
        first_response_timeout: float = 5.0,
        request_sync: SyncRequest | None = None,
    ) -> None:
        self._request_sync = request_sync
        self._cache = cache
        self._peers = peers
        self._attestors = tuple(attestors)
        self._proc_root = proc_root
        self._clock = clock or SystemClock()
        self._first_timeout = first_response_timeout

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler serving ``/SpiffeWorkloadAPI/<Method>``."""
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "FetchX509SVID": grpc.unary_stream_rpc_method_handler(
                    self.FetchX509SVID,
                    request_deserializer=pb.X509SVIDRequest.FromString,
                    response_serializer=pb.X509SVIDResponse.SerializeToString,
                ),
                "FetchX509Bundles": grpc.unary_stream_rpc_method_handler(
                    self.FetchX509Bundles,
                    request_deserializer=pb.X509BundlesRequest.FromString,
                    response_serializer=pb.X509BundlesResponse.SerializeToString,
                ),
                "FetchJWTSVID": grpc.unary_unary_rpc_method_handler(
                    self.FetchJWTSVID,
                    request_deserializer=pb.JWTSVIDRequest.FromString,
                    response_serializer=pb.JWTSVIDResponse.SerializeToString,
                ),
                "FetchJWTBundles": grpc.unary_stream_rpc_method_handler(
                    self.FetchJWTBundles,
                    request_deserializer=pb.JWTBundlesRequest.FromString,
                    response_serializer=pb.JWTBundlesResponse.SerializeToString,
                ),
                "ValidateJWTSVID": grpc.unary_unary_rpc_method_handler(
                    self.ValidateJWTSVID,
                    request_deserializer=pb.ValidateJWTSVIDRequest.FromString,
                    response_serializer=pb.ValidateJWTSVIDResponse.SerializeToString,
                ),
                "FetchWITSVID": grpc.unary_stream_rpc_method_handler(
                    self.FetchWITSVID,
                    request_deserializer=pb.WITSVIDRequest.FromString,
                    response_serializer=pb.WITSVIDResponse.SerializeToString,
                ),
                "FetchWITBundles": grpc.unary_stream_rpc_method_handler(
                    self.FetchWITBundles,
                    request_deserializer=pb.WITBundlesRequest.FromString,
                    response_serializer=pb.WITBundlesResponse.SerializeToString,
                ),
            },
        )

    # The caller --------------------------------------------------------------

    async def _caller(self, context: grpc.aio.ServicerContext[Any, Any]) -> _Caller:
        """Check the header, identify and attest the caller.

        Aborts the RPC with InvalidArgument (header) or PermissionDenied (unknown
        connection, process gone or PID reused).
        """
        values = [v for k, v in (context.invocation_metadata() or ()) if k == SECURITY_HEADER]
        # SPIRE's rule: exactly one value, exactly "true".
        if values != ["true"]:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, HEADER_MISSING)
        return await self.identify(context)

    async def identify(self, context: grpc.aio.ServicerContext[Any, Any]) -> _Caller:
        """Identify and attest the caller, without the security header check.

        For the services that share the socket but not the Workload API's header
        (Envoy's SDS sends none). Aborts the RPC with PermissionDenied (unknown
        connection, process gone or PID reused).
        """
        creds = self._peers(context.peer())
        if creds is None:
            # Not a connection the front made: someone reached the internal socket
            # directly. Only the agent's own user could, but refuse it anyway.
            log.event("workload refused", level=logging.WARNING,
                      reason="connection not made by the front")
            await _abort(context, grpc.StatusCode.PERMISSION_DENIED, "caller not identified")
        try:
            selectors = await self._attest_all(creds)
        except WorkloadAttestationError as exc:
            # Process gone or /proc unreadable: whatever we could say about this
            # caller might describe another process, so it gets nothing.
            log.event("workload attestation failed", level=logging.WARNING,
                      pid=creds.pid, reason=str(exc))
            await _abort(
                context, grpc.StatusCode.PERMISSION_DENIED, f"workload attestation failed: {exc}"
            )
        caller = _Caller(creds, frozenset(selectors))
        await self._check_alive(caller, context)
        return caller

    async def _attest_all(self, creds: PeerCredentials) -> list[Selector]:
        """Every attestor's selectors: on the loop where one can answer without
        waiting (WorkloadAttestor, ``attest_without_waiting``), else in a thread."""
        process = ProcessInfo(pid=creds.pid, uid=creds.uid, gid=creds.gid)
        selectors: list[Selector] = []
        waiting: list[WorkloadAttestor] = []
        for attestor in self._attestors:
            quick = getattr(attestor, "attest_without_waiting", None)
            got = quick(process) if quick is not None else None
            if got is None:
                waiting.append(attestor)
            else:
                selectors.extend(got)
        if waiting:
            # run_in_executor rather than to_thread: nothing here reads context
            # variables, so copying them for every call buys nothing.
            selectors += await asyncio.get_running_loop().run_in_executor(
                None, self._attest, creds, waiting)
        return selectors

    @staticmethod
    def _attest(creds: PeerCredentials, attestors: Sequence[WorkloadAttestor]
                ) -> list[Selector]:
        process = ProcessInfo(pid=creds.pid, uid=creds.uid, gid=creds.gid)
        selectors: list[Selector] = []
        for attestor in attestors:
            selectors.extend(attestor.attest(process))
        return selectors

    async def check_alive(
        self, caller: _Caller, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """Abort unless the caller is still the process that was attested (see
        :meth:`_check_alive`); for the other services on the socket."""
        await self._check_alive(caller, context)

    async def sync_for_newcomer(self) -> None:
        """One fresh sync for a caller without identity (bounded by the first
        response timeout); for the other services on the socket."""
        await self._sync_for_newcomer()

    async def _check_alive(
        self, caller: _Caller, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """Abort unless the PID still names the process the front recorded.

        Run after attestation and before every answer: if the process exited and its
        PID went to another process, what we attested is no longer who asked. The
        pidfd (where the kernel has one) catches an exit even when the PID was reused
        within one clock tick, which the start time alone cannot tell apart.
        """
        if caller.creds.process_exited():
            log.event("workload refused", level=logging.WARNING, pid=caller.creds.pid,
                      reason="process exited")
            await _abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"process {caller.creds.pid} is gone or its PID was reused",
            )
        await self._check_executable(caller, context)
        if caller.creds.pidfd is not None:
            # The pinned process is alive, so its PID cannot have been reused: the
            # start time cannot have changed, and reading it would cost a thread hop.
            return
        try:
            now = await asyncio.to_thread(
                process_start_time, caller.creds.pid, proc_root=self._proc_root
            )
        except WorkloadAttestationError:
            now = None
        if now != caller.creds.start_time:
            log.event("workload refused", level=logging.WARNING, pid=caller.creds.pid,
                      reason="process gone or PID reused")
            await _abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"process {caller.creds.pid} is gone or its PID was reused",
            )

    async def _check_executable(
        self, caller: _Caller, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """Abort unless the process runs the binary it ran when it connected, and
        still holds its end of the connection (when the front pinned those: an
        attestor's selectors describe the executable).

        Otherwise a process could connect, hand the connection to a child and exec
        a binary with an identity: the child would be answered as that binary.
        A stat and (once the descriptor is known) a readlink.
        """
        creds = caller.creds
        if creds.peer_socket is None:
            return
        reason = ""
        try:
            if creds.executable is None:
                reason = "had an executable the agent could not read when it connected"
            elif executable_identity(creds.pid, proc_root=self._proc_root) != creds.executable:
                reason = "runs another executable than when it connected"
            elif not creds.peer_socket.held_by(creds.pid, proc_root=self._proc_root):
                reason = "no longer holds its connection"
        except WorkloadAttestationError:
            reason = "is gone"
        if reason:
            log.event("workload refused", level=logging.WARNING, pid=creds.pid,
                      reason=f"process {reason}")
            await _abort(context, grpc.StatusCode.PERMISSION_DENIED,
                         f"process {creds.pid} {reason}")

    async def _sync_for_newcomer(self) -> None:
        """Give a caller without identity one fresh sync before refusing it."""
        if self._request_sync is None:
            return
        try:
            await asyncio.wait_for(self._request_sync(), self._first_timeout)
        except TimeoutError:
            pass

    async def _entitled(
        self, caller: _Caller, context: grpc.aio.ServicerContext[Any, Any], *, may_sync: bool
    ) -> tuple[Snapshot, list[CachedEntry], bool]:
        """The cache now and the caller's entries in it; PermissionDenied when it has none.

        With ``may_sync`` (a stream that has sent nothing and not synced yet), a
        caller without entries first gets one sync, so an entry registered since
        the last sync is found.

        Returns:
            (snapshot, entitled entries, whether a sync was requested).
        """
        snap = self._cache.snapshot()
        entitled = snap.entitled(caller.selectors)
        synced = False
        if not entitled and may_sync:
            synced = True
            await self._sync_for_newcomer()
            snap = self._cache.snapshot()
            entitled = snap.entitled(caller.selectors)
        if not entitled:
            _log_denied(caller, "no identity")
            await _abort(context, grpc.StatusCode.PERMISSION_DENIED, NO_IDENTITY)
        return snap, entitled, synced

    async def _wait(self, version: int, timeout: float | None) -> None:
        try:
            await asyncio.wait_for(self._cache.wait_for_change(version), timeout)
        except TimeoutError:
            pass

    # X.509 -------------------------------------------------------------------

    async def FetchX509SVID(
        self, request: pb.X509SVIDRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.X509SVIDResponse]:
        """Stream the caller's X.509-SVIDs: at once, then on every change.

        Never ends normally (py-spiffe 0.3.2 reconnects in a loop when it does);
        ends with PermissionDenied when the caller has, or comes to have, no identity.
        """
        metrics.count_call("FetchX509SVID")
        caller = await self._caller(context)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._first_timeout
        last: pb.X509SVIDResponse | None = None
        synced = False
        # The stream holds its entries' SVIDs in the bounded cache (never evicted,
        # signed on demand) until the RPC ends, however it ends.
        holder = object()
        context.add_done_callback(lambda _ctx: self._cache.release(holder))
        while True:
            snap, entitled, did_sync = await self._entitled(
                caller, context, may_sync=last is None and not synced
            )
            synced = synced or did_sync
            self._cache.use(holder, (e.id for e in entitled))
            # Never an expired SVID, even in the instant before the sync loop
            # drops it from the cache (which wakes this stream).
            now = self._clock.now()
            identities = [i for i in snap.identities(entitled)
                          if _x509_bundle(snap, i) and i.svid.expires_at > now]
            complete = len(identities) == len(entitled)
            waiting_first = last is None and not complete and loop.time() < deadline
            if identities and not waiting_first:
                response = _x509_svid_response(snap, identities, entitled)
                if response != last:
                    await self._check_alive(caller, context)
                    yield response
                    last = response
            elif not identities and last is None and loop.time() >= deadline:
                await _abort(
                    context, grpc.StatusCode.UNAVAILABLE, "X.509-SVIDs not issued yet; retry"
                )
            timeout = max(0.0, deadline - loop.time()) if last is None else None
            await self._wait(snap.version, timeout)

    async def FetchX509Bundles(
        self, request: pb.X509BundlesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.X509BundlesResponse]:
        """Stream the X.509 bundles the caller may see (own trust domain + federated)."""
        metrics.count_call("FetchX509Bundles")
        caller = await self._caller(context)
        async for bundles in self._bundle_updates(caller, context):
            response = pb.X509BundlesResponse()
            for td, bundle in bundles.items():
                der = bundle.x509_der()
                if der:
                    response.bundles[td.id_string()] = der
            yield response

    async def FetchJWTBundles(
        self, request: pb.JWTBundlesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.JWTBundlesResponse]:
        """Stream the JWT bundles (plain JWKS of jwt-svid keys) the caller may see."""
        metrics.count_call("FetchJWTBundles")
        caller = await self._caller(context)
        async for bundles in self._bundle_updates(caller, context):
            response = pb.JWTBundlesResponse()
            for td, bundle in bundles.items():
                response.bundles[td.id_string()] = bundle.jwt_jwks()
            yield response

    async def _bundle_updates(
        self, caller: _Caller, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[dict[TrustDomain, Bundle]]:
        """The caller's bundles now and after every change that alters them."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._first_timeout
        last: dict[str, bytes] | None = None
        synced = False
        while True:
            snap, entitled, did_sync = await self._entitled(
                caller, context, may_sync=last is None and not synced
            )
            synced = synced or did_sync
            bundles = snap.bundles_for(entitled)
            if snap.trust_domain in bundles:
                key = {td.name: b.to_json() for td, b in bundles.items()}
                if key != last:
                    await self._check_alive(caller, context)
                    yield bundles
                    last = key
            elif last is None and loop.time() >= deadline:
                await _abort(context, grpc.StatusCode.UNAVAILABLE, "bundle not available yet")
            timeout = max(0.0, deadline - loop.time()) if last is None else None
            await self._wait(snap.version, timeout)

    # JWT ---------------------------------------------------------------------

    async def FetchJWTSVID(
        self, request: pb.JWTSVIDRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.JWTSVIDResponse:
        """JWT-SVIDs for every identity of the caller (or the one requested)."""
        metrics.count_call("FetchJWTSVID")
        caller = await self._caller(context)
        audience = list(dict.fromkeys(a for a in request.audience if a))
        if not audience:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        await _check_audience_bounds(context, audience)
        wanted: SpiffeId | None = None
        if request.spiffe_id:
            try:
                wanted = SpiffeId.parse(request.spiffe_id)
            except InvalidSpiffeIdError as exc:
                await _abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"invalid requested SPIFFE ID: {exc}",
                )
        entitled = self._cache.snapshot().entitled(caller.selectors)
        if not entitled:
            await self._sync_for_newcomer()
            entitled = self._cache.snapshot().entitled(caller.selectors)
        if wanted is not None:
            entitled = [e for e in entitled if e.spiffe_id == wanted]
        if not entitled:
            _log_denied(caller, "no identity" if wanted is None else f"no identity {wanted}")
            await _abort(context, grpc.StatusCode.PERMISSION_DENIED, NO_IDENTITY)
        # Tokens for the same SPIFFE ID are interchangeable: one per ID, first
        # entry in the stable order.
        seen: set[SpiffeId] = set()
        response = pb.JWTSVIDResponse()
        for entry in entitled:
            if entry.spiffe_id in seen:
                continue
            seen.add(entry.spiffe_id)
            try:
                svid = await self._cache.jwt_svid(entry, audience)
            except AgentError as exc:
                log.event("jwt-svid fetch failed", level=logging.WARNING,
                          spiffe_id=entry.spiffe_id, reason=str(exc))
                await _abort(
                    context, grpc.StatusCode.UNAVAILABLE, f"could not fetch JWT-SVID: {exc}"
                )
            response.svids.append(
                pb.JWTSVID(spiffe_id=str(entry.spiffe_id), svid=svid.token, hint=entry.hint)
            )
        await self._check_alive(caller, context)
        return response

    async def ValidateJWTSVID(
        self, request: pb.ValidateJWTSVIDRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ValidateJWTSVIDResponse:
        """Validate a JWT-SVID against the agent's JWT bundles."""
        metrics.count_call("ValidateJWTSVID")
        caller = await self._caller(context)
        if not request.audience:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        if not request.svid:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "svid must be specified")
        await _check_audience_bounds(context, [request.audience])
        snap = self._cache.snapshot()
        # The caller's own trust domain and those its entries federate with: the
        # bundles it could fetch itself, and no others.
        bundles = snap.bundles_for(snap.entitled(caller.selectors))
        try:
            svid = validate_jwt_svid(
                request.svid,
                bundles=BundleSet(bundles.values()),
                audience=request.audience,
                now=self._clock.now(),
            )
        except (JwtSvidError, InvalidSpiffeIdError) as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        # Our server's revocations name our trust domain's tokens only.
        if (svid.spiffe_id.trust_domain == self._cache.trust_domain
                and self._cache.jwt_revoked(svid)):
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         "token is revoked (its jti or signing key)")
        claims = struct_pb2.Struct()
        doc = dict(svid.claims)
        # A single-string aud is legal in a JWT; hand it out as a list, as SPIRE does.
        if isinstance(doc.get("aud"), str):
            doc["aud"] = [doc["aud"]]
        claims.update(doc)
        await self._check_alive(caller, context)
        return pb.ValidateJWTSVIDResponse(spiffe_id=str(svid.spiffe_id), claims=claims)

    # WIT-SVID profile (spiffe/spiffe standards/workloadapiwitsvid.proto) -----

    async def FetchWITSVID(
        self, request: pb.WITSVIDRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WITSVIDResponse]:
        """Stream the caller's WIT-SVIDs with their private keys (JWK): at once, then
        whenever one is replaced (jittered half-life) or the caller's entries change.

        One WIT-SVID per SPIFFE ID, in the stable entry order (``svids[0]`` is the
        default identity). The key pair of each is made in this agent; the server
        only saw the public half. Never ends normally; PermissionDenied when the
        caller has, or comes to have, no identity.
        """
        caller = await self._caller(context)
        wanted: SpiffeId | None = None
        if request.spiffe_id:
            try:
                wanted = SpiffeId.parse(request.spiffe_id)
            except InvalidSpiffeIdError as exc:
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                             f"invalid requested SPIFFE ID: {exc}")
        last: pb.WITSVIDResponse | None = None
        synced = False
        while True:
            snap, entitled, did_sync = await self._entitled(
                caller, context, may_sync=last is None and not synced
            )
            synced = synced or did_sync
            if wanted is not None:
                entitled = [e for e in entitled if e.spiffe_id == wanted]
                if not entitled:
                    await _abort(context, grpc.StatusCode.PERMISSION_DENIED, NO_IDENTITY)
            response = pb.WITSVIDResponse()
            seen: set[SpiffeId] = set()
            hints: set[str] = set()
            refresh_at: dt.datetime | None = None
            failed = False
            for entry in entitled:
                if entry.spiffe_id in seen:
                    continue
                seen.add(entry.spiffe_id)
                try:
                    item = await self._cache.wit_svid(entry)
                except AgentError as exc:
                    log.event("wit-svid fetch failed", level=logging.WARNING,
                              spiffe_id=entry.spiffe_id, reason=str(exc))
                    if isinstance(exc, ServerCallError) and exc.code == "UNIMPLEMENTED":
                        # A server without WIT-SVIDs: the profile is unsupported, which
                        # the draft proto says to answer with Unimplemented (no retry).
                        await _abort(context, grpc.StatusCode.UNIMPLEMENTED,
                                     "the server does not issue WIT-SVIDs")
                    if last is None:
                        await _abort(context, grpc.StatusCode.UNAVAILABLE,
                                     f"could not fetch WIT-SVID: {exc}")
                    failed = True  # keep what the caller has; retry shortly
                    break
                hint = entry.hint if entry.hint not in hints else ""
                hints.add(hint)
                response.svids.append(pb.WITSVID(
                    spiffe_id=str(entry.spiffe_id), wit_svid=item.svid.token,
                    wit_svid_key=json.dumps(private_jwk(item.key), separators=(",", ":")),
                    hint=hint,
                ))
                if refresh_at is None or item.refresh_at < refresh_at:
                    refresh_at = item.refresh_at
            if not failed and response != last:
                await self._check_alive(caller, context)
                yield response
                last = response
            if failed:
                timeout: float | None = WIT_RETRY_SECONDS
            elif refresh_at is not None:
                timeout = max(0.0, (refresh_at - self._clock.now()).total_seconds())
            else:
                timeout = None
            await self._wait(snap.version, timeout)

    async def FetchWITBundles(
        self, request: pb.WITBundlesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WITBundlesResponse]:
        """Stream the WIT bundles (JWK sets of wit-svid keys) the caller may see.

        Our own trust domain always (an empty key set when it has no WIT keys);
        a federated one when its bundle has wit-svid keys (WIT-SVID §6.2: without
        them it does not support WIT-SVIDs). ``more`` is never set: one message
        is always the whole set.
        """
        caller = await self._caller(context)
        async for bundles in self._bundle_updates(caller, context):
            response = pb.WITBundlesResponse()
            for td, bundle in bundles.items():
                if td == self._cache.trust_domain or bundle.wit_authorities:
                    response.bundles[td.id_string()] = bundle.wit_jwks()
            yield response


class _Caller:
    """An attested caller: its credentials and selectors (:data:`Caller`)."""

    __slots__ = ("creds", "selectors")

    def __init__(self, creds: PeerCredentials, selectors: frozenset[Selector]) -> None:
        self.creds = creds
        self.selectors = selectors


async def _check_audience_bounds(
    context: grpc.aio.ServicerContext[Any, Any], audience: Sequence[str]
) -> None:
    if len(audience) > MAX_AUDIENCES:
        await _abort(
            context, grpc.StatusCode.INVALID_ARGUMENT,
            f"too many audiences: {len(audience)} (at most {MAX_AUDIENCES})",
        )
    for value in audience:
        if len(value.encode()) > MAX_AUDIENCE_BYTES:
            await _abort(
                context, grpc.StatusCode.INVALID_ARGUMENT,
                f"audience longer than {MAX_AUDIENCE_BYTES} bytes",
            )


def _log_denied(caller: _Caller, reason: str) -> None:
    """At debug: who was refused, and the selectors it has (what to register for it)."""
    log.event("workload denied", level=logging.DEBUG, pid=caller.creds.pid,
              uid=caller.creds.uid, gid=caller.creds.gid, reason=reason,
              selectors=",".join(sorted(str(s) for s in caller.selectors)))


def _denial_reason(details: str) -> str:
    """The metrics label of a PERMISSION_DENIED answer, from its message."""
    if details == NO_IDENTITY:
        return "no_identity"
    if details == "caller not identified":
        return "not_identified"
    if details.startswith("workload attestation failed"):
        return "attestation_failed"
    if details.endswith(("is gone or its PID was reused", " is gone")):
        return "process_gone"
    return "process_changed"


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, details: str
) -> NoReturn:
    if code == grpc.StatusCode.PERMISSION_DENIED:
        metrics.count_denial(_denial_reason(details))
    await context.abort(code, details)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


def _x509_bundle(snap: Snapshot, identity: Identity) -> bytes:
    bundle = snap.bundles.get(identity.entry.spiffe_id.trust_domain)
    return bundle.x509_der() if bundle is not None else b""


def _x509_svid_response(
    snap: Snapshot, identities: list[Identity], entitled: list[CachedEntry]
) -> pb.X509SVIDResponse:
    response = pb.X509SVIDResponse()
    hints: set[str] = set()
    for identity in identities:
        hint = identity.entry.hint
        # Hints must be unique within a response; clients keep the first anyway.
        if hint in hints:
            hint = ""
        hints.add(hint)
        response.svids.append(
            pb.X509SVID(
                spiffe_id=str(identity.svid.spiffe_id),
                x509_svid=identity.svid.chain_der(),
                x509_svid_key=identity.svid.key_der(),
                # Never empty: py-spiffe fails on an empty bundle, and callers of
                # this function only pass identities whose bundle we hold.
                bundle=_x509_bundle(snap, identity),
                hint=hint,
            )
        )
    for td, bundle in snap.bundles_for(entitled).items():
        der = bundle.x509_der()
        if td != snap.trust_domain and der:
            response.federated_bundles[td.id_string()] = der
    return response


Caller = _Caller
"""An attested caller, as :meth:`WorkloadApiServicer.identify` returns it."""
