"""Foreign trust domains' bundles managed by hand (``sigil-server bundle set``).

Federated bundles live in the datastore's ``bundles`` table, one row per trust
domain, next to our own. The federation refresher writes them from bundle
endpoints; an operator may also set, replace or delete one here. A bundle set by
hand always replaces the one held, whatever its sequence number: it is how an
operator recovers from a bad refresh. Every check runs before anything is written.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from cryptography import x509

from ca.errors import InvalidArgumentError, NotFoundError
from ca.log import event
from identity.bundle import Bundle
from identity.errors import BundleError, InvalidSpiffeIdError
from identity.spiffeid import TrustDomain

if TYPE_CHECKING:
    # Annotations only: importing ca.datastore loads SQLAlchemy, which the admin CLI
    # (ca/cli/bundle.py uses parse_trust_domain and MAX_BUNDLE_BYTES) must not pay for.
    from ca.datastore.records import StoredBundle
    from ca.datastore.repository import Datastore

MAX_BUNDLE_BYTES = 1024 * 1024
"""Largest bundle accepted (the same bound the refresher applies to endpoints)."""
FORMATS = ("pem", "spiffe")
MAX_BATCH_BUNDLES = 1000
"""Most bundles one :meth:`ForeignBundles.set_many` (a bundle map) may set."""


def parse_trust_domain(text: str, field: str = "trust_domain") -> TrustDomain:
    """A trust domain from ``name`` or ``spiffe://name`` (a path is refused).

    Raises:
        InvalidArgumentError: empty, malformed, or a SPIFFE ID with a path.
    """
    if not text:
        raise InvalidArgumentError(f"{field} is required")
    if text.startswith("spiffe://") and "/" in text[len("spiffe://"):].rstrip("/"):
        raise InvalidArgumentError(
            f"{field} {text!r} must be a trust domain (spiffe://name), not a workload ID")
    try:
        return TrustDomain.parse(text)
    except InvalidSpiffeIdError as exc:
        raise InvalidArgumentError(f"{field}: {exc}") from None


def parse_bundle(trust_domain: TrustDomain, fmt: str, data: bytes) -> Bundle:
    """Parse a bundle in ``fmt`` (``pem`` or ``spiffe``) for ``trust_domain``.

    Raises:
        InvalidArgumentError: unknown format, oversized, unparsable, or empty.
    """
    if fmt not in FORMATS:
        raise InvalidArgumentError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if len(data) > MAX_BUNDLE_BYTES:
        raise InvalidArgumentError(
            f"bundle is {len(data)} bytes, more than the limit of {MAX_BUNDLE_BYTES}")
    try:
        bundle = (Bundle.from_x509_pem(trust_domain, data) if fmt == "pem"
                  else Bundle.from_jwks(trust_domain, data))
    except BundleError as exc:
        raise InvalidArgumentError(f"bundle of {trust_domain} ({fmt}): {exc}") from None
    if not (bundle.x509_authorities or bundle.jwt_authorities or bundle.wit_authorities):
        raise InvalidArgumentError(
            f"bundle of {trust_domain} ({fmt}) holds no CA certificate and no JWT key")
    _check_authority_names(trust_domain, bundle)
    return bundle


def _check_authority_names(trust_domain: TrustDomain, bundle: Bundle) -> None:
    # A document does not name its trust domain, but SPIFFE CA certificates carry
    # spiffe://<td> (Sigil's and SPIRE's do): catch another domain's bundle set under
    # this name (files swapped), which would make its workloads trusted as ours.
    # Authorities without such a SAN (an upstream root) cannot be checked.
    for cert in bundle.x509_authorities:
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            continue
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            if not uri.startswith("spiffe://"):
                continue
            try:
                named = TrustDomain.parse(uri)
            except InvalidSpiffeIdError:
                continue
            if named != trust_domain:
                raise InvalidArgumentError(
                    f"bundle holds a CA certificate of trust domain {named}, "
                    f"not {trust_domain}")


class ForeignBundles:
    """List, get, set and delete other trust domains' bundles.

    Args:
        datastore: where bundle rows live.
        own: our trust domain, whose bundle only the CA writes.
    """

    def __init__(self, datastore: Datastore, own: TrustDomain) -> None:
        self._ds = datastore
        self._own = own

    def _foreign(self, td: TrustDomain) -> TrustDomain:
        if td == self._own:
            raise InvalidArgumentError(
                f"{td} is this server's own trust domain: its bundle is managed by the CA "
                "(see localauthority), not set or deleted by hand")
        return td

    def list(self) -> list[Bundle]:
        """Every foreign bundle, ordered by trust domain."""
        return [_load(row) for row in self._ds.list_bundles(exclude=self._own)]

    def get(self, td: TrustDomain) -> Bundle:
        """One foreign bundle.

        Raises:
            NotFoundError: none is held for ``td``.
        """
        stored = self._ds.get_bundle(self._foreign(td))
        if stored is None:
            raise NotFoundError(f"no bundle for trust domain {td}")
        return _load(stored)

    def set(self, td: TrustDomain, fmt: str, data: bytes) -> Bundle:
        """Parse and store ``td``'s bundle, replacing the one held.

        The sequence number is the document's ``spiffe_sequence`` when it has one,
        otherwise one more than the one held, so agents and refreshers see a change.

        Raises:
            InvalidArgumentError: our own trust domain, or a bad bundle (nothing written).
        """
        bundle = parse_bundle(self._foreign(td), fmt, data)
        if bundle.sequence_number is None:
            held = self._ds.get_bundle(td)
            bundle = replace(bundle, sequence_number=(held.sequence if held else 0) + 1)
        sequence = bundle.sequence_number or 0
        self._ds.set_bundle(td, bundle.to_json().decode(), sequence)
        event("foreign bundle set", trust_domain=td.name, sequence=sequence,
              x509_authorities=len(bundle.x509_authorities),
              jwt_authorities=len(bundle.jwt_authorities))
        return bundle

    def set_many(self, members: Sequence[tuple[str, str, bytes]]) -> builtins.list[Bundle]:
        """Parse and store several bundles (a SPIFFE bundle map) in one transaction.

        Every member is checked before the first write; the writes then commit
        together, so a failure at any point leaves every bundle as it was. Each
        sequence number follows the rule of :meth:`set`.

        Args:
            members: ``(trust domain, format, data)`` each, as in :meth:`set`.

        Returns:
            The bundles stored, in the given order.

        Raises:
            InvalidArgumentError: too many members, a trust domain twice or our own,
                or a member that does not parse (nothing written).
        """
        if len(members) > MAX_BATCH_BUNDLES:
            raise InvalidArgumentError(
                f"a bundle map may hold at most {MAX_BATCH_BUNDLES} trust domains, "
                f"not {len(members)}")
        parsed: builtins.list[Bundle] = []
        seen: set[TrustDomain] = set()
        for index, (name, fmt, data) in enumerate(members):
            td = parse_trust_domain(name, f"bundles[{index}].trust_domain")
            if td in seen:
                raise InvalidArgumentError(f"trust domain {td.name!r} appears more than once")
            seen.add(td)
            try:
                parsed.append(parse_bundle(self._foreign(td), fmt, data))
            except InvalidArgumentError as exc:
                raise InvalidArgumentError(f"member {td.name!r}: {exc}") from None

        def renderer(bundle: Bundle) -> Callable[[int], tuple[str, int]]:
            def render(held: int) -> tuple[str, int]:
                if bundle.sequence_number is not None:
                    return bundle.to_json().decode(), bundle.sequence_number
                numbered = replace(bundle, sequence_number=held + 1)
                return numbered.to_json().decode(), held + 1
            return render

        stored = self._ds.set_bundles([(b.trust_domain, renderer(b)) for b in parsed])
        out = [_load(row) for row in stored]
        for b in out:
            event("foreign bundle set", trust_domain=b.trust_domain.name,
                  sequence=b.sequence_number or 0, x509_authorities=len(b.x509_authorities),
                  jwt_authorities=len(b.jwt_authorities), batch=len(out))
        return out

    def delete(self, td: TrustDomain) -> None:
        """Remove ``td``'s bundle. Entries that federate with it keep the name.

        Raises:
            InvalidArgumentError: our own trust domain.
            NotFoundError: none is held.
        """
        if not self._ds.delete_bundle(self._foreign(td)):
            raise NotFoundError(f"no bundle for trust domain {td}")
        event("foreign bundle deleted", trust_domain=td.name)


def _load(stored: StoredBundle) -> Bundle:
    return Bundle.from_jwks(TrustDomain(stored.trust_domain), stored.data)
