"""The refresher: fetch every foreign trust domain's bundle on its refresh hint.

SPIFFE Federation §5.3: poll each bundle endpoint every ``spiffe_refresh_hint``
seconds (here bounded by ``federation.refresh_min_interval`` and
``refresh_max_interval``; ``refresh_default_interval`` when the bundle has no hint),
keep the latest bundle per trust domain, and on failure try again at the next
interval rather than hammering the endpoint.

A fetched bundle is stored only when it passed every check of
:mod:`ca.federation.fetch` and its ``spiffe_sequence`` is not lower than the one
held; a bad answer keeps the bundle held, is logged (``federated bundle refresh
failed``) and counted (``sigil_federation_refresh_errors_total{trust_domain,reason}``).
Stored bundles reach agents at their next sync (the agent API reads the
``bundles`` table).

APScheduler only says *when* to look; :meth:`Refresher.tick` decides from the
injectable clock, so tests move a FakeClock and call ``tick()`` themselves.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler

from ca.config.federation import FederationConfig
from ca.config.relationship import PROFILE_HTTPS_SPIFFE, Relationship
from ca.datastore import Datastore, StoredBundle
from ca.errors import NotFoundError
from ca.federation.fetch import REASON_SEQUENCE, Fetched, FetchError, fetch_bundle
from ca.log import event
from ca.metrics import count_federation_refresh
from identity.bundle import Bundle
from identity.clock import Clock
from identity.errors import BundleError
from identity.spiffeid import TrustDomain

TICK_SECONDS = 1.0
STORE_ATTEMPTS = 3
"""Reads and conditional writes before giving way to other servers writing the bundle."""

FetchFn = Callable[..., Fetched]


@dataclass(frozen=True, slots=True)
class RefreshOutcome:
    """What one refresh did.

    Attributes:
        trust_domain: whose bundle.
        reason: "" on success, else the :class:`FetchError` reason.
        message: what happened, for people.
        changed: a new bundle was stored.
        sequence: the sequence number of the bundle held afterwards (None: none held).
        next_refresh_at: when the next fetch is due.
    """

    trust_domain: TrustDomain
    reason: str
    message: str
    changed: bool
    sequence: int | None
    next_refresh_at: dt.datetime

    @property
    def ok(self) -> bool:
        """The fetch succeeded (whether or not the bundle changed)."""
        return not self.reason


def _same_contents(a: Bundle, b: Bundle) -> bool:
    return (a.x509_authorities == b.x509_authorities
            and a.jwt_authorities == b.jwt_authorities
            and a.wit_authorities == b.wit_authorities
            and a.sequence_number == b.sequence_number)


class Refresher:
    """Keeps the foreign bundles of every relationship in the datastore current."""

    def __init__(self, datastore: Datastore, config: FederationConfig, clock: Clock, *,
                 fetch: FetchFn = fetch_bundle) -> None:
        """Args:
            datastore: relationships and bundles.
            config: intervals, timeout and the https_web CA file.
            clock: the time of schedules and SVID verification.
            fetch: :func:`~ca.federation.fetch.fetch_bundle` (replaceable in tests).
        """
        self._ds = datastore
        self._cfg = config
        self._clock = clock
        self._fetch = fetch
        self._lock = threading.Lock()
        self._store_lock = threading.Lock()
        self._due: dict[TrustDomain, dt.datetime] = {}
        self._interval: dict[TrustDomain, dt.timedelta] = {}
        self._last: dict[TrustDomain, RefreshOutcome] = {}
        self._scheduler: BackgroundScheduler | None = None
        # Set by stop(): a tick with several slow endpoints ends after the current
        # fetch instead of making shutdown wait for all of them.
        self._stopping = threading.Event()

    # ---- timing ------------------------------------------------------------------

    def interval_for(self, hint_seconds: int | None) -> dt.timedelta:
        """The refresh interval for a bundle's hint, within the configured bounds."""
        cfg = self._cfg
        wanted = (dt.timedelta(seconds=hint_seconds) if hint_seconds
                  else cfg.refresh_default_interval)
        return min(max(wanted, cfg.refresh_min_interval), cfg.refresh_max_interval)

    def next_refresh_at(self, trust_domain: TrustDomain) -> dt.datetime | None:
        """When the next fetch of ``trust_domain`` is due (None: not scheduled yet)."""
        with self._lock:
            return self._due.get(trust_domain)

    def last_outcome(self, trust_domain: TrustDomain) -> RefreshOutcome | None:
        """The outcome of the latest fetch of ``trust_domain`` in this process."""
        with self._lock:
            return self._last.get(trust_domain)

    # ---- work --------------------------------------------------------------------

    def tick(self) -> list[RefreshOutcome]:
        """Fetch every relationship whose refresh is due; forget deleted ones."""
        relationships = {r.trust_domain: r for r in self._ds.list_relationships()}
        now = self._clock.now()
        with self._lock:
            for gone in set(self._due) - set(relationships):
                self._due.pop(gone, None)
                self._interval.pop(gone, None)
            due = [r for td, r in sorted(relationships.items(), key=lambda kv: kv[0].name)
                   if self._due.get(td, now) <= now]
        outcomes = []
        for rel in due:
            if self._stopping.is_set():
                break
            outcomes.append(self._refresh(rel))
        return outcomes

    def refresh(self, trust_domain: TrustDomain) -> RefreshOutcome:
        """Fetch ``trust_domain``'s bundle now (``federation refresh``).

        Raises:
            NotFoundError: there is no relationship with it.
        """
        rel = self._ds.get_relationship(trust_domain)
        if rel is None:
            raise NotFoundError(f"no federation relationship with {trust_domain}")
        return self._refresh(rel)

    def _held(self, td: TrustDomain) -> tuple[Bundle | None, int]:
        return self._parse_held(td, self._ds.get_bundle(td))

    @staticmethod
    def _parse_held(td: TrustDomain, stored: StoredBundle | None) -> tuple[Bundle | None, int]:
        if stored is None:
            return None, 0
        try:
            return Bundle.from_jwks(td, stored.data), stored.sequence
        except BundleError:
            return None, stored.sequence

    def _refresh(self, rel: Relationship) -> RefreshOutcome:
        td = rel.trust_domain
        try:
            outcome = self._fetch_and_store(rel)
        except FetchError as exc:
            count_federation_refresh(td.name, exc.reason)
            event("federated bundle refresh failed", level=logging.WARNING,
                  trust_domain=td.name, reason=exc.reason, error=str(exc))
            held, _ = self._held(td)
            interval = self._interval.get(td) or self.interval_for(
                held.refresh_hint if held else None)
            outcome = RefreshOutcome(td, exc.reason, str(exc), False,
                                     held.sequence_number if held else None,
                                     self._clock.now() + interval)
        else:
            count_federation_refresh(td.name)
        with self._lock:
            self._due[td] = outcome.next_refresh_at
            self._last[td] = outcome
        return outcome

    def _fetch_and_store(self, rel: Relationship) -> RefreshOutcome:
        td = rel.trust_domain
        trust_bundle = None
        if rel.profile == PROFILE_HTTPS_SPIFFE and rel.endpoint_spiffe_id is not None:
            # The bundle we hold for the endpoint's trust domain: for a self-serving
            # endpoint the foreign one itself (bootstrap first, then the latest
            # fetched, so a rotation over there rolls forward).
            trust_bundle, _ = self._held(rel.endpoint_spiffe_id.trust_domain)
        fetched = self._fetch(rel, trust_bundle=trust_bundle, web_ca_file=self._web_ca_file(),
                              timeout=self._cfg.fetch_timeout.total_seconds(),
                              now=self._clock.now()).bundle
        interval = self.interval_for(fetched.refresh_hint)
        with self._lock:
            self._interval[td] = interval
        with self._store_lock:
            for attempt in range(STORE_ATTEMPTS):
                row = self._ds.get_bundle(td)
                held, held_row_sequence = self._parse_held(td, row)
                if (held is not None and held.sequence_number is not None
                        and fetched.sequence_number is not None
                        and fetched.sequence_number < held.sequence_number):
                    if attempt:
                        # Not a bad answer: another server stored a newer bundle
                        # while we fetched this one.
                        return RefreshOutcome(
                            td, "", "superseded: another server stored a newer bundle",
                            False, held.sequence_number, self._clock.now() + interval)
                    raise FetchError(REASON_SEQUENCE,
                                     f"{rel.bundle_endpoint_url}: sequence "
                                     f"{fetched.sequence_number} is lower than the "
                                     f"{held.sequence_number} held")
                if held is not None and _same_contents(held, fetched):
                    return RefreshOutcome(td, "", "unchanged", False, held.sequence_number,
                                          self._clock.now() + interval)
                store = fetched
                if store.sequence_number is None:
                    # §5.3: no sequence -> the latest fetched wins; a new number tells
                    # agents and our own comparisons that it changed.
                    store = replace(store, sequence_number=held_row_sequence + 1)
                sequence = store.sequence_number or 0
                # Only over what we just read: another server sharing the database
                # may have stored a newer bundle since; then decide again.
                if self._ds.replace_bundle(td, row, store.to_json().decode(), sequence):
                    break
            else:
                return RefreshOutcome(td, "", "not stored: other servers kept writing it",
                                      False, held.sequence_number if held else None,
                                      self._clock.now() + interval)
        event("federated bundle updated", trust_domain=td.name, sequence=sequence,
              x509_authorities=len(store.x509_authorities),
              jwt_authorities=len(store.jwt_authorities))
        return RefreshOutcome(td, "", "updated", True, sequence, self._clock.now() + interval)

    def _web_ca_file(self) -> Path | None:
        return self._cfg.web_ca_file

    # ---- background --------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.tick()
        except Exception as exc:
            event("federation refresh tick failed", level=logging.ERROR,
                  error=f"{exc.__class__.__name__}: {exc}", exc_info=True)

    def start(self) -> None:
        """Check for due refreshes every second on a background thread."""
        self._stopping.clear()
        self._scheduler = BackgroundScheduler(daemon=True)
        self._scheduler.add_job(self._run, "interval", seconds=TICK_SECONDS,
                                id="federation-refresh", max_instances=1, coalesce=True,
                                next_run_time=dt.datetime.now(dt.UTC))
        self._scheduler.start()

    def stop(self) -> None:
        """Stop the background thread (a running fetch finishes first)."""
        self._stopping.set()
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=True)
        self._scheduler = None
