"""The certificate authority: CA keys in slots, signing, and the trust bundle.

On first start the authority creates a self-signed root (URI SAN ``spiffe://td``)
and a JWT signing key, keeps the private keys in the key manager and their public
halves in ``ca_keys`` and in the trust domain's bundle. On restart it loads them
again, so the trust domain keeps its CA.

Keys live in slots (a ``ca_keys`` row each, with a status): today one active X.509
slot and one active JWT slot. Rotation (prepare -> activate -> old) adds rows and
status changes on the same structure; the bundle already publishes every slot.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ca.datastore import CaKeyRecord, Datastore
from ca.errors import KeyManagerError, ServerError
from ca.keys import KeyHandle, KeyManager
from ca.log import event
from identity.bundle import Bundle, JwtAuthority
from identity.clock import Clock
from identity.jwtsvid import sign_jwt_svid
from identity.keys import KeyType, PublicKey, key_id, load_public_key_der, public_key_der
from identity.spiffeid import SpiffeId, TrustDomain
from identity.x509svid import new_ca_certificate, new_svid_certificate

SERVER_DNS_NAME = "server.sigil.invalid"
"""The DNS SAN of the server's TLS certificate; agents use it as the TLS target name."""

# Certificates start a little in the past so a peer whose clock is slightly behind
# still accepts them (SPIRE backdates by the same amount).
BACKDATE = dt.timedelta(seconds=10)

KIND_X509 = "x509"
KIND_JWT = "jwt"
STATUS_PREPARED = "prepared"
STATUS_ACTIVE = "active"
STATUS_OLD = "old"


class AuthorityError(ServerError):
    """The CA cannot sign or cannot load its keys."""


def server_id(trust_domain: TrustDomain) -> SpiffeId:
    """The server's own SPIFFE ID: ``spiffe://<td>/sigil/server``."""
    return SpiffeId.from_segments(trust_domain, "sigil", "server")


@dataclass(frozen=True, slots=True)
class AuthorityConfig:
    """What the authority depends on."""

    trust_domain: TrustDomain
    datastore: Datastore
    key_manager: KeyManager
    clock: Clock
    ca_ttl: dt.timedelta
    ca_key_type: KeyType = KeyType.EC_P256
    jwt_key_type: KeyType = KeyType.EC_P256


@dataclass(frozen=True, slots=True)
class X509Slot:
    """A signing certificate and its key."""

    record_id: str
    key: KeyHandle
    certificate: x509.Certificate


@dataclass(frozen=True, slots=True)
class JwtSlot:
    """A JWT signing key, its kid and its end of life."""

    record_id: str
    key: KeyHandle
    kid: str
    not_after: dt.datetime


@dataclass(frozen=True, slots=True)
class SignedJwtSvid:
    """A signed JWT-SVID and the times it carries."""

    token: str
    spiffe_id: SpiffeId
    issued_at: dt.datetime
    expires_at: dt.datetime


def _ts(value: dt.datetime) -> int:
    return int(value.timestamp())


