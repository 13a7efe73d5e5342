"""The Broker API over TCP with mutual TLS (SPIFFE Broker Endpoint, sections 3.1 and 5).

The standard's TCP transport needs mutual TLS with X.509-SVIDs on both sides:

- The agent is the server and presents its own X.509-SVID (the agent SVID the
  server issued, ``spiffe://<td>/sigil/agent/...``): section 5 asks the broker to
  check the SPIFFE ID of the SPIFFE provider it talks to, and that is the agent's.
- The broker must present an X.509-SVID of the agent's own trust domain. grpcio's
  TLS requires a client certificate and verifies its chain against the X.509
  authorities of that trust domain's bundle only (a certificate of another trust
  domain, an expired one, or none, fails the handshake: no RPC runs);
  :class:`CertificateCallers` then verifies it again as an X.509-SVID
  (:func:`identity.x509svid.verify_chain`: one URI SAN, not a CA, ...) and hands
  its SPIFFE ID to the servicer, which checks it against ``[broker] authorized``.

Rotation: grpcio asks :meth:`ServerTls.fetch` for a new certificate configuration
at every handshake; it answers with one only when the agent SVID or the bundle's
X.509 authorities changed, so a renewed SVID or a CA rotation applies to new
connections without a restart (connections already open keep theirs).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

import grpc

from agent import log
from identity.bundle import Bundle, BundleSet
from identity.clock import Clock
from identity.errors import SigilError
from identity.revocation import RevocationSet
from identity.spiffeid import SpiffeId
from identity.x509svid import (
    X509Svid,
    certificates_to_pem,
    load_certificates_pem,
    verify_chain,
)

# grpc's auth context properties of an SSL peer (grpc core, ssl_utils.cc): the
# client's certificate, PEM; and the chain OpenSSL verified, PEM (checked with
# grpcio 1.85: not leaf first).
_PEM_CHAIN = "x509_pem_cert_chain"
_PEM_LEAF = "x509_pem_cert"
NOT_IDENTIFIED = "client certificate is not a valid X.509-SVID of this trust domain"
REVOKED = "client certificate is revoked"


@dataclass(frozen=True, slots=True)
class BrokerCaller:
    """Who calls the Broker API, as far as authorization goes.

    Attributes:
        spiffe_ids: the caller's SPIFFE IDs; one must be in ``[broker] authorized``.
        fields: what to log about it when it is refused (pid and uid, or peer).
    """

    spiffe_ids: frozenset[SpiffeId]
    fields: Mapping[str, str] = field(default_factory=dict)


class CallerIdentifier(Protocol):
    """How one endpoint identifies its callers (peer credentials, or certificates)."""

    async def identify(self, context: grpc.aio.ServicerContext[Any, Any]) -> BrokerCaller:
        """The caller of this RPC.

        Raises:
            grpc's abort exception: the caller cannot be identified (the RPC is
                ended with the status saying why).
        """
        ...


class BrokerTlsError(SigilError):
    """The TLS endpoint cannot be served (no agent SVID, a bundle without X.509
    authorities)."""


class ServerTls:
    """The server side of the broker's TLS: the agent SVID and the bundle, current.

    Args:
        svid: the agent's current X.509-SVID, with its key.
        bundle: the agent's own trust domain's current bundle: broker
            certificates must chain to one of its X.509 authorities.
    """

    def __init__(self, *, svid: Callable[[], X509Svid], bundle: Callable[[], Bundle]) -> None:
        self._svid = svid
        self._bundle = bundle
        self._lock = threading.Lock()
        self._served: tuple[bytes, bytes] | None = None
        self._last: tuple[X509Svid, Bundle] | None = None
        self._failed = False

    def _configuration(self, svid: X509Svid, bundle: Bundle,
                       ) -> tuple[tuple[bytes, bytes], grpc.ServerCertificateConfiguration]:
        if not bundle.x509_authorities:
            raise BrokerTlsError(f"the bundle of {bundle.trust_domain} has no X.509 "
                                 "authorities to verify brokers with")
        roots = certificates_to_pem(bundle.x509_authorities)
        chain = svid.chain_pem()
        config = grpc.ssl_server_certificate_configuration(
            [(svid.key_pem(), chain)], root_certificates=roots)
        return (chain, roots), config

    def initial(self) -> grpc.ServerCertificateConfiguration:
        """The configuration to start with.

        Raises:
            BrokerTlsError: the bundle has no X.509 authorities.
        """
        with self._lock:
            svid, bundle = self._svid(), self._bundle()
            served, config = self._configuration(svid, bundle)
            self._served, self._last = served, (svid, bundle)
            return config

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """For grpcio, at each handshake: a new configuration, or None to keep the one
        in use. Never raises (grpcio would only log it): a failure keeps the last."""
        try:
            with self._lock:
                svid, bundle = self._svid(), self._bundle()
                last = self._last
                if last is not None and last[0] is svid and last[1] is bundle:
                    return None
                served, config = self._configuration(svid, bundle)
                self._last = (svid, bundle)
                if served == self._served:
                    return None
                self._served = served
                self._failed = False
            log.event("broker tls updated", agent_id=svid.spiffe_id,
                      expires_at=svid.expires_at.isoformat(),
                      authorities=len(bundle.x509_authorities))
            return config
        except Exception as exc:
            if not self._failed:
                self._failed = True
                log.event("broker tls update failed", level=logging.ERROR,
                          reason=str(exc), serving="the previous certificate and bundle")
            return None

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that require a client certificate and follow rotation.

        Raises:
            BrokerTlsError: the bundle has no X.509 authorities.
        """
        return grpc.dynamic_ssl_server_credentials(
            self.initial(), self.fetch, require_client_authentication=True)


