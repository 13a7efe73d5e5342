"""The admin API servicer, served only on the admin Unix socket."""

from __future__ import annotations

import datetime as dt
import socket

import grpc

from api.protos.sigil.admin.v1 import admin_pb2, admin_pb2_grpc
from api.protos.sigil.types.v1 import types_pb2
from attestation.node import join_token
from ca.api.convert import agent_to_proto, bundle_to_proto, entry_to_proto, svid_to_proto
from ca.api.deps import ApiDeps
from ca.api.federation import FederationMethods
from ca.api.localauthority import LocalAuthorityMethods
from ca.api.revocations import RevocationMethods
from ca.api.status import grpc_method, status_for
from ca.authority import mint
from ca.datastore import EntryRecord
from ca.errors import InvalidArgumentError
from ca.log import event
from ca.registry import validate
from ca.registry.agents import DEFAULT_PURGE_EXPIRED_FOR, AgentService
from ca.registry.entries import EntryService
from ca.registry.foreign_bundles import ForeignBundles, parse_trust_domain
from identity.spiffeid import SpiffeId

# A join token is a bearer credential: a long life makes a leaked one dangerous.
MAX_JOIN_TOKEN_TTL = dt.timedelta(days=30)


class AdminServicer(LocalAuthorityMethods, FederationMethods, RevocationMethods,
                    admin_pb2_grpc.AdminServicer):
    """The Admin service."""

    def __init__(self, deps: ApiDeps) -> None:
        self._d = deps
        self._entries = EntryService(deps.datastore, deps.clock, deps.config.policy)
        self._agents = AgentService(deps.datastore, deps.clock)
        self._foreign_bundles = ForeignBundles(deps.datastore, deps.config.trust_domain)

    def _validate_entry(self, msg: types_pb2.Entry) -> EntryRecord:
        return validate.new_entry(msg, trust_domain=self._d.config.trust_domain,
                                  max_ttl=self._d.config.ca_ttl)

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
        return entry_to_proto(self._entries.create(self._validate_entry(request.entry)))

    @grpc_method("admin")
    def ListEntries(
        self, request: admin_pb2.ListEntriesRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListEntriesResponse:
        """One page of the entries matching every given filter."""
        entries, next_token = self._entries.list_page(
            validate.entry_filter(request), size=request.page_size,
            page_token=request.page_token,
        )
        return admin_pb2.ListEntriesResponse(
            entries=[entry_to_proto(e) for e in entries], next_page_token=next_token
        )

    @grpc_method("admin")
    def GetEntry(
        self, request: admin_pb2.GetEntryRequest, context: grpc.ServicerContext
    ) -> types_pb2.Entry:
        """One entry by id."""
        return entry_to_proto(self._entries.get(request.id))

    @grpc_method("admin")
    def DeleteEntry(
        self, request: admin_pb2.DeleteEntryRequest, context: grpc.ServicerContext
    ) -> admin_pb2.DeleteEntryResponse:
        """Delete an entry by id."""
        self._entries.delete(request.id)
        return admin_pb2.DeleteEntryResponse()

    @grpc_method("admin")
    def UpdateEntry(
        self, request: admin_pb2.UpdateEntryRequest, context: grpc.ServicerContext
    ) -> types_pb2.Entry:
        """Change the named fields of an entry; its revision bumps."""
        cfg = self._d.config

        def change(current: EntryRecord) -> EntryRecord:
            return validate.updated_entry(
                entry_to_proto(current), request.entry, request.fields,
                trust_domain=cfg.trust_domain, max_ttl=cfg.ca_ttl,
            )

        if not request.entry.id:
            raise InvalidArgumentError("entry.id is required")
        return entry_to_proto(
            self._entries.update(request.entry.id, change, fields=list(request.fields))
        )

    @grpc_method("admin")
    def CountEntries(
        self, request: admin_pb2.CountEntriesRequest, context: grpc.ServicerContext
    ) -> admin_pb2.CountEntriesResponse:
        """How many entries there are."""
        return admin_pb2.CountEntriesResponse(count=self._entries.count())

    @grpc_method("admin")
    def BatchCreateEntry(
        self, request: admin_pb2.BatchCreateEntryRequest, context: grpc.ServicerContext
    ) -> admin_pb2.BatchCreateEntryResponse:
        """Validate every entry first (one invalid entry: nothing is created), then
        create each in its own transaction and report each outcome."""
        records: list[EntryRecord] = []
        problems: list[str] = []
        for index, msg in enumerate(request.entries):
            try:
                records.append(self._validate_entry(msg))
            except InvalidArgumentError as exc:
                problems.append(f"entry {index}: {exc}")
        if problems:
            shown = "; ".join(problems[:5])
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise InvalidArgumentError(f"nothing was created: {shown}{more}")
        results = []
        for outcome in self._entries.create_batch(records):
            if isinstance(outcome, EntryRecord):
                results.append(admin_pb2.BatchCreateEntryResult(
                    status=types_pb2.Status(code=0), entry=entry_to_proto(outcome)))
            else:
                results.append(admin_pb2.BatchCreateEntryResult(status=types_pb2.Status(
                    code=status_for(outcome).value[0], message=str(outcome))))
        return admin_pb2.BatchCreateEntryResponse(results=results)

    # ---- agents ----------------------------------------------------------------------

    def _agent_id(self, value: str) -> SpiffeId:
        return validate.agent_id(value, self._d.config.trust_domain)

    @grpc_method("admin")
    def ListAgents(
        self, request: admin_pb2.ListAgentsRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListAgentsResponse:
        """One page of attested agents, ordered by ID."""
        nodes, next_token = self._agents.list_page(size=request.page_size,
                                              page_token=request.page_token)
        return admin_pb2.ListAgentsResponse(agents=[agent_to_proto(n) for n in nodes],
                                            next_page_token=next_token)

    @grpc_method("admin")
    def GetAgent(
        self, request: admin_pb2.GetAgentRequest, context: grpc.ServicerContext
    ) -> admin_pb2.Agent:
        """One attested agent."""
        return agent_to_proto(self._agents.get(self._agent_id(request.id)))

    @grpc_method("admin")
    def BanAgent(
        self, request: admin_pb2.BanAgentRequest, context: grpc.ServicerContext
    ) -> admin_pb2.Agent:
        """Ban an agent: refused at its next call and at re-attestation."""
        return agent_to_proto(self._agents.ban(self._agent_id(request.id)))

    @grpc_method("admin")
    def EvictAgent(
        self, request: admin_pb2.EvictAgentRequest, context: grpc.ServicerContext
    ) -> admin_pb2.EvictAgentResponse:
        """Delete an agent's record; it must attest again."""
        self._agents.evict(self._agent_id(request.id))
        return admin_pb2.EvictAgentResponse()

    @grpc_method("admin")
    def CountAgents(
        self, request: admin_pb2.CountAgentsRequest, context: grpc.ServicerContext
    ) -> admin_pb2.CountAgentsResponse:
        """How many attested agents there are."""
        return admin_pb2.CountAgentsResponse(count=self._agents.count())

    @grpc_method("admin")
    def PurgeAgents(
        self, request: admin_pb2.PurgeAgentsRequest, context: grpc.ServicerContext
    ) -> admin_pb2.PurgeAgentsResponse:
        """Evict agents whose SVIDs expired more than ``expired_for`` seconds ago."""
        if request.expired_for < 0:
            raise InvalidArgumentError("expired_for must not be negative")
        expired_for = (dt.timedelta(seconds=request.expired_for) if request.expired_for
                       else DEFAULT_PURGE_EXPIRED_FOR)
        ids = self._agents.purge(expired_for=expired_for, dry_run=request.dry_run)
        return admin_pb2.PurgeAgentsResponse(ids=[str(i) for i in ids])

    # ---- SVIDs for operators ---------------------------------------------------------

    @grpc_method("admin")
    def MintX509SVID(
        self, request: admin_pb2.MintX509SVIDRequest, context: grpc.ServicerContext
    ) -> admin_pb2.MintX509SVIDResponse:
        """Sign an X.509-SVID for any workload ID of ours over the caller's CSR."""
        cfg = self._d.config
        spiffe_id = validate.workload_id(request.spiffe_id, "spiffe_id", cfg.trust_domain)
        ttl = mint.ttl(request.ttl, default=cfg.x509_svid_ttl, maximum=cfg.ca_ttl)
        dns_names = validate.dns_names(request.dns_names)
        # The policy's rules without a parent scope apply: paths, DNS names, TTLs
        # (an asked-for TTL above the maximum is refused, the default clamped).
        verdict = cfg.policy.check_mint(spiffe_id, dns_names=dns_names, x509_ttl=request.ttl)
        if verdict.violation is not None:
            raise verdict.violation.error()
        ttl = verdict.x509_ttl(request.ttl, ttl)
        chain = mint.mint_x509_svid(self._d.authority, spiffe_id, request.csr, ttl=ttl,
                                    dns_names=dns_names)
        return admin_pb2.MintX509SVIDResponse(
            svid=svid_to_proto(spiffe_id, chain),
            bundle=bundle_to_proto(self._d.authority.bundle()),
        )

    @grpc_method("admin")
    def MintJWTSVID(
        self, request: admin_pb2.MintJWTSVIDRequest, context: grpc.ServicerContext
    ) -> admin_pb2.MintJWTSVIDResponse:
        """Sign a JWT-SVID for any workload ID of ours."""
        cfg = self._d.config
        spiffe_id = validate.workload_id(request.spiffe_id, "spiffe_id", cfg.trust_domain)
        audience = validate.audience(request.audience)
        ttl = mint.ttl(request.ttl, default=cfg.jwt_svid_ttl, maximum=cfg.ca_ttl)
        verdict = cfg.policy.check_mint(spiffe_id, jwt_ttl=request.ttl)
        if verdict.violation is not None:
            raise verdict.violation.error()
        ttl = verdict.jwt_ttl(request.ttl, ttl)
        signed = mint.mint_jwt_svid(self._d.authority, spiffe_id, audience, ttl=ttl)
        return admin_pb2.MintJWTSVIDResponse(
            token=signed.token, spiffe_id=str(spiffe_id),
            issued_at=int(signed.issued_at.timestamp()),
            expires_at=int(signed.expires_at.timestamp()),
        )

    @grpc_method("admin")
    def GetBundle(
        self, request: admin_pb2.GetBundleRequest, context: grpc.ServicerContext
    ) -> types_pb2.Bundle:
        """Our trust domain's bundle, or a foreign one's when a trust domain is named."""
        if request.trust_domain:
            td = parse_trust_domain(request.trust_domain)
            if td != self._d.config.trust_domain:
                return bundle_to_proto(self._foreign_bundles.get(td))
        return bundle_to_proto(self._d.authority.bundle())

    @grpc_method("admin")
    def ListBundles(
        self, request: admin_pb2.ListBundlesRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListBundlesResponse:
        """Every foreign trust domain's bundle."""
        return admin_pb2.ListBundlesResponse(
            bundles=[bundle_to_proto(b) for b in self._foreign_bundles.list()])

    @grpc_method("admin")
    def SetBundle(
        self, request: admin_pb2.SetBundleRequest, context: grpc.ServicerContext
    ) -> types_pb2.Bundle:
        """Replace (or add) a foreign trust domain's bundle by hand."""
        td = parse_trust_domain(request.trust_domain)
        return bundle_to_proto(self._foreign_bundles.set(td, request.format, request.data))

    @grpc_method("admin")
    def BatchSetFederatedBundles(
        self, request: admin_pb2.BatchSetFederatedBundlesRequest,
        context: grpc.ServicerContext,
    ) -> admin_pb2.BatchSetFederatedBundlesResponse:
        """Replace (or add) several foreign bundles in one transaction: all or none."""
        stored = self._foreign_bundles.set_many(
            [(m.trust_domain, m.format, m.data) for m in request.bundles])
        return admin_pb2.BatchSetFederatedBundlesResponse(
            bundles=[bundle_to_proto(b) for b in stored])

    @grpc_method("admin")
    def DeleteBundle(
        self, request: admin_pb2.DeleteBundleRequest, context: grpc.ServicerContext
    ) -> admin_pb2.DeleteBundleResponse:
        """Remove a foreign trust domain's bundle."""
        self._foreign_bundles.delete(parse_trust_domain(request.trust_domain))
        return admin_pb2.DeleteBundleResponse()

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
            instance_id=self._d.authority.owner, hostname=socket.gethostname(),
            version=_version(),
        )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sigil")
    except PackageNotFoundError:
        return "unknown"
