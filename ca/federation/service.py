"""Federation relationships as the admin API and the config manage them.

Validation (:func:`~ca.config.relationship.new_relationship`) and the bootstrap
bundle's parsing run before anything is written, so bad input changes nothing.
A bootstrap bundle is stored as the foreign trust domain's bundle only when none is
held: once a bundle has been fetched, the latest fetched one authenticates the
endpoint (SPIFFE Federation §5.2.2), and an old bootstrap must not roll it back.
"""

from __future__ import annotations

from dataclasses import dataclass

from ca.config.federation import ConfiguredRelationship
from ca.config.relationship import Relationship, new_relationship, parse_bootstrap_bundle
from ca.datastore import Datastore
from ca.errors import InvalidArgumentError, NotFoundError
from ca.federation.refresher import Refresher, RefreshOutcome
from ca.log import event
from identity.bundle import Bundle
from identity.clock import Clock
from identity.errors import InvalidSpiffeIdError
from identity.spiffeid import TrustDomain


@dataclass(frozen=True, slots=True)
class RelationshipRequest:
    """A relationship as the caller gave it (text, not yet validated)."""

    trust_domain: str
    bundle_endpoint_url: str
    profile: str
    endpoint_spiffe_id: str = ""
    bootstrap_bundle: bytes = b""


@dataclass(frozen=True, slots=True)
class RelationshipStatus:
    """A relationship with the state of its foreign bundle."""

    relationship: Relationship
    bundle_sequence: int | None
    last_refresh: RefreshOutcome | None


class FederationService:
    """Create, list, show, update, delete and refresh relationships."""

    def __init__(self, datastore: Datastore, own: TrustDomain, clock: Clock,
                 refresher: Refresher) -> None:
        self._ds = datastore
        self._own = own
        self._clock = clock
        self._refresher = refresher

    def _validate(self, req: RelationshipRequest) -> tuple[Relationship, Bundle | None]:
        # The trust domain first: the bootstrap bundle is parsed for it, and whether
        # we already hold its bundle decides if a bootstrap is needed.
        td: TrustDomain | None = None
        try:
            td = TrustDomain.parse(req.trust_domain) if req.trust_domain else None
        except InvalidSpiffeIdError:
            pass  # new_relationship reports it, with the rule it broke
        bootstrap = None
        if td is not None and req.bootstrap_bundle:
            bootstrap = parse_bootstrap_bundle(td, req.bootstrap_bundle)
        held = td is not None and td != self._own and self._ds.get_bundle(td) is not None
        rel = new_relationship(
            trust_domain=req.trust_domain, bundle_endpoint_url=req.bundle_endpoint_url,
            profile=req.profile, endpoint_spiffe_id=req.endpoint_spiffe_id,
            own_trust_domain=self._own, has_bootstrap=bootstrap is not None or held)
        if bootstrap is not None and not rel.self_serving:
            raise InvalidArgumentError(
                "a bootstrap bundle is only for an https_spiffe endpoint whose ID is in the "
                f"foreign trust domain {rel.trust_domain} itself (self-serving)")
        return rel, bootstrap

    def _store_bootstrap(self, td: TrustDomain, bootstrap: Bundle | None) -> None:
        if bootstrap is None or self._ds.get_bundle(td) is not None:
            return
        self._ds.set_bundle(td, bootstrap.to_json().decode(), bootstrap.sequence_number or 0)
        event("federated bundle bootstrapped", trust_domain=td.name,
              x509_authorities=len(bootstrap.x509_authorities))

    def create(self, req: RelationshipRequest) -> Relationship:
        """Validate and store a new relationship (and its bootstrap bundle).

        Raises:
            InvalidArgumentError: a bad value (nothing written).
            AlreadyExistsError: one exists for that trust domain.
        """
        rel, bootstrap = self._validate(req)
        stored = self._ds.create_relationship(rel, now=self._clock.now())
        self._store_bootstrap(rel.trust_domain, bootstrap)
        event("federation relationship created", trust_domain=rel.trust_domain.name,
              profile=rel.profile, url=rel.bundle_endpoint_url)
        return stored

    def update(self, req: RelationshipRequest) -> Relationship:
        """Replace an existing relationship's fields.

        Raises:
            InvalidArgumentError: a bad value (nothing written).
            NotFoundError: none exists for that trust domain.
        """
        rel, bootstrap = self._validate(req)
        stored = self._ds.update_relationship(rel, now=self._clock.now())
        self._store_bootstrap(rel.trust_domain, bootstrap)
        event("federation relationship updated", trust_domain=rel.trust_domain.name,
              profile=rel.profile, url=rel.bundle_endpoint_url)
        return stored

    def apply_configured(self, items: tuple[ConfiguredRelationship, ...]) -> None:
        """Create or replace the relationships of the config file (at start)."""
        for item in items:
            self._ds.put_relationship(item.relationship, now=self._clock.now())
            self._store_bootstrap(item.relationship.trust_domain, item.bootstrap_bundle)

    def status(self, rel: Relationship) -> RelationshipStatus:
        """``rel`` with its held bundle's sequence and this server's latest fetch."""
        stored = self._ds.get_bundle(rel.trust_domain)
        return RelationshipStatus(rel, None if stored is None else stored.sequence,
                                  self._refresher.last_outcome(rel.trust_domain))

    def get(self, td: TrustDomain) -> RelationshipStatus:
        """One relationship.

        Raises:
            NotFoundError: none exists.
        """
        rel = self._ds.get_relationship(td)
        if rel is None:
            raise NotFoundError(f"no federation relationship with {td}")
        return self.status(rel)

    def list(self) -> list[RelationshipStatus]:
        """Every relationship, by trust domain."""
        return [self.status(r) for r in self._ds.list_relationships()]

    def delete(self, td: TrustDomain) -> None:
        """Stop fetching ``td``'s bundle; the bundle held stays (``bundle delete``).

        Raises:
            NotFoundError: none exists.
        """
        self._ds.delete_relationship(td)
        event("federation relationship deleted", trust_domain=td.name)

    def refresh(self, td: TrustDomain) -> RefreshOutcome:
        """Fetch now (NotFoundError without a relationship)."""
        return self._refresher.refresh(td)
