"""Helpers for federation tests: a small CA per trust domain, and a local HTTPS server
(Python ssl) that serves whatever answer a test needs, good or bad."""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from cryptography import x509

from ca.federation.https import Document, HttpsServer, Route, server_context
from identity.bundle import Bundle, JwtAuthority
from identity.keys import PrivateKey, generate_private_key, key_id, private_key_to_pem
from identity.spiffeid import SpiffeId, TrustDomain
from identity.x509svid import certificates_to_pem, new_ca_certificate, new_svid_certificate

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


class TestCa:
    """A self-signed CA of one trust domain, with a JWT key."""

    __test__ = False  # not a test class, whatever its name

    def __init__(self, td: str) -> None:
        self.td = TrustDomain(td)
        self.key = generate_private_key()
        self.cert = new_ca_certificate(
            trust_domain=self.td, public_key=self.key.public_key(), signer_key=self.key,
            not_before=NOW - dt.timedelta(hours=1), not_after=NOW + dt.timedelta(days=2))
        self.jwt_key = generate_private_key()

    def svid(self, path: str = "/sigil/server", *, dns_names: tuple[str, ...] = ()
             ) -> tuple[tuple[x509.Certificate, ...], PrivateKey]:
        """An X509-SVID (chain, key) for ``spiffe://<td><path>``."""
        key = generate_private_key()
        leaf = new_svid_certificate(
            spiffe_id=SpiffeId.parse(f"spiffe://{self.td.name}{path}"),
            public_key=key.public_key(), ca_cert=self.cert, ca_key=self.key,
            not_before=NOW - dt.timedelta(minutes=5), not_after=NOW + dt.timedelta(days=1),
            dns_names=dns_names)
        return (leaf,), key

    def bundle(self, *, sequence: int | None = 1, hint: int | None = 60,
               extra: tuple[x509.Certificate, ...] = ()) -> Bundle:
        """This CA's bundle (plus ``extra`` X.509 authorities)."""
        return Bundle(self.td, (self.cert, *extra),
                      (JwtAuthority(key_id(self.jwt_key.public_key()),
                                    self.jwt_key.public_key()),),
                      sequence_number=sequence, refresh_hint=hint)


def context_for(tmp: Path, chain: tuple[x509.Certificate, ...], key: PrivateKey
                ) -> ssl.SSLContext:
    """A server context presenting ``chain`` (files written under ``tmp``)."""
    tmp.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = tmp / "tls.crt", tmp / "tls.key"
    cert_file.write_bytes(certificates_to_pem(chain))
    key_file.write_bytes(private_key_to_pem(key))
    ctx = server_context()
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


@contextmanager
def https_server(ctx: ssl.SSLContext, routes: Mapping[str, Route]) -> Iterator[str]:
    """Serve ``routes`` on 127.0.0.1; yields ``127.0.0.1:PORT``."""
    server = HttpsServer("127.0.0.1:0", name="test", contexts=lambda: ctx, routes=routes)
    server.start()
    try:
        yield server.bound_address
    finally:
        server.stop()


def body(data: bytes, status: int = 200) -> Route:
    """A route answering ``data``."""
    return lambda: Document(data, status=status)
