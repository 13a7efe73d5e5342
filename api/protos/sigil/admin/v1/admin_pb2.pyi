from api.protos.sigil.types.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Match(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MATCH_EXACT: _ClassVar[Match]
    MATCH_SUBSET: _ClassVar[Match]
    MATCH_SUPERSET: _ClassVar[Match]
    MATCH_ANY: _ClassVar[Match]
MATCH_EXACT: Match
MATCH_SUBSET: Match
MATCH_SUPERSET: Match
MATCH_ANY: Match

class CreateJoinTokenRequest(_message.Message):
    __slots__ = ("ttl", "spiffe_id")
    TTL_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    ttl: int
    spiffe_id: str
    def __init__(self, ttl: _Optional[int] = ..., spiffe_id: _Optional[str] = ...) -> None: ...

class JoinToken(_message.Message):
    __slots__ = ("token", "spiffe_id", "expires_at", "agent_id")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    token: str
    spiffe_id: str
    expires_at: int
    agent_id: str
    def __init__(self, token: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., expires_at: _Optional[int] = ..., agent_id: _Optional[str] = ...) -> None: ...

class CreateEntryRequest(_message.Message):
    __slots__ = ("entry",)
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    entry: _types_pb2.Entry
    def __init__(self, entry: _Optional[_Union[_types_pb2.Entry, _Mapping]] = ...) -> None: ...

class ListEntriesRequest(_message.Message):
    __slots__ = ("spiffe_id", "parent_id", "selectors", "selector_match", "federates_with", "federates_with_match", "hint", "page_size", "page_token")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    SELECTORS_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_MATCH_FIELD_NUMBER: _ClassVar[int]
    FEDERATES_WITH_FIELD_NUMBER: _ClassVar[int]
    FEDERATES_WITH_MATCH_FIELD_NUMBER: _ClassVar[int]
    HINT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    parent_id: str
    selectors: _containers.RepeatedCompositeFieldContainer[_types_pb2.Selector]
    selector_match: Match
    federates_with: _containers.RepeatedScalarFieldContainer[str]
    federates_with_match: Match
    hint: str
    page_size: int
    page_token: str
    def __init__(self, spiffe_id: _Optional[str] = ..., parent_id: _Optional[str] = ..., selectors: _Optional[_Iterable[_Union[_types_pb2.Selector, _Mapping]]] = ..., selector_match: _Optional[_Union[Match, str]] = ..., federates_with: _Optional[_Iterable[str]] = ..., federates_with_match: _Optional[_Union[Match, str]] = ..., hint: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListEntriesResponse(_message.Message):
    __slots__ = ("entries", "next_page_token")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[_types_pb2.Entry]
    next_page_token: str
    def __init__(self, entries: _Optional[_Iterable[_Union[_types_pb2.Entry, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UpdateEntryRequest(_message.Message):
    __slots__ = ("entry", "fields")
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    entry: _types_pb2.Entry
    fields: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, entry: _Optional[_Union[_types_pb2.Entry, _Mapping]] = ..., fields: _Optional[_Iterable[str]] = ...) -> None: ...

class CountEntriesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CountEntriesResponse(_message.Message):
    __slots__ = ("count",)
    COUNT_FIELD_NUMBER: _ClassVar[int]
    count: int
    def __init__(self, count: _Optional[int] = ...) -> None: ...

class BatchCreateEntryRequest(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[_types_pb2.Entry]
    def __init__(self, entries: _Optional[_Iterable[_Union[_types_pb2.Entry, _Mapping]]] = ...) -> None: ...

class BatchCreateEntryResult(_message.Message):
    __slots__ = ("status", "entry")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    status: _types_pb2.Status
    entry: _types_pb2.Entry
    def __init__(self, status: _Optional[_Union[_types_pb2.Status, _Mapping]] = ..., entry: _Optional[_Union[_types_pb2.Entry, _Mapping]] = ...) -> None: ...

class BatchCreateEntryResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[BatchCreateEntryResult]
    def __init__(self, results: _Optional[_Iterable[_Union[BatchCreateEntryResult, _Mapping]]] = ...) -> None: ...

class GetEntryRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteEntryRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteEntryResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetBundleRequest(_message.Message):
    __slots__ = ("trust_domain",)
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    trust_domain: str
    def __init__(self, trust_domain: _Optional[str] = ...) -> None: ...

class ListBundlesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListBundlesResponse(_message.Message):
    __slots__ = ("bundles",)
    BUNDLES_FIELD_NUMBER: _ClassVar[int]
    bundles: _containers.RepeatedCompositeFieldContainer[_types_pb2.Bundle]
    def __init__(self, bundles: _Optional[_Iterable[_Union[_types_pb2.Bundle, _Mapping]]] = ...) -> None: ...

class SetBundleRequest(_message.Message):
    __slots__ = ("trust_domain", "format", "data")
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    trust_domain: str
    format: str
    data: bytes
    def __init__(self, trust_domain: _Optional[str] = ..., format: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class BatchSetFederatedBundlesRequest(_message.Message):
    __slots__ = ("bundles",)
    BUNDLES_FIELD_NUMBER: _ClassVar[int]
    bundles: _containers.RepeatedCompositeFieldContainer[SetBundleRequest]
    def __init__(self, bundles: _Optional[_Iterable[_Union[SetBundleRequest, _Mapping]]] = ...) -> None: ...

class BatchSetFederatedBundlesResponse(_message.Message):
    __slots__ = ("bundles",)
    BUNDLES_FIELD_NUMBER: _ClassVar[int]
    bundles: _containers.RepeatedCompositeFieldContainer[_types_pb2.Bundle]
    def __init__(self, bundles: _Optional[_Iterable[_Union[_types_pb2.Bundle, _Mapping]]] = ...) -> None: ...

class DeleteBundleRequest(_message.Message):
    __slots__ = ("trust_domain",)
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    trust_domain: str
    def __init__(self, trust_domain: _Optional[str] = ...) -> None: ...

class DeleteBundleResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("serving", "trust_domain", "bundle_sequence", "instance_id", "hostname", "version")
    SERVING_FIELD_NUMBER: _ClassVar[int]
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    serving: bool
    trust_domain: str
    bundle_sequence: int
    instance_id: str
    hostname: str
    version: str
    def __init__(self, serving: _Optional[bool] = ..., trust_domain: _Optional[str] = ..., bundle_sequence: _Optional[int] = ..., instance_id: _Optional[str] = ..., hostname: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class Agent(_message.Message):
    __slots__ = ("id", "attestor", "selectors", "serial", "expires_at", "banned", "can_reattest", "created_at", "updated_at", "new_serial")
    ID_FIELD_NUMBER: _ClassVar[int]
    ATTESTOR_FIELD_NUMBER: _ClassVar[int]
    SELECTORS_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    BANNED_FIELD_NUMBER: _ClassVar[int]
    CAN_REATTEST_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    NEW_SERIAL_FIELD_NUMBER: _ClassVar[int]
    id: str
    attestor: str
    selectors: _containers.RepeatedCompositeFieldContainer[_types_pb2.Selector]
    serial: str
    expires_at: int
    banned: bool
    can_reattest: bool
    created_at: int
    updated_at: int
    new_serial: str
    def __init__(self, id: _Optional[str] = ..., attestor: _Optional[str] = ..., selectors: _Optional[_Iterable[_Union[_types_pb2.Selector, _Mapping]]] = ..., serial: _Optional[str] = ..., expires_at: _Optional[int] = ..., banned: _Optional[bool] = ..., can_reattest: _Optional[bool] = ..., created_at: _Optional[int] = ..., updated_at: _Optional[int] = ..., new_serial: _Optional[str] = ...) -> None: ...

class ListAgentsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAgentsResponse(_message.Message):
    __slots__ = ("agents", "next_page_token")
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[Agent]
    next_page_token: str
    def __init__(self, agents: _Optional[_Iterable[_Union[Agent, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetAgentRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class BanAgentRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class EvictAgentRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class EvictAgentResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CountAgentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CountAgentsResponse(_message.Message):
    __slots__ = ("count",)
    COUNT_FIELD_NUMBER: _ClassVar[int]
    count: int
    def __init__(self, count: _Optional[int] = ...) -> None: ...

class PurgeAgentsRequest(_message.Message):
    __slots__ = ("expired_for", "dry_run")
    EXPIRED_FOR_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    expired_for: int
    dry_run: bool
    def __init__(self, expired_for: _Optional[int] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class PurgeAgentsResponse(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[str]] = ...) -> None: ...

class MintX509SVIDRequest(_message.Message):
    __slots__ = ("spiffe_id", "csr", "ttl", "dns_names")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    CSR_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    DNS_NAMES_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    csr: bytes
    ttl: int
    dns_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, spiffe_id: _Optional[str] = ..., csr: _Optional[bytes] = ..., ttl: _Optional[int] = ..., dns_names: _Optional[_Iterable[str]] = ...) -> None: ...

class MintX509SVIDResponse(_message.Message):
    __slots__ = ("svid", "bundle")
    SVID_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    svid: _types_pb2.X509SVID
    bundle: _types_pb2.Bundle
    def __init__(self, svid: _Optional[_Union[_types_pb2.X509SVID, _Mapping]] = ..., bundle: _Optional[_Union[_types_pb2.Bundle, _Mapping]] = ...) -> None: ...

class MintJWTSVIDRequest(_message.Message):
    __slots__ = ("spiffe_id", "audience", "ttl")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    audience: _containers.RepeatedScalarFieldContainer[str]
    ttl: int
    def __init__(self, spiffe_id: _Optional[str] = ..., audience: _Optional[_Iterable[str]] = ..., ttl: _Optional[int] = ...) -> None: ...

class MintJWTSVIDResponse(_message.Message):
    __slots__ = ("token", "spiffe_id", "issued_at", "expires_at")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    token: str
    spiffe_id: str
    issued_at: int
    expires_at: int
    def __init__(self, token: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., issued_at: _Optional[int] = ..., expires_at: _Optional[int] = ...) -> None: ...

class LocalAuthorityRequest(_message.Message):
    __slots__ = ("kind", "authority_id", "force")
    KIND_FIELD_NUMBER: _ClassVar[int]
    AUTHORITY_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    authority_id: str
    force: bool
    def __init__(self, kind: _Optional[str] = ..., authority_id: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class LocalAuthority(_message.Message):
    __slots__ = ("kind", "authority_id", "status", "not_after", "owner", "signed_until", "upstream_authority_id", "not_before", "drops_at", "owner_hostname")
    KIND_FIELD_NUMBER: _ClassVar[int]
    AUTHORITY_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SIGNED_UNTIL_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_AUTHORITY_ID_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    DROPS_AT_FIELD_NUMBER: _ClassVar[int]
    OWNER_HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    kind: str
    authority_id: str
    status: str
    not_after: int
    owner: str
    signed_until: int
    upstream_authority_id: str
    not_before: int
    drops_at: int
    owner_hostname: str
    def __init__(self, kind: _Optional[str] = ..., authority_id: _Optional[str] = ..., status: _Optional[str] = ..., not_after: _Optional[int] = ..., owner: _Optional[str] = ..., signed_until: _Optional[int] = ..., upstream_authority_id: _Optional[str] = ..., not_before: _Optional[int] = ..., drops_at: _Optional[int] = ..., owner_hostname: _Optional[str] = ...) -> None: ...

class LocalAuthorities(_message.Message):
    __slots__ = ("authorities",)
    AUTHORITIES_FIELD_NUMBER: _ClassVar[int]
    authorities: _containers.RepeatedCompositeFieldContainer[LocalAuthority]
    def __init__(self, authorities: _Optional[_Iterable[_Union[LocalAuthority, _Mapping]]] = ...) -> None: ...

class FederationRelationship(_message.Message):
    __slots__ = ("trust_domain", "bundle_endpoint_url", "profile", "endpoint_spiffe_id", "created_at", "updated_at", "bundle_sequence", "has_bundle", "last_refresh", "last_refresh_message", "next_refresh_at")
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_ENDPOINT_URL_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    HAS_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    LAST_REFRESH_FIELD_NUMBER: _ClassVar[int]
    LAST_REFRESH_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    NEXT_REFRESH_AT_FIELD_NUMBER: _ClassVar[int]
    trust_domain: str
    bundle_endpoint_url: str
    profile: str
    endpoint_spiffe_id: str
    created_at: int
    updated_at: int
    bundle_sequence: int
    has_bundle: bool
    last_refresh: str
    last_refresh_message: str
    next_refresh_at: int
    def __init__(self, trust_domain: _Optional[str] = ..., bundle_endpoint_url: _Optional[str] = ..., profile: _Optional[str] = ..., endpoint_spiffe_id: _Optional[str] = ..., created_at: _Optional[int] = ..., updated_at: _Optional[int] = ..., bundle_sequence: _Optional[int] = ..., has_bundle: _Optional[bool] = ..., last_refresh: _Optional[str] = ..., last_refresh_message: _Optional[str] = ..., next_refresh_at: _Optional[int] = ...) -> None: ...

class FederationRelationshipRequest(_message.Message):
    __slots__ = ("relationship", "bootstrap_bundle")
    RELATIONSHIP_FIELD_NUMBER: _ClassVar[int]
    BOOTSTRAP_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    relationship: FederationRelationship
    bootstrap_bundle: bytes
    def __init__(self, relationship: _Optional[_Union[FederationRelationship, _Mapping]] = ..., bootstrap_bundle: _Optional[bytes] = ...) -> None: ...

class FederationRelationshipName(_message.Message):
    __slots__ = ("trust_domain",)
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    trust_domain: str
    def __init__(self, trust_domain: _Optional[str] = ...) -> None: ...

class ListFederationRelationshipsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListFederationRelationshipsResponse(_message.Message):
    __slots__ = ("relationships",)
    RELATIONSHIPS_FIELD_NUMBER: _ClassVar[int]
    relationships: _containers.RepeatedCompositeFieldContainer[FederationRelationship]
    def __init__(self, relationships: _Optional[_Iterable[_Union[FederationRelationship, _Mapping]]] = ...) -> None: ...

class DeleteFederationRelationshipResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RefreshFederatedBundleResponse(_message.Message):
    __slots__ = ("ok", "reason", "message", "changed", "sequence", "next_refresh_at")
    OK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    NEXT_REFRESH_AT_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    reason: str
    message: str
    changed: bool
    sequence: int
    next_refresh_at: int
    def __init__(self, ok: _Optional[bool] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., changed: _Optional[bool] = ..., sequence: _Optional[int] = ..., next_refresh_at: _Optional[int] = ...) -> None: ...

class RevokeSVIDRequest(_message.Message):
    __slots__ = ("x509_serial", "spiffe_id", "jwt_id", "jwt_key_id")
    X509_SERIAL_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    JWT_ID_FIELD_NUMBER: _ClassVar[int]
    JWT_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    x509_serial: str
    spiffe_id: str
    jwt_id: str
    jwt_key_id: str
    def __init__(self, x509_serial: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., jwt_id: _Optional[str] = ..., jwt_key_id: _Optional[str] = ...) -> None: ...

class ListRevokedSVIDsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRevokedSVIDsResponse(_message.Message):
    __slots__ = ("revocations", "version")
    REVOCATIONS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    revocations: _containers.RepeatedCompositeFieldContainer[_types_pb2.Revocation]
    version: int
    def __init__(self, revocations: _Optional[_Iterable[_Union[_types_pb2.Revocation, _Mapping]]] = ..., version: _Optional[int] = ...) -> None: ...
