"""SyncAuthorizedEntries: an agent's sync by revision, cut into pages.

The agent API servicer authenticates the agent and calls :func:`sync_pages`; the
entry index (:mod:`ca.entry_index`) decides what changed for that agent. Pages are
cut by encoded size, so however many entries an agent has, every message stays far
below grpc's default 4 MiB receive limit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from api.protos.sigil.agent.v1 import agent_pb2
from api.protos.sigil.types.v1 import types_pb2
from ca.api.convert import entry_to_proto
from ca.entry_index import EntryIndex, SyncDelta
from ca.errors import InvalidArgumentError
from ca.metrics import observe_sync_seconds
from identity.selectors import Selector
from identity.spiffeid import SpiffeId, TrustDomain

PAGE_BYTES = 1024 * 1024
"""Target encoded size of one page (the first also carries the bundles)."""
MAX_GENERATION_LENGTH = 64

BundlesFor = Callable[[Iterable[TrustDomain]], dict[str, types_pb2.Bundle]]
"""Our bundle plus those of the given federated trust domains, keyed by name."""


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
    return index.sync(agent_id=agent_id, node_selectors=node_selectors,
                      known_generation=request.known_generation,
                      known_revision=request.known_revision)


def delta_pages(
    delta: SyncDelta, bundles: dict[str, types_pb2.Bundle], *, page_bytes: int = PAGE_BYTES
) -> list[agent_pb2.SyncAuthorizedEntriesPage]:
    """The delta as pages of at most about ``page_bytes`` each; the last is marked."""

    def new_page() -> agent_pb2.SyncAuthorizedEntriesPage:
        return agent_pb2.SyncAuthorizedEntriesPage(
            revision=delta.revision, generation=delta.generation)

    first = new_page()
    first.full_resync = delta.full
    for name, bundle in bundles.items():
        first.bundles[name].CopyFrom(bundle)
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
    pages = delta_pages(delta, bundles_for(sorted(delta.federates_with, key=str)))
    observe_sync_seconds(time.perf_counter() - started)
    return pages
