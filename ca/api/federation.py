"""Admin RPCs for ``sigil-server federation create|list|show|update|delete|refresh``:
a mixin of AdminServicer (as :mod:`ca.api.localauthority`)."""

from __future__ import annotations

import datetime as dt

import grpc

from api.protos.sigil.admin.v1 import admin_pb2
from ca.api.deps import ApiDeps
from ca.api.status import grpc_method
from ca.config.relationship import MAX_BOOTSTRAP_BYTES
from ca.errors import InvalidArgumentError
from ca.federation.refresher import Refresher
from ca.federation.service import FederationService, RelationshipRequest, RelationshipStatus
from ca.registry.foreign_bundles import parse_trust_domain
from identity.spiffeid import TrustDomain


def _ts(value: dt.datetime | None) -> int:
    return 0 if value is None else int(value.timestamp())


def relationship_to_proto(st: RelationshipStatus) -> admin_pb2.FederationRelationship:
    """A relationship and its bundle state as the admin API returns them."""
    rel, last = st.relationship, st.last_refresh
    return admin_pb2.FederationRelationship(
        trust_domain=rel.trust_domain.name, bundle_endpoint_url=rel.bundle_endpoint_url,
        profile=rel.profile, endpoint_spiffe_id=str(rel.endpoint_spiffe_id or ""),
        created_at=rel.created_at, updated_at=rel.updated_at,
        bundle_sequence=st.bundle_sequence or 0, has_bundle=st.bundle_sequence is not None,
        last_refresh="" if last is None else ("ok" if last.ok else last.reason),
        last_refresh_message="" if last is None else last.message,
        next_refresh_at=0 if last is None else _ts(last.next_refresh_at),
    )


def _request(msg: admin_pb2.FederationRelationshipRequest) -> RelationshipRequest:
    if len(msg.bootstrap_bundle) > MAX_BOOTSTRAP_BYTES:
        raise InvalidArgumentError(
            f"bootstrap_bundle is larger than {MAX_BOOTSTRAP_BYTES} bytes")
    r = msg.relationship
    return RelationshipRequest(
        trust_domain=r.trust_domain, bundle_endpoint_url=r.bundle_endpoint_url,
        profile=r.profile, endpoint_spiffe_id=r.endpoint_spiffe_id,
        bootstrap_bundle=bytes(msg.bootstrap_bundle))


class FederationMethods:
    """Create/List/Get/Update/DeleteFederationRelationship, RefreshFederatedBundle."""

    _d: ApiDeps
    _federation_service: FederationService | None = None

    def _federation(self) -> FederationService:
        if self._federation_service is None:
            d = self._d
            # The server's refresher (so `show` sees its schedule); a servicer built
            # without one (tests) gets its own, which only fetches on request.
            refresher = d.refresher or Refresher(d.datastore, d.config.federation, d.clock)
            self._federation_service = FederationService(
                d.datastore, d.config.trust_domain, d.clock, refresher)
        return self._federation_service

    def _name(self, text: str) -> TrustDomain:
        return parse_trust_domain(text)

    @grpc_method("admin")
    def CreateFederationRelationship(
        self, request: admin_pb2.FederationRelationshipRequest, context: grpc.ServicerContext
    ) -> admin_pb2.FederationRelationship:
        """Validate and store a relationship; its bundle is fetched at the next tick."""
        fed = self._federation()
        return relationship_to_proto(fed.status(fed.create(_request(request))))

    @grpc_method("admin")
    def UpdateFederationRelationship(
        self, request: admin_pb2.FederationRelationshipRequest, context: grpc.ServicerContext
    ) -> admin_pb2.FederationRelationship:
        """Replace a relationship's fields."""
        fed = self._federation()
        return relationship_to_proto(fed.status(fed.update(_request(request))))

    @grpc_method("admin")
    def ListFederationRelationships(
        self, request: admin_pb2.ListFederationRelationshipsRequest,
        context: grpc.ServicerContext,
    ) -> admin_pb2.ListFederationRelationshipsResponse:
        """Every relationship, by trust domain."""
        return admin_pb2.ListFederationRelationshipsResponse(
            relationships=[relationship_to_proto(s) for s in self._federation().list()])

    @grpc_method("admin")
    def GetFederationRelationship(
        self, request: admin_pb2.FederationRelationshipName, context: grpc.ServicerContext
    ) -> admin_pb2.FederationRelationship:
        """One relationship."""
        return relationship_to_proto(self._federation().get(self._name(request.trust_domain)))

    @grpc_method("admin")
    def DeleteFederationRelationship(
        self, request: admin_pb2.FederationRelationshipName, context: grpc.ServicerContext
    ) -> admin_pb2.DeleteFederationRelationshipResponse:
        """Stop fetching a foreign bundle (the bundle held stays)."""
        self._federation().delete(self._name(request.trust_domain))
        return admin_pb2.DeleteFederationRelationshipResponse()

    @grpc_method("admin")
    def RefreshFederatedBundle(
        self, request: admin_pb2.FederationRelationshipName, context: grpc.ServicerContext
    ) -> admin_pb2.RefreshFederatedBundleResponse:
        """Fetch a foreign bundle now and say what happened."""
        out = self._federation().refresh(self._name(request.trust_domain))
        return admin_pb2.RefreshFederatedBundleResponse(
            ok=out.ok, reason=out.reason, message=out.message, changed=out.changed,
            sequence=out.sequence or 0, next_refresh_at=_ts(out.next_refresh_at))
