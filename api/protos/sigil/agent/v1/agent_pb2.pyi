from api.protos.sigil.types.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AttestationData(_message.Message):
    __slots__ = ("type", "payload")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    type: str
    payload: bytes
    def __init__(self, type: _Optional[str] = ..., payload: _Optional[bytes] = ...) -> None: ...

class AttestationChallengeRequest(_message.Message):
    __slots__ = ("type",)
    TYPE_FIELD_NUMBER: _ClassVar[int]
    type: str
    def __init__(self, type: _Optional[str] = ...) -> None: ...

class AttestationChallengeResponse(_message.Message):
    __slots__ = ("nonce", "expires_at")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    expires_at: int
    def __init__(self, nonce: _Optional[bytes] = ..., expires_at: _Optional[int] = ...) -> None: ...

class AttestAgentRequest(_message.Message):
    __slots__ = ("data", "csr")
    DATA_FIELD_NUMBER: _ClassVar[int]
    CSR_FIELD_NUMBER: _ClassVar[int]
    data: AttestationData
    csr: bytes
    def __init__(self, data: _Optional[_Union[AttestationData, _Mapping]] = ..., csr: _Optional[bytes] = ...) -> None: ...

class AttestAgentResponse(_message.Message):
    __slots__ = ("svid", "bundle", "node_selectors")
    SVID_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    NODE_SELECTORS_FIELD_NUMBER: _ClassVar[int]
    svid: _types_pb2.X509SVID
    bundle: _types_pb2.Bundle
    node_selectors: _containers.RepeatedCompositeFieldContainer[_types_pb2.Selector]
    def __init__(self, svid: _Optional[_Union[_types_pb2.X509SVID, _Mapping]] = ..., bundle: _Optional[_Union[_types_pb2.Bundle, _Mapping]] = ..., node_selectors: _Optional[_Iterable[_Union[_types_pb2.Selector, _Mapping]]] = ...) -> None: ...

class RenewAgentRequest(_message.Message):
    __slots__ = ("csr",)
    CSR_FIELD_NUMBER: _ClassVar[int]
    csr: bytes
    def __init__(self, csr: _Optional[bytes] = ...) -> None: ...

class RenewAgentResponse(_message.Message):
    __slots__ = ("svid",)
    SVID_FIELD_NUMBER: _ClassVar[int]
    svid: _types_pb2.X509SVID
    def __init__(self, svid: _Optional[_Union[_types_pb2.X509SVID, _Mapping]] = ...) -> None: ...

class SyncAuthorizedRequest(_message.Message):
    __slots__ = ("known_revision", "known_generation", "known_bundle_digests", "known_revocation_id")
    class KnownBundleDigestsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KNOWN_REVISION_FIELD_NUMBER: _ClassVar[int]
    KNOWN_GENERATION_FIELD_NUMBER: _ClassVar[int]
    KNOWN_BUNDLE_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    KNOWN_REVOCATION_ID_FIELD_NUMBER: _ClassVar[int]
    known_revision: int
    known_generation: str
    known_bundle_digests: _containers.ScalarMap[str, str]
    known_revocation_id: int
    def __init__(self, known_revision: _Optional[int] = ..., known_generation: _Optional[str] = ..., known_bundle_digests: _Optional[_Mapping[str, str]] = ..., known_revocation_id: _Optional[int] = ...) -> None: ...

class SyncAuthorizedResponse(_message.Message):
    __slots__ = ("entries", "bundles", "revision")
    class BundlesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _types_pb2.Bundle
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_types_pb2.Bundle, _Mapping]] = ...) -> None: ...
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    BUNDLES_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[_types_pb2.Entry]
    bundles: _containers.MessageMap[str, _types_pb2.Bundle]
    revision: int
    def __init__(self, entries: _Optional[_Iterable[_Union[_types_pb2.Entry, _Mapping]]] = ..., bundles: _Optional[_Mapping[str, _types_pb2.Bundle]] = ..., revision: _Optional[int] = ...) -> None: ...

