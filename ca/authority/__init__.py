"""The certificate authority: CA keys in slots, signing, rotation, the trust bundle, minting.

Keys live in slots, one ``ca_keys`` row each, for X.509 and JWT alike:

    prepared -> active -> old (or tainted) -> dropped

Rotation without outage (DESIGN flow 6), decided by :meth:`CertificateAuthority.tick`
from the injectable clock, for a CA lifetime L (``ca_ttl``, 24h by default):

- at 1/2 L the next key is *prepared* and published in the bundle, so every agent
  and workload trusts it long before anything is signed by it;
- at 5/6 L it becomes *active*; the previous one becomes *old*;
- an old (or tainted) slot stays in the bundle until everything it signed has
  expired (``signed_until``) plus ``safety_margin``, then is dropped.

An SVID never outlives its signing CA (notAfter is clamped), which is why an SVID
TTL above L/6 is warned about at start-up: SVIDs signed just before activation
would be cut short.

``signed_until`` is written ahead: before a slot signs something that expires after
the stored value, the stored value moves to that time plus :data:`WATERMARK_STEP`,
so a crash never loses what a slot signed, at one small write every few minutes.

Several servers may share one database (HA): each has its own keys (``owner`` is
its instance id) and rotates only its own slots; the bundle is rendered from every
owner's slots and written with optimistic concurrency on its sequence number, and
each server re-reads it on every tick, so each trusts what the others sign.

With an upstream authority the X.509 slots hold intermediates signed by the
upstream key; SVID chains carry the intermediate, and the bundle holds the
upstream roots, not the intermediates.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ca.datastore import CaKeyRecord, Datastore
from ca.errors import FailedPreconditionError, KeyManagerError, ServerError
from ca.keys import KeyHandle, KeyManager
from ca.log import event
from identity.bundle import Bundle, JwtAuthority
from identity.clock import Clock
from identity.jwtsvid import sign_jwt_svid
from identity.keys import JwtPrivateKey, KeyType, PrivateKey, PublicKey, key_id, public_key_der
from identity.spiffeid import SpiffeId, TrustDomain
from identity.witsvid import sign_wit_svid
from identity.x509svid import SvidSigner, new_ca_certificate

SERVER_DNS_NAME = "server.sigil.invalid"
"""The DNS SAN of the server's TLS certificate; agents use it as the TLS target name."""

# Certificates start a little in the past so a peer whose clock is slightly behind
# still accepts them (SPIRE backdates by the same amount).
BACKDATE = dt.timedelta(seconds=10)
# The key types a WIT slot may have (WIT-SVID §2.3: RS*, ES*, PS*).
WIT_KEY_TYPES = frozenset({KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048,
                           KeyType.RSA_4096})
# How far ahead signed_until is written: one datastore write per step of signing time.
WATERMARK_STEP = dt.timedelta(minutes=5)
PUBLISH_ATTEMPTS = 50

KIND_X509 = "x509"
KIND_JWT = "jwt"
# WIT-SVID signing keys: a slot kind of their own (WIT-SVID §6.1: a kid is unique
# in the bundle across jwt-svid and wit-svid keys; §7.1: a WIT must not validate
# where a JWT is expected). docs/standards.md, "WIT-SVID".
KIND_WIT = "wit"
KINDS = (KIND_X509, KIND_JWT, KIND_WIT)
STATUS_PREPARED = "prepared"
STATUS_ACTIVE = "active"
STATUS_OLD = "old"
STATUS_TAINTED = "tainted"


class AuthorityError(ServerError):
    """The CA cannot sign or cannot load its keys."""


class AuthorityStateError(AuthorityError, FailedPreconditionError):
    """A localauthority step that does not fit the current slots (FailedPrecondition)."""


def server_id(trust_domain: TrustDomain) -> SpiffeId:
    """The server's own SPIFFE ID: ``spiffe://<td>/sigil/server``."""
    return SpiffeId.from_segments(trust_domain, "sigil", "server")


