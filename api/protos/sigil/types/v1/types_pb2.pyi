from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Selector(_message.Message):
    __slots__ = ("type", "value")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    type: str
    value: str
    def __init__(self, type: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class Entry(_message.Message):
    __slots__ = ("id", "spiffe_id", "parent_id", "selectors", "x509_svid_ttl", "jwt_svid_ttl", "dns_names", "federates_with", "hint", "admin", "downstream", "expires_at", "revision", "created_at", "updated_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    SELECTORS_FIELD_NUMBER: _ClassVar[int]
    X509_SVID_TTL_FIELD_NUMBER: _ClassVar[int]
    JWT_SVID_TTL_FIELD_NUMBER: _ClassVar[int]
    DNS_NAMES_FIELD_NUMBER: _ClassVar[int]
    FEDERATES_WITH_FIELD_NUMBER: _ClassVar[int]
    HINT_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    DOWNSTREAM_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    spiffe_id: str
    parent_id: str
    selectors: _containers.RepeatedCompositeFieldContainer[Selector]
    x509_svid_ttl: int
    jwt_svid_ttl: int
    dns_names: _containers.RepeatedScalarFieldContainer[str]
    federates_with: _containers.RepeatedScalarFieldContainer[str]
    hint: str
    admin: bool
    downstream: bool
    expires_at: int
    revision: int
    created_at: int
    updated_at: int
    def __init__(self, id: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., parent_id: _Optional[str] = ..., selectors: _Optional[_Iterable[_Union[Selector, _Mapping]]] = ..., x509_svid_ttl: _Optional[int] = ..., jwt_svid_ttl: _Optional[int] = ..., dns_names: _Optional[_Iterable[str]] = ..., federates_with: _Optional[_Iterable[str]] = ..., hint: _Optional[str] = ..., admin: _Optional[bool] = ..., downstream: _Optional[bool] = ..., expires_at: _Optional[int] = ..., revision: _Optional[int] = ..., created_at: _Optional[int] = ..., updated_at: _Optional[int] = ...) -> None: ...

class JWTKey(_message.Message):
    __slots__ = ("key_id", "public_key", "expires_at")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    public_key: bytes
    expires_at: int
    def __init__(self, key_id: _Optional[str] = ..., public_key: _Optional[bytes] = ..., expires_at: _Optional[int] = ...) -> None: ...

class Bundle(_message.Message):
    __slots__ = ("trust_domain", "x509_authorities", "jwt_authorities", "sequence_number", "refresh_hint", "tainted_x509_authorities", "tainted_jwt_key_ids", "wit_authorities")
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    X509_AUTHORITIES_FIELD_NUMBER: _ClassVar[int]
    JWT_AUTHORITIES_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_NUMBER_FIELD_NUMBER: _ClassVar[int]
    REFRESH_HINT_FIELD_NUMBER: _ClassVar[int]
    TAINTED_X509_AUTHORITIES_FIELD_NUMBER: _ClassVar[int]
    TAINTED_JWT_KEY_IDS_FIELD_NUMBER: _ClassVar[int]
    WIT_AUTHORITIES_FIELD_NUMBER: _ClassVar[int]
    trust_domain: str
    x509_authorities: _containers.RepeatedScalarFieldContainer[bytes]
    jwt_authorities: _containers.RepeatedCompositeFieldContainer[JWTKey]
    sequence_number: int
    refresh_hint: int
    tainted_x509_authorities: _containers.RepeatedScalarFieldContainer[bytes]
    tainted_jwt_key_ids: _containers.RepeatedScalarFieldContainer[str]
    wit_authorities: _containers.RepeatedCompositeFieldContainer[JWTKey]
    def __init__(self, trust_domain: _Optional[str] = ..., x509_authorities: _Optional[_Iterable[bytes]] = ..., jwt_authorities: _Optional[_Iterable[_Union[JWTKey, _Mapping]]] = ..., sequence_number: _Optional[int] = ..., refresh_hint: _Optional[int] = ..., tainted_x509_authorities: _Optional[_Iterable[bytes]] = ..., tainted_jwt_key_ids: _Optional[_Iterable[str]] = ..., wit_authorities: _Optional[_Iterable[_Union[JWTKey, _Mapping]]] = ...) -> None: ...

class X509SVID(_message.Message):
    __slots__ = ("spiffe_id", "cert_chain", "expires_at")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    CERT_CHAIN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    cert_chain: _containers.RepeatedScalarFieldContainer[bytes]
    expires_at: int
    def __init__(self, spiffe_id: _Optional[str] = ..., cert_chain: _Optional[_Iterable[bytes]] = ..., expires_at: _Optional[int] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class Revocation(_message.Message):
    __slots__ = ("id", "kind", "value", "not_before_max", "expires_at", "created_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_MAX_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: int
    kind: str
    value: str
    not_before_max: int
    expires_at: int
    created_at: int
    def __init__(self, id: _Optional[int] = ..., kind: _Optional[str] = ..., value: _Optional[str] = ..., not_before_max: _Optional[int] = ..., expires_at: _Optional[int] = ..., created_at: _Optional[int] = ...) -> None: ...