class CertificateAuthority:
    """Signs SVIDs for one trust domain. Thread-safe."""

    def __init__(self, config: AuthorityConfig) -> None:
        self._cfg = config
        self._lock = threading.Lock()
        self._x509: X509Slot | None = None
        self._jwt: JwtSlot | None = None
        self._bundle: Bundle | None = None

    @property
    def trust_domain(self) -> TrustDomain:
        """The trust domain this CA signs for."""
        return self._cfg.trust_domain

    # ---- start-up ----------------------------------------------------------------

    def load_or_create(self) -> None:
        """Load the active CA slots, creating them on first start; publish the bundle.

        Raises:
            KeyManagerError: a stored slot's private key is missing or unreadable.
        """
        with self._lock:
            records = self._cfg.datastore.list_ca_keys()
            x509_rec = next((r for r in records if r.kind == KIND_X509
                             and r.status == STATUS_ACTIVE), None)
            jwt_rec = next((r for r in records if r.kind == KIND_JWT
                            and r.status == STATUS_ACTIVE), None)
            changed = False
            if x509_rec is None:
                self._x509 = self._create_x509_slot()
                changed = True
            else:
                self._x509 = self._load_x509_slot(x509_rec)
            if jwt_rec is None:
                self._jwt = self._create_jwt_slot()
                changed = True
            else:
                self._jwt = self._load_jwt_slot(jwt_rec)
            stored = self._cfg.datastore.get_bundle(self.trust_domain)
            if changed or stored is None:
                self._publish_bundle()
            else:
                self._bundle = Bundle.from_jwks(self.trust_domain, stored.data)
            now = self._cfg.clock.now()
            if self._x509.certificate.not_valid_after_utc <= now:
                # Rotation is the next step of the roadmap; until then say it loudly.
                event("ca certificate expired", level=logging.ERROR,
                      not_after=self._x509.certificate.not_valid_after_utc.isoformat())

    def _key(self, key_id: str) -> KeyHandle:
        handle = self._cfg.key_manager.get_key(key_id)
        if handle is None:
            raise KeyManagerError(
                f"the private key {key_id} of a stored CA slot is missing from the key manager"
            )
        return handle

    def _load_x509_slot(self, rec: CaKeyRecord) -> X509Slot:
        if rec.certificate is None:
            raise AuthorityError(f"CA slot {rec.id} has no certificate")
        return X509Slot(rec.id, self._key(rec.key_id), x509.load_der_x509_certificate(
            rec.certificate))

    def _load_jwt_slot(self, rec: CaKeyRecord) -> JwtSlot:
        handle = self._key(rec.key_id)
        return JwtSlot(rec.id, handle, key_id(handle.public_key),
                       dt.datetime.fromtimestamp(rec.not_after, dt.UTC))

    def _create_x509_slot(self) -> X509Slot:
        now = self._cfg.clock.now()
        record_id = str(uuid.uuid4())
        handle = self._cfg.key_manager.generate_key(f"x509-ca-{record_id}",
                                                    self._cfg.ca_key_type)
        cert = new_ca_certificate(
            trust_domain=self.trust_domain,
            public_key=handle.public_key,
            signer_key=handle.private_key,
            not_before=now - BACKDATE,
            not_after=now + self._cfg.ca_ttl,
        )
        self._cfg.datastore.add_ca_key(CaKeyRecord(
            id=record_id, kind=KIND_X509, status=STATUS_ACTIVE, key_id=handle.key_id,
            public_key=public_key_der(handle.public_key),
            certificate=cert.public_bytes(Encoding.DER), not_after=_ts(cert.not_valid_after_utc),
            created_at=_ts(now),
        ))
        event("ca created", kind=KIND_X509, serial=format(cert.serial_number, "x"),
              not_after=cert.not_valid_after_utc.isoformat())
        return X509Slot(record_id, handle, cert)

    def _create_jwt_slot(self) -> JwtSlot:
        now = self._cfg.clock.now()
        record_id = str(uuid.uuid4())
        handle = self._cfg.key_manager.generate_key(f"jwt-{record_id}", self._cfg.jwt_key_type)
        not_after = now + self._cfg.ca_ttl
        self._cfg.datastore.add_ca_key(CaKeyRecord(
            id=record_id, kind=KIND_JWT, status=STATUS_ACTIVE, key_id=handle.key_id,
            public_key=public_key_der(handle.public_key), certificate=None,
            not_after=_ts(not_after), created_at=_ts(now),
        ))
        kid = key_id(handle.public_key)
        event("jwt key created", kid=kid, not_after=not_after.isoformat())
        return JwtSlot(record_id, handle, kid, not_after)

    def _publish_bundle(self) -> None:
        """Rebuild the bundle from every stored slot and store it (sequence + 1)."""
        records = self._cfg.datastore.list_ca_keys()
        x509s = tuple(x509.load_der_x509_certificate(r.certificate) for r in records
                      if r.kind == KIND_X509 and r.certificate is not None)
        jwts: list[JwtAuthority] = []
        for r in records:
            if r.kind != KIND_JWT:
                continue
            pub = load_public_key_der(r.public_key)
            jwts.append(JwtAuthority(key_id=key_id(pub), public_key=pub,
                                     expires_at=dt.datetime.fromtimestamp(r.not_after, dt.UTC)))

        def render(sequence: int) -> str:
            return Bundle(
                trust_domain=self.trust_domain,
                x509_authorities=x509s,
                jwt_authorities=tuple(jwts),
                sequence_number=sequence,
                refresh_hint=None,
            ).to_json().decode()

        stored = self._cfg.datastore.put_bundle(self.trust_domain, render)
        self._bundle = Bundle.from_jwks(self.trust_domain, stored.data)
        event("bundle updated", trust_domain=self.trust_domain, sequence=stored.sequence)

    # ---- the narrow signing interface --------------------------------------------

    def _active_x509(self) -> X509Slot:
        slot = self._x509
        if slot is None:
            raise AuthorityError("the CA is not loaded")
        return slot

    def bundle(self) -> Bundle:
        """The current trust bundle of our trust domain."""
        bundle = self._bundle
        if bundle is None:
            raise AuthorityError("the CA is not loaded")
        return bundle

    def ca_certificate(self) -> x509.Certificate:
        """The active signing certificate."""
        return self._active_x509().certificate

    def _chain_for(self, leaf: x509.Certificate) -> tuple[x509.Certificate, ...]:
        # A self-signed root is not part of an SVID chain (X509-SVID §5.3: roots come
        # from the bundle); an intermediate from an upstream CA would be appended here.
        return (leaf,)

    def sign_x509_svid(
        self, spiffe_id: SpiffeId, public_key: PublicKey, *, ttl: dt.timedelta,
        dns_names: Sequence[str] = (),
    ) -> tuple[x509.Certificate, ...]:
        """Sign a workload X.509-SVID; returns the chain, leaf first.

        The lifetime never exceeds the CA's: new_svid_certificate clamps it.
        """
        slot = self._active_x509()
        now = self._cfg.clock.now()
        leaf = new_svid_certificate(
            spiffe_id=spiffe_id, public_key=public_key, ca_cert=slot.certificate,
            ca_key=slot.key.private_key, not_before=now - BACKDATE, not_after=now + ttl,
            dns_names=tuple(dns_names),
        )
        return self._chain_for(leaf)

    def sign_agent_svid(
        self, agent_id: SpiffeId, public_key: PublicKey, *, ttl: dt.timedelta
    ) -> tuple[x509.Certificate, ...]:
        """Sign an agent's X.509-SVID; returns the chain, leaf first."""
        return self.sign_x509_svid(agent_id, public_key, ttl=ttl)

    def sign_server_tls(
        self, public_key: PublicKey, *, ttl: dt.timedelta
    ) -> tuple[x509.Certificate, ...]:
        """Sign the server's TLS certificate.

        Returns:
            leaf and CA certificate: the CA is included so an agent bootstrapping
            with ``--insecure-bootstrap`` can read the root from the handshake.
        """
        slot = self._active_x509()
        leaf_chain = self.sign_x509_svid(
            server_id(self.trust_domain), public_key, ttl=ttl, dns_names=(SERVER_DNS_NAME,)
        )
        return (*leaf_chain, slot.certificate)

    def sign_jwt_svid(
        self, spiffe_id: SpiffeId, audience: Sequence[str], *, ttl: dt.timedelta
    ) -> SignedJwtSvid:
        """Sign a JWT-SVID with the active JWT key; never outlives that key."""
        slot = self._jwt
        if slot is None:
            raise AuthorityError("the CA is not loaded")
        now = self._cfg.clock.now()
        expires_at = min(now + ttl, slot.not_after)
        token = sign_jwt_svid(
            spiffe_id=spiffe_id, audience=tuple(audience), key=slot.key.private_key,
            key_id=slot.kid, issued_at=now, expires_at=expires_at,
        )
        return SignedJwtSvid(token, spiffe_id, now, expires_at)

