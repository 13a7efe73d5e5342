"""Tainted authorities: SVIDs whose chain one of them signed are re-issued early.

The server sends, with its bundle, the signing certificates an operator tainted
(``localauthority x509 taint``). The agent re-issues every X.509-SVID whose leaf
or intermediate was signed by one of them at its next sync, instead of waiting
for half its lifetime, so the authority can then be revoked without an outage.
"""

from __future__ import annotations

from collections.abc import Iterable

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from identity.x509svid import X509Svid


def load_tainted(ders: Iterable[bytes]) -> tuple[x509.Certificate, ...]:
    """Parse the tainted certificates; unparseable ones are ignored (nothing to match)."""
    out = []
    for der in ders:
        try:
            out.append(x509.load_der_x509_certificate(der))
        except ValueError:
            continue
    return tuple(out)


def signed_by_tainted(svid: X509Svid, tainted: Iterable[x509.Certificate]) -> bool:
    """True when a certificate of the SVID's chain was issued by a tainted authority.

    Matched by issuer name *and* signature, so a new CA with the same subject
    name (ours all carry the trust domain's) is not mistaken for the tainted one.
    """
    for cert in svid.cert_chain:
        for authority in tainted:
            if cert == authority or cert.issuer != authority.subject:
                continue
            try:
                cert.verify_directly_issued_by(authority)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return True
    return False
