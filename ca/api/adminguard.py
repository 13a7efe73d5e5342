"""The admin API's edge: who is calling, may they, and the audit log.

:class:`AdminGuard` is a gRPC server interceptor. For every call of the Admin
service it identifies the caller (the admin socket's peer credentials, or an
admin entry's X.509-SVID on the agent API's TLS port), asks
:class:`ca.config.adminauth.Authorizer`, runs the method only when allowed, and writes one
audit line with the outcome. A refusal is PERMISSION_DENIED (UNAUTHENTICATED for
a caller it cannot identify) and the method never runs, so nothing is written.
Other services on the same server (the agent API) pass through untouched.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

from ca.api.status import status_for
from ca.config.adminauth import METHOD_ROLES, Authorizer, Caller, EntryTarget
from ca.datastore import Datastore
from ca.errors import (
    FailedPreconditionError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from ca.log import event
from identity.clock import Clock
from identity.errors import SigilError
from identity.revocation import Revocation, RevocationSet
from identity.spiffeid import TrustDomain
from identity.x509svid import validate_leaf

SERVICE_PREFIX = "/sigil.admin.v1.Admin/"
MAIN_PROCESS_ONLY = frozenset({"PrepareLocalAuthority", "ActivateLocalAuthority",
                               "TaintLocalAuthority", "RevokeLocalAuthority"})
"""Steps only the main process may take: it alone rotates this server's authorities."""
MAX_AUDITED_IDS = 20  # of a batch: the first ones, and the count

Identify = Callable[[grpc.ServicerContext], Caller]


class AuditLog:
    """Appends one JSON object a line to a file created 0600.

    Each line is one ``write`` on a file opened ``O_APPEND``, so lines of several
    threads (and processes) do not interleave.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        # An existing file keeps its mode on open: the audit names who did what.
        os.fchmod(fd, 0o600)
        self._fd = fd

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record."""
        line = (json.dumps(record, separators=(",", ":"), sort_keys=False) + "\n").encode()
        with self._lock:
            os.write(self._fd, line)

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def unix_caller(lookup: Callable[[str], tuple[int, int] | None]) -> Identify:
    """Callers on the admin socket, by the (uid, gid) its front recorded."""

    def identify(context: grpc.ServicerContext) -> Caller:
        creds = lookup(context.peer())
        if creds is None:
            raise UnauthenticatedError("the connection did not come through the admin socket")
        return Caller.unix(*creds)

    return identify


def svid_caller(peer_certificate: Callable[[str], tuple[bool, x509.Certificate | None]],
                datastore: Datastore, trust_domain: TrustDomain, clock: Clock, *,
                revocations: Callable[[], tuple[int, tuple[Revocation, ...]]] | None = None,
                ) -> Identify:
    """Callers on the TLS port: the SPIFFE ID of an X.509-SVID of an ``admin`` entry.

    The TLS front verified the certificate chain against our bundle; here the
    certificate must not be revoked (``svid revoke``, by serial or SPIFFE ID:
    UNAUTHENTICATED), and the ID must be a workload ID of ours that an unexpired
    entry marked admin names.

    Args:
        revocations: the unexpired revocations and their version
            (:meth:`ca.api.revocations.ServerRevocations.current`); None: none.
    """
    lock = threading.Lock()
    held: list[Any] = [None, RevocationSet()]  # the version indexed, and its index

    def revoked(cert: x509.Certificate, spiffe_id: str) -> bool:
        if revocations is None:
            return False
        version, items = revocations()
        with lock:
            if version != held[0]:
                index = RevocationSet()
                index.add(items)
                held[:] = [version, index]
            index = held[1]
        return bool(index.x509_revoked(serial=cert.serial_number, spiffe_id=spiffe_id,
                                       not_before=cert.not_valid_before_utc))

    def identify(context: grpc.ServicerContext) -> Caller:
        known, cert = peer_certificate(context.peer())
        if not known or cert is None:
            raise UnauthenticatedError("the admin API over TLS needs an admin X.509-SVID")
        try:
            spiffe_id = validate_leaf(cert)
        except SigilError:
            raise UnauthenticatedError("the client certificate is not an X.509-SVID") from None
        if revoked(cert, str(spiffe_id)):
            raise UnauthenticatedError("the client certificate is revoked")
        if not spiffe_id.is_member_of(trust_domain) or spiffe_id.path.startswith("/sigil/"):
            raise PermissionDeniedError(f"{spiffe_id} is not an admin workload ID of "
                                        f"{trust_domain.name}")
        now = int(clock.now().timestamp())
        if not any(e.admin and (not e.expires_at or e.expires_at > now)
                   for e in datastore.list_entries(spiffe_id=spiffe_id)):
            raise PermissionDeniedError(f"{spiffe_id} is not the SPIFFE ID of an admin entry")
        return Caller.svid(spiffe_id)

    return identify


