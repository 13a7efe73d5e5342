"""A workload talks to a real agent with clients nobody on this project wrote.

py-spiffe (PyPI ``spiffe``) fetches the X.509 context, JWT-SVIDs and JWT bundles
from the agent's Workload API socket and validates them with its own code;
``openssl verify`` accepts the fetched chain against ``sigil-server bundle show``.
"""

from __future__ import annotations

import json
import stat
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.e2e.conftest import Stack
from tests.support.require import require_module, require_program

spiffe = require_module("spiffe", "py-spiffe")
from spiffe import JwtSvid, SpiffeId, WorkloadApiClient  # noqa: E402
from spiffe.workloadapi.errors import FetchX509SvidError  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

AUDIENCE = "spiffe://e2e.sigil.test/db"


def _wait_for_svid(client: WorkloadApiClient, spiffe_id: str, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            ctx = client.fetch_x509_context(timeout=5)
            if any(str(s.spiffe_id) == spiffe_id for s in ctx.x509_svids):
                return ctx
        except FetchX509SvidError as exc:  # PermissionDenied until the entry syncs
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"no SVID for {spiffe_id} within {timeout}s (last error: {last})")


def test_py_spiffe_gets_and_validates_svids(stack: Stack, uid_selector: str) -> None:
    client = WorkloadApiClient(socket_path=stack.endpoint)
    try:
        # No entry yet: the workload has no identity, and the agent says so.
        with pytest.raises(FetchX509SvidError, match="PERMISSION_DENIED"):
            client.fetch_x509_context(timeout=5)

        workload_id = "spiffe://e2e.sigil.test/web"
        stack.create_entry(workload_id, uid_selector)
        ctx = _wait_for_svid(client, workload_id)

        svid = ctx.default_svid
        assert str(svid.spiffe_id) == workload_id
        bundle = ctx.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        assert bundle is not None and bundle.x509_authorities
        # py-spiffe validated the profile while parsing; the chain must also verify
        # against the bundle py-spiffe received, with cryptography's own check.
        roots = list(bundle.x509_authorities)
        top = svid.cert_chain[-1]
        assert any(top.issuer == r.subject for r in roots) or top in roots
        svid.leaf.verify_directly_issued_by(
            svid.cert_chain[1] if len(svid.cert_chain) > 1 else roots[0]
        )

        jwt_svid = client.fetch_jwt_svid(audience={AUDIENCE}, subject=SpiffeId(workload_id))
        assert str(jwt_svid.spiffe_id) == workload_id
        assert AUDIENCE in jwt_svid.audience
        jwt_bundles = client.fetch_jwt_bundles()
        jwt_bundle = jwt_bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        assert jwt_bundle is not None
        # py-spiffe's own signature, expiry and audience checks.
        validated = JwtSvid.parse_and_validate(jwt_svid.token, jwt_bundle, {AUDIENCE})
        assert str(validated.spiffe_id) == workload_id
        # The agent's ValidateJWTSVID accepts it; a wrong audience is refused.
        checked = client.validate_jwt_svid(jwt_svid.token, AUDIENCE)
        assert str(checked.spiffe_id) == workload_id
        with pytest.raises(Exception, match=r"INVALID_ARGUMENT|audience"):
            client.validate_jwt_svid(jwt_svid.token, "spiffe://e2e.sigil.test/other")
    finally:
        client.close()


def test_openssl_verifies_fetched_chain_and_shows_profile(
    stack: Stack, uid_selector: str, tmp_path: Path
) -> None:
    require_program("openssl")
    workload_id = "spiffe://e2e.sigil.test/api"
    stack.create_entry(workload_id, uid_selector, extra=("--dns-name", "api.example.test"))
    client = WorkloadApiClient(socket_path=stack.endpoint)
    try:
        _wait_for_svid(client, workload_id)
    finally:
        client.close()

    out = tmp_path / "svid"
    stack.agent_cli("api", "fetch", "x509", "--write", str(out))
    for name in ("svid.pem", "svid.key", "bundle.pem"):
        assert (out / name).exists(), name
    assert stat.S_IMODE((out / "svid.key").stat().st_mode) == 0o600

    bundle = tmp_path / "server-bundle.pem"
    bundle.write_text(stack.server_cli("bundle", "show", "--format", "pem").stdout)
    chain = x509.load_pem_x509_certificates((out / "svid.pem").read_bytes())
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(chain[0].public_bytes(serialization.Encoding.PEM))
    cmd = ["openssl", "verify", "-CAfile", str(bundle)]
    if len(chain) > 1:
        cmd += ["-untrusted", str(out / "svid.pem")]
    verified = subprocess.run([*cmd, str(leaf)], capture_output=True, text=True)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.strip().endswith(": OK")

    # A bundle of another CA must not verify it.
    other = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(tmp_path / "k.pem"), "-out", str(tmp_path / "other.pem"),
         "-subj", "/CN=other", "-days", "1"],
        capture_output=True, text=True,
    )
    assert other.returncode == 0, other.stderr
    refused = subprocess.run(
        ["openssl", "verify", "-CAfile", str(tmp_path / "other.pem"), str(leaf)],
        capture_output=True, text=True,
    )
    assert refused.returncode != 0

    text = subprocess.run(
        ["openssl", "x509", "-noout", "-text", "-in", str(leaf)],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "X509v3 Basic Constraints: critical\n                CA:FALSE" in text
    assert "X509v3 Key Usage: critical" in text
    assert "Digital Signature" in text
    assert "Certificate Sign" not in text and "CRL Sign" not in text
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in text
    assert f"URI:{workload_id}" in text
    assert "DNS:api.example.test" in text

    # The same facts through cryptography, with criticality.
    cert = chain[0]
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not ku.value.key_cert_sign and not ku.value.crl_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [workload_id]
    ca = x509.load_pem_x509_certificates(bundle.read_bytes())
    assert cert.not_valid_after_utc <= min(c.not_valid_after_utc for c in ca)


def test_agent_cli_fetch_jwt_and_json_output(stack: Stack, uid_selector: str) -> None:
    workload_id = "spiffe://e2e.sigil.test/cli"
    stack.create_entry(workload_id, uid_selector)
    client = WorkloadApiClient(socket_path=stack.endpoint)
    try:
        _wait_for_svid(client, workload_id)
    finally:
        client.close()
    x509_json = json.loads(stack.agent_cli("api", "fetch", "x509", "--output", "json").stdout)
    [first] = x509_json["svids"]
    assert first["spiffe_id"] == workload_id
    jwt_json = json.loads(
        stack.agent_cli("api", "fetch", "jwt", "--audience", AUDIENCE, "--output", "json").stdout
    )
    [first_jwt] = jwt_json["svids"]
    assert first_jwt["spiffe_id"] == workload_id
    parsed = JwtSvid.parse_insecure(first_jwt["token"], {AUDIENCE})
    assert str(parsed.spiffe_id) == workload_id
    # A missing audience is a usage error: one line, exit 2.
    bad = stack.agent_cli("api", "fetch", "jwt", check=False)
    assert bad.returncode == 2
    assert stack.agent_cli("healthcheck", check=False).returncode == 0
