"""Switching the JWT-SVID key type (EC <-> ML-DSA) with the localauthority steps,
while a validator keeps checking freshly minted JWT-SVIDs with the bundle it holds:
zero failed validations, as for a CA rotation.

The validator's bundle is a copy through the SPIFFE document (what an agent or a
federated peer holds), refreshed one step late: it always validates the tokens
of a step with the bundle of the step before, as a validator that syncs after
each change would.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

import migrations
from ca.authority import KIND_JWT, AuthorityConfig, CertificateAuthority
from ca.datastore import Datastore
from ca.keys import MemoryKeyManager
from identity.bundle import Bundle
from identity.clock import FakeClock
from identity.errors import JwtSvidError
from identity.jwtsvid import validate_jwt_svid
from identity.keys import KeyType, jwt_key_type_of
from identity.spiffeid import SpiffeId, TrustDomain

TD = TrustDomain("example.org")
WORKLOAD = SpiffeId.parse("spiffe://example.org/w")
TTL = dt.timedelta(minutes=5)
ALG = {KeyType.EC_P256: "ES256", KeyType.ML_DSA_44: "ML-DSA-44",
       KeyType.ML_DSA_65: "ML-DSA-65", KeyType.ML_DSA_87: "ML-DSA-87"}


def _ca(url: str, clock: FakeClock, keys: MemoryKeyManager, jwt_key_type: KeyType
        ) -> CertificateAuthority:
    ca = CertificateAuthority(AuthorityConfig(
        trust_domain=TD, datastore=Datastore(url), key_manager=keys, clock=clock,
        ca_ttl=dt.timedelta(hours=24), jwt_key_type=jwt_key_type,
        safety_margin=dt.timedelta(minutes=10)))
    ca.load_or_create()
    return ca


class Validator:
    """Holds a bundle copy; validates every token minted so far that has not expired."""

    def __init__(self, ca: CertificateAuthority, clock: FakeClock) -> None:
        self.clock = clock
        self.bundle = self._copy(ca)
        self.in_flight: list[tuple[str, dt.datetime]] = []
        self.validations = 0
        self.failures: list[str] = []
        self.algs: list[str] = []

    @staticmethod
    def _copy(ca: CertificateAuthority) -> Bundle:
        return Bundle.from_jwks(TD, ca.bundle().to_json())

    def sync(self, ca: CertificateAuthority) -> None:
        self.bundle = self._copy(ca)

    def round(self, ca: CertificateAuthority, n: int = 5) -> None:
        for _ in range(n):
            self.clock.advance(dt.timedelta(seconds=7))
            signed = ca.sign_jwt_svid(WORKLOAD, ["db"], ttl=TTL)
            import jwt

            self.algs.append(jwt.get_unverified_header(signed.token)["alg"])
            self.in_flight.append((signed.token, signed.expires_at))
            now = self.clock.now()
            self.in_flight = [(t, exp) for t, exp in self.in_flight if exp > now]
            for token, _ in self.in_flight:
                self.validations += 1
                try:
                    validate_jwt_svid(token, bundles=self.bundle, audience="db", now=now)
                except JwtSvidError as exc:
                    self.failures.append(str(exc))


@pytest.fixture
def url(tmp_path: Path) -> str:
    u = f"sqlite:///{tmp_path / 'ds.sqlite3'}"
    migrations.upgrade(u)
    return u


@pytest.mark.parametrize(("before", "after"), [
    (KeyType.EC_P256, KeyType.ML_DSA_65),
    (KeyType.ML_DSA_65, KeyType.EC_P256),
    (KeyType.ML_DSA_44, KeyType.ML_DSA_87),
], ids=lambda k: k.value)
def test_switch_key_type_with_no_failed_validation(url: str, before: KeyType,
                                                   after: KeyType) -> None:
    clock = FakeClock()
    keys = MemoryKeyManager()
    ca = _ca(url, clock, keys, before)
    v = Validator(ca, clock)
    v.round(ca)
    (old,) = ca.list_authorities(KIND_JWT)

    # The operator sets jwt_key_type to the new type and restarts: nothing changes
    # until the next rotation step (the active key keeps its type).
    ca = _ca(url, clock, keys, after)
    v.round(ca)
    assert set(v.algs) == {ALG[before]}

    # prepare: the new key is published next to the old one (a mixed bundle) and
    # signs nothing yet; validators sync it before it is activated.
    new = ca.prepare(KIND_JWT)
    v.round(ca)
    v.sync(ca)
    kinds = {jwt_key_type_of(a.public_key) for a in v.bundle.jwt_authorities}
    assert kinds == {before, after}
    v.round(ca)
    assert set(v.algs) == {ALG[before]}

    # activate: tokens now carry the new alg and kid; the validator picks the key
    # by kid, and tokens of the old key still in flight keep validating.
    ca.activate(KIND_JWT)
    v.round(ca, n=10)
    assert v.algs[-1] == ALG[after]
    v.sync(ca)
    v.round(ca)

    # taint the old key: still in the bundle while what it signed is valid.
    ca.taint(KIND_JWT, old.authority_id)
    v.round(ca)
    v.sync(ca)
    v.round(ca, n=40)  # well past the old key's last token (5 min TTL)

    # revoke once nothing it signed is valid; the bundle then holds the new type only.
    clock.advance(dt.timedelta(minutes=6))  # the signed_until watermark runs 5 min ahead
    ca.revoke(KIND_JWT, old.authority_id)
    v.round(ca)
    v.sync(ca)
    v.round(ca)
    assert [a.key_id for a in v.bundle.jwt_authorities] == [new.authority_id]
    assert {jwt_key_type_of(a.public_key) for a in v.bundle.jwt_authorities} == {after}

    assert v.failures == []
    assert v.validations > 500
    assert v.algs.count(ALG[before]) >= 20 and v.algs.count(ALG[after]) >= 60


def test_a_token_under_the_old_kid_with_the_new_alg_is_refused(url: str) -> None:
    # Mixed bundle: an ES256 token whose header is changed to ML-DSA-65 (or the
    # reverse) is refused by key type before any signature check.
    clock = FakeClock()
    keys = MemoryKeyManager()
    ca = _ca(url, clock, keys, KeyType.EC_P256)
    ca = _ca(url, clock, keys, KeyType.ML_DSA_65)
    ca.prepare(KIND_JWT)
    bundle = Bundle.from_jwks(TD, ca.bundle().to_json())
    import base64
    import json

    token = ca.sign_jwt_svid(WORKLOAD, ["db"], ttl=TTL).token
    h, p, s = token.split(".")
    header = json.loads(base64.urlsafe_b64decode(h + "=="))
    assert header["alg"] == "ES256"
    header["alg"] = "ML-DSA-65"
    forged_h = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=").decode()
    with pytest.raises(JwtSvidError, match="algorithm ML-DSA-65 needs an ML-DSA-65 key"):
        validate_jwt_svid(f"{forged_h}.{p}.{s}", bundles=bundle, audience="db",
                          now=clock.now())


def test_automatic_rotation_moves_to_the_new_type(url: str) -> None:
    # No operator: after the restart with the new jwt_key_type, the scheduled
    # rotation prepares (at L/2) and activates (at 5/6 L) a key of the new type.
    clock = FakeClock()
    keys = MemoryKeyManager()
    ca = _ca(url, clock, keys, KeyType.EC_P256)
    v = Validator(ca, clock)
    ca = _ca(url, clock, keys, KeyType.ML_DSA_65)
    for _ in range(24 * 6):  # every 10 minutes for a day: tick, mint, validate, sync
        clock.advance(dt.timedelta(minutes=10) - dt.timedelta(seconds=7))
        ca.tick()
        v.round(ca, n=1)
        v.sync(ca)
    assert v.failures == []
    assert v.algs[0] == "ES256" and v.algs[-1] == "ML-DSA-65"
    assert {jwt_key_type_of(a.public_key) for a in v.bundle.jwt_authorities} == {
        KeyType.ML_DSA_65}
