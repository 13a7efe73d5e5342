"""The bundle endpoint and OIDC discovery over real HTTPS, in process: what they
serve, what they refuse, the https_web certificate files re-read when they change,
and PyJWT's PyJWKClient validating a JWT-SVID with the JWKS from /keys."""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import json
import os
import socket
import ssl
import threading
import time
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from ca.config.federation import BundleEndpointConfig, OidcDiscoveryConfig
from ca.config.relationship import new_relationship
from ca.errors import ConfigError
from ca.federation.endpoint import BundleEndpoint
from ca.federation.fetch import fetch_bundle
from ca.federation.oidc import OidcDiscovery
from identity.bundle import Bundle
from identity.clock import FakeClock
from identity.jwtsvid import sign_jwt_svid
from identity.keys import key_id, private_key_to_pem
from identity.spiffeid import SpiffeId, TrustDomain
from identity.x509svid import certificates_to_pem
from tests.integration.federation_helpers import NOW, TestCa


class StubAuthority:
    """What the endpoints read from the CA: its bundle."""

    def __init__(self, bundle: Bundle) -> None:
        self._bundle = bundle
        self.trust_domain = bundle.trust_domain

    def bundle(self) -> Bundle:
        return self._bundle


def _write(dir_: Path, ca: TestCa, host: str = "localhost") -> tuple[Path, Path]:
    chain, key = ca.svid("/web", dns_names=(host,))
    cert_file, key_file = dir_ / "endpoint.crt", dir_ / "endpoint.key"
    # Written aside and renamed in: a reader never sees half a file.
    for path, data in ((cert_file, certificates_to_pem(chain)),
                       (key_file, private_key_to_pem(key))):
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return cert_file, key_file


def _request(address: str, method: str = "GET", path: str = "/"
             ) -> tuple[int, dict[str, str], bytes, x509.Certificate]:
    host, port = address.rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)
    try:
        conn.connect()
        assert isinstance(conn.sock, ssl.SSLSocket)
        der = conn.sock.getpeercert(binary_form=True)
        assert der is not None
        conn.request(method, path)
        resp = conn.getresponse()
        return (resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read(),
                x509.load_der_x509_certificate(der))
    finally:
        conn.close()


@pytest.fixture
def own_ca() -> TestCa:
    return TestCa("endpoint.fed.test")


def test_https_web_serves_the_bundle_and_refuses_the_rest(tmp_path: Path, own_ca: TestCa) -> None:
    web = TestCa("webpki.test")
    cert_file, key_file = _write(tmp_path, web)
    bundle = own_ca.bundle(sequence=42, hint=None)
    cfg = BundleEndpointConfig(address="127.0.0.1:0", profile="https_web",
                               refresh_hint=dt.timedelta(minutes=7),
                               cert_file=cert_file, key_file=key_file)
    endpoint = BundleEndpoint(cfg, StubAuthority(bundle), FakeClock(NOW))  # type: ignore[arg-type]
    endpoint.start()
    try:
        status, headers, body, _ = _request(endpoint.bound_address)
        assert (status, headers["content-type"]) == (200, "application/json")
        doc = json.loads(body)
        assert (doc["spiffe_sequence"], doc["spiffe_refresh_hint"]) == (42, 420)
        assert Bundle.from_jwks(own_ca.td, body).x509_authorities == (own_ca.cert,)
        for method in ("POST", "PUT", "DELETE", "HEAD"):
            status, headers, _, _ = _request(endpoint.bound_address, method)
            assert (status, headers.get("allow")) == (405, "GET"), method
        assert _request(endpoint.bound_address, "GET", "/other")[0] == 404
    finally:
        endpoint.stop()


def test_https_web_certificate_files_are_reread(tmp_path: Path, own_ca: TestCa) -> None:
    first, second = TestCa("web1.test"), TestCa("web2.test")
    cert_file, key_file = _write(tmp_path, first)
    cfg = BundleEndpointConfig(address="127.0.0.1:0", profile="https_web",
                               refresh_hint=dt.timedelta(minutes=5),
                               cert_file=cert_file, key_file=key_file)
    endpoint = BundleEndpoint(cfg, StubAuthority(own_ca.bundle()), FakeClock(NOW))  # type: ignore[arg-type]
    endpoint.start()
    try:
        issuer = _request(endpoint.bound_address)[3].issuer
        assert issuer == first.cert.subject
        _write(tmp_path, second)
        assert _request(endpoint.bound_address)[3].issuer == second.cert.subject
        # A broken replacement keeps the last good certificate serving.
        cert_file.write_bytes(b"not a certificate")
        assert _request(endpoint.bound_address)[3].issuer == second.cert.subject
    finally:
        endpoint.stop()


