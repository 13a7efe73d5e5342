"""Who may connect: allow lists of SPIFFE IDs, trust domains and path prefixes.

A policy belongs to one listener. It allows a peer when its SPIFFE ID is one of
the exact IDs, or belongs to one of the trust domains, or sits under one of the
path prefixes; anything else is denied (default deny: an empty policy allows no
one). Prefixes match whole path segments: ``spiffe://td/ns/prod`` covers
``spiffe://td/ns/prod`` and ``spiffe://td/ns/prod/api``, never
``spiffe://td/ns/production``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from identity.errors import InvalidSpiffeIdError
from identity.spiffeid import SpiffeId, TrustDomain
from proxy.errors import PolicyError


@dataclass(frozen=True)
class Policy:
    """One listener's allow lists.

    Attributes:
        ids: exact SPIFFE IDs.
        trust_domains: every ID of these trust domains.
        prefixes: IDs equal to one of these or below it (segment-aligned).
    """

    ids: frozenset[SpiffeId] = frozenset()
    trust_domains: frozenset[TrustDomain] = frozenset()
    prefixes: frozenset[SpiffeId] = frozenset()

    @property
    def empty(self) -> bool:
        """True when the policy allows no one."""
        return not (self.ids or self.trust_domains or self.prefixes)

    def allows(self, peer: SpiffeId) -> bool:
        """True when ``peer`` is on one of the allow lists."""
        if peer in self.ids or peer.trust_domain in self.trust_domains:
            return True
        for prefix in self.prefixes:
            if peer.trust_domain == prefix.trust_domain and (
                peer.path == prefix.path or peer.path.startswith(prefix.path + "/")
            ):
                return True
        return False

    def merge(self, other: Policy) -> Policy:
        """A policy allowing what either allows."""
        return Policy(self.ids | other.ids, self.trust_domains | other.trust_domains,
                      self.prefixes | other.prefixes)

    def describe(self) -> str:
        """The allow lists in the ``--allow`` notation, comma separated (for logs)."""
        rules = sorted(str(i) for i in self.ids)
        rules += sorted(td.id_string() for td in self.trust_domains)
        rules += sorted(f"{p}/*" for p in self.prefixes)
        return ",".join(rules) or "(nobody)"


def parse_id(text: str) -> SpiffeId:
    """An exact SPIFFE ID with a path (a workload's ID).

    Raises:
        PolicyError: not a SPIFFE ID, or one without a path.
    """
    try:
        spiffe_id = SpiffeId.parse(text)
    except InvalidSpiffeIdError as exc:
        raise PolicyError(f"invalid SPIFFE ID: {exc}") from None
    if not spiffe_id.has_path:
        raise PolicyError(
            f"invalid SPIFFE ID {text!r}: a workload's ID has a path (to allow the whole "
            "trust domain, list it as a trust domain)"
        )
    return spiffe_id


def parse_trust_domain(text: str) -> TrustDomain:
    """A trust domain: ``example.org`` or ``spiffe://example.org``.

    Raises:
        PolicyError: not a trust domain name, or an ID with a path.
    """
    try:
        if text.startswith("spiffe://"):
            spiffe_id = SpiffeId.parse(text)
            if spiffe_id.has_path:
                raise PolicyError(
                    f"invalid trust domain {text!r}: it has a path (list it as an ID or prefix)"
                )
            return spiffe_id.trust_domain
        return TrustDomain.parse(text)
    except InvalidSpiffeIdError as exc:
        raise PolicyError(f"invalid trust domain: {exc}") from None


def parse_prefix(text: str) -> SpiffeId:
    """A path prefix: ``spiffe://td/ns/prod``; a trailing ``/`` or ``/*`` is accepted.

    Raises:
        PolicyError: not a SPIFFE ID with a path once the trailing ``/*`` is removed.
    """
    stripped = text[:-2] if text.endswith("/*") else text.removesuffix("/")
    if not stripped.startswith("spiffe://") or len(stripped) == len("spiffe://"):
        raise PolicyError(f"invalid path prefix {text!r}: expected spiffe://TRUST-DOMAIN/PATH")
    try:
        prefix = SpiffeId.parse(stripped)
    except InvalidSpiffeIdError as exc:
        raise PolicyError(f"invalid path prefix {text!r}: {exc}") from None
    if not prefix.has_path:
        raise PolicyError(
            f"invalid path prefix {text!r}: it has no path (list it as a trust domain)"
        )
    return prefix


def parse_rule(text: str) -> Policy:
    """One ``--allow``/``--expect`` value as a one-rule policy.

    ``spiffe://td/path`` is an exact ID, ``spiffe://td`` (or ``td``) the whole trust
    domain, ``spiffe://td/path/*`` every ID under that path.

    Raises:
        PolicyError: naming the bad value.
    """
    if "://" in text and not text.startswith("spiffe://"):
        raise PolicyError(f"invalid rule {text!r}: a rule is a SPIFFE ID (spiffe://...)")
    if text.endswith("/*"):
        return Policy(prefixes=frozenset([parse_prefix(text)]))
    if not text.startswith("spiffe://") or text.rstrip("/").count("/") == 2:
        return Policy(trust_domains=frozenset([parse_trust_domain(text.rstrip("/"))]))
    return Policy(ids=frozenset([parse_id(text)]))


def from_rules(rules: Iterable[str]) -> Policy:
    """The union of several ``--allow`` values.

    Raises:
        PolicyError: naming the first bad value.
    """
    policy = Policy()
    for rule in rules:
        policy = policy.merge(parse_rule(rule))
    return policy
