"""The agent's cache: authorized entries, their X.509-SVIDs, JWT-SVIDs and bundles.

The cache is the one place the Workload API reads from and the sync loop writes
to. Every change bumps a version number and wakes the streams waiting on it, so a
stream re-reads a consistent :class:`Snapshot` rather than a half-updated state.

It also decides what to rotate (:meth:`Cache.rotation_plan`): an entry needs a
new SVID when it has none, when the entry changed in a way the certificate shows,
or when the SVID is past half its lifetime (DESIGN flow 6; SPIRE does the same, so
an SVID is always replaced long before a client sees it expire).

The X.509-SVIDs it holds are bounded (``svid_cache_size``, an LRU): an agent
authorized for 50,000 entries does not hold 50,000 keys. SVIDs of entries a
connected workload uses (:meth:`Cache.use`, called by the Workload API streams)
are never evicted and are signed on demand when missing; the rest fill the cache
up to its size, in the stable entry order, and the least recently used of those
give way first (docs/agent.md, "The SVID cache").

All mutating methods must be called from the event loop that runs the Workload
API: the change notification is an :class:`asyncio.Event`, which is not
thread-safe.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import jwt
from cryptography import x509

from agent.errors import NotReadyError
from agent.rotation import rotation_due, wit_rotation_time
from agent.taint import load_tainted, signed_by_tainted
from identity.bundle import Bundle
from identity.clock import Clock, SystemClock
from identity.jwtsvid import JwtSvid
from identity.keys import PrivateKey
from identity.revocation import Revocation, RevocationSet
from identity.selectors import Selector, selectors_match
from identity.spiffeid import SpiffeId, TrustDomain
from identity.witsvid import WitSvid
from identity.x509svid import X509Svid


@dataclass(frozen=True, slots=True)
class CachedEntry:
    """A registration entry as the agent holds it (parsed at the client edge)."""

    id: str
    spiffe_id: SpiffeId
    parent_id: SpiffeId
    selectors: frozenset[Selector]
    x509_svid_ttl: int = 0
    jwt_svid_ttl: int = 0
    dns_names: tuple[str, ...] = ()
    federates_with: tuple[TrustDomain, ...] = ()
    hint: str = ""
    revision: int = 0

    def svid_fingerprint(self) -> tuple[object, ...]:
        """What the X.509-SVID depends on; a change here means re-issue.

        Selectors are left out on purpose: they decide who receives the SVID, not
        what is in it, and the Workload API re-evaluates them on every read.
        """
        return (str(self.spiffe_id), self.x509_svid_ttl, tuple(sorted(self.dns_names)))

    def sort_key(self) -> tuple[str, str]:
        """The stable order of identities in Workload API responses."""
        return (str(self.spiffe_id), self.id)


@dataclass(frozen=True, slots=True)
class CachedSvid:
    """An X.509-SVID and the entry fingerprint it was issued for."""

    svid: X509Svid
    fingerprint: tuple[object, ...]


@dataclass(frozen=True, slots=True)
class Identity:
    """One identity a workload is entitled to, with its SVID."""

    entry: CachedEntry
    svid: X509Svid


def _index_by_selector(entries: Sequence[CachedEntry]) -> dict[Selector, tuple[int, ...]]:
    """Positions in ``entries`` under one selector of each entry: its rarest.

    An entry a caller is entitled to has all its selectors among the caller's,
    so in particular its key selector: looking up the caller's selectors finds
    every candidate. The rarest selector keeps the candidates that then fail
    the full check few (``unix:uid:0`` may be on thousands of entries, a
    service account on one). An entry without selectors matches nobody and is
    left out.
    """
    counts = Counter(s for e in entries for s in e.selectors)
    index: dict[Selector, list[int]] = {}
    for position, entry in enumerate(entries):
        if entry.selectors:
            key = min(entry.selectors, key=lambda s: (counts[s], s))
            index.setdefault(key, []).append(position)
    return {s: tuple(positions) for s, positions in index.items()}


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An immutable view of the cache at one version."""

    version: int
    trust_domain: TrustDomain
    entries: tuple[CachedEntry, ...]
    svids: Mapping[str, X509Svid]
    bundles: Mapping[TrustDomain, Bundle]
    # What :meth:`entitled` reads (:func:`_index_by_selector` of ``entries``); the
    # cache passes the one it keeps while the entries do not change, since
    # building it costs as much as a thousand lookups.
    by_selector: Mapping[Selector, tuple[int, ...]] | None = field(
        default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.by_selector is None:
            object.__setattr__(self, "by_selector", _index_by_selector(self.entries))

    def entitled(self, selectors: Iterable[Selector]) -> list[CachedEntry]:
        """Entries whose selectors are all among ``selectors``, in the stable order.

        This is the security invariant of the Workload API: a workload never
        receives an SVID whose entry selectors it does not all carry. The cost
        is in proportion to the caller's selectors and the entries indexed under
        them, not to all the entries.
        """
        available = frozenset(selectors)
        index = self.by_selector
        assert index is not None  # set in __post_init__
        positions: list[int] = []
        for selector in available:
            positions.extend(index.get(selector, ()))
        # Each entry sits under one key, so no position comes twice.
        positions.sort()
        return [
            self.entries[i] for i in positions
            if selectors_match(self.entries[i].selectors, available)
        ]

    def identities(self, entries: Iterable[CachedEntry]) -> list[Identity]:
        """The entries among ``entries`` that have an SVID, as identities."""
        out = []
        for entry in entries:
            svid = self.svids.get(entry.id)
            if svid is not None:
                out.append(Identity(entry, svid))
        return out

    def bundles_for(self, entries: Iterable[CachedEntry]) -> dict[TrustDomain, Bundle]:
        """The bundles a workload with ``entries`` may see.

        Its own trust domain always (the Workload API must return at least that),
        plus every trust domain its entries federate with that we have a bundle for.
        """
        out: dict[TrustDomain, Bundle] = {}
        own = self.bundles.get(self.trust_domain)
        if own is not None:
            out[self.trust_domain] = own
        for entry in entries:
            for td in entry.federates_with:
                b = self.bundles.get(td)
                if b is not None:
                    out[td] = b
        return out


DEFAULT_SVID_CACHE_SIZE = 1000
"""How many X.509-SVIDs the agent keeps beyond those connected workloads use."""

MAX_JWT_CACHE = 10_000
"""Most JWT-SVIDs the cache keeps (per entry and audience set)."""

JwtSigner = Callable[[CachedEntry, Sequence[str]], Awaitable[JwtSvid]]
"""Signs a JWT-SVID for an entry and audience (the server's NewJWTSVID)."""

MAX_WIT_CACHE = 10_000
"""Most WIT-SVIDs (with their workload keys) the cache keeps."""

WitSigner = Callable[[CachedEntry], Awaitable[tuple[WitSvid, PrivateKey]]]
"""Makes a workload key and has the server sign a WIT-SVID for it (NewWITSVID)."""


@dataclass(frozen=True)
class WitIdentity:
    """A WIT-SVID and the workload key its ``cnf`` names (made in the agent).

    Attributes:
        svid: the token.
        key: its private key, handed only to the entitled workload.
        refresh_at: when it is replaced (half-life, jittered).
    """

    svid: WitSvid
    key: PrivateKey
    refresh_at: dt.datetime


def past_half_life(not_before: dt.datetime, not_after: dt.datetime, now: dt.datetime) -> bool:
    """True when ``now`` is at or past the midpoint of ``[not_before, not_after]``."""
    return now >= not_before + (not_after - not_before) / 2


def _bundle_key(bundle: Bundle) -> bytes:
    # Compare bundles by their SPIFFE document: certificates and keys compare by
    # encoding there, whatever object identity they have in memory.
    return bundle.to_json()


@dataclass
class _JwtCacheItem:
    svid: JwtSvid
    refresh_at: dt.datetime


@dataclass
class _State:
    entries: dict[str, CachedEntry] = field(default_factory=dict)
    svids: dict[str, CachedSvid] = field(default_factory=dict)
    bundles: dict[TrustDomain, Bundle] = field(default_factory=dict)


class Cache:
    """Entries, SVIDs and bundles, with change notification for streams."""

    def __init__(
        self,
        *,
        trust_domain: TrustDomain,
        clock: Clock | None = None,
        jwt_signer: JwtSigner | None = None,
        svid_cache_size: int = DEFAULT_SVID_CACHE_SIZE,
    ) -> None:
        if svid_cache_size < 1:
            raise ValueError(f"svid_cache_size must be at least 1, not {svid_cache_size}")
        self.trust_domain = trust_domain
        self.svid_cache_size = svid_cache_size
        # LRU bookkeeping: entry id -> tick of its last use; holders -> entry ids.
        self._ticks = itertools.count()
        self._last_used: dict[str, int] = {}
        self._holders: dict[object, frozenset[str]] = {}
        self._on_demand: Callable[[], None] | None = None
        self._clock = clock or SystemClock()
        self._jwt_signer = jwt_signer
        self._state = _State()
        self._tainted: tuple[x509.Certificate, ...] = ()
        self._version = 0
        self._snapshot: Snapshot | None = None
        # The entries in the stable order and their index, until the entries change.
        self._sorted: tuple[tuple[CachedEntry, ...], Mapping[Selector, tuple[int, ...]]] | None
        self._sorted = None
        self._changed = asyncio.Event()
        self._jwt: dict[tuple[str, tuple[str, ...]], _JwtCacheItem] = {}
        # Concurrent requests for one (entry, audience) share one server call.
        self._jwt_inflight: dict[tuple[str, tuple[str, ...]], asyncio.Future[JwtSvid]] = {}
        self._revoked = RevocationSet()
        # WIT-SVIDs by (entry id, SPIFFE ID), and the server calls in flight for them.
        self._wit_signer: WitSigner | None = None
        self._wit: dict[tuple[str, SpiffeId], WitIdentity] = {}
        self._wit_inflight: dict[tuple[str, SpiffeId], asyncio.Future[WitIdentity]] = {}

    # Reading -----------------------------------------------------------------

    @property
    def version(self) -> int:
        """Increments on every change a workload could see."""
        return self._version

    def snapshot(self) -> Snapshot:
        """The current state, immutable."""
        if self._snapshot is None or self._snapshot.version != self._version:
            entries, index = self._sorted_entries()
            self._snapshot = Snapshot(
                version=self._version,
                trust_domain=self.trust_domain,
                entries=entries,
                svids={k: v.svid for k, v in self._state.svids.items()},
                bundles=dict(self._state.bundles),
                by_selector=index,
            )
        return self._snapshot

    def _sorted_entries(
        self,
    ) -> tuple[tuple[CachedEntry, ...], Mapping[Selector, tuple[int, ...]]]:
        """The entries in the stable order and their index, kept until they change."""
        if self._sorted is None:
            entries = tuple(sorted(self._state.entries.values(), key=CachedEntry.sort_key))
            self._sorted = entries, _index_by_selector(entries)
        return self._sorted

    async def wait_for_change(self, version: int) -> int:
        """Return the current version once it differs from ``version``."""
        while self._version == version:
            await self._changed.wait()
        return self._version

    # Writing -----------------------------------------------------------------

    def _bump(self) -> None:
        self._version += 1
        # Wake every waiter on the old event, then give new waiters a fresh one.
        old, self._changed = self._changed, asyncio.Event()
        old.set()

    def set_entries(self, entries: Iterable[CachedEntry]) -> bool:
        """Replace the authorized entries.

        SVIDs of entries that disappeared are dropped; so are SVIDs whose entry now
        names another SPIFFE ID (the certificate would lie). An SVID whose entry
        changed otherwise stays until :meth:`rotation_plan` replaces it.

        Returns:
            Whether anything changed.
        """
        new = {e.id: e for e in entries}
        if new == self._state.entries:
            return False
        for entry_id in list(self._state.svids):
            entry = new.get(entry_id)
            cached = self._state.svids[entry_id]
            if entry is None or cached.svid.spiffe_id != entry.spiffe_id:
                del self._state.svids[entry_id]
        for key in list(self._jwt):
            entry = new.get(key[0])
            old = self._state.entries.get(key[0])
            if entry is None or old is None or entry.spiffe_id != old.spiffe_id:
                del self._jwt[key]
        for entry_id in [i for i in self._last_used if i not in new]:
            del self._last_used[entry_id]
        self._state.entries = new
        self._sorted = None
        self._bump()
        return True

    def apply_entry_changes(
        self, changed: Iterable[CachedEntry], removed: Iterable[str]
    ) -> bool:
        """Apply a sync delta: add or replace ``changed``, drop the ``removed`` ids.

        The same rules as :meth:`set_entries` hold for the SVIDs. Returns whether
        anything changed.
        """
        changed, removed = list(changed), list(removed)
        if not changed and not removed:
            return False
        new = dict(self._state.entries)
        for entry_id in removed:
            new.pop(entry_id, None)
        for entry in changed:
            new[entry.id] = entry
        return self.set_entries(new.values())

    def set_bundles(self, bundles: Mapping[TrustDomain, Bundle]) -> bool:
        """Replace the bundles. Returns whether anything changed."""
        old = self._state.bundles
        same = old.keys() == bundles.keys() and all(
            _bundle_key(old[td]) == _bundle_key(b) for td, b in bundles.items()
        )
        if same:
            return False
        self._state.bundles = dict(bundles)
        self._bump()
        return True

    def set_x509_svid(self, entry_id: str, svid: X509Svid) -> None:
        """Store a freshly signed SVID for an entry we still hold."""
        entry = self._state.entries.get(entry_id)
        if entry is None:
            # The entry went away while its CSR was at the server.
            return
        self._state.svids[entry_id] = CachedSvid(svid, entry.svid_fingerprint())
        self._last_used[entry_id] = next(self._ticks)
        self._evict()
        self._bump()

    def drop_expired(self, now: dt.datetime | None = None) -> list[str]:
        """Forget X.509-SVIDs that have expired (the server was away too long).

        Returns:
            The entry ids whose SVID was dropped.
        """
        now = now or self._clock.now()
        gone = [i for i, c in self._state.svids.items() if c.svid.expires_at <= now]
        for entry_id in gone:
            del self._state.svids[entry_id]
        if gone:
            self._bump()
        return gone

    # Revocations ---------------------------------------------------------------

    @property
    def revoked(self) -> RevocationSet:
        """The revocations the last syncs delivered (read-only for callers)."""
        return self._revoked

    def apply_revocations(self, revocations: Iterable[Revocation], *, full: bool,
                          now: dt.datetime | None = None) -> list[str]:
        """Take in what a sync delivered and forget every SVID it revokes.

        A dropped X.509-SVID has no SVID in the cache any more, so the next
        :meth:`rotation_plan` (the same sync tick) signs a new one for it; until
        then its workloads are sent nothing rather than the revoked one. Cached
        JWT-SVIDs that are revoked are dropped too, so none is handed out again.

        Args:
            revocations: new revocations, or with ``full`` the complete set.
            full: replace what is held instead of adding.
            now: for dropping revocations past their expiry.

        Returns:
            The entry ids whose X.509-SVID was dropped.
        """
        now = now or self._clock.now()
        if full:
            self._revoked.replace(revocations)
        else:
            self._revoked.add(revocations)
        self._revoked.prune(now)
        gone = [i for i, c in self._state.svids.items() if self._revoked.x509_revoked(
            serial=c.svid.leaf.serial_number, spiffe_id=str(c.svid.spiffe_id),
            not_before=c.svid.leaf.not_valid_before_utc)]
        for entry_id in gone:
            del self._state.svids[entry_id]
        for key in [k for k, item in self._jwt.items() if self.jwt_revoked(item.svid)]:
            del self._jwt[key]
        if gone:
            self._bump()
        return gone

    def jwt_revoked(self, svid: JwtSvid) -> bool:
        """Whether a JWT-SVID's ``jti`` or signing key is revoked."""
        jti = svid.claims.get("jti")
        try:
            kid = jwt.get_unverified_header(svid.token).get("kid")
        except jwt.PyJWTError:
            kid = None
        return self._revoked.jwt_revoked(jwt_id=jti if isinstance(jti, str) else None,
                                         key_id=kid if isinstance(kid, str) else None)

    # The bounded SVID cache --------------------------------------------------

    def use(self, holder: object, entry_ids: Iterable[str]) -> None:
        """Record that ``holder`` (a workload stream) uses these entries' SVIDs.

        Replaces what ``holder`` used before. Entries in use are never evicted,
        and a missing SVID among them asks the sync loop to sign it now.
        """
        ids = frozenset(entry_ids)
        if self._holders.get(holder) == ids:
            return
        self._holders[holder] = ids
        tick = next(self._ticks)
        for entry_id in ids:
            self._last_used[entry_id] = tick
        if self._on_demand is not None and any(i not in self._state.svids for i in ids):
            self._on_demand()

    def release(self, holder: object) -> None:
        """``holder`` is gone: its entries may be evicted again (when over the size)."""
        if self._holders.pop(holder, None) is not None and self._evict():
            self._bump()

    def in_use(self) -> frozenset[str]:
        """Entry ids some connected workload uses."""
        return frozenset().union(*self._holders.values())

    def set_demand_callback(self, callback: Callable[[], None]) -> None:
        """Called (on the loop) when a workload needs an SVID the cache lacks."""
        self._on_demand = callback

    def _evict(self) -> bool:
        """Drop the least recently used SVIDs nobody holds, down to the size."""
        excess = len(self._state.svids) - self.svid_cache_size
        if excess <= 0:
            return False
        used = self.in_use()
        victims = sorted(
            (i for i in self._state.svids if i not in used),
            key=lambda i: self._last_used.get(i, -1),
        )[:excess]
        for entry_id in victims:
            del self._state.svids[entry_id]
            self._last_used.pop(entry_id, None)
        return bool(victims)

    def set_tainted(self, ders: Iterable[bytes]) -> None:
        """The signing certificates an operator tainted (sent with the bundle)."""
        self._tainted = load_tainted(ders)

    # Decisions ---------------------------------------------------------------

    def rotation_plan(self, now: dt.datetime | None = None) -> list[CachedEntry]:
        """Entries that need a new X.509-SVID, in the stable order.

        An entry needs one when its :meth:`CachedEntry.svid_fingerprint` changed
        since its SVID was issued, when its SVID is due
        (:func:`agent.rotation.rotation_due`: half its lifetime +/- 10 %), or when it
        has none and either a connected workload uses it or the cache has room
        for it (the first ones in the stable order get the room; the others are
        signed lazily, when a workload asks).
        """
        now = now or self._clock.now()
        used = self.in_use()
        out = []
        # Entries in use take their place first; what is left is for signing ahead.
        room = self.svid_cache_size - len(self._state.svids) - sum(
            1 for i in used if i in self._state.entries and i not in self._state.svids
        )
        for entry in self._sorted_entries()[0]:
            cached = self._state.svids.get(entry.id)
            if cached is None:
                if entry.id in used:
                    out.append(entry)
                elif room > 0:
                    room -= 1
                    out.append(entry)
            elif (
                cached.fingerprint != entry.svid_fingerprint()
                or rotation_due(cached.svid, now)
                or (self._tainted and signed_by_tainted(cached.svid, self._tainted))
            ):
                out.append(entry)
        return out

    # JWT-SVIDs ---------------------------------------------------------------

    async def jwt_svid(self, entry: CachedEntry, audience: Sequence[str]) -> JwtSvid:
        """A JWT-SVID for ``entry`` and ``audience``, from the cache or the server.

        Cached per (entry, sorted audiences) until half its lifetime, like the
        X.509-SVIDs; concurrent requests for the same key wait for one server
        call. At most :data:`MAX_JWT_CACHE` tokens are kept (oldest dropped first),
        so callers inventing audiences cannot grow the cache without bound.

        Raises:
            NotReadyError: no signer is configured.
            ServerCallError: the server refused or could not be reached.
        """
        key = (entry.id, tuple(sorted(set(audience))))
        now = self._clock.now()
        item = self._jwt.get(key)
        if item is not None and now < item.refresh_at:
            return item.svid
        if self._jwt_signer is None:
            raise NotReadyError("the agent cannot sign JWT-SVIDs yet")
        call = self._jwt_inflight.get(key)
        if call is None:
            call = asyncio.ensure_future(self._sign_jwt(key, entry, self._jwt_signer))
            self._jwt_inflight[key] = call
        # shield: a caller that goes away must not cancel the call the others share.
        return await asyncio.shield(call)

    async def _sign_jwt(
        self, key: tuple[str, tuple[str, ...]], entry: CachedEntry, signer: JwtSigner
    ) -> JwtSvid:
        try:
            svid = await signer(entry, key[1])
        finally:
            del self._jwt_inflight[key]
        issued = svid.issued_at or self._clock.now()
        self._jwt.pop(key, None)
        self._jwt[key] = _JwtCacheItem(svid, issued + (svid.expires_at - issued) / 2)
        while len(self._jwt) > MAX_JWT_CACHE:
            del self._jwt[next(iter(self._jwt))]
        return svid

    def set_jwt_signer(self, signer: JwtSigner) -> None:
        """Install the function that asks the server for JWT-SVIDs."""
        self._jwt_signer = signer

    # WIT-SVIDs ---------------------------------------------------------------

    def set_wit_signer(self, signer: WitSigner) -> None:
        """Install the function that makes a key and asks the server for a WIT-SVID."""
        self._wit_signer = signer

    async def wit_svid(self, entry: CachedEntry) -> WitIdentity:
        """The WIT-SVID of ``entry``, from the cache or newly signed.

        Kept until its jittered half-life (:func:`~agent.rotation.wit_rotation_time`),
        then replaced with a new key pair (draft-ietf-wimse-workload-creds: a key
        SHOULD be re-generated for each WIT). Keyed by entry id and SPIFFE ID, so an
        entry that changes its ID never serves the old token; entries that went
        away are never asked for, and at most :data:`MAX_WIT_CACHE` are kept.

        Raises:
            NotReadyError: no signer is configured.
            ServerCallError: the server refused or could not be reached.
        """
        key = (entry.id, entry.spiffe_id)
        item = self._wit.get(key)
        if item is not None and self._clock.now() < item.refresh_at:
            return item
        signer = self._wit_signer
        if signer is None:
            raise NotReadyError("the agent cannot sign WIT-SVIDs yet")
        call = self._wit_inflight.get(key)
        if call is None:
            call = asyncio.ensure_future(self._sign_wit(key, entry, signer))
            self._wit_inflight[key] = call
        return await asyncio.shield(call)

    async def _sign_wit(
        self, key: tuple[str, SpiffeId], entry: CachedEntry, signer: WitSigner
    ) -> WitIdentity:
        try:
            svid, private_key = await signer(entry)
        finally:
            del self._wit_inflight[key]
        issued = svid.issued_at or self._clock.now()
        item = WitIdentity(svid, private_key,
                           wit_rotation_time(issued, svid.expires_at, svid.token))
        self._wit.pop(key, None)
        self._wit[key] = item
        while len(self._wit) > MAX_WIT_CACHE:
            del self._wit[next(iter(self._wit))]
        return item