def test_https_web_unreadable_certificate_fails_at_start(tmp_path: Path, own_ca: TestCa) -> None:
    cfg = BundleEndpointConfig(address="127.0.0.1:0", profile="https_web",
                               refresh_hint=dt.timedelta(minutes=5),
                               cert_file=tmp_path / "missing.crt",
                               key_file=tmp_path / "missing.key")
    endpoint = BundleEndpoint(cfg, StubAuthority(own_ca.bundle()), FakeClock(NOW))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"federation\.bundle_endpoint: cannot load cert_file"):
        endpoint.start()


def test_oidc_discovery_with_pyjwkclient(tmp_path: Path, own_ca: TestCa) -> None:
    web = TestCa("oidc-web.test")
    cert_file, key_file = _write(tmp_path, web)
    roots = tmp_path / "roots.pem"
    roots.write_bytes(web.bundle().x509_pem())
    cfg = OidcDiscoveryConfig(address="127.0.0.1:0", domain="oidc.endpoint.fed.test",
                              cert_file=cert_file, key_file=key_file)
    oidc = OidcDiscovery(cfg, StubAuthority(own_ca.bundle()))  # type: ignore[arg-type]
    oidc.start()
    try:
        port = oidc.bound_address.rsplit(":", 1)[1]
        status, headers, body, _ = _request(oidc.bound_address, "GET",
                                            "/.well-known/openid-configuration")
        assert (status, headers["content-type"]) == (200, "application/json")
        assert json.loads(body) == {
            "issuer": "https://oidc.endpoint.fed.test",
            "jwks_uri": "https://oidc.endpoint.fed.test/keys",
            "authorization_endpoint": "",
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
        }
        kid = key_id(own_ca.jwt_key.public_key())
        keys = json.loads(_request(oidc.bound_address, "GET", "/keys")[2])["keys"]
        assert [(k["kid"], k["use"], k["alg"], k["kty"]) for k in keys] == [
            (kid, "sig", "ES256", "EC")]
        assert _request(oidc.bound_address, "POST", "/keys")[0] == 405

        now = dt.datetime.now(dt.UTC)
        token = sign_jwt_svid(spiffe_id=SpiffeId.parse("spiffe://endpoint.fed.test/web"),
                              audience=["cloud"], key=own_ca.jwt_key, key_id=kid,
                              issued_at=now, expires_at=now + dt.timedelta(minutes=5))
        client = jwt.PyJWKClient(f"https://localhost:{port}/keys",
                                 ssl_context=ssl.create_default_context(cafile=str(roots)))
        signing_key = client.get_signing_key_from_jwt(token)
        claims = jwt.decode(token, signing_key.key, algorithms=["ES256"], audience="cloud")
        assert claims["sub"] == "spiffe://endpoint.fed.test/web"
        # A token signed by a key not in /keys is not found there.
        stranger = TestCa("stranger.test")
        forged = sign_jwt_svid(spiffe_id=SpiffeId.parse("spiffe://endpoint.fed.test/web"),
                               audience=["cloud"], key=stranger.jwt_key,
                               key_id=key_id(stranger.jwt_key.public_key()),
                               issued_at=now, expires_at=now + dt.timedelta(minutes=5))
        with pytest.raises(jwt.PyJWKClientError, match="Unable to find a signing key"):
            client.get_signing_key_from_jwt(forged)
    finally:
        oidc.stop()


class RotatingAuthority:
    """A CA whose bundle sequence and signing CA a test changes (a rotation)."""

    def __init__(self, ca: TestCa) -> None:
        self.ca = ca
        self.trust_domain = ca.td
        self.sequence = 1
        self.signed: list[SpiffeId] = []

    def bundle(self) -> Bundle:
        return self.ca.bundle(sequence=self.sequence)

    def sign_x509_svid(self, spiffe_id: SpiffeId, public_key: object, *,
                       ttl: dt.timedelta) -> tuple[x509.Certificate, ...]:
        from identity.x509svid import new_svid_certificate

        self.signed.append(spiffe_id)
        return (new_svid_certificate(spiffe_id=spiffe_id, public_key=public_key,  # type: ignore[arg-type]
                                     ca_cert=self.ca.cert, ca_key=self.ca.key,
                                     not_before=NOW, not_after=NOW + ttl),)