class CertificateCallers:
    """Identifies a TCP caller by its client certificate, as an X.509-SVID.

    grpcio already verified the chain in the handshake; this verifies it again
    with the X.509-SVID rules (X509-SVID section 5) against the current bundle,
    so a certificate without exactly one SPIFFE ID in a URI SAN, or a CA
    certificate, is refused too (UNAUTHENTICATED, as section 6 of the Broker
    Endpoint has it for a client that cannot be identified).

    A certificate the server revoked (``sigil-server svid revoke``, by serial or by
    SPIFFE ID; the agent learns it at sync) is refused the same way: over TCP the
    certificate is the broker's whole identity, so a stolen one must stop working
    when it is revoked, not when it expires.

    Args:
        bundle: the agent's own trust domain's current bundle.
        clock: the verification time.
        revoked: the revocations the agent holds (None: none are checked).
    """

    def __init__(self, *, bundle: Callable[[], Bundle], clock: Clock,
                 revoked: Callable[[], RevocationSet] | None = None) -> None:
        self._bundle = bundle
        self._clock = clock
        self._revoked = revoked

    async def identify(self, context: grpc.aio.ServicerContext[Any, Any]) -> BrokerCaller:
        """The caller's SPIFFE ID; aborts with UNAUTHENTICATED when it has none."""
        auth = context.auth_context() or {}
        leaf_pem = b"".join(auth.get(_PEM_LEAF) or ())
        peer = context.peer()
        try:
            if not leaf_pem:
                raise BrokerTlsError("no client certificate")
            leaf = load_certificates_pem(leaf_pem)[0]
            # The rest of what the handshake verified (grpcio lists it in its own
            # order, root included): candidates for the path, the leaf first.
            others = [c for c in load_certificates_pem(b"".join(auth.get(_PEM_CHAIN) or ()))
                      if c != leaf]
            chain = [leaf, *others]
            # Only this trust domain's bundle: an SVID of another has none here.
            spiffe_id = verify_chain(chain, BundleSet([self._bundle()]),
                                     now=self._clock.now())
        except SigilError as exc:
            log.event("broker refused", level=logging.WARNING, peer=peer,
                      reason=f"client not identified: {exc}")
            await _abort(context, grpc.StatusCode.UNAUTHENTICATED, NOT_IDENTIFIED)
        if self._revoked is not None and self._revoked().x509_revoked(
                serial=leaf.serial_number, spiffe_id=str(spiffe_id),
                not_before=leaf.not_valid_before_utc):
            log.event("broker refused", level=logging.WARNING, peer=peer,
                      spiffe_id=spiffe_id, serial=format(leaf.serial_number, "x"),
                      reason="client certificate revoked")
            await _abort(context, grpc.StatusCode.UNAUTHENTICATED, REVOKED)
        return BrokerCaller(frozenset({spiffe_id}), {"peer": peer})



async def _abort(context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode,
                 details: str) -> NoReturn:
    await context.abort(code, details)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover
