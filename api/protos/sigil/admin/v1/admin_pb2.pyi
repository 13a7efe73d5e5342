from api.protos.sigil.types.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

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
    __slots__ = ("spiffe_id", "parent_id", "selectors")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    SELECTORS_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    parent_id: str
    selectors: _containers.RepeatedCompositeFieldContainer[_types_pb2.Selector]
    def __init__(self, spiffe_id: _Optional[str] = ..., parent_id: _Optional[str] = ..., selectors: _Optional[_Iterable[_Union[_types_pb2.Selector, _Mapping]]] = ...) -> None: ...

class ListEntriesResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[_types_pb2.Entry]
    def __init__(self, entries: _Optional[_Iterable[_Union[_types_pb2.Entry, _Mapping]]] = ...) -> None: ...

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
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("serving", "trust_domain", "bundle_sequence")
    SERVING_FIELD_NUMBER: _ClassVar[int]
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    serving: bool
    trust_domain: str
    bundle_sequence: int
    def __init__(self, serving: _Optional[bool] = ..., trust_domain: _Optional[str] = ..., bundle_sequence: _Optional[int] = ...) -> None: ...