def test_https_spiffe_serves_the_server_svid_renewed_on_rotation(own_ca: TestCa) -> None:
    authority = RotatingAuthority(own_ca)
    clock = FakeClock(NOW + dt.timedelta(seconds=1))
    cfg = BundleEndpointConfig(address="127.0.0.1:0", profile="https_spiffe",
                               refresh_hint=dt.timedelta(minutes=5))
    endpoint = BundleEndpoint(cfg, authority, clock)  # type: ignore[arg-type]
    endpoint.start()
    try:
        leaf = _request(endpoint.bound_address)[3]
        from identity.x509svid import validate_leaf

        assert validate_leaf(leaf) == SpiffeId.parse("spiffe://endpoint.fed.test/sigil/server")
        leaf.verify_directly_issued_by(own_ca.cert)
        assert _request(endpoint.bound_address)[3] == leaf  # same SVID while nothing changed
        # The CA rotated: the bundle changed and a new CA signs; the next connection
        # gets an SVID from it.
        new_ca = TestCa("endpoint.fed.test")
        authority.ca, authority.sequence = new_ca, 2
        rotated = _request(endpoint.bound_address)[3]
        rotated.verify_directly_issued_by(new_ca.cert)
        with pytest.raises((InvalidSignature, ValueError)):
            rotated.verify_directly_issued_by(own_ca.cert)
        # Past half its life (30 of 60 minutes): renewed.
        clock.advance(dt.timedelta(minutes=31))
        renewed = _request(endpoint.bound_address)[3]
        assert renewed != rotated
        assert len(authority.signed) == 3
    finally:
        endpoint.stop()


# ---- slowloris (issue 10, section 5) ------------------------------------------------

DRIP_TIMEOUT = 2  # the endpoint's request_timeout in the test, in seconds


def _drip_client_hello(port: int) -> tuple[socket.socket, bytes]:
    """A TCP connection that will send a real ClientHello one byte at a time."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    sock = socket.create_connection(("127.0.0.1", port), timeout=5,
                                    source_address=("127.0.0.2", 0))
    sock.settimeout(0.05)
    return sock, outgoing.read()


def _drip_request(port: int) -> socket.socket | None:
    """A TLS connection that will send its GET one byte at a time; None if refused."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", port), timeout=5,
                                   source_address=("127.0.0.2", 0))
    try:
        sock = ctx.wrap_socket(raw)
    except OSError:
        raw.close()
        return None
    sock.settimeout(0.05)
    return sock


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_slow_drip_does_not_hold_the_bundle_endpoint(own_ca: TestCa) -> None:
    authority = RotatingAuthority(own_ca)
    cfg = BundleEndpointConfig(address="127.0.0.1:0", profile="https_spiffe",
                               refresh_hint=dt.timedelta(minutes=5),
                               request_timeout=dt.timedelta(seconds=DRIP_TIMEOUT))
    endpoint = BundleEndpoint(cfg, authority, FakeClock(NOW + dt.timedelta(seconds=1)))  # type: ignore[arg-type]
    endpoint.start()
    port = int(endpoint.bound_address.rsplit(":", 1)[1])
    hellos: list[tuple[socket.socket, bytes]] = []
    requests: list[socket.socket] = []
    stop = threading.Event()

    def drip() -> None:
        # One byte a second on every connection, as long as the server keeps it.
        sent = 0
        while not stop.wait(1.0):
            for s, hello in hellos:
                with contextlib.suppress(OSError):
                    s.send(hello[sent:sent + 1])
            for s in requests:
                with contextlib.suppress(OSError):
                    s.send(b"GET / HTTP/1.1\r\n"[sent % 16:sent % 16 + 1])
            sent += 1

    dripper = threading.Thread(target=drip, daemon=True)
    try:
        # All from one source: 4 stuck in the handshake, 60 after it (64: every slot).
        hellos.extend(_drip_client_hello(port) for _ in range(4))
        for _ in range(60):
            sock = _drip_request(port)
            if sock is not None:
                requests.append(sock)
        dripper.start()
        # A peer refreshing after a CA rotation: the project's own fetch, served.
        rel = new_relationship(
            trust_domain="endpoint.fed.test",
            bundle_endpoint_url=f"https://{endpoint.bound_address}/", profile="https_spiffe",
            endpoint_spiffe_id="spiffe://endpoint.fed.test/sigil/server",
            own_trust_domain=TrustDomain("peer.fed.test"), has_bootstrap=True)
        fetched = fetch_bundle(rel, trust_bundle=own_ca.bundle(), web_ca_file=None,
                               timeout=10, now=NOW + dt.timedelta(seconds=2))
        assert fetched.bundle.x509_authorities == (own_ca.cert,)
        # One source holds its share (max_connections_per_ip, 8) and no more.
        assert 1 <= len(requests) <= 8 - len(hellos)
        # However slowly they drip, every one is cut once the deadline has passed.
        attackers = [s for s, _hello in hellos] + requests
        deadline = time.monotonic() + DRIP_TIMEOUT + 30
        open_ = attackers
        while open_ and time.monotonic() < deadline:
            open_ = [s for s in open_ if not _closed(s)]
            time.sleep(0.2)
        assert open_ == []
    finally:
        stop.set()
        if dripper.is_alive():
            dripper.join(timeout=5)
        for s in [s for s, _hello in hellos] + requests:
            s.close()
        endpoint.stop()
