"""Fetch a foreign trust domain's bundle from its bundle endpoint, and judge the answer.

Every bad answer raises :class:`FetchError` with a short ``reason`` (a metric
label) and changes nothing; the refresher keeps the bundle it held.

Authentication (SPIFFE Federation §5.2):

- ``https_spiffe``: no hostname check and no system roots. The endpoint's chain must
  be an X509-SVID that verifies (:func:`identity.x509svid.verify_chain`) against the
  bundle we already hold for the endpoint's trust domain (for a self-serving
  endpoint: the foreign trust domain's own, bootstrap first, then the latest
  fetched), and its SPIFFE ID must equal the configured ``endpoint_spiffe_id``.
  This is checked right after the handshake, before the request is sent.
- ``https_web``: the system roots (or ``federation.web_ca_file``) and the usual host
  name check.

Whose bundle is it? A bundle does not name its trust domain (Trust Domain and
Bundle §4), so we check what can be checked:

1. every X.509 authority that carries a SPIFFE ID URI SAN (``spiffe://<td>``, as
   SPIFFE signing certificates do) must carry the foreign trust domain's;
2. for a self-serving ``https_spiffe`` endpoint, the new bundle must itself verify
   the endpoint's SVID we just authenticated: a bundle of another trust domain
   would not (and accepting it would lock us out of the next refresh).

JWT keys carry no name and cannot be attributed; they travel with the X.509 ones.
"""

from __future__ import annotations

import datetime as dt
import http.client
import ssl
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from ca.config.relationship import PROFILE_HTTPS_SPIFFE, Relationship
from ca.errors import ServerError
from identity.bundle import Bundle, BundleSet
from identity.errors import BundleError, InvalidSpiffeIdError, X509SvidError
from identity.spiffeid import SpiffeId
from identity.x509svid import verify_chain

MAX_BODY_BYTES = 1024 * 1024
READ_CHUNK = 64 * 1024

REASON_NOT_HTTPS = "not_https"
REASON_CONNECT = "connect"
REASON_TLS = "tls"
REASON_UNAUTHENTICATED = "unauthenticated"
REASON_TIMEOUT = "timeout"
REASON_HTTP_STATUS = "http_status"
REASON_TOO_LARGE = "too_large"
REASON_NOT_A_BUNDLE = "not_a_bundle"
REASON_WRONG_TRUST_DOMAIN = "wrong_trust_domain"
REASON_SEQUENCE = "sequence_regressed"
REASON_NO_TRUST_BUNDLE = "no_trust_bundle"
REASONS = (REASON_NOT_HTTPS, REASON_CONNECT, REASON_TLS, REASON_UNAUTHENTICATED,
           REASON_TIMEOUT, REASON_HTTP_STATUS, REASON_TOO_LARGE, REASON_NOT_A_BUNDLE,
           REASON_WRONG_TRUST_DOMAIN, REASON_SEQUENCE, REASON_NO_TRUST_BUNDLE)


