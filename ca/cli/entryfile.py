"""Entries written by hand: the JSON batch file of ``entry create --data`` and the
time values the entry commands accept.

A batch file is a list of entries, or ``{"entries": [...]}`` (what ``entry show
--output json`` prints can be fed back: ``id``, ``revision``, ``created_at`` and
``updated_at`` are ignored). Each entry uses the keys of the JSON output;
``selectors`` may be ``[{"type": "unix", "value": "uid:1000"}]`` or
``["unix:uid:1000"]``; ``"node": true`` in place of ``parent_id`` makes a node-alias
entry. Only the shape is checked here; the server validates every value.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

from api.protos.sigil.types.v1 import types_pb2
from ca.errors import InvalidArgumentError
from identity.errors import SigilError
from identity.spiffeid import SpiffeId, TrustDomain

MAX_FILE_BYTES = 4 * 1024 * 1024
_STRING_KEYS = ("spiffe_id", "parent_id", "hint")
_INT_KEYS = ("x509_svid_ttl", "jwt_svid_ttl")
_BOOL_KEYS = ("admin", "downstream", "node")
_LIST_KEYS = ("dns_names", "federates_with")
_IGNORED_KEYS = ("id", "revision", "created_at", "updated_at")
KNOWN_KEYS = frozenset(
    (*_STRING_KEYS, *_INT_KEYS, *_BOOL_KEYS, *_LIST_KEYS, *_IGNORED_KEYS, "selectors",
     "expires_at")
)


def server_id_for(spiffe_id: str) -> str:
    """The server's ID in the trust domain of ``spiffe_id``: a node alias's parent."""
    try:
        td = SpiffeId.parse(spiffe_id).trust_domain
    except SigilError as exc:
        raise InvalidArgumentError(f"spiffe_id: {exc}") from None
    return str(SpiffeId.from_segments(TrustDomain(td.name), "sigil", "server"))


def parse_time(value: object, what: str) -> int:
    """Unix seconds from an integer, or from an RFC 3339 time (``2030-01-01T00:00:00Z``).

    ``0``, ``""``, ``null`` and ``"never"`` mean no expiry (0).
    """
    if value is None or value in ("", "never", 0):
        return 0
    if isinstance(value, bool):
        raise InvalidArgumentError(f"{what}: expected a time, not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise InvalidArgumentError(f"{what} {value} must not be negative")
        return value
    if isinstance(value, str):
        if value.isdigit():
            return int(value)
        try:
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            parsed = None
        if parsed is None or parsed.tzinfo is None:
            raise InvalidArgumentError(
                f"{what} {value!r} is not unix seconds or an RFC 3339 time with a zone "
                "(e.g. 2030-01-01T00:00:00Z)"
            )
        return int(parsed.timestamp())
    raise InvalidArgumentError(f"{what}: expected a time, not {type(value).__name__}")


def _selector(value: object, where: str) -> types_pb2.Selector:
    if isinstance(value, str):
        kind, sep, rest = value.partition(":")
        if not sep:
            raise InvalidArgumentError(f"{where}: selector {value!r} is not type:value")
        return types_pb2.Selector(type=kind, value=rest)
    if isinstance(value, Mapping) and set(value) == {"type", "value"} and all(
        isinstance(v, str) for v in value.values()
    ):
        return types_pb2.Selector(type=value["type"], value=value["value"])
    raise InvalidArgumentError(
        f"{where}: a selector is \"type:value\" or {{\"type\": ..., \"value\": ...}}"
    )


def entry_from_json(doc: object, where: str) -> types_pb2.Entry:
    """One entry object of a batch file as an Entry message.

    Raises:
        InvalidArgumentError: naming ``where`` (e.g. ``entry 3``) and the bad key.
    """
    if not isinstance(doc, Mapping):
        raise InvalidArgumentError(f"{where}: expected an object")
    unknown = sorted(set(doc) - KNOWN_KEYS)
    if unknown:
        raise InvalidArgumentError(f"{where}: unknown key {unknown[0]!r}")
    kwargs: dict[str, Any] = {}
    for key in _STRING_KEYS:
        if key in doc:
            if not isinstance(doc[key], str):
                raise InvalidArgumentError(f"{where}: {key} must be a string")
            kwargs[key] = doc[key]
    for key in _INT_KEYS:
        if key in doc:
            value = doc[key]
            if isinstance(value, bool) or not isinstance(value, int) or not (
                0 <= value < 2**31
            ):
                raise InvalidArgumentError(f"{where}: {key} must be a number of seconds, 0 or more")
            kwargs[key] = value
    for key in _BOOL_KEYS:
        if key in doc and not isinstance(doc[key], bool):
            raise InvalidArgumentError(f"{where}: {key} must be true or false")
    for key in _LIST_KEYS:
        if key in doc:
            value = doc[key]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise InvalidArgumentError(f"{where}: {key} must be a list of strings")
            kwargs[key] = value
    sels = doc.get("selectors", [])
    if not isinstance(sels, list):
        raise InvalidArgumentError(f"{where}: selectors must be a list")
    kwargs["selectors"] = [_selector(s, where) for s in sels]
    kwargs["admin"] = bool(doc.get("admin", False))
    kwargs["downstream"] = bool(doc.get("downstream", False))
    kwargs["expires_at"] = parse_time(doc.get("expires_at"), f"{where}: expires_at")
    if doc.get("node"):
        if kwargs.get("parent_id"):
            raise InvalidArgumentError(f"{where}: give parent_id or node, not both")
        kwargs["parent_id"] = server_id_for(kwargs.get("spiffe_id", ""))
    return types_pb2.Entry(**kwargs)


def load_batch(data: bytes, *, source: str) -> list[types_pb2.Entry]:
    """Every entry of a batch file, shape-checked.

    Raises:
        InvalidArgumentError: naming ``source`` and, where it applies, the entry.
    """
    if len(data) > MAX_FILE_BYTES:
        raise InvalidArgumentError(f"{source} is larger than {MAX_FILE_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"{source} is not JSON: {exc}") from None
    if isinstance(doc, Mapping) and set(doc) == {"entries"}:
        doc = doc["entries"]
    if not isinstance(doc, list):
        raise InvalidArgumentError(f'{source}: expected a list of entries or {{"entries": [...]}}')
    if not doc:
        raise InvalidArgumentError(f"{source} holds no entries")
    return [entry_from_json(item, f"{source}: entry {i}") for i, item in enumerate(doc)]