class AdminGuard(grpc.ServerInterceptor):  # type: ignore[misc]
    """Authorizes and audits every Admin call (see the module docstring)."""

    def __init__(self, *, identify: Identify, authorizer: Authorizer, audit: AuditLog,
                 datastore: Datastore, clock: Clock, worker: bool = False) -> None:
        """Args:
            worker: in an extra agent API process (``worker_processes``), where
                :data:`MAIN_PROCESS_ONLY` calls are refused (FAILED_PRECONDITION).
        """
        self._worker = worker
        self._identify = identify
        self._authorizer = authorizer
        self._audit = audit
        self._datastore = datastore
        self._clock = clock

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """Wrap the Admin service's unary handlers; leave every other service alone."""
        full: str = handler_call_details.method
        handler = continuation(handler_call_details)
        if handler is None or not full.startswith(SERVICE_PREFIX):
            return handler
        method = full[len(SERVICE_PREFIX):]
        inner = handler.unary_unary
        if inner is None:  # every Admin RPC is unary; refuse anything else
            return None
        return grpc.unary_unary_rpc_method_handler(
            self._guarded(method, inner),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _guarded(self, method: str, inner: Callable[[Any, grpc.ServicerContext], Any]
                 ) -> Callable[[Any, grpc.ServicerContext], Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            caller: Caller | None = None
            role = ""
            try:
                caller = self._identify(context)
                role = self._authorizer.check(method, caller,
                                              lambda: self._entry_target(method, request))
                if self._worker and method in MAIN_PROCESS_ONLY:
                    raise FailedPreconditionError(
                        f"{method} is served by the server's main process only; this "
                        "connection reached a worker process: use the admin socket")
            except (PermissionDeniedError, UnauthenticatedError,
                    FailedPreconditionError) as exc:
                code = status_for(exc)
                self._record(method, caller, METHOD_ROLES.get(method, ""), request, None,
                             code, str(exc))
                event("admin call refused", level=logging.WARNING, method=method,
                      caller=caller.name if caller else "", code=code.name, reason=str(exc))
                context.abort(code, str(exc))
            except Exception:  # a bug, or the datastore failing: refuse, never run
                self._record(method, caller, METHOD_ROLES.get(method, ""), request, None,
                             grpc.StatusCode.INTERNAL, "")
                event("admin call failed", level=logging.ERROR, exc_info=True, method=method)
                context.abort(grpc.StatusCode.INTERNAL, "internal error")
            try:
                response = inner(request, context)
            except BaseException:
                self._record(method, caller, role, request, None,
                             context.code() or grpc.StatusCode.UNKNOWN, "")
                raise
            self._record(method, caller, role, request, response, grpc.StatusCode.OK, "")
            return response

        return call

    def _entry_target(self, method: str, request: Any) -> EntryTarget:
        """The SPIFFE IDs an entry call would create, change or delete."""
        if method == "CreateEntry":
            return EntryTarget((request.entry.spiffe_id,), sets_admin=request.entry.admin)
        if method == "BatchCreateEntry":
            return EntryTarget(tuple(e.spiffe_id for e in request.entries),
                               sets_admin=any(e.admin for e in request.entries))
        if method == "UpdateEntry":
            ids = [*self._stored_id(request.entry.id)]
            if "spiffe_id" in request.fields:
                ids.append(request.entry.spiffe_id)
            return EntryTarget(tuple(ids), sets_admin="admin" in request.fields)
        if method == "DeleteEntry":
            return EntryTarget(tuple(self._stored_id(request.id)))
        return EntryTarget()

    def _stored_id(self, entry_id: str) -> list[str]:
        # A missing entry touches nothing: the method answers NOT_FOUND.
        try:
            return [str(self._datastore.get_entry(entry_id).spiffe_id)] if entry_id else []
        except NotFoundError:
            return []

    def _record(self, method: str, caller: Caller | None, role: str, request: Any,
                response: Any | None, code: grpc.StatusCode, message: str) -> None:
        record: dict[str, Any] = {
            "time": self._clock.now().astimezone(dt.UTC).isoformat().replace("+00:00", "Z"),
            "transport": caller.transport if caller else "",
            **(caller.audit_fields() if caller else {}),
            "method": method,
            "role": role,
            "ids": audited_ids(request, response),
            "code": code.name,
        }
        if message:
            record["message"] = message
        try:
            self._audit.write(record)
        except OSError as exc:
            event("admin audit write failed", level=logging.ERROR, path=str(self._audit.path),
                  reason=exc.strerror or str(exc))


# Only these fields of requests and responses are audited: names, never secrets
# (a join token, a key, a CSR, a JWT, a bundle document are not among them).
_ID_FIELDS = ("id", "spiffe_id", "parent_id", "trust_domain", "kind", "authority_id",
              "x509_serial", "jwt_id", "jwt_key_id")


def audited_ids(request: Any, response: Any | None) -> dict[str, Any]:
    """The identifiers a call named or produced, for the audit log."""
    ids: dict[str, Any] = {}
    _collect(request, ids)
    entry = _field(request, "entry")
    if entry is not None:
        _collect(entry, ids, prefix="entry.")
    if "entries" in request.DESCRIPTOR.fields_by_name:
        entries = list(request.entries)
        ids["entries.count"] = len(entries)
        ids["entries.spiffe_id"] = [e.spiffe_id for e in entries[:MAX_AUDITED_IDS]]
    if request.DESCRIPTOR.name == "BatchSetFederatedBundlesRequest":
        # The trust domains whose bundles it set (each one is also logged by the server).
        members = list(request.bundles)
        ids["bundles.count"] = len(members)
        ids["bundles.trust_domain"] = [b.trust_domain for b in members[:MAX_AUDITED_IDS]]
    if response is not None:
        result: dict[str, Any] = {}
        name = response.DESCRIPTOR.name
        if name == "JoinToken":
            # The token is "<token id>.<secret>": only the id is kept.
            result["token_id"] = response.token.split(".", 1)[0]
            result["agent_id"] = response.agent_id
        elif name == "Entry":
            result["id"] = response.id
        elif name in ("PurgeAgentsResponse",):
            result["ids"] = list(response.ids)[:MAX_AUDITED_IDS]
        elif name == "BatchCreateEntryResponse":
            result["ids"] = [r.entry.id for r in response.results
                             if r.entry.id][:MAX_AUDITED_IDS]
        if result:
            ids["result"] = result
    return ids


def _field(msg: Any, name: str) -> Any | None:
    desc = msg.DESCRIPTOR.fields_by_name.get(name)
    if desc is None or desc.message_type is None or getattr(desc, "is_repeated", False):
        return None
    value: Any = getattr(msg, name)
    return value


def _collect(msg: Any, into: dict[str, Any], prefix: str = "") -> None:
    fields = msg.DESCRIPTOR.fields_by_name
    for name in _ID_FIELDS:
        if name in fields and fields[name].type == fields[name].TYPE_STRING:
            value = getattr(msg, name)
            if value:
                into[prefix + name] = value

