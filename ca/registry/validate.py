"""Validation of admin input: every field checked before anything is written."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable

from api.protos.sigil.admin.v1 import admin_pb2
from api.protos.sigil.types.v1 import types_pb2
from ca.datastore.records import EntryFilter, EntryRecord, Match
from ca.errors import InvalidArgumentError
from identity.errors import InvalidSelectorError, InvalidSpiffeIdError
from identity.selectors import Selector
from identity.spiffeid import SpiffeId, TrustDomain

MAX_SELECTORS = 64
MAX_DNS_NAMES = 32
MAX_FEDERATES_WITH = 32
MAX_HINT_LENGTH = 1024
RESERVED_DNS_SUFFIX = "sigil.invalid"
# Paths under /sigil/ name the server and its agents; no entry may claim them.
RESERVED_PATH_PREFIX = "/sigil/"

_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def parse_spiffe_id(value: str, field: str) -> SpiffeId:
    """Parse a SPIFFE ID, naming the field in the error."""
    if not value:
        raise InvalidArgumentError(f"{field} is required")
    try:
        return SpiffeId.parse(value)
    except InvalidSpiffeIdError as exc:
        raise InvalidArgumentError(f"{field}: {exc}") from None


def workload_id(value: str, field: str, trust_domain: TrustDomain) -> SpiffeId:
    """A SPIFFE ID an entry or alias may hand out: ours, with a path, not reserved."""
    sid = parse_spiffe_id(value, field)
    if not sid.is_member_of(trust_domain):
        raise InvalidArgumentError(
            f"{field} {sid} is not in the trust domain {trust_domain}"
        )
    if not sid.has_path:
        raise InvalidArgumentError(f"{field} {sid} must have a path")
    if (sid.path + "/").startswith(RESERVED_PATH_PREFIX):
        raise InvalidArgumentError(
            f"{field} {sid}: paths under {RESERVED_PATH_PREFIX} are reserved for Sigil itself"
        )
    return sid


def ttl_seconds(value: int, field: str, *, maximum: dt.timedelta) -> int:
    """A TTL in seconds: 0 (the default) up to ``maximum``."""
    limit = int(maximum.total_seconds())
    if value < 0 or value > limit:
        raise InvalidArgumentError(f"{field} {value} must be between 0 and {limit} seconds")
    return value


def dns_name(value: str) -> str:
    """A DNS SAN: an RFC 1123 host name, optionally with one leading ``*.`` label.

    Returns:
        The name in lowercase (DNS names compare case-insensitively).
    """
    name = value.lower()
    labels = name.split(".")
    if labels and labels[0] == "*":
        labels = labels[1:]
    if not value or len(name) > 253 or not labels or not all(
        _DNS_LABEL.match(label) for label in labels
    ):
        raise InvalidArgumentError(
            f"DNS name {value!r} is not a valid host name (letters, digits and '-' in "
            "dot-separated labels of at most 63 characters; an optional leading '*.')"
        )
    if name == RESERVED_DNS_SUFFIX or name.endswith("." + RESERVED_DNS_SUFFIX):
        raise InvalidArgumentError(
            f"DNS name {value!r}: names under {RESERVED_DNS_SUFFIX} are reserved for Sigil"
        )
    return name


def selectors(values: Iterable[types_pb2.Selector]) -> tuple[Selector, ...]:
    """At least one valid selector, at most MAX_SELECTORS."""
    out: list[Selector] = []
    for sel in values:
        try:
            out.append(Selector(sel.type, sel.value))
        except InvalidSelectorError as exc:
            raise InvalidArgumentError(str(exc)) from None
    if not out:
        raise InvalidArgumentError("an entry needs at least one selector")
    if len(out) > MAX_SELECTORS:
        raise InvalidArgumentError(f"an entry may have at most {MAX_SELECTORS} selectors")
    return tuple(sorted(set(out)))


def new_entry(
    msg: types_pb2.Entry, *, trust_domain: TrustDomain, max_ttl: dt.timedelta
) -> EntryRecord:
    """Validate a CreateEntry request's entry.

    Raises:
        InvalidArgumentError: naming the field and the rule it broke.
    """
    spiffe_id = workload_id(msg.spiffe_id, "spiffe_id", trust_domain)
    parent_id = parse_spiffe_id(msg.parent_id, "parent_id")
    # Parents are our agents, node aliases, the server or other entries: all ours.
    if not parent_id.is_member_of(trust_domain):
        raise InvalidArgumentError(
            f"parent_id {parent_id} is not in the trust domain {trust_domain}"
        )
    if not parent_id.has_path:
        raise InvalidArgumentError(f"parent_id {parent_id} must have a path")
    sels = selectors(msg.selectors)
    if len(msg.dns_names) > MAX_DNS_NAMES:
        raise InvalidArgumentError(f"an entry may have at most {MAX_DNS_NAMES} DNS names")
    dns = tuple(dict.fromkeys(dns_name(n) for n in msg.dns_names))
    if len(msg.federates_with) > MAX_FEDERATES_WITH:
        raise InvalidArgumentError(
            f"an entry may federate with at most {MAX_FEDERATES_WITH} trust domains"
        )
    federated: list[TrustDomain] = []
    for name in msg.federates_with:
        td = trust_domain_name(name, "federates_with")
        if td == trust_domain:
            raise InvalidArgumentError(
                f"federates_with: {td} is our own trust domain, not a federated one"
            )
        federated.append(td)
    if len(msg.hint) > MAX_HINT_LENGTH:
        raise InvalidArgumentError(f"hint is longer than {MAX_HINT_LENGTH} characters")
    if msg.expires_at < 0:
        raise InvalidArgumentError("expires_at must not be negative")
    return EntryRecord(
        spiffe_id=spiffe_id,
        parent_id=parent_id,
        selectors=sels,
        x509_svid_ttl=ttl_seconds(msg.x509_svid_ttl, "x509_svid_ttl", maximum=max_ttl),
        jwt_svid_ttl=ttl_seconds(msg.jwt_svid_ttl, "jwt_svid_ttl", maximum=max_ttl),
        dns_names=dns,
        federates_with=tuple(dict.fromkeys(federated)),
        hint=msg.hint,
        admin=msg.admin,
        downstream=msg.downstream,
        expires_at=msg.expires_at,
    )


def trust_domain_name(value: str, field: str) -> TrustDomain:
    """A trust domain name (``example.org``) or its ID (``spiffe://example.org``)."""
    try:
        return TrustDomain.parse(value)
    except InvalidSpiffeIdError as exc:
        raise InvalidArgumentError(f"{field}: {exc}") from None


# The Entry fields UpdateEntry may set; id, revision and timestamps are the server's.
UPDATABLE_FIELDS = (
    "spiffe_id", "parent_id", "selectors", "x509_svid_ttl", "jwt_svid_ttl", "dns_names",
    "federates_with", "hint", "admin", "downstream", "expires_at",
)


def updated_entry(
    current: types_pb2.Entry, patch: types_pb2.Entry, fields: Iterable[str], *,
    trust_domain: TrustDomain, max_ttl: dt.timedelta,
) -> EntryRecord:
    """The entry ``current`` with the named ``fields`` taken from ``patch``, validated
    as a whole exactly like a new entry.

    Raises:
        InvalidArgumentError: no field named, a field that cannot be set, or an
            invalid resulting entry.
    """
    names = list(dict.fromkeys(fields))
    if not names:
        raise InvalidArgumentError(
            "name at least one field to update: " + ", ".join(UPDATABLE_FIELDS)
        )
    for name in names:
        if name not in UPDATABLE_FIELDS:
            raise InvalidArgumentError(
                f"field {name!r} cannot be updated; these can: " + ", ".join(UPDATABLE_FIELDS)
            )
    merged = types_pb2.Entry()
    merged.CopyFrom(current)
    for name in names:
        merged.ClearField(name)
        value = getattr(patch, name)
        if name in ("selectors", "dns_names", "federates_with"):
            getattr(merged, name).extend(value)
        else:
            setattr(merged, name, value)
    return new_entry(merged, trust_domain=trust_domain, max_ttl=max_ttl)


_MATCH = {
    admin_pb2.MATCH_EXACT: Match.EXACT,
    admin_pb2.MATCH_SUBSET: Match.SUBSET,
    admin_pb2.MATCH_SUPERSET: Match.SUPERSET,
    admin_pb2.MATCH_ANY: Match.ANY,
}


def _match(value: int, field: str) -> Match:
    found: Match | None = _MATCH.get(value)  # type: ignore[call-overload]
    if found is None:
        raise InvalidArgumentError(f"{field} {value} is not a known match behaviour")
    return found


def entry_filter(request: admin_pb2.ListEntriesRequest) -> EntryFilter:
    """The filters of a ListEntries request, each parsed and checked."""
    spiffe_id = parse_spiffe_id(request.spiffe_id, "spiffe_id") if request.spiffe_id else None
    parent_id = parse_spiffe_id(request.parent_id, "parent_id") if request.parent_id else None
    sels: tuple[Selector, ...] = ()
    if request.selectors:
        sels = selectors(request.selectors)
    federated = tuple(trust_domain_name(n, "federates_with") for n in request.federates_with)
    if len(federated) > MAX_FEDERATES_WITH:
        raise InvalidArgumentError(
            f"at most {MAX_FEDERATES_WITH} federates_with values may be given"
        )
    if len(request.hint) > MAX_HINT_LENGTH:
        raise InvalidArgumentError(f"hint is longer than {MAX_HINT_LENGTH} characters")
    return EntryFilter(
        spiffe_id=spiffe_id, parent_id=parent_id, selectors=sels,
        selector_match=_match(request.selector_match, "selector_match"),
        federates_with=federated,
        federates_with_match=_match(request.federates_with_match, "federates_with_match"),
        hint=request.hint or None,
    )


def agent_id(value: str, trust_domain: TrustDomain) -> SpiffeId:
    """An agent's SPIFFE ID: ours, under /sigil/agent/."""
    sid = parse_spiffe_id(value, "id")
    if not sid.is_member_of(trust_domain) or not sid.path.startswith("/sigil/agent/"):
        raise InvalidArgumentError(f"id {sid} is not an agent ID of {trust_domain}")
    return sid


MAX_AUDIENCES = 32
MAX_AUDIENCE_LENGTH = 256


def audience(values: Iterable[str]) -> list[str]:
    """A JWT-SVID audience: 1 to MAX_AUDIENCES non-empty values of bounded length."""
    out = list(values)
    if not out:
        raise InvalidArgumentError("at least one audience is required")
    if len(out) > MAX_AUDIENCES:
        raise InvalidArgumentError(f"at most {MAX_AUDIENCES} audiences are allowed")
    for aud in out:
        if not aud or len(aud) > MAX_AUDIENCE_LENGTH:
            raise InvalidArgumentError(
                f"each audience must be 1 to {MAX_AUDIENCE_LENGTH} characters"
            )
    return out


def dns_names(values: Iterable[str]) -> tuple[str, ...]:
    """Up to MAX_DNS_NAMES valid DNS names, lowercased, without duplicates."""
    names = list(values)
    if len(names) > MAX_DNS_NAMES:
        raise InvalidArgumentError(f"at most {MAX_DNS_NAMES} DNS names are allowed")
    return tuple(dict.fromkeys(dns_name(n) for n in names))
