"""Registration entry management behind the admin API.

The servicer parses and validates requests (``ca.registry.validate``); this module
holds what happens next: paging, batch creation (every entry in its own
transaction, so one failure leaves the others), and updates that refuse to
overwrite a concurrent change. Every change is logged as one event.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from attestation.node import k8s_psat
from ca.config.policy import SERVER_PATH, Policy
from ca.datastore import Datastore, EntryRecord
from ca.datastore.records import EntryFilter
from ca.errors import InvalidArgumentError, ServerError
from ca.log import event
from identity.clock import Clock
from identity.selectors import Selector
from identity.spiffeid import SpiffeId

DEFAULT_PAGE_SIZE = 500
MAX_PAGE_SIZE = 1000
# A batch is one gRPC message (4 MiB at most) and one admin call; this keeps a
# single call's work bounded as well.
MAX_BATCH_ENTRIES = 1000


def page_size(value: int) -> int:
    """A requested page size: 0 means the default; 1..MAX_PAGE_SIZE otherwise.

    Raises:
        InvalidArgumentError: negative or above MAX_PAGE_SIZE.
    """
    if value < 0 or value > MAX_PAGE_SIZE:
        raise InvalidArgumentError(
            f"page_size {value} must be between 1 and {MAX_PAGE_SIZE} (0 for the default)"
        )
    return value or DEFAULT_PAGE_SIZE


def encode_cursor(*parts: object) -> str:
    """An opaque page token for the given sort key."""
    text = "\n".join(str(p) for p in parts)
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(token: str, count: int) -> list[str]:
    """The ``count`` parts of a page token made by :func:`encode_cursor`.

    Raises:
        InvalidArgumentError: the token was not made by this server.
    """
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    parts = text.split("\n")
    if len(parts) != count or not all(parts):
        raise InvalidArgumentError("page_token is not one this server issued")
    return parts


def _entry_cursor(token: str) -> tuple[int, str]:
    created_at, entry_id = decode_cursor(token, 2)
    try:
        return int(created_at), entry_id
    except ValueError:
        raise InvalidArgumentError("page_token is not one this server issued") from None


def known_parent_selectors(datastore: Datastore, parent_id: SpiffeId) -> list[frozenset[Selector]]:
    """What is known of the agents an entry with this parent reaches: the node
    selectors of the attested agent with that ID (before it attests, those its ID
    implies: k8s_psat's cluster), and the selectors of each node alias with that
    SPIFFE ID (every agent it matches carries them)."""
    known: list[frozenset[Selector]] = []
    node = datastore.get_node(parent_id)
    if node is not None:
        known.append(frozenset(node.selectors))
    else:
        # Not attested yet (the Kubernetes controller parents entries by node):
        # what the agent ID itself says it will carry.
        implied = k8s_psat.implied_selectors(parent_id)
        if implied:
            known.append(frozenset(implied))
    for alias in datastore.list_entries(spiffe_id=parent_id):
        if alias.parent_id.path == SERVER_PATH and alias.selectors:
            known.append(frozenset(alias.selectors))
    return known


@dataclass(frozen=True, slots=True)
class EntryService:
    """Entry operations on the datastore, with their log events.

    Every entry created or updated must pass ``policy`` (ca/config/policy.py); one that
    does not is refused with PolicyViolationError (InvalidArgument) and nothing is
    written.
    """

    datastore: Datastore
    clock: Clock
    policy: Policy = field(default_factory=Policy)

    def check_policy(self, entry: EntryRecord) -> None:
        """Refuse an entry that breaks the policy.

        Raises:
            PolicyViolationError: naming the rule, where it is written, and why.
        """
        if not self.policy:
            return
        known = (known_parent_selectors(self.datastore, entry.parent_id)
                 if self.policy.has_selector_rules else [])
        violation = self.policy.check_entry(entry, parent_selectors=known)
        if violation is not None:
            raise violation.error()

    def create(self, entry: EntryRecord) -> EntryRecord:
        """Store a validated entry.

        Raises:
            AlreadyExistsError: same SPIFFE ID, parent ID and selectors.
            PolicyViolationError: the entry breaks the issuance policy.
        """
        self.check_policy(entry)
        created = self.datastore.create_entry(entry, now=self.clock.now())
        event("entry created", entry_id=created.id, spiffe_id=created.spiffe_id,
              parent_id=created.parent_id, revision=created.revision)
        return created

    def create_batch(self, entries: Sequence[EntryRecord]) -> list[EntryRecord | ServerError]:
        """Create each entry in its own transaction; one outcome per entry, in order.

        The caller validates the whole batch first, so the errors here are the
        policy's (PolicyViolationError) and the datastore's (a duplicate, within
        the batch or with a stored entry).
        """
        if len(entries) > MAX_BATCH_ENTRIES:
            raise InvalidArgumentError(
                f"a batch may hold at most {MAX_BATCH_ENTRIES} entries, not {len(entries)}"
            )
        out: list[EntryRecord | ServerError] = []
        for entry in entries:
            try:
                out.append(self.create(entry))
            except ServerError as exc:
                event("entry not created", level=logging.WARNING, spiffe_id=entry.spiffe_id,
                      parent_id=entry.parent_id, reason=str(exc))
                out.append(exc)
        return out

    def get(self, entry_id: str) -> EntryRecord:
        """One entry by id (NotFoundError if none)."""
        return self.datastore.get_entry(entry_id)

    def list_page(
        self, filters: EntryFilter, *, size: int, page_token: str
    ) -> tuple[list[EntryRecord], str]:
        """One page of matching entries and the token of the next page ("" at the end)."""
        limit = page_size(size)
        after = _entry_cursor(page_token) if page_token else None
        # One extra row tells whether another page follows, without a second query.
        rows = self.datastore.list_entries_page(filters, limit=limit + 1, after=after)
        if len(rows) <= limit:
            return rows, ""
        rows = rows[:limit]
        return rows, encode_cursor(rows[-1].created_at, rows[-1].id)

    def update(
        self, entry_id: str, change: Callable[[EntryRecord], EntryRecord],
        *, fields: Sequence[str] = (),
    ) -> EntryRecord:
        """Apply ``change`` to the stored entry and store the result.

        ``change`` validates the new values, then the result must pass the policy
        (PolicyViolationError otherwise, nothing written); if another update lands
        between the read and the write, the datastore refuses (ConflictError)
        instead of losing it.
        """
        current = self.datastore.get_entry(entry_id)
        new = change(current)
        self.check_policy(new)
        updated = self.datastore.update_entry(
            entry_id, new, expected_revision=current.revision,
            now=self.clock.now(),
        )
        event("entry updated", entry_id=entry_id, spiffe_id=updated.spiffe_id,
              revision=updated.revision, fields=",".join(fields))
        return updated

    def delete(self, entry_id: str) -> EntryRecord:
        """Delete an entry (NotFoundError if none)."""
        deleted = self.datastore.delete_entry(entry_id, now=self.clock.now())
        event("entry deleted", entry_id=deleted.id, spiffe_id=deleted.spiffe_id)
        return deleted

    def count(self) -> int:
        """How many entries there are."""
        return self.datastore.count_entries()