class FetchError(ServerError):
    """A refresh that failed; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Fetched:
    """A bundle that passed every check, and the endpoint certificate chain."""

    bundle: Bundle
    peer_chain: tuple[x509.Certificate, ...]


def _peer_chain(sock: ssl.SSLSocket) -> tuple[x509.Certificate, ...]:
    # Python 3.13 has SSLSocket.get_unverified_chain(); 3.10-3.12 have it on the
    # internal _sslobj only. Without either, the leaf alone (no intermediates).
    public = getattr(sock, "get_unverified_chain", None)
    if public is not None:
        ders = [bytes(c) for c in public()]
    else:
        sslobj = getattr(sock, "_sslobj", None)
        raw = getattr(sslobj, "get_unverified_chain", None)
        if raw is not None:
            ders = [c.public_bytes(ssl._ssl.ENCODING_DER)  # type: ignore[attr-defined]
                    for c in (raw() or [])]
        else:
            leaf = sock.getpeercert(binary_form=True)
            ders = [leaf] if leaf else []
    return tuple(x509.load_der_x509_certificate(d) for d in ders)


def _client_context(rel: Relationship, web_ca_file: Path | None) -> ssl.SSLContext:
    if rel.profile == PROFILE_HTTPS_SPIFFE:
        # The SVID is verified by verify_chain right after the handshake, against the
        # foreign bundle, not by OpenSSL against system roots; §5.2: no host check.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx = ssl.create_default_context(cafile=str(web_ca_file) if web_ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _check_trust_domain(rel: Relationship, bundle: Bundle) -> None:
    for cert in bundle.x509_authorities:
        try:
            sans = cert.extensions.get_extension_for_class(
                x509.SubjectAlternativeName).value.get_values_for_type(
                x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            continue
        for uri in sans:
            if not uri.startswith("spiffe://"):
                continue
            try:
                td = SpiffeId.parse(uri).trust_domain
            except InvalidSpiffeIdError:
                continue
            if td != rel.trust_domain:
                raise FetchError(REASON_WRONG_TRUST_DOMAIN,
                                 f"bundle from {rel.bundle_endpoint_url} holds an authority "
                                 f"of trust domain {td}, not {rel.trust_domain}")


def fetch_bundle(
    rel: Relationship, *, trust_bundle: Bundle | None, web_ca_file: Path | None,
    timeout: float, now: dt.datetime,
) -> Fetched:
    """GET the relationship's bundle endpoint and check the answer.

    Args:
        rel: the relationship.
        trust_bundle: https_spiffe: the bundle of the endpoint ID's trust domain that
            authenticates the endpoint (ignored for https_web).
        web_ca_file: https_web: roots instead of the system's.
        timeout: seconds for the whole fetch (connect, handshake, request, body).
        now: the verification time of the endpoint's SVID.

    Raises:
        FetchError: with the reason (see the module docstring).
    """
    url = rel.bundle_endpoint_url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https":
        raise FetchError(REASON_NOT_HTTPS, f"refusing {url}: not an https URL")
    if rel.profile == PROFILE_HTTPS_SPIFFE and (trust_bundle is None
                                                or not trust_bundle.x509_authorities):
        assert rel.endpoint_spiffe_id is not None
        raise FetchError(REASON_NO_TRUST_BUNDLE,
                         f"no bundle of {rel.endpoint_spiffe_id.trust_domain} to "
                         f"authenticate {rel.endpoint_spiffe_id} at {url}")
    deadline = time.monotonic() + timeout
    host = parts.hostname or ""
    conn = http.client.HTTPSConnection(host, parts.port or 443, timeout=timeout,
                                       context=_client_context(rel, web_ca_file))
    try:
        try:
            conn.connect()
        except ssl.SSLCertVerificationError as exc:
            raise FetchError(REASON_UNAUTHENTICATED,
                             f"{url}: certificate not trusted: {exc.verify_message}") from None
        except ssl.SSLError as exc:
            raise FetchError(REASON_TLS, f"{url}: TLS handshake failed: {exc}") from None
        except TimeoutError:
            raise FetchError(REASON_TIMEOUT, f"{url}: timed out after {timeout:g}s") from None
        except OSError as exc:
            raise FetchError(REASON_CONNECT, f"{url}: cannot connect: {exc}") from None
        sock = conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        chain = _peer_chain(sock)
        if rel.profile == PROFILE_HTTPS_SPIFFE:
            _authenticate_spiffe(rel, chain, trust_bundle, now)
        body = _get(conn, parts, url, deadline, timeout)
    finally:
        conn.close()
    try:
        bundle = Bundle.from_jwks(rel.trust_domain, body)
    except BundleError as exc:
        raise FetchError(REASON_NOT_A_BUNDLE, f"{url}: not a SPIFFE bundle: {exc}") from None
    _check_trust_domain(rel, bundle)
    if rel.self_serving:
        try:
            verify_chain(chain, BundleSet([bundle]), now=now)
        except X509SvidError as exc:
            raise FetchError(REASON_WRONG_TRUST_DOMAIN,
                             f"{url}: the bundle served does not authenticate its own "
                             f"endpoint, so it is not {rel.trust_domain}'s: {exc}") from None
    return Fetched(bundle, chain)


def _authenticate_spiffe(rel: Relationship, chain: tuple[x509.Certificate, ...],
                         trust_bundle: Bundle | None, now: dt.datetime) -> None:
    assert trust_bundle is not None and rel.endpoint_spiffe_id is not None
    url = rel.bundle_endpoint_url
    try:
        got = verify_chain(chain, BundleSet([trust_bundle]), now=now)
    except X509SvidError as exc:
        raise FetchError(REASON_UNAUTHENTICATED,
                         f"{url}: endpoint certificate is not a valid X509-SVID of "
                         f"{trust_bundle.trust_domain}: {exc}") from None
    if got != rel.endpoint_spiffe_id:
        raise FetchError(REASON_UNAUTHENTICATED,
                         f"{url}: endpoint is {got}, expected {rel.endpoint_spiffe_id}")


def _get(conn: http.client.HTTPSConnection, parts: urllib.parse.SplitResult, url: str,
         deadline: float, timeout: float) -> bytes:
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request("GET", target, headers={"Accept": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise FetchError(REASON_HTTP_STATUS, f"{url}: HTTP status {resp.status}")
        body = bytearray()
        # Stop at one byte past the limit: enough to know it is too large.
        while len(body) <= MAX_BODY_BYTES:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            if conn.sock is not None:
                conn.sock.settimeout(left)
            chunk = resp.read1(min(READ_CHUNK, MAX_BODY_BYTES + 1 - len(body)))
            if not chunk:
                break
            body += chunk
    except TimeoutError:
        raise FetchError(REASON_TIMEOUT, f"{url}: timed out after {timeout:g}s") from None
    except (http.client.HTTPException, OSError) as exc:
        raise FetchError(REASON_CONNECT, f"{url}: request failed: {exc}") from None
    if len(body) > MAX_BODY_BYTES:
        raise FetchError(REASON_TOO_LARGE, f"{url}: body is larger than {MAX_BODY_BYTES} bytes")
    return bytes(body)
