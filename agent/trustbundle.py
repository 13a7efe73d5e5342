"""The bootstrap trust bundle file (``trust_bundle_path``), checked before use.

An empty file, or one holding a leaf certificate (an SVID saved by mistake), would
otherwise surface much later as a TLS handshake failure whose cause is hard to see;
so the agent, and ``sigil-agent config check``, refuse it at once and say how to get
the right file.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509

from agent.errors import BootstrapError
from identity.bundle import Bundle
from identity.errors import SigilError
from identity.spiffeid import TrustDomain

FETCH_HINT = "fetch it again with `sigil-server bundle show --format pem > {path}`"


def load_trust_bundle(path: Path, trust_domain: TrustDomain) -> Bundle:
    """Read ``path``: PEM CA certificates of the server's trust domain.

    Raises:
        BootstrapError: unreadable, empty, not PEM certificates, or holding a
            certificate that is not a CA; the message names the file and the fix.
    """
    hint = FETCH_HINT.format(path=path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BootstrapError(f"cannot read trust bundle {path}: {exc.strerror}") from None
    if not data.strip():
        raise BootstrapError(f"trust bundle {path} is empty: {hint}")
    try:
        bundle = Bundle.from_x509_pem(trust_domain, data)
    except SigilError as exc:
        raise BootstrapError(f"trust bundle {path} is not usable: {exc}: {hint}") from None
    if not bundle.x509_authorities:
        raise BootstrapError(f"trust bundle {path} holds no certificate: {hint}")
    for cert in bundle.x509_authorities:
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise BootstrapError(
                f"trust bundle {path} holds a certificate that is not a CA "
                f"({cert.subject.rfc4514_string() or 'no subject'}; an SVID?): it must hold "
                f"the server's CA certificates: {hint}")
    return bundle