@dataclass(frozen=True, slots=True)
class UpstreamAuthority:
    """An existing CA that signs our intermediates (``upstream_authority`` config)."""

    certificate: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...] = ()
    """Upstream intermediates between ``certificate`` and a root, if any."""
    roots: tuple[x509.Certificate, ...] = ()
    """What goes in the bundle: the bundle file, or ``certificate`` if self-signed."""


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
    owner: str = ""
    """This server instance's id; the slots it rotates are those it owns."""
    upstream: UpstreamAuthority | None = None
    safety_margin: dt.timedelta = dt.timedelta(minutes=10)
    rotate: bool = True
    """False in extra worker processes: follow the slots, never change them."""
    jwt_issuer: str | None = None
    """The ``iss`` of JWT-SVIDs: the OIDC discovery issuer when that endpoint is on."""


@dataclass(frozen=True, slots=True)
class X509Slot:
    """A signing certificate and its key."""

    record_id: str
    key: KeyHandle
    certificate: x509.Certificate
    signer: SvidSigner
    """Checked the CA once; signs every leaf (re-verified if the key is external)."""


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


@dataclass(frozen=True, slots=True)
class AuthorityInfo:
    """One authority as ``localauthority show`` lists it."""

    kind: str
    authority_id: str
    """X.509: the CA certificate's subject key id (hex); JWT: the key id (kid)."""
    status: str
    not_after: dt.datetime
    owner: str
    signed_until: dt.datetime | None
    upstream_authority_id: str = ""
    not_before: dt.datetime | None = None
    drops_at: dt.datetime | None = None
    """Old or tainted: when it leaves the bundle (what it signed has expired)."""


def _ts(value: dt.datetime) -> int:
    return int(value.timestamp())


