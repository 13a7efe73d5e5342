"""Federation: the cost of one authenticated bundle fetch, against a bare HTTPS GET.

Usage:
    python bench/federation.py [--fetches 200] [--authorities 2]

Starts, in this process, a bundle endpoint (``https_spiffe``, the server SVID signed
by a test CA) serving a bundle of ``--authorities`` X.509 CAs and as many JWT keys,
and, side by side on the same certificate, a bare HTTPS server answering the same
bytes from memory. Then measures, alternating, ``--fetches`` times each:

- a bare GET (new TLS connection, no certificate check, body read);
- ``fetch_bundle`` as the refresher runs it: new TLS connection, X509-SVID path
  validation of the endpoint against the held bundle, ID check, body read with the
  1 MiB bound, bundle parse and trust-domain checks;
- the refresher's whole ``refresh()`` (fetch + datastore read, compare; unchanged
  answer, so no write), on SQLite.

Prints medians and the ratios fetch / bare GET and refresh / fetch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cryptography import x509

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import migrations  # noqa: E402
from ca.config.federation import BundleEndpointConfig, FederationConfig  # noqa: E402
from ca.config.relationship import Relationship  # noqa: E402
from ca.datastore import Datastore  # noqa: E402
from ca.federation.endpoint import BundleEndpoint  # noqa: E402
from ca.federation.fetch import fetch_bundle  # noqa: E402
from ca.federation.https import Document, HttpsServer, server_context  # noqa: E402
from ca.federation.refresher import Refresher  # noqa: E402
from identity.bundle import Bundle, JwtAuthority  # noqa: E402
from identity.clock import SystemClock  # noqa: E402
from identity.keys import PrivateKey, generate_private_key, key_id, private_key_to_pem  # noqa: E402
from identity.spiffeid import SpiffeId, TrustDomain  # noqa: E402
from identity.x509svid import (  # noqa: E402
    certificates_to_pem,
    new_ca_certificate,
    new_svid_certificate,
)


class _Ca:
    """A self-signed CA of one trust domain: the foreign server's."""

    def __init__(self, td: str) -> None:
        now = dt.datetime.now(dt.UTC)
        self.td = TrustDomain(td)
        self.key = generate_private_key()
        self.cert = new_ca_certificate(
            trust_domain=self.td, public_key=self.key.public_key(), signer_key=self.key,
            not_before=now - dt.timedelta(hours=1), not_after=now + dt.timedelta(days=2))

    def svid(self) -> tuple[tuple[x509.Certificate, ...], PrivateKey]:
        """The bundle endpoint's X509-SVID (chain, key): the server's ID."""
        now = dt.datetime.now(dt.UTC)
        key = generate_private_key()
        leaf = new_svid_certificate(
            spiffe_id=SpiffeId.from_segments(self.td, "sigil", "server"),
            public_key=key.public_key(), ca_cert=self.cert, ca_key=self.key,
            not_before=now - dt.timedelta(minutes=5), not_after=now + dt.timedelta(days=1))
        return (leaf,), key


def _context(tmp: Path, chain: tuple[x509.Certificate, ...], key: PrivateKey
             ) -> ssl.SSLContext:
    """A server context presenting ``chain`` (ssl loads keys only from files)."""
    tmp.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = tmp / "tls.crt", tmp / "tls.key"
    cert_file.write_bytes(certificates_to_pem(chain))
    key_file.write_bytes(private_key_to_pem(key))
    ctx = server_context()
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


class _Authority:
    def __init__(self, ca: _Ca, bundle: Bundle) -> None:
        self.ca, self._bundle, self.trust_domain = ca, bundle, ca.td

    def bundle(self) -> Bundle:
        return self._bundle

    def sign_x509_svid(self, spiffe_id: SpiffeId, public_key: object, *,
                       ttl: dt.timedelta) -> tuple[object, ...]:
        from identity.x509svid import new_svid_certificate

        now = dt.datetime.now(dt.UTC)
        return (new_svid_certificate(spiffe_id=spiffe_id, public_key=public_key,  # type: ignore[arg-type]
                                     ca_cert=self.ca.cert, ca_key=self.ca.key,
                                     not_before=now - dt.timedelta(minutes=1),
                                     not_after=now + ttl),)


def _bare_get(address: str) -> None:
    host, port = address.rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)
    try:
        conn.request("GET", "/")
        conn.getresponse().read()
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fetches", type=int, default=200)
    parser.add_argument("--authorities", type=int, default=2)
    args = parser.parse_args()

    ca = _Ca("bench.fed.test")
    extra = tuple(_Ca("bench.fed.test").cert for _ in range(args.authorities - 1))
    jwts = tuple(JwtAuthority(key_id(k.public_key()), k.public_key())
                 for k in (generate_private_key() for _ in range(args.authorities)))
    bundle = Bundle(ca.td, (ca.cert, *extra), jwts, sequence_number=7, refresh_hint=300)
    authority = _Authority(ca, bundle)
    endpoint = BundleEndpoint(BundleEndpointConfig("127.0.0.1:0", "https_spiffe",
                                                   dt.timedelta(minutes=5)),
                              authority, SystemClock())  # type: ignore[arg-type]
    endpoint.start()
    body = endpoint.document().body
    with tempfile.TemporaryDirectory() as tmp:
        bare_ctx = _context(Path(tmp) / "tls", *ca.svid())
        bare = HttpsServer("127.0.0.1:0", name="bare", contexts=lambda: bare_ctx,
                           routes={"/": lambda: Document(body)})
        bare.start()
        url = f"sqlite:///{tmp}/ds.sqlite3"
        migrations.upgrade(url)
        ds = Datastore(url)
        rel = Relationship(ca.td, f"https://{endpoint.bound_address}/", "https_spiffe",
                           SpiffeId.parse(f"spiffe://{ca.td.name}/sigil/server"))
        ds.put_relationship(rel, now=dt.datetime.now(dt.UTC))
        ds.set_bundle(ca.td, bundle.to_json().decode(), 7)
        refresher = Refresher(ds, FederationConfig(), SystemClock())
        timings: dict[str, list[float]] = {"bare": [], "fetch": [], "refresh": []}
        try:
            for _ in range(args.fetches):
                t0 = time.perf_counter()
                _bare_get(bare.bound_address)
                t1 = time.perf_counter()
                fetch_bundle(rel, trust_bundle=bundle, web_ca_file=None, timeout=10,
                             now=dt.datetime.now(dt.UTC))
                t2 = time.perf_counter()
                outcome = refresher.refresh(ca.td)
                t3 = time.perf_counter()
                assert outcome.ok and not outcome.changed, outcome
                timings["bare"].append(t1 - t0)
                timings["fetch"].append(t2 - t1)
                timings["refresh"].append(t3 - t2)
        finally:
            bare.stop()
            endpoint.stop()
            ds.close()
    med = {k: statistics.median(v) * 1000 for k, v in timings.items()}
    print(f"bundle: {args.authorities} X.509 + {args.authorities} JWT authorities, "
          f"{len(body)} bytes; {args.fetches} fetches each")
    print(f"bare HTTPS GET (no checks)   median {med['bare']:.2f} ms")
    print(f"fetch_bundle (https_spiffe)  median {med['fetch']:.2f} ms")
    print(f"refresher.refresh()          median {med['refresh']:.2f} ms")
    print(f"ratio fetch / bare GET       {med['fetch'] / med['bare']:.2f}")
    print(f"ratio refresh / fetch        {med['refresh'] / med['fetch']:.2f}")


if __name__ == "__main__":
    main()
