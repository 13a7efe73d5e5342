"""The sync loop: keeps the cache current and every SVID fresh (DESIGN flows 3 and 6).

Every ``sync_interval``:

1. renew the agent's own SVID once it reaches its renewal point, or once the
   last sync said an authority of its chain is tainted (otherwise revoking that
   authority would lock the agent out until then). The renewal point is the
   same as a workload SVID's (:func:`agent.rotation.rotation_time`): half its
   lifetime +/- 10 % of it, fixed per SVID by its serial number, so it does not
   move between ticks or restarts, and a fleet of agents started together does
   not renew in lock step;
2. SyncAuthorized: replace the entries and bundles in the cache (entries that
   disappeared lose their SVIDs there); persist a changed bundle of our trust
   domain and rebuild the server channel with it;
3. for each entry in :meth:`~agent.cache.Cache.rotation_plan` make a key and a
   CSR, send them in one BatchNewX509SVID, verify each returned chain against
   the bundle, and store it.

Making keys and CSRs, verifying chains and persisting the cache (every key)
cost milliseconds per SVID; they run in worker threads, so the loop that
serves the Workload API is not held up while hundreds of SVIDs rotate. The
cache itself is only ever changed on the loop.

A failed step is logged and retried; the loop never dies of a server error.
After a tick with a failure the next one waits an exponential backoff with
jitter (:class:`agent.rotation.Backoff`, from ``sync_interval`` up to
``sync_backoff_max``), reset by the next clean tick. After each tick, and
between ticks at the moment each one expires, the cache drops expired SVIDs (a
long backoff must not leave an expired SVID on offer), and a changed cache is
persisted to the data directory so a restart while the server is down still
serves it.

A workload that needs an SVID the bounded cache lacks makes the manager rotate
at once (:meth:`Manager.demand`), outside the periodic tick.

When the server refuses the agent itself (PERMISSION_DENIED with a reason token
in the trailing metadata, :mod:`identity.refusal`; the message's words do not
count): a banned agent (``agent_banned``) logs ``agent banned`` with the
server's message and gets no new SVIDs; an ``agent_not_attested`` (evicted)
one attests again through ``reattest`` when it has a usable attestor, and
otherwise logs what it needs (a new join token).
Either way the rest of that tick is skipped (every other call would be refused
too), each state is logged once, not every tick, and the SVIDs already held
are served until they expire.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence

from cryptography import x509

from agent import log, metrics
from agent.cache import Cache, CachedEntry
from agent.client import ServerClient, SignResult, roots_pem
from agent.errors import AgentError, ServerCallError
from agent.health import HealthReport, HealthState
from agent.rotation import Backoff, rotation_time
from agent.state import AgentState
from agent.taint import load_tainted, signed_by_tainted
from identity.bundle import Bundle, BundleSet
from identity.clock import Clock, SystemClock
from identity.errors import SigilError
from identity.jwtsvid import JwtSvid
from identity.keys import KeyType, PrivateKey, generate_private_key, public_keys_equal
from identity.refusal import RefusalReason
from identity.spiffeid import SpiffeId
from identity.witsvid import WitSvid
from identity.x509svid import X509Svid, new_csr, verify_chain

# A caller with no identity may trigger a sync (a just-registered workload then
# works at once); at most this often, so a workload without any entry that
# retries in a loop cannot make the agent hammer the server.
MIN_ON_DEMAND_SYNC_INTERVAL = 1.0

# One BatchNewX509SVID request carries at most this many CSRs, to keep each
# request well under the server's message size limit.
MAX_BATCH = 500

DEFAULT_BACKOFF_MAX = dt.timedelta(minutes=3)

Reattest = Callable[[], Awaitable[X509Svid]]
"""Attests the agent again and returns its new SVID (raises when it cannot)."""


class Manager:
    """Owns the agent SVID and drives syncing and rotation.

    Args:
        client: the configured server client.
        cache: the cache the Workload API reads.
        state: the data directory (agent SVID and bundle persistence).
        agent_svid: the current agent SVID.
        bundle: the current bundle of our trust domain.
        clock: injectable time.
        key_factory: makes private keys (tests may speed this up).
        sync_interval: the period of :meth:`run` when all is well; also the
            first backoff delay.
        backoff_max: the longest wait between two attempts after failures.
        reattest: how to attest again once evicted (None: no usable attestor).
    """

    def __init__(
        self,
        *,
        client: ServerClient,
        cache: Cache,
        state: AgentState,
        agent_svid: X509Svid,
        bundle: Bundle,
        clock: Clock | None = None,
        key_factory: Callable[[], PrivateKey] = generate_private_key,
        sync_interval: dt.timedelta = dt.timedelta(seconds=5),
        backoff_max: dt.timedelta = DEFAULT_BACKOFF_MAX,
        reattest: Reattest | None = None,
    ) -> None:
        self._client = client
        self._cache = cache
        self._state = state
        self.agent_svid = agent_svid
        self.bundle = bundle
        self._clock = clock or SystemClock()
        self._new_key = key_factory
        self.server_id = SpiffeId.from_segments(cache.trust_domain, "sigil", "server")
        cache.set_jwt_signer(self._sign_jwt)
        cache.set_wit_signer(self._sign_wit)
        cache.set_demand_callback(self.demand)
        self._lock = asyncio.Lock()
        self._last_on_demand: float | None = None
        # The revision of our last complete sync, and the server index generation
        # it belongs to: the server answers relative to them (only what changed).
        self._sync_generation = ""
        self._sync_revision = 0
        # The newest revocation id the last sync delivered (0: ask for them all).
        self._revocation_id = 0
        self.sync_interval = sync_interval
        self.backoff = Backoff(initial=sync_interval, maximum=max(backoff_max, sync_interval))
        self._reattest = reattest
        self._demand_task: asyncio.Task[None] | None = None
        self._saved_version = -1
        self._save_lock = asyncio.Lock()
        # Why the server refuses us ("banned", "evicted"), logged once per change.
        self.refused: str | None = None
        # Why attesting again last failed (logged again only when it changes).
        self._reattest_failure = ""
        # Signing certificates an operator tainted, from the last sync.
        self._tainted: tuple[x509.Certificate, ...] = ()
        # For health(): how the last tick went and why a step last failed.
        self._last_tick_ok: bool | None = None
        self._last_sync_at: dt.datetime | None = None
        self._last_failure = ""
        self._refusal_message = ""

    async def _sign_jwt(self, entry: CachedEntry, audience: Sequence[str]) -> JwtSvid:
        return await self._client.new_jwt_svid(entry.id, audience)

    async def _sign_wit(self, entry: CachedEntry) -> tuple[WitSvid, PrivateKey]:
        # The workload key is made here, in the agent; only its public half goes
        # to the server, and the private half only to the entitled workload.
        key = generate_private_key(KeyType.EC_P256)  # ES256: every WIT party supports it
        svid = await self._client.new_wit_svid(entry, key.public_key())
        return svid, key

    def _reconfigure(self) -> None:
        self._client.configure(roots_pem=roots_pem(self.bundle), svid=self.agent_svid)

    async def run(self, stop: asyncio.Event, interval: dt.timedelta | None = None) -> None:
        """Sync every ``interval`` (backing off after failures) until ``stop`` is set."""
        if interval is not None and interval != self.sync_interval:
            self.sync_interval = interval
            self.backoff = Backoff(initial=interval, maximum=max(self.backoff.maximum, interval))
        while not stop.is_set():
            ok = await self.sync_once()
            await self.pause(stop, self.next_delay(ok))
        if self._demand_task is not None:
            self._demand_task.cancel()

    def next_expiry(self) -> dt.datetime | None:
        """When the first cached workload X.509-SVID expires (None: none cached)."""
        return min((s.expires_at for s in self._cache.snapshot().svids.values()), default=None)

    async def pause(self, stop: asyncio.Event, delay: dt.timedelta) -> None:
        """Wait ``delay`` (or until ``stop``), dropping each SVID as it expires.

        Normally rotation replaces an SVID long before it expires; but while the
        server is away or refuses us, the wait can be minutes (the backoff), and
        an SVID that expires meanwhile must leave the cache then, not at the next
        tick: dropping it wakes the workloads' streams and persists the cache.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay.total_seconds()
        while not stop.is_set():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            expiry = self.next_expiry()
            wait = remaining
            if expiry is not None:
                wait = min(remaining, max(0.0, (expiry - self._clock.now()).total_seconds()))
            try:
                await asyncio.wait_for(stop.wait(), wait)
            except TimeoutError:
                pass
            if expiry is not None:
                await self._after_tick()

    def next_delay(self, ok: bool) -> dt.timedelta:
        """How long to wait after a tick that succeeded (``ok``) or failed."""
        if ok:
            self.backoff.reset()
            return self.sync_interval
        delay = self.backoff.next_delay()
        log.event("sync retry scheduled", level=logging.INFO,
                  delay=f"{delay.total_seconds():.1f}s", failures=self.backoff.failures)
        return delay

    def demand(self) -> None:
        """A workload waits for an SVID the cache lacks: rotate now, once."""
        if self._demand_task is not None and not self._demand_task.done():
            return
        self._demand_task = asyncio.get_running_loop().create_task(self._rotate_on_demand())

    async def _rotate_on_demand(self) -> None:
        async with self._lock:
            if await self._step(self._rotate):
                await self._after_tick()

    async def sync_soon(self) -> None:
        """Sync now for a caller without identity, and wait for it.

        Rate-limited among on-demand requests only: a periodic sync that ran just
        before an entry was registered must not hide that entry. Concurrent
        callers share one sync (they queue on the lock, then find it fresh).
        """
        loop = asyncio.get_running_loop()
        requested = loop.time()
        async with self._lock:
            if self._last_on_demand is not None and (
                self._last_on_demand >= requested
                or requested - self._last_on_demand < MIN_ON_DEMAND_SYNC_INTERVAL
            ):
                return
            self._last_on_demand = loop.time()
            await self._sync_locked()

    async def sync_once(self) -> bool:
        """One tick: renew, sync, rotate. Errors are logged, never raised.

        Returns:
            Whether every step succeeded.
        """
        async with self._lock:
            return await self._sync_locked()

    async def _sync_locked(self) -> bool:
        ok = True
        for step in (self._renew_agent_svid, self._sync, self._rotate):
            done = await self._step(step)
            ok = done and ok
            if not done and self.refused is not None:
                # Refused and not attested again: every other call would be
                # refused as well, so stop here until the next tick.
                break
        if ok and self.refused is not None:
            log.event("agent accepted by the server again", previously=self.refused)
            self.refused = None
        self._last_tick_ok = ok
        if ok:
            self._last_sync_at = self._clock.now()
        await self._after_tick()
        return ok

    def health(self) -> HealthReport:
        """The agent's state for ``sigil-agent healthcheck`` (:mod:`agent.health`).

        Banned or evicted (and not attested again) while refused; degraded when
        the last tick failed otherwise (the server away, say): in all three the
        SVIDs held are served until they expire, and nothing new comes. Healthy
        after a clean tick, and before the first one ends.
        """
        if self.refused == "banned":
            state, reason = HealthState.BANNED, self._refusal_message
        elif self.refused == "evicted":
            state, reason = HealthState.EVICTED, self._reattest_failure or self._refusal_message
        elif self._last_tick_ok is False:
            state, reason = HealthState.DEGRADED, self._last_failure
        else:
            state, reason = HealthState.HEALTHY, ""
        expiry = self.next_expiry()
        return HealthReport(
            state, reason,
            last_sync=self._last_sync_at.isoformat() if self._last_sync_at else "",
            svids=len(self._cache.snapshot().svids),
            next_expiry=expiry.isoformat() if expiry else "",
        )

    async def _step(self, step: Callable[[], Awaitable[None]]) -> bool:
        name = step.__name__.strip("_")
        try:
            await step()
        except ServerCallError as exc:
            if (exc.code == "PERMISSION_DENIED" and exc.reason is not None
                    and await self._refused(exc.reason, str(exc))):
                return False
            log.event("sync step failed", level=logging.WARNING, step=name, reason=str(exc))
            self._last_failure = f"{name}: {exc}"
            return False
        except (AgentError, SigilError) as exc:
            log.event("sync step failed", level=logging.WARNING, step=name, reason=str(exc))
            self._last_failure = f"{name}: {exc}"
            return False
        except Exception as exc:
            # Never let an unexpected error end the loop: the workloads
            # depend on rotation continuing.
            log.event("sync step crashed", level=logging.ERROR, step=name, exc_info=True)
            self._last_failure = f"{name}: {type(exc).__name__}"
            return False
        return True

    async def _refused(self, why: RefusalReason, reason: str) -> bool:
        """The server refused the agent itself (``why``); log ``reason`` once.

        Returns:
            True if handled (banned, or not attested); False for another reason.
        """
        self._refusal_message = reason
        if why is RefusalReason.AGENT_BANNED:
            if self.refused != "banned":
                self.refused = "banned"
                log.event("agent banned: the server refuses this agent, no new SVIDs will "
                          "be served", level=logging.ERROR, agent_id=self.agent_svid.spiffe_id,
                          reason=reason)
            return True
        if why is not RefusalReason.AGENT_NOT_ATTESTED:
            return False
        if self._reattest is None:
            if self.refused != "evicted":
                self.refused = "evicted"
                log.event("agent evicted: no usable attestor to attest again; give it a new "
                          "join token and restart it", level=logging.ERROR,
                          agent_id=self.agent_svid.spiffe_id, reason=reason)
            return True
        if self.refused != "evicted":
            log.event("agent evicted: attesting again", level=logging.WARNING,
                      agent_id=self.agent_svid.spiffe_id, reason=reason)
        try:
            svid = await self._reattest()
        except SigilError as exc:
            # Attesting swapped the channel to one without our SVID; put it back.
            self._reconfigure()
            if self.refused != "evicted" or str(exc) != self._reattest_failure:
                log.event("agent evicted: attesting again failed; serving the SVIDs it "
                          "holds until they expire", level=logging.ERROR,
                          agent_id=self.agent_svid.spiffe_id, reason=str(exc))
            self.refused = "evicted"
            self._reattest_failure = str(exc)
            return True
        self.agent_svid = svid
        self._reconfigure()
        self.refused = None
        self._reattest_failure = ""
        # A new node record: ask for everything again rather than a delta.
        self._sync_generation, self._sync_revision = "", 0
        self._revocation_id = 0
        log.event("agent attested again", agent_id=svid.spiffe_id,
                  expires_at=svid.expires_at.isoformat(),
                  renew_at=self.agent_svid_renew_at.isoformat())
        return True

    async def _after_tick(self) -> None:
        """Drop expired SVIDs; persist the cache when it changed."""
        for entry_id in self._cache.drop_expired(self._clock.now()):
            log.event("svid expired", level=logging.WARNING, entry_id=entry_id)
        # One save at a time (they share a temporary file): a pause and an
        # on-demand rotation may both get here.
        async with self._save_lock:
            snapshot = self._cache.snapshot()
            if snapshot.version == self._saved_version:
                return
            try:
                # Encoding a thousand keys takes tens of milliseconds: not on the
                # loop. The snapshot is immutable, so the thread reads it safely.
                await asyncio.to_thread(self._state.save_workload_cache, snapshot)
            except OSError as exc:
                log.event("workload cache not persisted", level=logging.WARNING,
                          reason=exc.strerror or str(exc))
                return
            self._saved_version = snapshot.version

    @property
    def agent_svid_renew_at(self) -> dt.datetime:
        """When the current agent SVID is due for renewal (40-60 % of its lifetime).

        Derived from the SVID alone, so it stays put across ticks and restarts and
        moves only when the SVID is replaced.
        """
        return rotation_time(self.agent_svid)

    async def _renew_agent_svid(self) -> None:
        tainted = bool(self._tainted) and signed_by_tainted(self.agent_svid, self._tainted)
        if not tainted and self._clock.now() < self.agent_svid_renew_at:
            return
        key, csr = await asyncio.to_thread(self._make_key_and_csr)
        svid = await self._client.renew(csr=csr, key=key)
        metrics.count_rotation("agent")
        self._state.save_svid(svid)
        self.agent_svid = svid
        self._reconfigure()
        log.event("agent svid renewed", agent_id=svid.spiffe_id,
                  expires_at=svid.expires_at.isoformat(),
                  renew_at=self.agent_svid_renew_at.isoformat())

    def _make_key_and_csr(self) -> tuple[PrivateKey, bytes]:
        key = self._new_key()
        return key, new_csr(key)

    async def _sync(self) -> None:
        result = await self._client.sync(known_generation=self._sync_generation,
                                         known_revision=self._sync_revision,
                                         known_revocation_id=self._revocation_id)
        own = result.bundles.get(self._cache.trust_domain)
        if own is not None and own != self.bundle:
            self._state.save_bundle(own)
            self.bundle = own
            self._reconfigure()
            log.event("bundle updated", trust_domain=own.trust_domain,
                      sequence=own.sequence_number)
        bundles = dict(result.bundles)
        bundles.setdefault(self._cache.trust_domain, self.bundle)
        self._cache.set_bundles(bundles)
        self._cache.set_tainted(result.tainted_x509)
        self._tainted = load_tainted(result.tainted_x509)
        # Node-alias entries (parent = the server) describe agents, not workloads.
        entries = [e for e in result.entries if e.parent_id != self.server_id]
        if result.full:
            changed = self._cache.set_entries(entries)
        else:
            changed = self._cache.apply_entry_changes(entries, result.removed)
        self._sync_generation, self._sync_revision = result.generation, result.revision
        # After the entries: _rotate, the next step of this tick, signs a new SVID
        # for every entry whose SVID a revocation dropped here.
        dropped = self._cache.apply_revocations(result.revocations,
                                                full=result.revocations_full)
        self._revocation_id = result.revocation_id
        if result.revocations:
            log.event("revocations updated", received=len(result.revocations),
                      full=result.revocations_full, count=len(self._cache.revoked),
                      revocation_id=result.revocation_id)
        for entry_id in dropped:
            log.event("revoked svid dropped", level=logging.WARNING, entry_id=entry_id)
        if changed:
            log.event("entries updated", full=result.full, changed=len(entries),
                      removed=len(result.removed),
                      count=len(self._cache.snapshot().entries), revision=result.revision)

    async def _rotate(self) -> None:
        plan = self._cache.rotation_plan(self._clock.now())
        for start in range(0, len(plan), MAX_BATCH):
            batch = plan[start:start + MAX_BATCH]
            # Key and CSR generation and chain verification cost milliseconds per
            # SVID: for 500 of them, seconds. They run in a worker thread so that
            # the loop keeps serving the Workload API meanwhile; the cache is only
            # touched here, on the loop.
            keys, csrs = await asyncio.to_thread(self._make_keys, batch)
            results = await self._client.batch_new_x509_svid(csrs)
            bundles = BundleSet(self._cache.snapshot().bundles.values())
            checked = await asyncio.to_thread(self._check_results, batch, keys, results, bundles)
            for entry_id, outcome in checked:
                if isinstance(outcome, str):
                    log.event("svid rejected", level=logging.WARNING, entry_id=entry_id,
                              reason=outcome)
                    continue
                self._cache.set_x509_svid(entry_id, outcome)
                metrics.count_rotation("workload")
                log.event("svid updated", entry_id=entry_id, spiffe_id=outcome.spiffe_id,
                          expires_at=outcome.expires_at.isoformat())

    def _make_keys(
        self, batch: Sequence[CachedEntry]
    ) -> tuple[dict[str, PrivateKey], list[tuple[str, bytes]]]:
        """A new key and its CSR per entry (run in a worker thread)."""
        keys = {e.id: self._new_key() for e in batch}
        return keys, [(entry_id, new_csr(key)) for entry_id, key in keys.items()]

    def _check_results(
        self,
        batch: Sequence[CachedEntry],
        keys: Mapping[str, PrivateKey],
        results: Sequence[SignResult],
        bundles: BundleSet,
    ) -> list[tuple[str, X509Svid | str]]:
        """Each signed chain as an SVID, or why it is rejected (run in a worker thread).

        A chain must verify against our bundles, name the entry's SPIFFE ID and
        certify the key we made for it. Results for entries not in ``batch`` are
        ignored; refusals by the server are logged here (logging is thread-safe).
        """
        by_id = {e.id: e for e in batch}
        out: list[tuple[str, X509Svid | str]] = []
        for r in results:
            entry = by_id.get(r.entry_id)
            if entry is None:
                continue
            if r.error:
                log.event("svid signing refused", level=logging.WARNING,
                          entry_id=r.entry_id, reason=r.error)
                continue
            try:
                spiffe_id = verify_chain(r.chain, bundles, now=self._clock.now())
                if spiffe_id != entry.spiffe_id:
                    raise AgentError(
                        f"server signed {spiffe_id}, the entry says {entry.spiffe_id}"
                    )
                key = keys[r.entry_id]
                if not public_keys_equal(r.chain[0].public_key(), key.public_key()):
                    raise AgentError("server signed another key")
                out.append((entry.id, X509Svid(spiffe_id, r.chain, key)))
            except (SigilError, ValueError) as exc:
                out.append((r.entry_id, str(exc)))
        return out
