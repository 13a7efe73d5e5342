"""The sync loop: keeps the cache current and every SVID fresh (DESIGN flows 3 and 6).

Every ``sync_interval``:

1. renew the agent's own SVID once it is past half its lifetime;
2. SyncAuthorized: replace the entries and bundles in the cache (entries that
   disappeared lose their SVIDs there); persist a changed bundle of our trust
   domain and rebuild the server channel with it;
3. for each entry in :meth:`~agent.cache.Cache.rotation_plan` make a key and a
   CSR, send them in one BatchNewX509SVID, verify each returned chain against
   the bundle, and store it.

A failed step is logged and retried on the next tick; the loop never dies of a
server error (backoff is a later issue).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable, Sequence

from agent import log
from agent.cache import Cache, CachedEntry, svid_needs_rotation
from agent.client import ServerClient, roots_pem
from agent.errors import AgentError
from agent.state import AgentState
from identity.bundle import Bundle, BundleSet
from identity.clock import Clock, SystemClock
from identity.errors import SigilError
from identity.jwtsvid import JwtSvid
from identity.keys import PrivateKey, generate_private_key, public_keys_equal
from identity.spiffeid import SpiffeId
from identity.x509svid import X509Svid, new_csr, verify_chain

# A caller with no identity may trigger a sync (a just-registered workload then
# works at once); at most this often, so a workload without any entry that
# retries in a loop cannot make the agent hammer the server.
MIN_ON_DEMAND_SYNC_INTERVAL = 1.0

# One BatchNewX509SVID request carries at most this many CSRs, to keep each
# request well under the server's message size limit.
MAX_BATCH = 500


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
        self._lock = asyncio.Lock()
        self._last_on_demand: float | None = None

    async def _sign_jwt(self, entry: CachedEntry, audience: Sequence[str]) -> JwtSvid:
        return await self._client.new_jwt_svid(entry.id, audience)

    def _reconfigure(self) -> None:
        self._client.configure(roots_pem=roots_pem(self.bundle), svid=self.agent_svid)

    async def run(self, stop: asyncio.Event, interval: dt.timedelta) -> None:
        """Sync every ``interval`` until ``stop`` is set."""
        while not stop.is_set():
            await self.sync_once()
            try:
                await asyncio.wait_for(stop.wait(), interval.total_seconds())
            except TimeoutError:
                pass

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

    async def sync_once(self) -> None:
        """One tick: renew, sync, rotate. Errors are logged, never raised."""
        async with self._lock:
            await self._sync_locked()

    async def _sync_locked(self) -> None:
        for step in (self._renew_agent_svid, self._sync, self._rotate):
            try:
                await step()
            except (AgentError, SigilError) as exc:
                log.event("sync step failed", level=logging.WARNING,
                          step=step.__name__.strip("_"), reason=str(exc))
            except Exception:
                # Never let an unexpected error end the loop: the workloads
                # depend on rotation continuing.
                log.event("sync step crashed", level=logging.ERROR,
                          step=step.__name__.strip("_"), exc_info=True)

    async def _renew_agent_svid(self) -> None:
        if not svid_needs_rotation(self.agent_svid, self._clock.now()):
            return
        key = self._new_key()
        svid = await self._client.renew(csr=new_csr(key), key=key)
        self._state.save_svid(svid)
        self.agent_svid = svid
        self._reconfigure()
        log.event("agent svid renewed", agent_id=svid.spiffe_id,
                  expires_at=svid.expires_at.isoformat())

    async def _sync(self) -> None:
        result = await self._client.sync()
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
        # Node-alias entries (parent = the server) describe agents, not workloads.
        entries = [e for e in result.entries if e.parent_id != self.server_id]
        if self._cache.set_entries(entries):
            log.event("entries updated", count=len(entries), revision=result.revision)

    async def _rotate(self) -> None:
        plan = self._cache.rotation_plan(self._clock.now())
        for start in range(0, len(plan), MAX_BATCH):
            batch = plan[start:start + MAX_BATCH]
            keys = {e.id: self._new_key() for e in batch}
            results = await self._client.batch_new_x509_svid(
                [(entry_id, new_csr(key)) for entry_id, key in keys.items()]
            )
            by_id = {e.id: e for e in batch}
            bundles = BundleSet(self._cache.snapshot().bundles.values())
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
                    svid = X509Svid(spiffe_id, r.chain, keys[r.entry_id])
                except (SigilError, ValueError) as exc:
                    log.event("svid rejected", level=logging.WARNING,
                              entry_id=r.entry_id, reason=str(exc))
                    continue
                self._cache.set_x509_svid(entry.id, svid)
                log.event("svid updated", entry_id=entry.id, spiffe_id=spiffe_id,
                          expires_at=svid.expires_at.isoformat())
