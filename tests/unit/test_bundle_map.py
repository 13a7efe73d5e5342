"""The SPIFFE bundle map (Trust Domain and Bundle §5): write, read back, refuse."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from identity.bundle import (
    Bundle,
    JwtAuthority,
    bundle_map_to_json,
    bundle_map_to_jwks,
    parse_bundle_map,
)
from identity.errors import BundleError
from identity.keys import generate_private_key, key_id
from identity.spiffeid import TrustDomain
from identity.x509svid import new_ca_certificate

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _bundle(name: str, *, hint: int | None = 300, sequence: int | None = 4) -> Bundle:
    td = TrustDomain(name)
    key = generate_private_key()
    cert = new_ca_certificate(trust_domain=td, public_key=key.public_key(), signer_key=key,
                              not_before=NOW, not_after=NOW + dt.timedelta(days=1))
    jwt_key = generate_private_key().public_key()
    return Bundle(td, (cert,), (JwtAuthority(key_id(jwt_key), jwt_key),),
                  sequence_number=sequence, refresh_hint=hint)


@pytest.fixture(scope="module")
def two() -> tuple[Bundle, Bundle]:
    return _bundle("b.example.org"), _bundle("a.example.org", hint=None, sequence=None)


def test_round_trip(two: tuple[Bundle, Bundle]) -> None:
    data = bundle_map_to_json(two)
    doc = json.loads(data)
    # Keyed by name, in name order; the per-bundle refresh hint is omitted.
    assert list(doc) == ["trust_domains"]
    assert list(doc["trust_domains"]) == ["a.example.org", "b.example.org"]
    assert "spiffe_refresh_hint" not in doc["trust_domains"]["b.example.org"]
    assert doc["trust_domains"]["b.example.org"]["spiffe_sequence"] == 4
    back = parse_bundle_map(data)
    assert [b.trust_domain.name for b in back] == ["a.example.org", "b.example.org"]
    a, b = sorted(two, key=lambda x: x.trust_domain.name)
    assert back[0] == a
    assert back[1].x509_authorities == b.x509_authorities
    assert back[1].jwt_authorities == b.jwt_authorities
    assert back[1].sequence_number == 4 and back[1].refresh_hint is None
    # Serialising what was read gives the same bytes.
    assert bundle_map_to_json(back) == data


def test_empty_map_is_allowed() -> None:
    assert bundle_map_to_jwks([]) == {"trust_domains": {}}
    assert parse_bundle_map(b'{"trust_domains": {}}') == ()


def test_refresh_hint_in_a_member_is_not_used(two: tuple[Bundle, Bundle]) -> None:
    member = two[0].to_jwks()
    assert member["spiffe_refresh_hint"] == 300
    (parsed,) = parse_bundle_map(json.dumps({"trust_domains": {"b.example.org": member}}))
    assert parsed.refresh_hint is None


def test_two_bundles_of_one_trust_domain_are_not_written() -> None:
    with pytest.raises(BundleError, match=r"two bundles for trust domain a\.example\.org"):
        bundle_map_to_json([_bundle("a.example.org"), _bundle("a.example.org")])


def _member(two: tuple[Bundle, Bundle]) -> str:
    return two[0].to_json().decode()


BAD = [
    # duplicate trust domain: the parser refuses it, the later one never wins
    ('{{"trust_domains": {{"b.example.org": {m}, "b.example.org": {m}}}}}',
     "duplicate JSON member 'b.example.org'"),
    ('{{"trust_domains": {{}}, "trust_domains": {{"b.example.org": {m}}}}}',
     "duplicate JSON member 'trust_domains'"),
    ('{{"trust_domains": {{"b.example.org": {{"keys": [], "keys": []}}}}}}',
     "duplicate JSON member 'keys'"),
    ('{{"bundles": {{"b.example.org": {m}}}}}', "bundle map has no 'trust_domains' member"),
    ('{{"trust_domains": [{m}]}}', "'trust_domains' must be a JSON object"),
    ('{{"trust_domains": {{"B.example.org": {m}}}}}',
     "bundle map key 'B.example.org' is not a trust domain name"),
    ('{{"trust_domains": {{"spiffe://b.example.org": {m}}}}}',
     "not a trust domain name in canonical form (want 'b.example.org')"),
    ('{{"trust_domains": {{"": {m}}}}}', "bundle map key '' is not a trust domain name"),
    ('{{"trust_domains": {{"b.example.org:443": {m}}}}}',
     "bundle map key 'b.example.org:443' is not a trust domain name"),
    ('{{"trust_domains": {{"b.example.org": "{{}}"}}}}',
     "bundle map member 'b.example.org' is not a JSON object"),
    ('{{"trust_domains": {{"b.example.org": {{"spiffe_sequence": 1}}}}}}',
     "bundle map member 'b.example.org': bundle has no 'keys' member"),
    ('{{"trust_domains": {{"b.example.org": {{"keys": [{{"use": "jwt-svid", "kty": "EC",'
     ' "crv": "P-256", "x": "AA", "y": "AA"}}]}}}}}}',
     "bundle map member 'b.example.org': bundle key 0: a jwt-svid key must have a non-empty"),
    ('[]', "bundle document must be a JSON object"),
    ('{{"trust_domains": {{}}', "not valid JSON"),
]


@pytest.mark.parametrize(("template", "message"), BAD)
def test_bad_maps_are_refused(two: tuple[Bundle, Bundle], template: str, message: str) -> None:
    with pytest.raises(BundleError) as info:
        parse_bundle_map(template.format(m=_member(two)))
    assert message in str(info.value)


def test_a_decoded_object_is_refused() -> None:
    # Duplicates are only visible in the text; an already decoded dict has lost them.
    with pytest.raises(BundleError, match="takes the JSON text"):
        parse_bundle_map({"trust_domains": {}})  # type: ignore[arg-type]
