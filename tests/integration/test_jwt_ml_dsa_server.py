"""A real server switched to ML-DSA JWT keys (``jwt_key_type = "ml-dsa-65"``):
restart with the setting, localauthority jwt prepare/activate, ``jwt mint`` gives
ML-DSA-65 JWT-SVIDs that validate with the bundle ``bundle show`` prints, across
a restart (the key is reloaded from the disk key store)."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path

import jwt
import pytest

from identity.bundle import Bundle
from identity.jwtsvid import validate_jwt_svid
from identity.spiffeid import TrustDomain
from tests.integration.conftest import RunningServer

TD = TrustDomain("it.sigil.test")


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _mint(srv: RunningServer) -> str:
    return _ok(srv.cli("jwt", "mint", "--spiffe-id", "spiffe://it.sigil.test/w",
                       "--audience", "db")).strip()


def _validate(srv: RunningServer, token: str) -> str:
    bundle = Bundle.from_jwks(TD, _ok(srv.cli("bundle", "show", "--format", "spiffe")))
    svid = validate_jwt_svid(token, bundles=bundle, audience="db", now=dt.datetime.now(dt.UTC),
                             leeway=5)
    return str(svid.spiffe_id)


@pytest.mark.slow
def test_server_switches_to_ml_dsa_jwt_keys(sigil_server: RunningServer,
                                            tmp_path: Path) -> None:
    srv = sigil_server
    before = _mint(srv)
    assert jwt.get_unverified_header(before)["alg"] == "ES256"

    config = tmp_path / "server.toml"
    config.write_text('trust_domain = "it.sigil.test"\njwt_key_type = "ml-dsa-65"\n')
    srv.extra_args = ("--config", str(config))
    srv.restart()
    assert jwt.get_unverified_header(_mint(srv))["alg"] == "ES256"  # until activation

    prepared = json.loads(_ok(srv.cli("localauthority", "jwt", "prepare", "--output", "json")))
    doc = json.loads(_ok(srv.cli("bundle", "show", "--format", "spiffe")))
    jwt_keys = {k["kid"]: k for k in doc["keys"] if k["use"] == "jwt-svid"}
    assert {k["kty"] for k in jwt_keys.values()} == {"EC", "AKP"}
    akp = jwt_keys[prepared["authority_id"]]
    assert akp["alg"] == "ML-DSA-65" and len(akp["pub"]) == 2603  # 1952 bytes, base64url
    assert "priv" not in akp

    _ok(srv.cli("localauthority", "jwt", "activate"))
    after = _mint(srv)
    header = jwt.get_unverified_header(after)
    assert header == {"alg": "ML-DSA-65", "kid": prepared["authority_id"], "typ": "JWT"}
    # Both validate with the mixed bundle: each by its kid.
    assert _validate(srv, before) == _validate(srv, after) == "spiffe://it.sigil.test/w"

    # The ML-DSA key comes back from the disk key store after a restart.
    srv.restart()
    again = _mint(srv)
    assert jwt.get_unverified_header(again)["kid"] == prepared["authority_id"]
    assert _validate(srv, again) == "spiffe://it.sigil.test/w"
    keys = list((srv.data_dir).rglob("jwt-*.pem"))
    assert any(b"BEGIN PRIVATE KEY" in p.read_bytes() for p in keys)