class SyncAuthorizedEntriesPage(_message.Message):
    __slots__ = ("full_resync", "entries", "removed_entry_ids", "bundles", "revision", "generation", "last", "bundle_digests", "revocations", "revocation_id", "revocations_full")
    class BundlesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _types_pb2.Bundle
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_types_pb2.Bundle, _Mapping]] = ...) -> None: ...
    class BundleDigestsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    FULL_RESYNC_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    REMOVED_ENTRY_IDS_FIELD_NUMBER: _ClassVar[int]
    BUNDLES_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    REVOCATIONS_FIELD_NUMBER: _ClassVar[int]
    REVOCATION_ID_FIELD_NUMBER: _ClassVar[int]
    REVOCATIONS_FULL_FIELD_NUMBER: _ClassVar[int]
    full_resync: bool
    entries: _containers.RepeatedCompositeFieldContainer[_types_pb2.Entry]
    removed_entry_ids: _containers.RepeatedScalarFieldContainer[str]
    bundles: _containers.MessageMap[str, _types_pb2.Bundle]
    revision: int
    generation: str
    last: bool
    bundle_digests: _containers.ScalarMap[str, str]
    revocations: _containers.RepeatedCompositeFieldContainer[_types_pb2.Revocation]
    revocation_id: int
    revocations_full: bool
    def __init__(self, full_resync: _Optional[bool] = ..., entries: _Optional[_Iterable[_Union[_types_pb2.Entry, _Mapping]]] = ..., removed_entry_ids: _Optional[_Iterable[str]] = ..., bundles: _Optional[_Mapping[str, _types_pb2.Bundle]] = ..., revision: _Optional[int] = ..., generation: _Optional[str] = ..., last: _Optional[bool] = ..., bundle_digests: _Optional[_Mapping[str, str]] = ..., revocations: _Optional[_Iterable[_Union[_types_pb2.Revocation, _Mapping]]] = ..., revocation_id: _Optional[int] = ..., revocations_full: _Optional[bool] = ...) -> None: ...

class NewX509SVIDParams(_message.Message):
    __slots__ = ("entry_id", "csr")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    CSR_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    csr: bytes
    def __init__(self, entry_id: _Optional[str] = ..., csr: _Optional[bytes] = ...) -> None: ...

class BatchNewX509SVIDRequest(_message.Message):
    __slots__ = ("params",)
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    params: _containers.RepeatedCompositeFieldContainer[NewX509SVIDParams]
    def __init__(self, params: _Optional[_Iterable[_Union[NewX509SVIDParams, _Mapping]]] = ...) -> None: ...

class BatchNewX509SVIDResult(_message.Message):
    __slots__ = ("status", "svid", "entry_id")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SVID_FIELD_NUMBER: _ClassVar[int]
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    status: _types_pb2.Status
    svid: _types_pb2.X509SVID
    entry_id: str
    def __init__(self, status: _Optional[_Union[_types_pb2.Status, _Mapping]] = ..., svid: _Optional[_Union[_types_pb2.X509SVID, _Mapping]] = ..., entry_id: _Optional[str] = ...) -> None: ...

class BatchNewX509SVIDResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[BatchNewX509SVIDResult]
    def __init__(self, results: _Optional[_Iterable[_Union[BatchNewX509SVIDResult, _Mapping]]] = ...) -> None: ...

class NewJWTSVIDRequest(_message.Message):
    __slots__ = ("entry_id", "audience")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    audience: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, entry_id: _Optional[str] = ..., audience: _Optional[_Iterable[str]] = ...) -> None: ...

class NewJWTSVIDResponse(_message.Message):
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

class RevocationListRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RevocationListResponse(_message.Message):
    __slots__ = ("signed_list", "version")
    SIGNED_LIST_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    signed_list: str
    version: int
    def __init__(self, signed_list: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class NewWITSVIDRequest(_message.Message):
    __slots__ = ("entry_id", "public_key")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    public_key: bytes
    def __init__(self, entry_id: _Optional[str] = ..., public_key: _Optional[bytes] = ...) -> None: ...

class NewWITSVIDResponse(_message.Message):
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