def _dt(value: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(value, dt.UTC)


def subject_key_id(cert: x509.Certificate) -> str:
    """The certificate's subject key identifier in hex (its X.509 authority id)."""
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest.hex()


def _authority_id(rec: CaKeyRecord) -> str:
    if rec.kind == KIND_X509 and rec.certificate is not None:
        return subject_key_id(x509.load_der_x509_certificate(rec.certificate))
    from identity.keys import load_jwt_public_key_der

    return key_id(load_jwt_public_key_der(rec.public_key))


def ttl_warnings(ca_ttl: dt.timedelta, x509_svid_ttl: dt.timedelta,
                 jwt_svid_ttl: dt.timedelta) -> list[str]:
    """Configured SVID TTLs above ca_ttl / 6 (the time between activation and expiry)."""
    out = []
    for name, ttl in (("x509_svid_ttl", x509_svid_ttl), ("jwt_svid_ttl", jwt_svid_ttl)):
        if ttl > ca_ttl / 6:
            out.append(f"{name} {ttl} is longer than ca_ttl/6 ({ca_ttl / 6}): SVIDs signed "
                       "shortly before a CA rotation are cut to the CA's end of life")
    return out


class CertificateAuthority:
    """Signs SVIDs for one trust domain and rotates its keys. Thread-safe."""

    def __init__(self, config: AuthorityConfig) -> None:
        self._cfg = config
        self._lock = threading.RLock()
        self._x509: X509Slot | None = None
        self._jwt: JwtSlot | None = None
        self._wit: JwtSlot | None = None
        self._bundle: Bundle | None = None
        self._tainted_x509: tuple[x509.Certificate, ...] = ()
        self._tainted_jwt: tuple[str, ...] = ()
        # Persisted signed_until of the active slots (the write-ahead watermark).
        self._watermark: dict[str, int] = {}

    @property
    def trust_domain(self) -> TrustDomain:
        """The trust domain this CA signs for."""
        return self._cfg.trust_domain

    # ---- start-up ----------------------------------------------------------------

    @property
    def owner(self) -> str:
        """This server instance's id: the owner of the authorities it made."""
        return self._cfg.owner

    def load_or_create(self) -> None:
        """Load this server's active slots, creating them on first start; publish.

        Raises:
            KeyManagerError: a stored slot's private key is missing or unreadable.
        """
        with self._lock:
            changed = False
            for kind in KINDS if self._cfg.rotate else ():
                if self._own(kind, STATUS_ACTIVE) is None:
                    rec = self._own(kind, STATUS_PREPARED) or self._create(kind)
                    self._set_active(rec)
                    changed = True
            self._load_active()
            stored = self._cfg.datastore.get_bundle(self.trust_domain)
            if self._cfg.rotate and (changed or stored is None
                                     or not self._bundle_matches(stored.data)):
                self._publish_bundle()
            elif stored is None:
                raise AuthorityError("no bundle in the datastore yet")
            else:
                self._bundle = Bundle.from_jwks(self.trust_domain, stored.data)
            self._load_taints()
        self.tick()

    def _bundle_matches(self, data: str) -> bool:
        stored = Bundle.from_jwks(self.trust_domain, data)
        wanted = self._render(0)
        return (set(stored.x509_authorities) == set(wanted.x509_authorities)
                and {a.key_id for a in stored.jwt_authorities}
                == {a.key_id for a in wanted.jwt_authorities}
                and {a.key_id for a in stored.wit_authorities}
                == {a.key_id for a in wanted.wit_authorities})

    # ---- slots in the datastore --------------------------------------------------

    def _records(self, kind: str | None = None) -> list[CaKeyRecord]:
        return self._cfg.datastore.list_ca_keys(kind)

    def _own(self, kind: str, status: str) -> CaKeyRecord | None:
        return next((r for r in reversed(self._records(kind))
                     if r.owner == self._cfg.owner and r.status == status), None)

    def _key(self, key_id_: str) -> KeyHandle:
        handle = self._cfg.key_manager.get_key(key_id_)
        if handle is None:
            raise KeyManagerError(
                f"the private key {key_id_} of a stored CA slot is missing from the key manager"
            )
        return handle

    def _load_active(self, x: CaKeyRecord | None = None, j: CaKeyRecord | None = None,
                     w: CaKeyRecord | None = None) -> None:
        """Load the active slots: ``x``, ``j``, ``w`` when given (just read), else the stored.

        A WIT slot may be missing in a worker that started before the main process
        of an upgraded server made one: WIT-SVIDs are refused until it appears.
        """
        x = x or self._own(KIND_X509, STATUS_ACTIVE)
        j = j or self._own(KIND_JWT, STATUS_ACTIVE)
        w = w or self._own(KIND_WIT, STATUS_ACTIVE)
        if x is None or x.certificate is None or j is None:
            raise AuthorityError("no active CA slot after start-up")
        handle = self._key(x.key_id)
        cert = x509.load_der_x509_certificate(x.certificate)
        self._x509 = X509Slot(x.id, handle, cert, SvidSigner(
            cert, handle.x509_key, verify_signatures=handle.external))
        jh = self._key(j.key_id)
        self._jwt = JwtSlot(j.id, jh, key_id(jh.public_key), _dt(j.not_after))
        self._watermark = {x.id: x.signed_until, j.id: j.signed_until}
        if w is not None:
            wh = self._key(w.key_id)
            self._wit = JwtSlot(w.id, wh, key_id(wh.public_key), _dt(w.not_after))
            self._watermark[w.id] = w.signed_until

    def _create(self, kind: str) -> CaKeyRecord:
        """Generate a key and store it as a prepared slot."""
        now = self._cfg.clock.now()
        record_id = str(uuid.uuid4())
        not_after = now + self._cfg.ca_ttl
        upstream = self._cfg.upstream
        if kind == KIND_X509:
            handle = self._cfg.key_manager.generate_key(f"x509-ca-{record_id}",
                                                        self._cfg.ca_key_type)
            if upstream is not None:
                # An intermediate never outlives the CA that signs it.
                not_after = min(not_after, upstream.certificate.not_valid_after_utc)
                cert = new_ca_certificate(
                    trust_domain=self.trust_domain, public_key=handle.x509_public_key,
                    signer_key=upstream.key, issuer=upstream.certificate,
                    not_before=now - BACKDATE, not_after=not_after)
            else:
                cert = new_ca_certificate(
                    trust_domain=self.trust_domain, public_key=handle.x509_public_key,
                    signer_key=handle.x509_key, not_before=now - BACKDATE,
                    not_after=not_after)
            cert_der: bytes | None = cert.public_bytes(Encoding.DER)
            not_after = cert.not_valid_after_utc
        elif kind == KIND_WIT:
            # WIT-SVID §2.3: RS/ES/PS only, so an ML-DSA jwt_key_type does not apply.
            wit_type = (self._cfg.jwt_key_type if self._cfg.jwt_key_type in WIT_KEY_TYPES
                        else KeyType.EC_P256)
            handle = self._cfg.key_manager.generate_key(f"wit-{record_id}", wit_type)
            cert_der = None
        else:
            handle = self._cfg.key_manager.generate_key(f"jwt-{record_id}",
                                                        self._cfg.jwt_key_type)
            cert_der = None
        rec = CaKeyRecord(
            id=record_id, kind=kind, status=STATUS_PREPARED, key_id=handle.key_id,
            public_key=public_key_der(handle.public_key), certificate=cert_der,
            not_after=_ts(not_after), created_at=_ts(now), owner=self._cfg.owner,
            not_before=_ts(now),
        )
        self._cfg.datastore.add_ca_key(rec)
        event("ca authority prepared", kind=kind, authority_id=_authority_id(rec),
              not_after=not_after.isoformat())
        return rec

    def _set_active(self, rec: CaKeyRecord) -> None:
        """Make ``rec`` the active slot of its kind; the previous one becomes old."""
        now = _ts(self._cfg.clock.now())
        previous = self._own(rec.kind, STATUS_ACTIVE)
        if previous is not None and previous.id != rec.id:
            self._cfg.datastore.update_ca_key(previous.id, status=STATUS_OLD,
                                              deactivated_at=now)
        self._cfg.datastore.update_ca_key(rec.id, status=STATUS_ACTIVE, activated_at=now)
        event("ca authority activated", kind=rec.kind, authority_id=_authority_id(rec),
              not_after=_dt(rec.not_after).isoformat())

    # ---- the bundle --------------------------------------------------------------

    def _render(self, sequence: int) -> Bundle:
        records = self._records()
        upstream = self._cfg.upstream
        if upstream is not None:
            x509s: tuple[x509.Certificate, ...] = upstream.roots
        else:
            x509s = tuple(x509.load_der_x509_certificate(r.certificate) for r in records
                          if r.kind == KIND_X509 and r.certificate is not None)
        from identity.keys import load_jwt_public_key_der

        def keys(kind: str) -> tuple[JwtAuthority, ...]:
            return tuple(JwtAuthority(key_id=key_id(load_jwt_public_key_der(r.public_key)),
                                      public_key=load_jwt_public_key_der(r.public_key),
                                      expires_at=_dt(r.not_after))
                         for r in records if r.kind == kind)

        return Bundle(trust_domain=self.trust_domain, x509_authorities=x509s,
                      jwt_authorities=keys(KIND_JWT), sequence_number=sequence,
                      refresh_hint=None, wit_authorities=keys(KIND_WIT))

    def _publish_bundle(self) -> None:
        """Render the bundle from every server's slots and store it (sequence + 1).

        Optimistic concurrency: read the sequence, then the slots, then write only
        if the sequence is unchanged; otherwise another server wrote in between,
        and we re-read both (its slots included) and try again.
        """
        ds = self._cfg.datastore
        for _ in range(PUBLISH_ATTEMPTS):
            stored = ds.get_bundle(self.trust_domain)
            expected = stored.sequence if stored is not None else 0
            data = self._render(expected + 1).to_json().decode()
            result = ds.compare_and_put_bundle(self.trust_domain, expected, data)
            if result is not None:
                self._bundle = Bundle.from_jwks(self.trust_domain, result.data)
                event("bundle updated", trust_domain=self.trust_domain,
                      sequence=result.sequence)
                return
        raise AuthorityError("could not update the bundle: too many concurrent writers")

    def refresh_bundle(self) -> bool:
        """Re-read the bundle and taints from the datastore; True when it changed.

        Another server sharing the database may have changed either.
        """
        stored = self._cfg.datastore.get_bundle(self.trust_domain)
        changed = False
        with self._lock:
            if stored is not None and (self._bundle is None
                                       or self._bundle.sequence_number != stored.sequence):
                self._bundle = Bundle.from_jwks(self.trust_domain, stored.data)
                changed = True
            self._load_taints()
        return changed

    def _load_taints(self) -> None:
        tainted = [r for r in self._records() if r.status == STATUS_TAINTED]
        x509s = tuple(x509.load_der_x509_certificate(r.certificate) for r in tainted
                      if r.kind == KIND_X509 and r.certificate is not None)
        jwts = tuple(_authority_id(r) for r in tainted if r.kind == KIND_JWT)
        # Unchanged lists keep their objects: what is built from them (the bundle
        # message every sync sends) is then not built again.
        if x509s != self._tainted_x509:
            self._tainted_x509 = x509s
        if jwts != self._tainted_jwt:
            self._tainted_jwt = jwts

    def bundle(self) -> Bundle:
        """The current trust bundle of our trust domain."""
        bundle = self._bundle
        if bundle is None:
            raise AuthorityError("the CA is not loaded")
        return bundle

    def tainted_x509_authorities(self) -> tuple[x509.Certificate, ...]:
        """Signing certificates (of any server) an operator tainted: rotate away early."""
        return self._tainted_x509

    def tainted_jwt_key_ids(self) -> tuple[str, ...]:
        """JWT key ids (of any server) an operator tainted."""
        return self._tainted_jwt

    # ---- rotation ----------------------------------------------------------------

    def _drop_time(self, rec: CaKeyRecord) -> dt.datetime:
        # A slot made old by a version without signed_until: all we know is notAfter.
        # Otherwise the margin counts from its last SVID's expiry, and never from
        # before it stopped signing (a slot that signed nothing still gets the margin).
        if rec.deactivated_at is None:
            until = rec.not_after
        else:
            until = min(max(rec.signed_until, rec.deactivated_at), rec.not_after)
        return _dt(until) + self._cfg.safety_margin

    def tick(self) -> None:
        """One rotation step: prepare, activate and drop as the clock says; refresh.

        Called by the scheduler every few seconds and by tests after moving a
        FakeClock. Idempotent: a tick with nothing due changes nothing.
        """
        now = self._cfg.clock.now()
        changed = False
        with self._lock:
            if not self._cfg.rotate:
                self._follow()
            for kind in KINDS if self._cfg.rotate else ():
                active = self._own(kind, STATUS_ACTIVE)
                prepared = self._own(kind, STATUS_PREPARED)
                if active is None:  # pragma: no cover - load_or_create guarantees one
                    continue
                life = _dt(active.not_after) - _dt(active.not_before)
                start = _dt(active.not_before)
                if prepared is None and now >= start + life / 2:
                    self._create(kind)
                    changed = True
                elif prepared is not None and now >= start + life * 5 / 6:
                    self._set_active(prepared)
                    changed = True
                for rec in self._records(kind):
                    if (rec.owner == self._cfg.owner
                            and rec.status in (STATUS_OLD, STATUS_TAINTED)
                            and now >= self._drop_time(rec)):
                        self._cfg.datastore.delete_ca_key(rec.id)
                        event("ca authority dropped", kind=kind, status=rec.status,
                              authority_id=_authority_id(rec))
                        changed = True
            if changed:
                self._load_active()
                self._publish_bundle()
        self.refresh_bundle()

    def _follow(self) -> None:
        """Reload the active slots when another process of this server rotated them."""
        x = self._own(KIND_X509, STATUS_ACTIVE)
        j = self._own(KIND_JWT, STATUS_ACTIVE)
        w = self._own(KIND_WIT, STATUS_ACTIVE)
        current = (self._x509.record_id if self._x509 else None,
                   self._jwt.record_id if self._jwt else None,
                   self._wit.record_id if self._wit else None)
        if x is not None and j is not None and (x.id, j.id, w.id if w else None) != current:
            # The slots just read: reading them again could fall between the two
            # writes of an activation in the main process (old, then active).
            self._load_active(x, j, w)

    # ---- localauthority (operator steps) ------------------------------------------

    def _info(self, rec: CaKeyRecord) -> AuthorityInfo:
        upstream = ""
        if rec.kind == KIND_X509 and self._cfg.upstream is not None:
            upstream = subject_key_id(self._cfg.upstream.certificate)
        return AuthorityInfo(
            kind=rec.kind, authority_id=_authority_id(rec), status=rec.status,
            not_after=_dt(rec.not_after), owner=rec.owner,
            signed_until=_dt(rec.signed_until) if rec.signed_until else None,
            upstream_authority_id=upstream,
            not_before=_dt(rec.not_before) if rec.not_before else None,
            drops_at=(self._drop_time(rec)
                      if rec.status in (STATUS_OLD, STATUS_TAINTED) else None))

    def list_authorities(self, kind: str) -> list[AuthorityInfo]:
        """This trust domain's authorities of ``kind`` (every server's), oldest first."""
        return [self._info(r) for r in self._records(kind)]

    def _find(self, kind: str, authority_id: str) -> CaKeyRecord:
        for rec in self._records(kind):
            if _authority_id(rec) == authority_id:
                if rec.owner != self._cfg.owner:
                    raise AuthorityStateError(
                        f"{kind} authority {authority_id} belongs to another server "
                        f"({rec.owner}); run the command against that server")
                return rec
        from ca.errors import NotFoundError

        raise NotFoundError(f"no {kind} authority {authority_id}")

    def prepare(self, kind: str) -> AuthorityInfo:
        """Prepare the next authority now and publish it in the bundle.

        Raises:
            AuthorityStateError: one is already prepared.
        """
        with self._lock:
            existing = self._own(kind, STATUS_PREPARED)
            if existing is not None:
                raise AuthorityStateError(
                    f"a {kind} authority is already prepared ({_authority_id(existing)}); "
                    "activate it first")
            rec = self._create(kind)
            self._publish_bundle()
            return self._info(rec)

    def activate(self, kind: str) -> AuthorityInfo:
        """Activate the prepared authority now; the active one becomes old.

        Raises:
            AuthorityStateError: nothing is prepared.
        """
        with self._lock:
            prepared = self._own(kind, STATUS_PREPARED)
            if prepared is None:
                raise AuthorityStateError(
                    f"no {kind} authority is prepared; run localauthority {kind} prepare "
                    "first (and let agents sync the new bundle)")
            self._set_active(prepared)
            self._load_active()
            self._publish_bundle()
            rec = self._own(kind, STATUS_ACTIVE)
            assert rec is not None
            return self._info(rec)

    def taint(self, kind: str, authority_id: str) -> AuthorityInfo:
        """Mark an old authority tainted: agents re-issue what it signed at once.

        Raises:
            AuthorityStateError: the authority is not old (only a rotated-out one may be
                tainted: tainting the active one would make agents re-sign with it).
            NotFoundError: no such authority.
        """
        with self._lock:
            rec = self._find(kind, authority_id)
            if rec.status == STATUS_TAINTED:
                raise AuthorityStateError(f"{kind} authority {authority_id} is already tainted")
            if rec.status != STATUS_OLD:
                raise AuthorityStateError(
                    f"only an old {kind} authority can be tainted; {authority_id} is "
                    f"{rec.status} (prepare and activate a new one first)")
            self._cfg.datastore.update_ca_key(rec.id, status=STATUS_TAINTED)
            self._load_taints()
            # A new sequence makes every server's TLS front and every agent pick it up.
            self._publish_bundle()
            event("ca authority tainted", kind=kind, authority_id=authority_id)
            return replace(self._info(rec), status=STATUS_TAINTED)

    def revoke(self, kind: str, authority_id: str, *, force: bool = False) -> AuthorityInfo:
        """Remove a tainted or old authority from the bundle.

        Only once nothing valid depends on it: everything it signed has expired
        (``signed_until``), unless ``force``.

        Raises:
            AuthorityStateError: it is active or prepared, or not tainted, or still
                vouches for unexpired SVIDs and ``force`` is not set.
            NotFoundError: no such authority.
        """
        now = self._cfg.clock.now()
        with self._lock:
            rec = self._find(kind, authority_id)
            if rec.status in (STATUS_ACTIVE, STATUS_PREPARED):
                raise AuthorityStateError(
                    f"{kind} authority {authority_id} is {rec.status}; only a tainted one "
                    "can be revoked")
            if rec.status != STATUS_TAINTED and not force:
                raise AuthorityStateError(
                    f"{kind} authority {authority_id} is not tainted; taint it first so "
                    "agents rotate away from it")
            until = _dt(min(rec.signed_until, rec.not_after))
            if not force and until > now:
                raise AuthorityStateError(
                    f"{kind} authority {authority_id} signed SVIDs valid until "
                    f"{until.isoformat()}; revoking now would break them (wait, or --force)")
            self._cfg.datastore.delete_ca_key(rec.id)
            self._load_taints()
            self._publish_bundle()
            event("ca authority revoked", kind=kind, authority_id=authority_id, forced=force)
            return replace(self._info(rec), status="revoked")

    # ---- the narrow signing interface --------------------------------------------

    def _note_signed(self, record_id: str, not_after: dt.datetime) -> None:
        """Write ahead: the slot's stored signed_until covers ``not_after``."""
        needed = _ts(not_after)
        if self._watermark.get(record_id, 0) >= needed:
            return
        with self._lock:
            if self._watermark.get(record_id, 0) >= needed:
                return
            mark = needed + int(WATERMARK_STEP.total_seconds())
            self._cfg.datastore.update_ca_key(record_id, signed_until=mark)
            self._watermark[record_id] = mark

    def _active_x509(self) -> X509Slot:
        slot = self._x509
        if slot is None:
            raise AuthorityError("the CA is not loaded")
        return slot

    def ca_certificate(self) -> x509.Certificate:
        """The active signing certificate."""
        return self._active_x509().certificate

    def _chain_for(self, leaf: x509.Certificate, slot: X509Slot) -> tuple[x509.Certificate, ...]:
        # A self-signed root is not part of an SVID chain (X509-SVID §5.3: roots come
        # from the bundle); an intermediate under an upstream CA is, with the
        # upstream's own intermediates, so peers can build the path to the root.
        upstream = self._cfg.upstream
        if upstream is None:
            return (leaf,)
        above = () if upstream.certificate in upstream.roots else (upstream.certificate,)
        return (leaf, slot.certificate, *above, *upstream.chain)

    def sign_x509_svid(
        self, spiffe_id: SpiffeId, public_key: PublicKey, *, ttl: dt.timedelta,
        dns_names: Sequence[str] = (),
    ) -> tuple[x509.Certificate, ...]:
        """Sign a workload X.509-SVID; returns the chain, leaf first.

        The lifetime never exceeds the CA's: the signer clamps it.
        """
        slot = self._active_x509()
        now = self._cfg.clock.now()
        leaf = slot.signer.sign(
            spiffe_id=spiffe_id, public_key=public_key, not_before=now - BACKDATE,
            not_after=now + ttl, dns_names=tuple(dns_names),
        )
        self._note_signed(slot.record_id, leaf.not_valid_after_utc)
        return self._chain_for(leaf, slot)

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
            the chain and then the root (the self-signed CA, or the upstream root)
            so an agent bootstrapping with ``--insecure-bootstrap`` can read the
            root from the handshake.
        """
        slot = self._active_x509()
        chain = self.sign_x509_svid(
            server_id(self.trust_domain), public_key, ttl=ttl, dns_names=(SERVER_DNS_NAME,)
        )
        upstream = self._cfg.upstream
        if upstream is None:
            return (*chain, slot.certificate)
        return (*chain, *(r for r in upstream.roots if r not in chain))

    def jwt_signing_key(self) -> tuple[JwtPrivateKey, str]:
        """The active JWT key and its kid, for documents the server signs besides
        JWT-SVIDs (the revocation list, :mod:`ca.api.revocations`)."""
        slot = self._jwt
        if slot is None:
            raise AuthorityError("the CA is not loaded")
        return slot.key.private_key, slot.kid

    def sign_jwt_svid(
        self, spiffe_id: SpiffeId, audience: Sequence[str], *, ttl: dt.timedelta
    ) -> SignedJwtSvid:
        """Sign a JWT-SVID with the active JWT key; never outlives that key."""
        slot = self._jwt
        if slot is None:
            raise AuthorityError("the CA is not loaded")
        now = self._cfg.clock.now()
        expires_at = min(now + ttl, slot.not_after)
        self._note_signed(slot.record_id, expires_at)
        token = sign_jwt_svid(
            spiffe_id=spiffe_id, audience=tuple(audience), key=slot.key.private_key,
            key_id=slot.kid, issued_at=now, expires_at=expires_at,
            issuer=self._cfg.jwt_issuer,
            # A jti lets an operator revoke this one token (sigil-server svid revoke --jti).
            jwt_id=secrets.token_urlsafe(16),
        )
        return SignedJwtSvid(token, spiffe_id, now, expires_at)

    def sign_wit_svid(
        self, spiffe_id: SpiffeId, workload_key: PublicKey, *, ttl: dt.timedelta
    ) -> SignedJwtSvid:
        """Sign a WIT-SVID binding ``workload_key`` with the active WIT key.

        The WIT slot rotates like the others (``localauthority wit``). Never
        outlives its key. No ``iss``: WIT-SVID §3.7 (an OIDC-discoverable issuer
        would let a WIT pass for an ID token).
        """
        slot = self._wit
        if slot is None:
            raise AuthorityError("no active WIT-SVID signing key yet")
        now = self._cfg.clock.now()
        expires_at = min(now + ttl, slot.not_after)
        self._note_signed(slot.record_id, expires_at)
        token = sign_wit_svid(
            spiffe_id=spiffe_id, workload_key=workload_key, key=slot.key.private_key,
            key_id=slot.kid, issued_at=now, expires_at=expires_at,
            not_before=now - BACKDATE,
        )
        return SignedJwtSvid(token, spiffe_id, now, expires_at)


def log_ttl_warnings(ca_ttl: dt.timedelta, x509_svid_ttl: dt.timedelta,
                     jwt_svid_ttl: dt.timedelta) -> None:
    """Log :func:`ttl_warnings` at start-up."""
    for message in ttl_warnings(ca_ttl, x509_svid_ttl, jwt_svid_ttl):
        event("svid ttl too long for ca rotation", level=logging.WARNING, detail=message)
