"""A real server with an ML-DSA JWT key: its bundle endpoint leaves the ML-DSA
(``kty: AKP``) keys out by default (``omit_post_quantum_keys``), so a strict
outside reader parses the served bundle; the admin API and the Workload API keep
the key; with the setting off the endpoint serves it.

The outside reader runs in a fresh interpreter (``-I``) that imports only
py-spiffe and PyJWT, never Sigil (whose import registers ML-DSA with PyJWT). It
applies go-spiffe v2's contract for a SPIFFE bundle (the parser SPIRE uses): the
document is a JWK set whose every key must load (go-jose refuses the whole set
over one key type it does not know, "unknown json web key type"), ``x509-svid``
keys carry one certificate, ``jwt-svid`` keys a non-empty kid. PyJWT's ``PyJWK``
stands in for go-jose per key; py-spiffe's ``X509Bundle.parse_raw`` and
``JwtBundle.parse`` build the bundles. py-spiffe alone is lenient (PyJWT's
``PyJWKSet`` drops a key it cannot load), so the reader also checks that no
``jwt-svid`` key was dropped.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.workload_api.client import WorkloadApiClient
from identity.bundle import Bundle
from identity.spiffeid import TrustDomain
from tests.integration.conftest import RunningServer
from tests.integration.test_agent_server import AgentThread, _token, agent_root  # noqa: F401
from tests.support.require import require_module

pytestmark = pytest.mark.slow

STRICT_READER = r"""
import base64, json, sys
import jwt
from spiffe import JwtBundle, TrustDomain, X509Bundle

doc = json.loads(sys.stdin.buffer.read())
td = TrustDomain(sys.argv[1])
certs, jwt_keys = [], []
for index, key in enumerate(doc["keys"]):
    try:
        jwt.PyJWK(key)
    except jwt.PyJWTError as exc:
        sys.exit(f"key {index}: {exc}")
    if key.get("use") == "x509-svid":
        if len(key.get("x5c", [])) != 1:
            sys.exit(f"key {index}: x5c must hold one certificate")
        certs.append(base64.b64decode(key["x5c"][0]))
    elif key.get("use") == "jwt-svid":
        if not key.get("kid"):
            sys.exit(f"key {index}: missing kid")
        jwt_keys.append(key)
x509 = X509Bundle.parse_raw(td, b"".join(certs))
jwts = JwtBundle.parse(td, json.dumps({"keys": jwt_keys}).encode())
if set(jwts.jwt_authorities) != {k["kid"] for k in jwt_keys}:
    sys.exit("a jwt-svid key was dropped")
print(json.dumps({"x509": len(x509.x509_authorities),
                  "jwt": sorted(jwts.jwt_authorities)}))
"""


def strict_read(doc: bytes, td: str) -> subprocess.CompletedProcess[str]:
    """Run the outside reader on a bundle document."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-I", "-c", STRICT_READER, td], input=doc.decode(),
                          capture_output=True, text=True, timeout=60, env=env)


