"""Load an upstream authority from disk (``[upstream_authority]`` in the config).

The upstream CA signs our intermediates; its private key is used only for that,
in this process, and never logged. The bundle holds the upstream *roots*: the
``bundle_file`` when given, else the upstream certificate itself, which must then
be self-signed (an upstream intermediate without its root cannot anchor trust).
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509

from ca.authority import UpstreamAuthority
from ca.config.authority import UpstreamConfig
from ca.errors import ConfigError
from identity.errors import InvalidKeyError, X509SvidError
from identity.keys import check_public_key_strength, load_private_key_pem, public_keys_equal
from identity.x509svid import load_certificates_pem, validate_signing_certificate


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"upstream_authority.{what}: cannot read {path}: "
                          f"{exc.strerror}") from None


def _certs(path: Path, what: str) -> tuple[x509.Certificate, ...]:
    try:
        certs = load_certificates_pem(_read(path, what))
    except X509SvidError as exc:
        raise ConfigError(f"upstream_authority.{what}: {path}: {exc}") from None
    if not certs:
        raise ConfigError(f"upstream_authority.{what}: {path} holds no PEM certificate")
    return certs


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, Exception):
        return False
    return True


def load_upstream(cfg: UpstreamConfig) -> UpstreamAuthority:
    """Read and check the upstream CA's certificate(s), key and roots.

    Raises:
        ConfigError: a file is missing or malformed, the key does not match the
            certificate, the certificate cannot sign certificates, or there is no
            root to put in the bundle.
    """
    chain = _certs(cfg.cert_file, "cert_file")
    cert, rest = chain[0], chain[1:]
    try:
        key = load_private_key_pem(_read(cfg.key_file, "key_file"))
        check_public_key_strength(key.public_key())
    except InvalidKeyError as exc:
        raise ConfigError(f"upstream_authority.key_file: {cfg.key_file}: {exc}") from None
    if not public_keys_equal(key.public_key(), cert.public_key()):
        raise ConfigError("upstream_authority: key_file does not match the certificate "
                          "in cert_file")
    try:
        validate_signing_certificate(cert)
    except X509SvidError as exc:
        raise ConfigError(f"upstream_authority.cert_file: {exc}") from None
    if cfg.bundle_file is not None:
        roots = _certs(cfg.bundle_file, "bundle_file")
    elif _self_signed(cert):
        roots = (cert,)
    else:
        raise ConfigError("upstream_authority: cert_file is not self-signed; give its "
                          "root certificate(s) in bundle_file")
    # Intermediates in cert_file that are also roots are not repeated in chains.
    return UpstreamAuthority(certificate=cert, key=key,
                             chain=tuple(c for c in rest if c not in roots), roots=roots)
