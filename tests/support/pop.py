"""Node credentials for the x509pop and sshpop tests, made at run time.

Nothing here is checked in, so nothing expires: each test makes its CAs, node
certificates and SSH host certificates with the validity it needs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    SSHCertificate,
    SSHCertificateBuilder,
    SSHCertificateType,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from attestation.node import sshpop, x509pop

Key = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

DAY = dt.timedelta(days=1)


def new_key(kind: str = "ec") -> Key:
    """An ``ec`` (P-256), ``rsa`` (2048), ``rsa1024`` (weak) or ``ed25519`` key."""
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "rsa1024":
        return rsa.generate_private_key(public_exponent=65537, key_size=1024)
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


def _hash(key: Key) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


@dataclass
class X509Ca:
    """A CA certificate and its key."""

    cert: x509.Certificate
    key: Key


def x509_ca(name: str, *, now: dt.datetime, parent: X509Ca | None = None,
            days: int = 365) -> X509Ca:
    """A root CA, or an intermediate under ``parent``."""
    key = new_key("ec")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (x509.CertificateBuilder()
               .subject_name(subject)
               .issuer_name(parent.cert.subject if parent else subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - DAY)
               .not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=False, content_commitment=False, key_encipherment=False,
                   data_encipherment=False, key_agreement=False, key_cert_sign=True,
                   crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False))
    signer = parent.key if parent else key
    return X509Ca(builder.sign(signer, _hash(signer)), key)


def x509_leaf(ca: X509Ca, key: Key, *, now: dt.datetime, cn: str | None = "node-1",
              dns: Sequence[str] = ("node-1.example.org",), uris: Sequence[str] = (),
              not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
              digital_signature: bool | None = True,
              eku: Sequence[x509.ObjectIdentifier] | None = (ExtendedKeyUsageOID.CLIENT_AUTH,),
              is_ca: bool = False, serial: int | None = None) -> x509.Certificate:
    """A node certificate; ``digital_signature=None`` leaves keyUsage out,
    ``eku=None`` leaves extendedKeyUsage out."""
    names = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name(names))
               .issuer_name(ca.cert.subject)
               .public_key(key.public_key())
               .serial_number(serial or x509.random_serial_number())
               .not_valid_before(not_before or now - DAY)
               .not_valid_after(not_after or now + 30 * DAY))
    if is_ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None),
                                        critical=True)
    if digital_signature is not None:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=digital_signature, content_commitment=False,
            key_encipherment=not digital_signature, data_encipherment=False,
            key_agreement=False, key_cert_sign=is_ca, crl_sign=False, encipher_only=False,
            decipher_only=False), critical=True)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.UniformResourceIdentifier(u) for u in uris]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca.key, _hash(ca.key))


def pem(*certs: x509.Certificate) -> bytes:
    """Certificates as concatenated PEM."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem(key: Key) -> bytes:
    """A private key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_x509_node(directory: Path, chain: Sequence[x509.Certificate],
                    key: Key) -> x509pop.AgentAttestorConfig:
    """Write a node's certificate chain and key; the agent's config for them."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "node.pem").write_bytes(pem(*chain))
    (directory / "node.key").write_bytes(key_pem(key))
    (directory / "node.key").chmod(0o600)
    return x509pop.AgentAttestorConfig(certificate_path=directory / "node.pem",
                                       private_key_path=directory / "node.key")


def sha1_hex(cert: x509.Certificate) -> str:
    """The SHA-1 fingerprint as the selectors spell it, computed independently."""
    return hashlib.sha1(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


# ---- SSH --------------------------------------------------------------------------------


def ssh_host_cert(ca_key: Key, host_key: Key, *, now: dt.datetime,
                  principals: Sequence[str] = ("node-1", "node-1.example.org"),
                  key_id: str = "node-1", valid_after: dt.datetime | None = None,
                  valid_before: dt.datetime | None = None,
                  cert_type: SSHCertificateType = SSHCertificateType.HOST,
                  critical_options: Sequence[tuple[str, str]] = ()) -> SSHCertificate:
    """An SSH host certificate for ``host_key`` signed by ``ca_key``."""
    builder = (SSHCertificateBuilder()
               .public_key(host_key.public_key())
               .serial(7)
               .type(cert_type)
               .key_id(key_id.encode())
               .valid_after(int((valid_after or now - DAY).timestamp()))
               .valid_before(int((valid_before or now + 30 * DAY).timestamp())))
    builder = (builder.valid_principals([p.encode() for p in principals]) if principals
               else builder.valid_for_all_principals())  # type: ignore[no-untyped-call]
    for name, value in critical_options:
        builder = builder.add_critical_option(name.encode(), value.encode())
    return builder.sign(ca_key)


def ssh_public(key: Key) -> bytes:
    """A public key in OpenSSH one-line form."""
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH)


def write_ssh_node(directory: Path, cert: SSHCertificate,
                   key: Key) -> sshpop.AgentAttestorConfig:
    """Write a host key and its certificate; the agent's config for them."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ssh_host_key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    (directory / "ssh_host_key").chmod(0o600)
    (directory / "ssh_host_key-cert.pub").write_bytes(cert.public_bytes() + b"\n")
    return sshpop.AgentAttestorConfig(host_key_path=directory / "ssh_host_key",
                                      host_cert_path=directory / "ssh_host_key-cert.pub")


@dataclass
class MemoryNonces:
    """A NonceStore in memory, for unit tests (the datastore's is tested apart)."""

    issued: dict[str, tuple[str, dt.datetime]] = field(default_factory=dict)

    def add_attestation_nonce(self, nonce_sha256: str, *, attestor: str,
                              expires_at: dt.datetime, now: dt.datetime) -> None:
        self.issued[nonce_sha256] = (attestor, expires_at)

    def take_attestation_nonce(self, nonce_sha256: str, *, attestor: str,
                               now: dt.datetime) -> bool:
        found = self.issued.get(nonce_sha256)
        if found is None or found[0] != attestor or found[1] <= now:
            return False
        del self.issued[nonce_sha256]
        return True
