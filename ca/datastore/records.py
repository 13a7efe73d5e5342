"""Plain values the repository returns: detached from sessions, typed, frozen."""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from identity.selectors import Selector
from identity.spiffeid import SpiffeId, TrustDomain


@dataclass(frozen=True, slots=True)
class EntryRecord:
    """A registration entry. ``id``, ``revision`` and times are set by the datastore."""

    spiffe_id: SpiffeId
    parent_id: SpiffeId
    selectors: tuple[Selector, ...]
    id: str = ""
    x509_svid_ttl: int = 0
    jwt_svid_ttl: int = 0
    dns_names: tuple[str, ...] = ()
    federates_with: tuple[TrustDomain, ...] = ()
    hint: str = ""
    admin: bool = False
    downstream: bool = False
    expires_at: int = 0
    owner: str = ""
    revision: int = 0
    created_at: int = 0
    updated_at: int = 0


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """An attested node (agent)."""

    spiffe_id: SpiffeId
    attestor: str
    serial: int
    expires_at: int
    selectors: tuple[Selector, ...] = ()
    new_serial: int | None = None
    banned: bool = False
    can_reattest: bool = False
    created_at: int = 0
    updated_at: int = 0


@dataclass(frozen=True, slots=True)
class CaKeyRecord:
    """A CA key slot's public half and state; the private key is in the key manager."""

    id: str
    kind: str
    status: str
    key_id: str
    public_key: bytes
    certificate: bytes | None
    not_after: int
    created_at: int
    owner: str = ""
    not_before: int = 0
    activated_at: int | None = None
    deactivated_at: int | None = None
    signed_until: int = 0


FOREIGN_BUNDLES_CHANGED = "foreign-bundles"
"""The ``entry_id`` of a change event that records a foreign bundle write.

Entry ids are UUIDs, so it names no entry; the entry index counts these events
(``EntryIndex.bundles_version``) and the sync's bundle cache re-reads on a new
count. A trust domain name can be longer than the column, so the event does not
say which bundle changed: bundles change rarely, and each is read again once.
"""


@dataclass(frozen=True, slots=True)
class StoredBundle:
    """A bundle row: the SPIFFE bundle JSON and its sequence number."""

    trust_domain: str
    data: str
    sequence: int


def selector_hash(
    spiffe_id: SpiffeId | str, parent_id: SpiffeId | str, selectors: Iterable[Selector]
) -> str:
    """The uniqueness key of an entry: SHA-256 over its IDs and sorted selectors.

    NUL separates the parts: it cannot occur in a SPIFFE ID or a selector, so two
    different entries never produce the same input.
    """
    parts = [str(spiffe_id), str(parent_id), *sorted({str(s) for s in selectors})]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


class Match(enum.Enum):
    """How a set filter compares with an entry's set (SPIRE's match behaviours)."""

    EXACT = "exact"  # the same set
    SUBSET = "subset"  # every value of the entry is among the given ones
    SUPERSET = "superset"  # the entry has every given value
    ANY = "any"  # at least one value in common


@dataclass(frozen=True, slots=True)
class EntryFilter:
    """Filters for listing entries; ``None`` (or an empty tuple) means no filter."""

    spiffe_id: SpiffeId | None = None
    parent_id: SpiffeId | None = None
    selectors: tuple[Selector, ...] = ()
    selector_match: Match = Match.EXACT
    federates_with: tuple[TrustDomain, ...] = ()
    federates_with_match: Match = Match.SUPERSET
    hint: str | None = None
