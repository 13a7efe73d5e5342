"""What authenticating an agent call may keep between calls, and how it stays true.

Two things cost more than the checks they feed, on every call:

- loading the caller's node record in full (its row and its selectors through the
  ORM). :class:`NodeCache` keeps each record, but *every call* still reads the
  row's state (:mod:`ca.datastore.hot_reads`: serial, renewed serial, ban,
  creation and update times) from the datastore and uses the kept record only if
  that state is exactly the one it was loaded with. A ban, an eviction, a renewal
  or a promotion, written by any process or server on the same database, therefore
  takes effect at the very next call everywhere, as without a cache; only the
  selectors, which change only together with the serial, are not re-read.
- checking the X509-SVID leaf rules of the client certificate and parsing its ID.
  :class:`LeafIds` keeps the result per certificate (per connection): it depends
  on the certificate's bytes alone. (The chain and validity were checked in the TLS
  handshake; whether this SVID is the node's current one is checked every call.)
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from cryptography import x509

from ca.datastore import NodeRecord
from ca.datastore.hot_reads import NodeState
from identity.spiffeid import SpiffeId
from identity.x509svid import validate_leaf

MAX_NODES = 100_000
"""Records kept at most (about 1 KiB each); past it the oldest kept is dropped."""
MAX_LEAVES = 10_000
"""Client certificates whose ID is kept at most (connections, not agents)."""


class NodeCache:
    """Node records, each used only while its row's state is unchanged.

    Args:
        read_state: the row's current state, or None if there is no such node
            (:meth:`ca.datastore.hot_reads.NodeStateReader.read`).
        load: the full record, or None (:meth:`ca.datastore.Datastore.get_node`).
        max_nodes: records kept at most.
    """

    def __init__(self, read_state: Callable[[SpiffeId], NodeState | None],
                 load: Callable[[SpiffeId], NodeRecord | None], *,
                 max_nodes: int = MAX_NODES) -> None:
        self._read_state = read_state
        self._load = load
        self._max = max_nodes
        self._lock = threading.Lock()
        self._nodes: dict[SpiffeId, tuple[NodeState, NodeRecord]] = {}

    def get(self, spiffe_id: SpiffeId) -> NodeRecord | None:
        """The node's record as the datastore holds it now; None if there is none.

        Raises:
            DatastoreError: the database failed.
        """
        state = self._read_state(spiffe_id)
        if state is None:
            self.forget(spiffe_id)
            return None
        kept = self._nodes.get(spiffe_id)
        if kept is not None and kept[0] == state:
            return kept[1]
        node = self._load(spiffe_id)
        if node is None:  # evicted since the state was read
            self.forget(spiffe_id)
            return None
        # Kept under the state of the record itself, read in one snapshot with its
        # selectors; if the row changed after `state` was read, the two differ
        # and the next call loads it again.
        with self._lock:
            self._nodes.pop(spiffe_id, None)
            if len(self._nodes) >= self._max:
                del self._nodes[next(iter(self._nodes))]
            self._nodes[spiffe_id] = (NodeState.of(node), node)
        return node

    def forget(self, spiffe_id: SpiffeId) -> None:
        """Drop the node's record (after this process changed its row)."""
        with self._lock:
            self._nodes.pop(spiffe_id, None)

    def __len__(self) -> int:
        return len(self._nodes)


class LeafIds:
    """The SPIFFE ID of each client certificate object, once it passed the leaf rules.

    The TLS front hands every call of a connection the same certificate object,
    so the object itself is the key: a lookup by identity costs nothing, where
    hashing the certificate's bytes would cost a fifth of validating it again.
    Each kept entry holds its certificate, so its ``id`` cannot be reused while
    kept.

    Args:
        max_leaves: certificates kept at most.
    """

    def __init__(self, *, max_leaves: int = MAX_LEAVES) -> None:
        self._max = max_leaves
        self._lock = threading.Lock()
        self._ids: dict[int, tuple[x509.Certificate, SpiffeId]] = {}

    def validate(self, cert: x509.Certificate) -> SpiffeId:
        """:func:`identity.x509svid.validate_leaf`, remembered for this certificate.

        Raises:
            X509SvidError: the certificate breaks a leaf rule (never remembered).
        """
        kept = self._ids.get(id(cert))
        if kept is not None and kept[0] is cert:
            return kept[1]
        spiffe_id = validate_leaf(cert)
        with self._lock:
            if len(self._ids) >= self._max:
                del self._ids[next(iter(self._ids))]
            self._ids[id(cert)] = (cert, spiffe_id)
        return spiffe_id
