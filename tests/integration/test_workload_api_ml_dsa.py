"""The Workload API with ML-DSA JWT keys: FetchJWTBundles carries the AKP key,
FetchJWTSVID hands out ML-DSA-65 tokens, ValidateJWTSVID validates them, and in a
mixed bundle picks each token's key by kid without algorithm confusion."""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Iterator

import jwt
import pytest
from click.testing import CliRunner

from agent.cli import main
from identity.bundle import Bundle, JwtAuthority
from identity.jwtsvid import sign_jwt_svid
from identity.keys import KeyType, generate_jwt_key, generate_private_key, key_id
from identity.spiffeid import SpiffeId, TrustDomain
from tests.integration.test_agent_cli_helper import UID, WEB
from tests.integration.workload_api_harness import Harness, entry

OWN = TrustDomain("example.org")


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    h.ca.jwt_key = generate_jwt_key(KeyType.ML_DSA_65)  # type: ignore[assignment]
    h.ca.jwt_kid = key_id(h.ca.jwt_key.public_key())
    try:
        yield h
    finally:
        h.close()


def cli(h: Harness, *args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, [*args, "--socket-path", str(h.socket_path)])


def _validate(h: Harness, token: str) -> tuple[int, str]:
    result = cli(h, "api", "validate", "jwt", "--audience", "db", "--svid", token)
    return result.exit_code, result.stdout + result.stderr


def test_fetch_and_validate_ml_dsa_jwt_svids(harness: Harness) -> None:
    harness.set_state([entry("w", WEB, UID)])
    doc = json.loads(cli(harness, "api", "fetch", "jwt-bundles", "--output", "json").stdout)
    (key,) = doc["spiffe://example.org"]["keys"]
    assert key["kty"] == "AKP" and key["alg"] == "ML-DSA-65" and key["kid"] == harness.ca.jwt_kid
    fetched = cli(harness, "api", "fetch", "jwt", "--audience", "db")
    assert fetched.exit_code == 0, fetched.output
    token = fetched.stdout.strip()
    assert jwt.get_unverified_header(token)["alg"] == "ML-DSA-65"
    code, out = _validate(harness, token)
    assert code == 0 and out.startswith(f"valid: {WEB}\n"), out
    h, p, s = token.split(".")
    code, out = _validate(harness, f"{h}.{p}.{s[:-8]}AAAAAAAA")
    assert code == 2 and "the JWT-SVID is not valid" in out


def test_mixed_bundle_picks_the_key_by_kid(harness: Harness) -> None:
    harness.set_state([entry("w", WEB, UID)])
    ec = generate_private_key()
    ec_kid = key_id(ec.public_key())
    mixed = Bundle(OWN, x509_authorities=(harness.ca.cert,), jwt_authorities=(
        JwtAuthority(ec_kid, ec.public_key()),
        JwtAuthority(harness.ca.jwt_kid, harness.ca.jwt_key.public_key())))
    harness.call(lambda: harness.cache.set_bundles({OWN: mixed}))
    now = dt.datetime.now(dt.UTC)
    old = sign_jwt_svid(spiffe_id=SpiffeId.parse(WEB), audience=["db"], key=ec, key_id=ec_kid,
                        issued_at=now, expires_at=now + dt.timedelta(minutes=5))
    new = cli(harness, "api", "fetch", "jwt", "--audience", "db").stdout.strip()
    assert _validate(harness, old)[0] == 0
    assert _validate(harness, new)[0] == 0
    # The EC token relabelled ML-DSA-65, and pointed at the ML-DSA key: refused.
    h, p, s = old.split(".")
    header = json.loads(base64.urlsafe_b64decode(h + "=="))
    for change in ({"alg": "ML-DSA-65"}, {"kid": harness.ca.jwt_kid}):
        forged = base64.urlsafe_b64encode(
            json.dumps({**header, **change}).encode()).rstrip(b"=").decode()
        code, out = _validate(harness, f"{forged}.{p}.{s}")
        assert code == 2 and "the JWT-SVID is not valid" in out, out