def _endpoint_address(server: RunningServer, since: int) -> str:
    """The bundle endpoint's address, from the log after line ``since`` (this start)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in server.log_lines[since:]:
            if "endpoint=bundle_endpoint" in line and "address=" in line:
                return line.split("address=", 1)[1].split()[0]
        time.sleep(0.1)
    raise AssertionError(f"bundle endpoint not listening:\n{server.log}")


def _served(address: str) -> bytes:
    host, port = address.rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the document, not the profile, is under test
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert resp.status == 200
        return resp.read()
    finally:
        conn.close()


def _use_kty(doc: dict[str, Any]) -> list[tuple[str, str]]:
    return sorted((k["use"], k["kty"]) for k in doc["keys"])


def _configure(srv: RunningServer, path: Path, extra: str = "") -> int:
    """Restart ``srv`` with an ML-DSA JWT key type and a bundle endpoint; returns the
    log line index where this start begins."""
    path.write_text(f'trust_domain = "{srv.trust_domain}"\njwt_key_type = "ml-dsa-65"\n'
                    '[federation.bundle_endpoint]\naddress = "127.0.0.1:0"\n'
                    f'profile = "https_spiffe"\n{extra}')
    srv.extra_args = ("--config", str(path))
    since = len(srv.log_lines)
    srv.restart()
    return since


def test_served_bundle_leaves_ml_dsa_keys_out_for_strict_peers(
        sigil_server: RunningServer, agent_root: Path, tmp_path: Path) -> None:  # noqa: F811
    require_module("spiffe", "py-spiffe is the outside bundle reader (pip install spiffe)")
    srv = sigil_server
    td = srv.trust_domain
    since = _configure(srv, tmp_path / "server.toml")
    assert srv.cli("localauthority", "jwt", "prepare").returncode == 0
    assert srv.cli("localauthority", "jwt", "activate").returncode == 0

    # The admin API shows the whole bundle: the active ML-DSA key and the old EC one.
    full = srv.cli("bundle", "show", "--format", "spiffe").stdout.encode()
    full_doc = json.loads(full)
    assert _use_kty(full_doc) == [("jwt-svid", "AKP"), ("jwt-svid", "EC"), ("wit-svid", "EC"),
                                  ("x509-svid", "EC")]
    # ... which a strict reader refuses whole: why the endpoint leaves the key out.
    refused = strict_read(full, td)
    assert refused.returncode == 1 and "AKP" in refused.stderr, refused

    served = _served(_endpoint_address(srv, since))
    doc = json.loads(served)
    assert _use_kty(doc) == [("jwt-svid", "EC"), ("wit-svid", "EC"), ("x509-svid", "EC")]
    assert doc["spiffe_sequence"] == full_doc["spiffe_sequence"]
    ec_kid = next(k["kid"] for k in full_doc["keys"] if k["kty"] == "EC" and "kid" in k)
    read = strict_read(served, td)
    assert read.returncode == 0, read.stderr
    assert json.loads(read.stdout) == {"x509": 1, "jwt": [ec_kid]}
    # Our own federation parser reads it too, with the same X.509 authorities.
    assert (Bundle.from_jwks(TrustDomain(td), served).x509_authorities
            == Bundle.from_jwks(TrustDomain(td), full).x509_authorities)

    # The Workload API is unchanged: an agent's FetchJWTBundles holds the ML-DSA key.
    token = _token(srv)
    trust = agent_root / "bundle.pem"
    trust.write_text(srv.cli("bundle", "show", "--format", "pem").stdout)
    socket_path = agent_root / "public" / "api.sock"
    workload_id = f"spiffe://{td}/web"
    created = srv.cli("entry", "create", "--spiffe-id", workload_id, "--parent-id",
                      token["agent_id"], "--selector", f"unix:uid:{os.getuid()}")
    assert created.returncode == 0, created.stderr
    agent = AgentThread(trust_domain=td, server_address=srv.address,
                        data_dir=str(agent_root / "data"), socket_path=str(socket_path),
                        trust_bundle_path=str(trust), sync_interval="200ms",
                        join_token=token["token"])
    agent.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with WorkloadApiClient(socket_path) as client:
                    jwks = json.loads(client.fetch_jwt_bundles().bundles[f"spiffe://{td}"])
                break
            except grpc.RpcError:  # PermissionDenied until the entry syncs
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        agent.stop()
    assert sorted(k["kty"] for k in jwks["keys"]) == ["AKP", "EC"]

    # Off: every key is served, for peers that read ML-DSA (other Sigil servers).
    since = _configure(srv, tmp_path / "server.toml", "omit_post_quantum_keys = false\n")
    served = _served(_endpoint_address(srv, since))
    assert _use_kty(json.loads(served)) == _use_kty(full_doc)
    pq = Bundle.from_jwks(TrustDomain(td), served)
    assert {a.key_id for a in pq.jwt_authorities} == {
        k["kid"] for k in full_doc["keys"] if k["use"] == "jwt-svid"}
