"""The admin API servicer, served only on the admin Unix socket."""

from __future__ import annotations

import datetime as dt

import grpc

from api.protos.sigil.admin.v1 import admin_pb2, admin_pb2_grpc
from api.protos.sigil.types.v1 import types_pb2
from attestation.node import join_token
from ca.api import validate
from ca.api.convert import bundle_to_proto, entry_to_proto
from ca.api.deps import ApiDeps
from ca.api.status import grpc_method
from ca.errors import InvalidArgumentError
from ca.log import event
from identity.spiffeid import SpiffeId

# A join token is a bearer credential: a long life makes a leaked one dangerous.
MAX_JOIN_TOKEN_TTL = dt.timedelta(days=30)


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """The Admin service."""

    def __init__(self, deps: ApiDeps) -> None:
        self._d = deps

    @grpc_method("admin")
    def CreateJoinToken(
        self, request: admin_pb2.CreateJoinTokenRequest, context: grpc.ServicerContext
    ) -> admin_pb2.JoinToken:
        """Create a single-use join token, optionally with an alias SPIFFE ID."""
        cfg = self._d.config
        if request.ttl < 0 or request.ttl > MAX_JOIN_TOKEN_TTL.total_seconds():
            raise InvalidArgumentError(
                f"ttl {request.ttl} must be between 1 and "
                f"{int(MAX_JOIN_TOKEN_TTL.total_seconds())} seconds (0 for the default)"
            )
        ttl = dt.timedelta(seconds=request.ttl) if request.ttl else cfg.join_token_ttl
        alias: SpiffeId | None = None
        if request.spiffe_id:
            alias = validate.workload_id(request.spiffe_id, "spiffe_id", cfg.trust_domain)
        token_id, token = join_token.new_token()
        _, secret = join_token.split_token(token)
        now = self._d.clock.now()
        expires_at = now + ttl
        self._d.datastore.create_join_token(
            token_id=token_id, secret_sha256=join_token.secret_sha256(secret), alias=alias,
            expires_at=expires_at, now=now,
        )
        agent_id = join_token.agent_id(cfg.trust_domain, token_id)
        event("join token created", token_id=token_id, alias=alias or "",
              expires_at=expires_at.isoformat())
        return admin_pb2.JoinToken(
            token=token, spiffe_id="" if alias is None else str(alias),
            expires_at=int(expires_at.timestamp()), agent_id=str(agent_id),
        )

    @grpc_method("admin")
    def CreateEntry(
        self, request: admin_pb2.CreateEntryRequest, context: grpc.ServicerContext
    ) -> types_pb2.Entry:
        """Validate and store a registration entry."""
        record = validate.new_entry(
            request.entry, trust_domain=self._d.config.trust_domain,
            max_ttl=self._d.config.ca_ttl,
        )
        created = self._d.datastore.create_entry(record, now=self._d.clock.now())
        event("entry created", entry_id=created.id, spiffe_id=created.spiffe_id,
              parent_id=created.parent_id)
        return entry_to_proto(created)

    @grpc_method("admin")
    def ListEntries(
        self, request: admin_pb2.ListEntriesRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListEntriesResponse:
        """Entries matching every given filter."""
        spiffe_id = (validate.parse_spiffe_id(request.spiffe_id, "spiffe_id")
                     if request.spiffe_id else None)
        parent_id = (validate.parse_spiffe_id(request.parent_id, "parent_id")
                     if request.parent_id else None)
        sels = validate.selectors(request.selectors) if request.selectors else None
        entries = self._d.datastore.list_entries(
            spiffe_id=spiffe_id, parent_id=parent_id, selectors=sels
        )
        return admin_pb2.ListEntriesResponse(entries=[entry_to_proto(e) for e in entries])

    @grpc_method("admin")
    def GetEntry(
        self, request: admin_pb2.GetEntryRequest, context: grpc.ServicerContext
    ) -> types_pb2.Entry:
        """One entry by id."""
        return entry_to_proto(self._d.datastore.get_entry(request.id))

    @grpc_method("admin")
    def DeleteEntry(
        self, request: admin_pb2.DeleteEntryRequest, context: grpc.ServicerContext
    ) -> admin_pb2.DeleteEntryResponse:
        """Delete an entry by id."""
        deleted = self._d.datastore.delete_entry(request.id, now=self._d.clock.now())
        event("entry deleted", entry_id=deleted.id, spiffe_id=deleted.spiffe_id)
        return admin_pb2.DeleteEntryResponse()

    @grpc_method("admin")
    def GetBundle(
        self, request: admin_pb2.GetBundleRequest, context: grpc.ServicerContext
    ) -> types_pb2.Bundle:
        """Our trust domain's bundle."""
        return bundle_to_proto(self._d.authority.bundle())

    @grpc_method("admin")
    def Health(
        self, request: admin_pb2.HealthRequest, context: grpc.ServicerContext
    ) -> admin_pb2.HealthResponse:
        """Serving status: the datastore answers and the CA is loaded."""
        self._d.datastore.current_revision()
        bundle = self._d.authority.bundle()
        return admin_pb2.HealthResponse(
            serving=True, trust_domain=self._d.config.trust_domain.name,
            bundle_sequence=bundle.sequence_number or 0,
        )
