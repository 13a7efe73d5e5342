"""The bundle endpoint: our trust domain's bundle for other trust domains to fetch.

SPIFFE Federation §5: GET on one path (``/``) answers the current bundle as a SPIFFE
bundle document (``Content-Type: application/json``) with ``spiffe_sequence`` and
``spiffe_refresh_hint``; any other method gets 405, any other path 404. Two
profiles (§5.2), never mixed:

- ``https_web``: the certificate and key come from files, re-read when they change
  (:class:`~ca.federation.https.FileContextSource`);
- ``https_spiffe``: the server's own X509-SVID (``spiffe://<td>/sigil/server``) from
  the authority, renewed at half its life and whenever the bundle changes (so it is
  signed by the CA that is active after a rotation).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import ssl
import threading
from collections.abc import Callable

from ca.authority import CertificateAuthority, server_id
from ca.config.federation import BundleEndpointConfig
from ca.config.relationship import PROFILE_HTTPS_WEB
from ca.federation.https import (
    Document,
    FileContextSource,
    HttpsServer,
    Limits,
    server_context,
)
from ca.log import event
from identity.clock import Clock
from identity.keys import generate_private_key, private_key_to_pem
from identity.x509svid import certificates_to_pem

ENDPOINT_SVID_TTL = dt.timedelta(hours=1)
PATH = "/"


class SvidContextSource:
    """A context serving the server's SVID, renewed at half-life or on bundle change."""

    def __init__(self, authority: CertificateAuthority, clock: Clock) -> None:
        self._authority = authority
        self._clock = clock
        self._lock = threading.Lock()
        self._context: ssl.SSLContext | None = None
        self._sequence: int | None = None
        self._renew_at: dt.datetime | None = None

    def current(self) -> ssl.SSLContext:
        """The context for the next handshake."""
        with self._lock:
            seq = self._authority.bundle().sequence_number
            if (self._context is None or seq != self._sequence or self._renew_at is None
                    or self._clock.now() >= self._renew_at):
                self._context = self._build()
                self._sequence = seq
            return self._context

    def _build(self) -> ssl.SSLContext:
        key = generate_private_key()
        chain = self._authority.sign_x509_svid(
            server_id(self._authority.trust_domain), key.public_key(), ttl=ENDPOINT_SVID_TTL)
        leaf = chain[0]
        self._renew_at = leaf.not_valid_before_utc + (
            leaf.not_valid_after_utc - leaf.not_valid_before_utc) / 2
        ctx = server_context()
        _load_in_memory(ctx, certificates_to_pem(chain), private_key_to_pem(key))
        event("bundle endpoint svid renewed", expires_at=leaf.not_valid_after_utc.isoformat())
        return ctx


def _load_in_memory(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    # ssl loads keys only from paths: an anonymous memfd keeps the key off the disk.
    fds = []
    try:
        for name, data in (("chain", chain_pem), ("key", key_pem)):
            fd = os.memfd_create(f"sigil-{name}", os.MFD_CLOEXEC)
            fds.append(fd)
            os.write(fd, data)
        ctx.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
    finally:
        for fd in fds:
            os.close(fd)


class BundleEndpoint:
    """Serves our bundle on ``[federation.bundle_endpoint]``. Start/stop, or a context."""

    def __init__(self, config: BundleEndpointConfig, authority: CertificateAuthority,
                 clock: Clock) -> None:
        self._config = config
        self._authority = authority
        contexts: Callable[[], ssl.SSLContext]
        if config.profile == PROFILE_HTTPS_WEB:
            assert config.cert_file is not None and config.key_file is not None
            contexts = FileContextSource(config.cert_file, config.key_file,
                                         what="federation.bundle_endpoint").current
        else:
            contexts = SvidContextSource(authority, clock).current
        limits = Limits(max_connections=config.max_connections,
                        max_per_ip=config.max_connections_per_ip,
                        request_timeout=config.request_timeout.total_seconds())
        self._server = HttpsServer(config.address, name="bundle_endpoint", contexts=contexts,
                                   routes={PATH: self.document}, limits=limits)

    @property
    def bound_address(self) -> str:
        """``HOST:PORT`` actually bound (after start)."""
        return self._server.bound_address

    def document(self) -> Document:
        """The current bundle with our refresh hint (without ML-DSA keys, by default)."""
        bundle = self._authority.bundle()
        if self._config.omit_post_quantum_keys:
            # go-spiffe (and so SPIRE) refuses a whole bundle over one JWK of a kty
            # it does not know ("AKP"), X.509 authorities included; a peer that
            # cannot read the key loses nothing by not seeing it (docs/federation.md).
            bundle = bundle.without_ml_dsa_keys()
        bundle = dataclasses.replace(
            bundle, refresh_hint=max(1, int(self._config.refresh_hint.total_seconds())))
        return Document(bundle.to_json())

    def start(self) -> None:
        """Listen (raises ConfigError when the certificate or address is unusable)."""
        self._server.start()

    def stop(self) -> None:
        """Stop serving."""
        self._server.stop()
