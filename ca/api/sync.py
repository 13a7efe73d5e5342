"""SyncAuthorizedEntries: an agent's sync by revision, cut into pages.

The agent API servicer authenticates the agent and calls :func:`sync_pages`; the
entry index (:mod:`ca.registry.entry_index`) decides what changed for that agent. Pages are
cut by encoded size, so however many entries an agent has, every message stays far
below grpc's default 4 MiB receive limit.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from api.protos.sigil.agent.v1 import agent_pb2
from api.protos.sigil.types.v1 import types_pb2
from ca.api.convert import bundle_to_proto, entry_to_proto, own_bundle_to_proto
from ca.errors import InvalidArgumentError
from ca.log import event
from ca.metrics import observe_sync_seconds
from ca.registry.entry_index import EntryIndex, SyncDelta
from identity.bundle import Bundle
from identity.errors import BundleError
from identity.selectors import Selector
from identity.spiffeid import SpiffeId, TrustDomain

if TYPE_CHECKING:
    from ca.authority import CertificateAuthority
    from ca.datastore import Datastore

PAGE_BYTES = 1024 * 1024
"""Target encoded size of one page (the first also carries the bundles)."""
MAX_GENERATION_LENGTH = 64
MAX_KNOWN_BUNDLES = 1024
"""Bundle digests an agent may present: far more trust domains than anyone federates with."""
DIGEST_LENGTH = 32
MAX_TRUST_DOMAIN_LENGTH = 255


@dataclass(frozen=True, slots=True)
class SyncBundle:
    """A bundle as a sync sends it, and the digest that names its content."""

    message: types_pb2.Bundle
    digest: str

    @classmethod
    def of(cls, message: types_pb2.Bundle) -> SyncBundle:
        """Digest the message (deterministic encoding, so equal content, equal digest)."""
        data = message.SerializeToString(deterministic=True)
        return cls(message, hashlib.sha256(data).hexdigest()[:DIGEST_LENGTH])


BundlesFor = Callable[[Iterable[TrustDomain]], dict[str, SyncBundle]]
"""Our bundle plus those of the given federated trust domains, keyed by name."""


class SyncBundles:
    """The bundles syncs send, each encoded and digested once per version.

    Our own bundle is rebuilt when the authority's bundle or taint lists change
    (new objects: the authority replaces them, never mutates them). A federated
    one is read from the datastore again only when ``version`` changes: the entry
    index's count of foreign bundle change events
    (:attr:`ca.registry.entry_index.EntryIndex.bundles_version`), which every write records
    in the change log, whichever server made it. So a sync with nothing new reads
    no bundle; a change reaches the syncs once the index has seen its event (at
    once for this process's writes, within the index's poll interval for another
    server's). Without ``version`` every call reads. Called as a
    :data:`BundlesFor`.
    """

    def __init__(self, authority: CertificateAuthority, datastore: Datastore, *,
                 version: Callable[[], int] | None = None) -> None:
        self._authority = authority
        self._datastore = datastore
        self._version = version
        self._own: tuple[object, object, object, SyncBundle] | None = None
        # trust domain -> (version read at, stored document or None, built message)
        self._foreign: dict[str, tuple[int, str | None, SyncBundle | None]] = {}

    def own(self) -> SyncBundle:
        """Our trust domain's bundle, with the tainted authorities agents act on."""
        a = self._authority
        bundle, tx, tj = a.bundle(), a.tainted_x509_authorities(), a.tainted_jwt_key_ids()
        cached = self._own
        if cached is not None and cached[0] is bundle and cached[1] is tx and cached[2] is tj:
            return cached[3]
        built = SyncBundle.of(own_bundle_to_proto(a))
        self._own = (bundle, tx, tj, built)
        return built

    def foreign(self, td: TrustDomain) -> SyncBundle | None:
        """A federated trust domain's stored bundle; None if absent or unreadable."""
        # Read the version before the row: a write landing in between is then
        # read again next time, never missed.
        version = self._version() if self._version is not None else None
        cached = self._foreign.get(td.name)
        if cached is not None and version is not None and cached[0] == version:
            return cached[2]
        stored = self._datastore.get_bundle(td)
        data = None if stored is None else stored.data
        built: SyncBundle | None = None
        if cached is not None and cached[1] == data:
            built = cached[2]
        elif data is not None:
            try:
                built = SyncBundle.of(bundle_to_proto(Bundle.from_jwks(td, data)))
            except BundleError as exc:
                # Both writers parse before storing; a row damaged in the database
                # must not fail every agent's sync, only go missing (and be seen, once).
                event("stored foreign bundle unreadable", level=logging.ERROR,
                      trust_domain=td.name, error=str(exc))
        # Absent bundles are remembered too: a trust domain an entry federates
        # with before its bundle arrives costs no read per sync either.
        self._foreign[td.name] = (-1 if version is None else version, data, built)
        return built

    def __call__(self, federated: Iterable[TrustDomain]) -> dict[str, SyncBundle]:
        own = self.own()
        bundles = {self._authority.trust_domain.name: own}
        for td in dict.fromkeys(federated):
            if td.name not in bundles and (found := self.foreign(td)) is not None:
                bundles[td.name] = found
        return bundles


def sync_delta(
    index: EntryIndex, request: agent_pb2.SyncAuthorizedRequest, *,
    agent_id: SpiffeId, node_selectors: Iterable[Selector],
) -> SyncDelta:
    """Validate the request and ask the index what changed for the agent.

    Raises:
        InvalidArgumentError: a negative revision or an oversized generation.
    """
    if request.known_revision < 0:
        raise InvalidArgumentError(
            f"known_revision must not be negative, not {request.known_revision}")
    if len(request.known_generation) > MAX_GENERATION_LENGTH:
        raise InvalidArgumentError(
            f"known_generation is at most {MAX_GENERATION_LENGTH} characters")
    known = request.known_bundle_digests
    if len(known) > MAX_KNOWN_BUNDLES:
        raise InvalidArgumentError(
            f"known_bundle_digests holds at most {MAX_KNOWN_BUNDLES} entries, not {len(known)}")
    for name, digest in known.items():
        if not name or len(name) > MAX_TRUST_DOMAIN_LENGTH or len(digest) != DIGEST_LENGTH:
            raise InvalidArgumentError(
                "known_bundle_digests maps trust domain names (1 to "
                f"{MAX_TRUST_DOMAIN_LENGTH} characters) to {DIGEST_LENGTH}-character digests")
    return index.sync(agent_id=agent_id, node_selectors=node_selectors,
                      known_generation=request.known_generation,
                      known_revision=request.known_revision)


def delta_pages(
    delta: SyncDelta, bundles: Mapping[str, SyncBundle], *,
    known_digests: Mapping[str, str] | None = None, page_bytes: int = PAGE_BYTES,
) -> list[agent_pb2.SyncAuthorizedEntriesPage]:
    """The delta as pages of at most about ``page_bytes`` each; the last is marked.

    The first page names every bundle by digest and carries those whose digest
    is not among ``known_digests`` (what the agent holds).
    """

    def new_page() -> agent_pb2.SyncAuthorizedEntriesPage:
        return agent_pb2.SyncAuthorizedEntriesPage(
            revision=delta.revision, generation=delta.generation)

    first = new_page()
    first.full_resync = delta.full
    known = known_digests or {}
    for name, bundle in bundles.items():
        first.bundle_digests[name] = bundle.digest
        if known.get(name) != bundle.digest:
            first.bundles[name].CopyFrom(bundle.message)
    pages = [first]
    page, size = first, first.ByteSize()
    for entry in delta.entries:
        message = entry_to_proto(entry)
        # 6 bytes covers the field tag and length prefix of any entry below 2 MiB.
        cost = message.ByteSize() + 6
        if size + cost > page_bytes and (page.entries or page.removed_entry_ids):
            page, size = new_page(), 0
            pages.append(page)
        page.entries.append(message)
        size += cost
    for entry_id in delta.removed:
        cost = len(entry_id) + 3
        if size + cost > page_bytes:
            page, size = new_page(), 0
            pages.append(page)
        page.removed_entry_ids.append(entry_id)
        size += cost
    page.last = True
    return pages


def sync_pages(
    index: EntryIndex, request: agent_pb2.SyncAuthorizedRequest, *,
    agent_id: SpiffeId, node_selectors: Iterable[Selector], bundles_for: BundlesFor,
) -> list[agent_pb2.SyncAuthorizedEntriesPage]:
    """Everything one SyncAuthorizedEntries call sends, observed as sync latency.

    Built before the first page is sent, so an error becomes the call's status
    rather than a stream cut short.
    """
    started = time.perf_counter()
    delta = sync_delta(index, request, agent_id=agent_id, node_selectors=node_selectors)
    pages = delta_pages(delta, bundles_for(sorted(delta.federates_with, key=str)),
                        known_digests=request.known_bundle_digests)
    observe_sync_seconds(time.perf_counter() - started)
    return pages
