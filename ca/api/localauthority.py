"""Admin RPCs for ``sigil-server localauthority x509|jwt ...``: a mixin of AdminServicer.

Each step acts on this server's own authorities (in an HA deployment, run it
against the server that holds the key); ``show`` lists every server's.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc

from api.protos.sigil.admin.v1 import admin_pb2
from ca.api.deps import ApiDeps
from ca.api.status import grpc_method
from ca.authority import KINDS, AuthorityInfo
from ca.errors import InvalidArgumentError
from ca.log import event


def _kind(request: admin_pb2.LocalAuthorityRequest) -> str:
    if request.kind not in KINDS:
        raise InvalidArgumentError(f"kind {request.kind!r} must be one of: {', '.join(KINDS)}")
    return request.kind


def _authority_id(request: admin_pb2.LocalAuthorityRequest) -> str:
    if not request.authority_id:
        raise InvalidArgumentError("authority_id is required (see localauthority ... show)")
    if len(request.authority_id) > 128:
        raise InvalidArgumentError("authority_id is longer than 128 characters")
    return request.authority_id


def authority_to_proto(info: AuthorityInfo, hosts: Mapping[str, str] | None = None
                       ) -> admin_pb2.LocalAuthority:
    """An authority as the admin API returns it (``hosts``: host name by owner)."""
    return admin_pb2.LocalAuthority(
        kind=info.kind, authority_id=info.authority_id, status=info.status,
        not_after=int(info.not_after.timestamp()), owner=info.owner,
        signed_until=int(info.signed_until.timestamp()) if info.signed_until else 0,
        upstream_authority_id=info.upstream_authority_id,
        not_before=int(info.not_before.timestamp()) if info.not_before else 0,
        drops_at=int(info.drops_at.timestamp()) if info.drops_at else 0,
        owner_hostname=(hosts or {}).get(info.owner, ""),
    )


class LocalAuthorityMethods:
    """ListLocalAuthorities, Prepare/Activate/Taint/RevokeLocalAuthority."""

    _d: ApiDeps

    @grpc_method("admin")
    def ListLocalAuthorities(
        self, request: admin_pb2.LocalAuthorityRequest, context: grpc.ServicerContext
    ) -> admin_pb2.LocalAuthorities:
        """Every authority of a kind, oldest first, with its status."""
        kind = _kind(request)
        hosts = self._d.datastore.server_hosts()
        return admin_pb2.LocalAuthorities(authorities=[
            authority_to_proto(a, hosts) for a in self._d.authority.list_authorities(kind)])

    @grpc_method("admin")
    def PrepareLocalAuthority(
        self, request: admin_pb2.LocalAuthorityRequest, context: grpc.ServicerContext
    ) -> admin_pb2.LocalAuthority:
        """Prepare the next authority now (FailedPrecondition if one is prepared)."""
        info = self._d.authority.prepare(_kind(request))
        event("localauthority prepared", kind=info.kind, authority_id=info.authority_id)
        return authority_to_proto(info)

    @grpc_method("admin")
    def ActivateLocalAuthority(
        self, request: admin_pb2.LocalAuthorityRequest, context: grpc.ServicerContext
    ) -> admin_pb2.LocalAuthority:
        """Activate the prepared authority (FailedPrecondition if none)."""
        info = self._d.authority.activate(_kind(request))
        event("localauthority activated", kind=info.kind, authority_id=info.authority_id)
        return authority_to_proto(info)

    @grpc_method("admin")
    def TaintLocalAuthority(
        self, request: admin_pb2.LocalAuthorityRequest, context: grpc.ServicerContext
    ) -> admin_pb2.LocalAuthority:
        """Taint an old authority so agents re-issue what it signed."""
        info = self._d.authority.taint(_kind(request), _authority_id(request))
        return authority_to_proto(info)

    @grpc_method("admin")
    def RevokeLocalAuthority(
        self, request: admin_pb2.LocalAuthorityRequest, context: grpc.ServicerContext
    ) -> admin_pb2.LocalAuthority:
        """Remove a tainted authority from the bundle once nothing valid depends on it."""
        info = self._d.authority.revoke(_kind(request), _authority_id(request),
                                        force=request.force)
        return authority_to_proto(info)
