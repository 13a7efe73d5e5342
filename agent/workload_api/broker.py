"""The SPIFFE Broker API (Incubating): SVIDs for a workload a broker names.

Standard: spiffe/spiffe ``standards/SPIFFE_Broker_API.md``, ``brokerapi.proto`` and
``SPIFFE_Broker_Endpoint.md``. A broker (a node-local proxy, a CSI driver) asks for
the SVIDs and bundles of a workload it references, here by PID.

Served under the standard's service name ``spiffe.broker.API`` on a socket of
its own (``[broker] socket_path``), through a second :class:`PeerCredentialFront`,
and/or over TCP with mutual TLS (``[broker] listen_address``,
:mod:`agent.workload_api.brokertls`). One servicer class serves both; only how
the caller is identified differs. Every call:

1. requires the ``broker.spiffe.io: true`` header (InvalidArgument otherwise);
2. identifies the broker: on the socket, its connection is attested exactly as
   the Workload API does and its SPIFFE IDs are those of the entries its
   selectors entitle it to; over TCP, its SPIFFE ID is that of its verified
   X.509-SVID (UNAUTHENTICATED when it is not one). One of them must be listed
   in ``[broker] authorized`` (PermissionDenied otherwise);
3. resolves the reference: a ``WorkloadPIDReference`` is pinned with a pidfd,
   then its credentials are read from /proc and the workload attestors run on it
   as if it had connected itself. Before every answer the pinned process must
   still be alive (and run the binary it ran, when an attestor describes the
   binary): a PID that exited, or was reused, gets NotFound. A stream ends with
   NotFound when its workload exits (standard 4.9).

A ``KubernetesObjectReference`` to a pod (``pods``, group ``core``) is resolved
in the kubelet's pod list through the k8s workload attestor (so only pods of this
node are found) and attested with the pod's ``k8s`` selectors (no container
ones); it is checked again before every answer, and a stream ends with NotFound
once the pod is gone. Other Kubernetes object types answer Unimplemented; any
other reference type InvalidArgument (3.1.4).
The referenced workload's identities are computed from its own selectors only:
the broker's never enter them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import grpc

from agent import log
from agent.cache import Cache, CachedEntry, Snapshot
from agent.errors import AgentError
from agent.workload_api.brokertls import (
    BrokerCaller,
    BrokerTlsError,
    CallerIdentifier,
    CertificateCallers,
    ServerTls,
)
from agent.workload_api.front import PeerCredentialFront
from agent.workload_api.server import MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES
from agent.workload_api.servicer import WorkloadApiServicer
from api.protos import broker_pb2 as bpb
from attestation.workload import (
    DEFAULT_PROC_ROOT,
    ProcessGoneError,
    ProcessInfo,
    WorkloadAttestationError,
    WorkloadAttestor,
    process_start_time,
)
from attestation.workload.k8s import K8sAttestor, pod_object_selectors
from attestation.workload.peersocket import executable_identity
from attestation.workload.pidfd import close_pidfd, pidfd_exited
from identity.bundle import Bundle
from identity.clock import Clock, SystemClock
from identity.errors import InvalidSpiffeIdError
from identity.selectors import Selector
from identity.spiffeid import SpiffeId
from identity.x509svid import X509Svid

SERVICE_NAME = "spiffe.broker.API"
SECURITY_HEADER = "broker.spiffe.io"
ENV_SOCKET = "SPIFFE_BROKER_SOCKET"
"""Where clients look for the endpoint (a ``unix://`` URI); the agent does not read it."""
_TYPE_PREFIX = "type.googleapis.com/"
PID_REFERENCE = "spiffe.broker.WorkloadPIDReference"
K8S_REFERENCE = "spiffe.broker.KubernetesObjectReference"
NOT_AUTHORIZED = "caller is not an authorized broker"
NO_IDENTITY = "referenced workload is not entitled to any identity"
POD_RECHECK_INTERVAL = 5.0
"""Seconds between kubelet checks that a referenced pod still runs, in a stream."""


# google.rpc.ErrorInfo reasons of the standard's section 4.8.
REFERENCE_INVALID = "WORKLOAD_REFERENCE_INVALID"
NOT_FOUND = "WORKLOAD_NOT_FOUND"
NOT_ENTITLED = "WORKLOAD_NOT_ENTITLED"
ERROR_DOMAIN = "spiffe.io"
STATUS_DETAILS_KEY = "grpc-status-details-bin"
_ERROR_INFO_TYPE = "type.googleapis.com/google.rpc.ErrorInfo"


class _Abort(Exception):
    """A status to answer with, raised below the servicer's edge (``reason``: the
    standard's ErrorInfo reason, when the situation is one of its table)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        # Every reference problem raised this way is one of the table's rows.
        self.reason = {grpc.StatusCode.INVALID_ARGUMENT: REFERENCE_INVALID,
                       grpc.StatusCode.NOT_FOUND: NOT_FOUND}.get(code, "")


class PinnedWorkload:
    """A referenced process, pinned by a pidfd for the life of one RPC."""

    blocking_check = False
    recheck_interval: float | None = None

    def __init__(self, pid: int, pidfd: int, start_time: int,
                 executable: tuple[int, int] | None, *, proc_root: Path) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.start_time = start_time
        self.executable = executable
        self.selectors: frozenset[Selector] = frozenset()
        self._proc_root = proc_root
        self._exited: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def exited(self) -> bool:
        return pidfd_exited(self.pidfd)

    def check(self) -> None:
        """Raise NotFound unless the pinned process lives (and runs the same binary,
        when one was recorded: an attestor describes the binary)."""
        if self.exited():
            raise _Abort(grpc.StatusCode.NOT_FOUND,
                         f"process {self.pid} exited (its PID may have been reused)")
        if self.executable is not None:
            try:
                same = executable_identity(self.pid, proc_root=self._proc_root) == \
                    self.executable
            except WorkloadAttestationError:
                same = False
            if not same:
                raise _Abort(grpc.StatusCode.NOT_FOUND,
                             f"process {self.pid} runs another executable than attested")

    def watch(self) -> asyncio.Future[None]:
        """A future done once the process exits (a pidfd polls readable then)."""
        if self._exited is None:
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()

            def ready() -> None:
                loop.remove_reader(self.pidfd)
                if not fut.done():
                    fut.set_result(None)

            loop.add_reader(self.pidfd, ready)
            self._loop = loop
            self._exited = fut
        return self._exited

    def close(self) -> None:
        """Stop watching and close the pidfd (when the RPC ends)."""
        if self._loop is not None and not self._loop.is_closed():
            # Before the descriptor closes, so the loop never watches a number
            # that the next open() may hand out again.
            self._loop.remove_reader(self.pidfd)
        close_pidfd(self.pidfd)


class PodTarget:
    """A pod named by a Kubernetes object reference, found in the kubelet's list.

    Pinned to the UID it had when resolved: a pod recreated under the same name
    is another object, and the RPC's workload counts as stopped (standard 4.9).
    The kubelet is asked again before every answer and, in a stream, every
    :data:`POD_RECHECK_INTERVAL` seconds.
    """

    blocking_check = True

    def __init__(self, attestor: K8sAttestor, namespace: str, name: str | None,
                 uid: str) -> None:
        self._attestor = attestor
        self.namespace = namespace
        self.name = name
        self.uid = uid
        self.selectors: frozenset[Selector] = frozenset()
        self.recheck_interval: float | None = POD_RECHECK_INTERVAL

    def check(self) -> None:
        try:
            pod = self._attestor.find_pod(namespace=self.namespace, name=self.name,
                                          uid=self.uid)
        except WorkloadAttestationError as exc:
            raise _Abort(grpc.StatusCode.UNAVAILABLE, f"kubelet: {exc}") from None
        if pod is None:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"pod {self.uid} no longer runs here")

    def watch(self) -> asyncio.Future[None]:
        return asyncio.get_running_loop().create_future()  # never done: rechecked

    def close(self) -> None:
        pass


def _resolve_pod(attestors: Sequence[WorkloadAttestor],
                 ref: bpb.KubernetesObjectReference) -> PodTarget:
    """A pod reference to a :class:`PodTarget` (blocking: asks the kubelet).

    Raises:
        _Abort: the standard's status for a bad or unresolvable reference.
    """
    if not ref.type.plural or not ref.type.group:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                     "KubernetesObjectReference needs type.plural and type.group")
    if not ref.HasField("key") and not ref.uid:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                     "KubernetesObjectReference needs a key or a uid")
    if ref.HasField("key") and not ref.key.name:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "key.name is required with key")
    if (ref.type.plural, ref.type.group) != ("pods", "core"):
        raise _Abort(grpc.StatusCode.UNIMPLEMENTED,
                     "only pods (plural pods, group core) can be referenced")
    if ref.HasField("key") and not ref.key.namespace:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                     "key.namespace is required for pods (namespaced)")
    k8s = next((a for a in attestors if isinstance(a, K8sAttestor)), None)
    if k8s is None:
        raise _Abort(grpc.StatusCode.UNIMPLEMENTED,
                     "Kubernetes references need the k8s workload attestor")
    name = ref.key.name if ref.HasField("key") else None
    namespace = ref.key.namespace if ref.HasField("key") else None
    try:
        pod = k8s.find_pod(namespace=namespace, name=name, uid=ref.uid or None)
    except WorkloadAttestationError as exc:
        raise _Abort(grpc.StatusCode.UNAVAILABLE, f"kubelet: {exc}") from None
    if pod is None:
        raise _Abort(grpc.StatusCode.NOT_FOUND, "no such pod running on this node")
    meta = pod.get("metadata") or {}
    target = PodTarget(k8s, str(meta.get("namespace", "")), name, str(meta.get("uid", "")))
    target.selectors = frozenset(pod_object_selectors(pod))
    return target


def _status_ids(pid: int, proc_root: Path) -> tuple[int, int]:
    """The effective uid and gid of ``pid`` (what SO_PEERCRED would report)."""
    try:
        text = (proc_root / str(pid) / "status").read_text()
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise ProcessGoneError(f"process {pid} is gone") from exc
    except OSError as exc:
        raise WorkloadAttestationError(f"cannot read /proc/{pid}/status: {exc}") from exc
    ids: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid"):
            fields = value.split()
            if len(fields) < 2:
                raise WorkloadAttestationError(f"/proc/{pid}/status is malformed")
            ids[key] = int(fields[1])
    if set(ids) != {"Uid", "Gid"}:
        raise WorkloadAttestationError(f"/proc/{pid}/status is malformed")
    return ids["Uid"], ids["Gid"]


_Target = PinnedWorkload | PodTarget


class BrokerApiServicer:
    """The four RPCs of ``spiffe.broker.API``.

    Args:
        cache: where identities, SVIDs and bundles come from.
        callers: identifies the broker that calls (by its connection's peer
            credentials, or by its client certificate).
        attestors: the workload attestors, run on referenced processes.
        authorized: the SPIFFE IDs of the brokers that may call.
        proc_root: the /proc to read.
        first_response_timeout: how long a stream waits for SVIDs not signed yet.
    """

    def __init__(
        self,
        *,
        cache: Cache,
        callers: CallerIdentifier,
        attestors: Sequence[WorkloadAttestor],
        authorized: Iterable[SpiffeId],
        proc_root: Path = DEFAULT_PROC_ROOT,
        clock: Clock | None = None,
        first_response_timeout: float = 5.0,
    ) -> None:
        self._cache = cache
        self._callers = callers
        self._attestors = tuple(attestors)
        self._authorized = frozenset(authorized)
        self._proc_root = proc_root
        self._clock = clock or SystemClock()
        self._first_timeout = first_response_timeout
        self._pin_executable = any(getattr(a, "uses_executable", False) for a in attestors)

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler serving ``/spiffe.broker.API/<Method>``."""
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "SubscribeToX509SVID": grpc.unary_stream_rpc_method_handler(
                self.SubscribeToX509SVID,
                request_deserializer=bpb.SubscribeToX509SVIDRequest.FromString,
                response_serializer=bpb.SubscribeToX509SVIDResponse.SerializeToString),
            "SubscribeToX509Bundles": grpc.unary_stream_rpc_method_handler(
                self.SubscribeToX509Bundles,
                request_deserializer=bpb.SubscribeToX509BundlesRequest.FromString,
                response_serializer=bpb.SubscribeToX509BundlesResponse.SerializeToString),
            "FetchJWTSVID": grpc.unary_unary_rpc_method_handler(
                self.FetchJWTSVID,
                request_deserializer=bpb.FetchJWTSVIDRequest.FromString,
                response_serializer=bpb.FetchJWTSVIDResponse.SerializeToString),
            "SubscribeToJWTBundles": grpc.unary_stream_rpc_method_handler(
                self.SubscribeToJWTBundles,
                request_deserializer=bpb.SubscribeToJWTBundlesRequest.FromString,
                response_serializer=bpb.SubscribeToJWTBundlesResponse.SerializeToString),
        })

    # The broker and the workload it references ------------------------------

    async def _authorize(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        values = [v for k, v in (context.invocation_metadata() or ()) if k == SECURITY_HEADER]
        if values != ["true"]:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         "security header missing from request")
        # Aborts when the caller cannot be identified (PermissionDenied for an
        # unknown connection or a process gone, UNAUTHENTICATED for a bad certificate).
        caller = await self._callers.identify(context)
        if not caller.spiffe_ids & self._authorized:
            who: dict[str, Any] = dict(caller.fields)  # pid and uid, or peer
            log.event("broker refused", level=logging.WARNING, **who,
                      reason="not an authorized broker",
                      spiffe_ids=",".join(sorted(str(i) for i in caller.spiffe_ids)))
            await _abort(context, grpc.StatusCode.PERMISSION_DENIED, NOT_AUTHORIZED)

    def _pin(self, reference: bpb.WorkloadReference | None) -> _Target:
        """Resolve a reference to a pinned, attested process (in a thread).

        Raises:
            _Abort: the standard's status for a bad reference or a missing workload.
        """
        if reference is None or not reference.reference.type_url:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "workload reference missing")
        type_url = reference.reference.type_url
        name = type_url.rpartition("/")[2] if type_url.startswith(_TYPE_PREFIX) else ""
        if name == K8S_REFERENCE:
            try:
                k8s_ref = bpb.KubernetesObjectReference.FromString(reference.reference.value)
            except Exception:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                             "malformed KubernetesObjectReference") from None
            return _resolve_pod(self._attestors, k8s_ref)
        if name != PID_REFERENCE:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"unsupported workload reference type {type_url[:200]!r}")
        try:
            pid_ref = bpb.WorkloadPIDReference.FromString(reference.reference.value)
        except Exception:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         "malformed WorkloadPIDReference") from None
        pid = pid_ref.pid
        if pid <= 0:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "PID must be a positive integer")
        pidfd_open = getattr(os, "pidfd_open", None)
        if pidfd_open is None:
            raise _Abort(grpc.StatusCode.UNIMPLEMENTED,
                         "PID references need pidfd_open (Linux 5.3 or later)")
        try:
            pidfd = int(pidfd_open(pid))
        except ProcessLookupError:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"process {pid} not found") from None
        except OSError as exc:
            raise _Abort(grpc.StatusCode.NOT_FOUND,
                         f"process {pid} cannot be pinned: {exc.strerror}") from None
        try:
            # Everything read from here on describes the pinned process as long
            # as it is still alive afterwards (its PID cannot be reused before).
            start = process_start_time(pid, proc_root=self._proc_root)
            exe = (executable_identity(pid, proc_root=self._proc_root)
                   if self._pin_executable else None)
            uid, gid = _status_ids(pid, self._proc_root)
            pinned = PinnedWorkload(pid, pidfd, start, exe, proc_root=self._proc_root)
            process = ProcessInfo(pid=pid, uid=uid, gid=gid)
            selectors: list[Selector] = []
            for attestor in self._attestors:
                selectors.extend(attestor.attest(process))
            pinned.selectors = frozenset(selectors)
        except ProcessGoneError:
            close_pidfd(pidfd)
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"process {pid} not found") from None
        except WorkloadAttestationError as exc:
            close_pidfd(pidfd)
            raise _Abort(grpc.StatusCode.PERMISSION_DENIED,
                         f"workload attestation failed: {exc}") from None
        except BaseException:
            close_pidfd(pidfd)
            raise
        if self._pin_executable and exe is None:
            close_pidfd(pidfd)
            raise _Abort(grpc.StatusCode.PERMISSION_DENIED,
                         f"the executable of process {pid} cannot be read")
        try:
            pinned.check()
        except _Abort:
            close_pidfd(pidfd)
            raise
        return pinned

    async def _workload_for(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> _Target:
        await self._authorize(context)
        reference = request.reference if request.HasField("reference") else None
        try:
            pinned = await asyncio.get_running_loop().run_in_executor(
                None, self._pin, reference)
        except _Abort as exc:
            await _abort(context, exc.code, exc.details, exc.reason)
        context.add_done_callback(lambda _ctx: pinned.close())
        return pinned

    async def _still_same(
        self, pinned: _Target, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        try:
            if pinned.blocking_check:
                await asyncio.get_running_loop().run_in_executor(None, pinned.check)
            else:
                pinned.check()
        except _Abort as exc:
            await _abort(context, exc.code, exc.details, exc.reason)

    async def _entitled(
        self, pinned: _Target, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tuple[Snapshot, list[CachedEntry]]:
        snap = self._cache.snapshot()
        entitled = snap.entitled(pinned.selectors)
        if not entitled:
            await _abort(context, grpc.StatusCode.PERMISSION_DENIED, NO_IDENTITY,
                         NOT_ENTITLED)
        return snap, entitled

    async def _wait(self, pinned: _Target, version: int, timeout: float | None) -> None:
        """Until the cache changes, the workload exits, or ``timeout`` passes (or
        the target's recheck interval, for targets that cannot signal an exit)."""
        if pinned.recheck_interval is not None:
            timeout = (pinned.recheck_interval if timeout is None
                       else min(timeout, pinned.recheck_interval))
        change: asyncio.Future[Any] = asyncio.ensure_future(
            self._cache.wait_for_change(version))
        waiters: set[asyncio.Future[Any]] = {change, pinned.watch()}
        try:
            await asyncio.wait(waiters, timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            change.cancel()

    # X.509 -------------------------------------------------------------------

    async def SubscribeToX509SVID(
        self, request: bpb.SubscribeToX509SVIDRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[bpb.SubscribeToX509SVIDResponse]:
        """The referenced workload's X.509-SVIDs: at once, then on every change;
        NotFound once it exits."""
        pinned = await self._workload_for(request, context)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._first_timeout
        holder = object()
        context.add_done_callback(lambda _ctx: self._cache.release(holder))
        last: bpb.SubscribeToX509SVIDResponse | None = None
        while True:
            await self._still_same(pinned, context)
            snap, entitled = await self._entitled(pinned, context)
            self._cache.use(holder, (e.id for e in entitled))
            now = self._clock.now()
            response = bpb.SubscribeToX509SVIDResponse()
            hints: set[str] = set()
            for ident in snap.identities(entitled):
                bundle = snap.bundles.get(ident.entry.spiffe_id.trust_domain)
                der = bundle.x509_der() if bundle is not None else b""
                if not der or ident.svid.expires_at <= now:
                    continue
                hint = "" if ident.entry.hint in hints else ident.entry.hint
                hints.add(hint)
                response.svids.append(bpb.X509SVID(
                    spiffe_id=str(ident.svid.spiffe_id), x509_svid=ident.svid.chain_der(),
                    x509_svid_key=ident.svid.key_der(), bundle=der, hint=hint))
            for td, bundle in snap.bundles_for(entitled).items():
                der = bundle.x509_der()
                if td != snap.trust_domain and der:
                    response.federated_bundles[td.id_string()] = der
            complete = len(response.svids) == len(entitled)
            waiting_first = last is None and not complete and loop.time() < deadline
            if response.svids and not waiting_first and response != last:
                await self._still_same(pinned, context)
                yield response
                last = response
            elif not response.svids and last is None and loop.time() >= deadline:
                await _abort(context, grpc.StatusCode.UNAVAILABLE,
                             "X.509-SVIDs not issued yet; retry")
            await self._wait(pinned, snap.version,
                             max(0.0, deadline - loop.time()) if last is None else None)

    async def SubscribeToX509Bundles(
        self, request: bpb.SubscribeToX509BundlesRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[bpb.SubscribeToX509BundlesResponse]:
        """The X.509 bundles the referenced workload may see."""
        pinned = await self._workload_for(request, context)
        last: bpb.SubscribeToX509BundlesResponse | None = None
        while True:
            await self._still_same(pinned, context)
            snap, entitled = await self._entitled(pinned, context)
            response = bpb.SubscribeToX509BundlesResponse()
            for td, bundle in snap.bundles_for(entitled).items():
                der = bundle.x509_der()
                if der:
                    response.bundles[td.id_string()] = der
            if response.bundles and response != last:
                yield response
                last = response
            await self._wait(pinned, snap.version, None)

    # JWT ---------------------------------------------------------------------

    async def FetchJWTSVID(
        self, request: bpb.FetchJWTSVIDRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bpb.FetchJWTSVIDResponse:
        """JWT-SVIDs of the referenced workload (or the one requested)."""
        audience = list(dict.fromkeys(a for a in request.audience if a))
        pinned = await self._workload_for(request, context)
        if not audience:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        _snap, entitled = await self._entitled(pinned, context)
        if request.spiffe_id:
            try:
                wanted = SpiffeId.parse(request.spiffe_id)
            except InvalidSpiffeIdError as exc:
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                             f"invalid requested SPIFFE ID: {exc}")
            entitled = [e for e in entitled if e.spiffe_id == wanted]
            if not entitled:
                await _abort(context, grpc.StatusCode.PERMISSION_DENIED, NO_IDENTITY,
                             NOT_ENTITLED)
        response = bpb.FetchJWTSVIDResponse()
        seen: set[SpiffeId] = set()
        for entry in entitled:
            if entry.spiffe_id in seen:
                continue
            seen.add(entry.spiffe_id)
            try:
                svid = await self._cache.jwt_svid(entry, audience)
            except AgentError as exc:
                await _abort(context, grpc.StatusCode.UNAVAILABLE,
                             f"could not fetch JWT-SVID: {exc}")
            response.svids.append(bpb.JWTSVID(
                spiffe_id=str(entry.spiffe_id), svid=svid.token, hint=entry.hint))
        await self._still_same(pinned, context)
        return response

    async def SubscribeToJWTBundles(
        self, request: bpb.SubscribeToJWTBundlesRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[bpb.SubscribeToJWTBundlesResponse]:
        """The JWT bundles (JWKS) the referenced workload may see."""
        pinned = await self._workload_for(request, context)
        last: bpb.SubscribeToJWTBundlesResponse | None = None
        while True:
            await self._still_same(pinned, context)
            snap, entitled = await self._entitled(pinned, context)
            response = bpb.SubscribeToJWTBundlesResponse()
            for td, bundle in snap.bundles_for(entitled).items():
                response.bundles[td.id_string()] = bundle.jwt_jwks()
            if response.bundles and response != last:
                yield response
                last = response
            await self._wait(pinned, snap.version, None)


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, details: str,
    reason: str = "",
) -> NoReturn:
    """End the RPC; with ``reason``, a google.rpc.Status carrying an ErrorInfo of
    domain ``spiffe.io`` goes in the ``grpc-status-details-bin`` trailer (4.8)."""
    trailer: tuple[tuple[str, bytes], ...] = ()
    if reason:
        status = bpb.RpcStatus(code=code.value[0], message=details)
        info = status.details.add()
        info.type_url = _ERROR_INFO_TYPE
        info.value = bpb.ErrorInfo(reason=reason, domain=ERROR_DOMAIN).SerializeToString()
        trailer = ((STATUS_DETAILS_KEY, status.SerializeToString()),)
    await context.abort(code, details, trailing_metadata=trailer)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


class PeerCredentialCallers:
    """Identifies a caller on the broker socket by its connection, as a workload.

    The connection's process is attested exactly as a Workload API caller is
    (:meth:`WorkloadApiServicer.identify`: PermissionDenied when the connection
    did not come through the front or its process is gone); its SPIFFE IDs are
    those of the entries its selectors entitle it to.
    """

    def __init__(self, *, workload: WorkloadApiServicer, cache: Cache) -> None:
        self._workload = workload
        self._cache = cache

    async def identify(self, context: grpc.aio.ServicerContext[Any, Any]) -> BrokerCaller:
        broker = await self._workload.identify(context)
        ids = {e.spiffe_id for e in self._cache.snapshot().entitled(broker.selectors)}
        return BrokerCaller(frozenset(ids), {"pid": str(broker.creds.pid),
                                                   "uid": str(broker.creds.uid)})


def _server_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
        ("grpc.max_send_message_length", MAX_RESPONSE_BYTES),
        ("grpc.max_metadata_size", 16 * 1024),
    ]


class BrokerApiServer:
    """Serves ``spiffe.broker.API`` on ``socket_path`` through its own front, on
    ``listen_address`` over TCP with mutual TLS, or on both.

    Args:
        socket_path: the broker socket, or None.
        listen_address: ``(ip, port)`` for TCP (port 0 picks one: see
            :attr:`tcp_port`), or None.
        agent_svid: the agent's current X.509-SVID: what the TCP endpoint
            presents (needed with ``listen_address``).
        bundle: the agent's own trust domain's current bundle: what broker
            certificates must chain to (needed with ``listen_address``).

    Use as an async context manager, or call :meth:`start` and :meth:`stop`.

    Raises:
        ValueError: no endpoint, or TCP without ``agent_svid`` and ``bundle``.
    """

    def __init__(
        self,
        *,
        cache: Cache,
        attestors: Sequence[WorkloadAttestor],
        authorized: Iterable[SpiffeId],
        socket_path: Path | None = None,
        listen_address: tuple[str, int] | None = None,
        agent_svid: Callable[[], X509Svid] | None = None,
        bundle: Callable[[], Bundle] | None = None,
        proc_root: Path = DEFAULT_PROC_ROOT,
        clock: Clock | None = None,
        private_dir: Path | None = None,
        first_response_timeout: float = 5.0,
    ) -> None:
        if socket_path is None and listen_address is None:
            raise ValueError("the Broker API needs a socket path or a listen address")
        authorized = tuple(authorized)
        common: dict[str, Any] = {
            "cache": cache, "attestors": attestors, "authorized": authorized,
            "proc_root": proc_root, "clock": clock,
            "first_response_timeout": first_response_timeout}
        self.front: PeerCredentialFront | None = None
        self.servicer: BrokerApiServicer | None = None
        if socket_path is not None:
            pin_exe = any(getattr(a, "uses_executable", False) for a in attestors)
            self.front = PeerCredentialFront(socket_path, private_dir=private_dir,
                                             proc_root=proc_root, pin_executable=pin_exe)
            # The broker itself is attested as a Workload API caller is.
            workload = WorkloadApiServicer(cache=cache, peers=self.front.lookup,
                                           attestors=attestors, proc_root=proc_root,
                                           clock=clock)
            self.servicer = BrokerApiServicer(
                callers=PeerCredentialCallers(workload=workload, cache=cache), **common)
        self._listen = listen_address
        self._tls: ServerTls | None = None
        self.tls_servicer: BrokerApiServicer | None = None
        if listen_address is not None:
            if agent_svid is None or bundle is None:
                raise ValueError("the Broker API over TCP needs the agent SVID and the bundle")
            self._tls = ServerTls(svid=agent_svid, bundle=bundle)
            self.tls_servicer = BrokerApiServicer(
                callers=CertificateCallers(bundle=bundle, clock=clock or SystemClock(),
                                           revoked=lambda: cache.revoked),
                **common)
        self.tcp_port: int | None = None
        """The TCP port listened on, once started (None without TCP)."""
        self._server: grpc.aio.Server | None = None
        self._tcp_server: grpc.aio.Server | None = None

    @property
    def socket_path(self) -> Path | None:
        return self.front.public_socket if self.front is not None else None

    async def start(self) -> None:
        """Listen on TCP, start the internal server, then open the public socket.

        Raises:
            AgentError: the TCP address cannot be listened on, or there is no
                X.509 authority to verify brokers with.
        """
        try:
            await self._start_tcp()
            await self._start_socket()
        except BaseException:
            await self.stop(None)
            raise

    async def _start_tcp(self) -> None:
        if self._listen is None or self._tls is None or self.tls_servicer is None:
            return
        host, port = self._listen
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        server = grpc.aio.server(options=_server_options())
        server.add_generic_rpc_handlers([self.tls_servicer.handler()])
        try:
            self.tcp_port = server.add_secure_port(target, self._tls.credentials())
        except BrokerTlsError as exc:
            raise AgentError(f"broker.listen_address: {exc}") from None
        except RuntimeError as exc:  # grpcio: "Failed to bind to address ..."
            raise AgentError(f"broker.listen_address {target}: cannot listen ({exc})") from None
        self._tcp_server = server
        await server.start()

    async def _start_socket(self) -> None:
        if self.front is None or self.servicer is None:
            return
        self.front.prepare_private_dir()
        server = grpc.aio.server(options=_server_options())
        server.add_generic_rpc_handlers([self.servicer.handler()])
        internal = self.front.internal_socket
        with contextlib.suppress(FileNotFoundError):
            internal.unlink()
        server.add_insecure_port(f"unix:{internal}")
        self._server = server
        await server.start()
        os.chmod(internal, 0o600)
        await self.front.start()

    async def stop(self, grace: float | None = 1.0) -> None:
        if self.front is not None:
            await self.front.close()
        for server in (self._server, self._tcp_server):
            if server is not None:
                await server.stop(grace)
        self._server = self._tcp_server = None

    async def __aenter__(self) -> BrokerApiServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
