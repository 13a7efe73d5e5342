"""SVIDs minted for operators through the admin API (``x509 mint``, ``jwt mint``).

The identity is whatever the operator names (in our trust domain, outside the
paths reserved for Sigil itself); no entry is needed. For X.509 the caller keeps
its key and sends a CSR, of which only the public key is used.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from cryptography import x509

from ca.authority import CertificateAuthority, SignedJwtSvid
from ca.errors import InvalidArgumentError
from ca.log import event
from identity.errors import X509SvidError
from identity.keys import PublicKey
from identity.spiffeid import SpiffeId
from identity.x509svid import parse_csr


def public_key_from_csr(der: bytes) -> PublicKey:
    """The public key of a PKCS#10 CSR whose signature and key strength check out.

    Raises:
        InvalidArgumentError: malformed CSR, bad signature, or a weak or unsupported key.
    """
    try:
        csr = parse_csr(der)
    except X509SvidError as exc:
        raise InvalidArgumentError(f"invalid CSR: {exc}") from None
    return csr.public_key()  # type: ignore[return-value]


def ttl(seconds: int, *, default: dt.timedelta, maximum: dt.timedelta) -> dt.timedelta:
    """A requested TTL: 0 means ``default``; otherwise 1 second up to ``maximum``."""
    limit = int(maximum.total_seconds())
    if seconds < 0 or seconds > limit:
        raise InvalidArgumentError(f"ttl {seconds} must be between 1 and {limit} seconds "
                                   "(0 for the default)")
    return dt.timedelta(seconds=seconds) if seconds else default


def mint_x509_svid(
    authority: CertificateAuthority, spiffe_id: SpiffeId, csr: bytes, *,
    ttl: dt.timedelta, dns_names: Sequence[str] = (),
) -> tuple[x509.Certificate, ...]:
    """Sign an X.509-SVID for ``spiffe_id`` over the CSR's key; returns the chain."""
    chain = authority.sign_x509_svid(
        spiffe_id, public_key_from_csr(csr), ttl=ttl, dns_names=dns_names
    )
    event("x509 svid minted", spiffe_id=spiffe_id, serial=format(chain[0].serial_number, "x"),
          expires_at=chain[0].not_valid_after_utc.isoformat())
    return chain


def mint_jwt_svid(
    authority: CertificateAuthority, spiffe_id: SpiffeId, audience: Sequence[str], *,
    ttl: dt.timedelta,
) -> SignedJwtSvid:
    """Sign a JWT-SVID for ``spiffe_id``."""
    signed = authority.sign_jwt_svid(spiffe_id, list(audience), ttl=ttl)
    event("jwt svid minted", spiffe_id=spiffe_id, audience=",".join(audience),
          expires_at=signed.expires_at.isoformat())
    return signed
