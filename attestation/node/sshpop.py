"""The sshpop node attestor (SSH host certificate proof of possession), both halves.

The node has an SSH host key and a host certificate for it, signed by an SSH CA
the server trusts (``cert_authorities_path``): what ``ssh-keygen -s ca -h``
makes for a VM fleet. The agent asks for a challenge nonce, signs it with the
host key (:mod:`attestation.node.pop`) and sends the certificate, the nonce and
the signature. The server, with the ``cryptography`` SSH support:

1. parses the certificate (OpenSSH one-line form); it must be a *host*
   certificate whose signature verifies with its signature key, and that key
   must be one of the configured CAs;
2. requires it to be valid now (``valid_after`` <= now < ``valid_before``) and
   to carry no critical option (none is defined for host certificates; an
   unknown one must be refused, PROTOCOL.certkeys);
3. verifies the signature over the challenge with the certified host key (RSA
   2048+, ECDSA P-256/384/521, Ed25519);
4. spends the nonce -- last, so a refused proof spends nothing.

The agent ID is ``spiffe://<td>/sigil/agent/sshpop/<fingerprint>``, where the
fingerprint is SPIRE's: the SHA-256 of the certificate blob, unpadded URL-safe
base64. Or ``agent_path_template`` over ``{fingerprint}``, ``{key_id}``,
``{principal}`` (the first one). Node selectors: ``sshpop:principal:<p>`` (each),
``sshpop:key_id:<id>``, ``sshpop:ca:fingerprint:<SHA-256 of the CA key, same
encoding>``. Attesting again with the same certificate gives the same ID.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    SSHCertificate,
    SSHCertificateType,
    load_ssh_private_key,
    load_ssh_public_identity,
    load_ssh_public_key,
)

from attestation.node import AttestationResult, pop
from attestation.node.errors import AttestationError, MalformedAttestationError
from identity.clock import Clock
from identity.selectors import Selector
from identity.spiffeid import TrustDomain

NAME = "sshpop"
"""The attestor's name: ``AttestationData.type`` and the selector type."""

DEFAULT_TEMPLATE = "sshpop/{fingerprint}"
PLACEHOLDERS = frozenset({"fingerprint", "key_id", "principal"})
DEFAULT_HOST_KEY_PATH = Path("/etc/ssh/ssh_host_rsa_key")
DEFAULT_HOST_CERT_PATH = Path("/etc/ssh/ssh_host_rsa_key-cert.pub")
MAX_PAYLOAD_BYTES = 32 * 1024
MAX_FILE_BYTES = 1024 * 1024
_KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
              "ecdsa-sha2-nistp521")


def _b64_sha256(blob: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _blob(openssh_line: bytes) -> bytes:
    # The OpenSSH one-line form is "<type> <base64 blob> [comment]"; the blob is what
    # ssh-keygen fingerprints.
    return base64.b64decode(openssh_line.split()[1])


def fingerprint(cert: SSHCertificate) -> str:
    """SPIRE's sshpop fingerprint of a certificate: SHA-256 of its blob, unpadded
    URL-safe base64."""
    return _b64_sha256(_blob(cert.public_bytes()))


def key_fingerprint(key: object) -> str:
    """The same encoding over an SSH public key's blob (a CA key)."""
    return _b64_sha256(_blob(_openssh(key)))


def _openssh(key: object) -> bytes:
    assert isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey
                      | ed25519.Ed25519PublicKey)
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{what} {path}: cannot read: {exc.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"{what} {path} is larger than {MAX_FILE_BYTES} bytes")
    return data


def load_cert_authorities(path: Path, what: str) -> tuple[bytes, ...]:
    """The CA public keys of an ``authorized_keys``-style file, in OpenSSH form.

    Each line holds one key (``<type> <base64> [comment]``), possibly after
    options such as ``cert-authority`` or a known_hosts ``@cert-authority <hosts>``
    prefix; blank lines and ``#`` comments are skipped.

    Raises:
        ValueError: unreadable, a line that is not a key, or no key at all.
    """
    keys: list[bytes] = []
    for number, line in enumerate(_read(path, what).decode(errors="replace").splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        start = next((i for i, w in enumerate(words) if w in _KEY_TYPES), None)
        if start is None or start + 1 >= len(words):
            raise ValueError(f"{what} {path}:{number}: not an SSH public key line")
        try:
            key = load_ssh_public_key(f"{words[start]} {words[start + 1]}".encode())
        except (ValueError, TypeError):
            raise ValueError(f"{what} {path}:{number}: not an SSH public key line") from None
        keys.append(_openssh(key))
    if not keys:
        raise ValueError(f"{what} {path} holds no SSH public key")
    return tuple(dict.fromkeys(keys))


# ---- agent half -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentAttestorConfig:
    """The agent's ``[node_attestor.sshpop]``.

    Attributes:
        host_key_path: the host private key (OpenSSH format).
        host_cert_path: its host certificate (``...-cert.pub``).
    """

    host_key_path: Path = DEFAULT_HOST_KEY_PATH
    host_cert_path: Path = DEFAULT_HOST_CERT_PATH


def parse_agent_config(table: object) -> AgentAttestorConfig:
    """Validate the agent's ``[node_attestor.sshpop]`` table (the files are read at
    each attestation, so a renewed host certificate is picked up).

    Raises:
        ValueError: an unknown key or a bad value, naming the key.
    """
    where = f"node_attestor.{NAME}"
    table = pop.check_table(where, table, ("host_key_path", "host_cert_path"))
    paths: dict[str, Path] = {}
    for key in ("host_key_path", "host_cert_path"):
        if key in table:
            value = table[key]
            if not isinstance(value, str) or not value:
                raise ValueError(f"{where}.{key} must be a file path")
            paths[key] = Path(value)
    return AgentAttestorConfig(**paths)


def load_credentials(config: AgentAttestorConfig) -> tuple[SSHCertificate, pop.SigningKey]:
    """The host certificate and host key, read from their files.

    Raises:
        MalformedAttestationError: unreadable, not a certificate, or a key that is
            not the certificate's.
    """
    try:
        cert_data = _read(config.host_cert_path, "sshpop host_cert_path")
        key_data = _read(config.host_key_path, "sshpop host_key_path")
    except ValueError as exc:
        raise MalformedAttestationError(str(exc)) from None
    try:
        cert = load_ssh_public_identity(cert_data.strip())
    except (ValueError, TypeError, UnicodeError):
        cert = None
    if not isinstance(cert, SSHCertificate):
        raise MalformedAttestationError(
            f"sshpop host_cert_path {config.host_cert_path} is not an SSH certificate")
    try:
        key = load_ssh_private_key(key_data, password=None)
    except (ValueError, TypeError):
        raise MalformedAttestationError(
            f"sshpop host_key_path {config.host_key_path} is not an unencrypted OpenSSH "
            "private key") from None
    key = pop.signing_key(NAME, key, "host key")
    if _openssh(key.public_key()) != _openssh(cert.public_key()):
        raise MalformedAttestationError(
            f"sshpop: the host key {config.host_key_path} is not the key certified by "
            f"{config.host_cert_path}")
    return cert, key


def make_attestation(config: AgentAttestorConfig, *, trust_domain: TrustDomain,
                     nonce: bytes, csr: bytes) -> tuple[str, bytes]:
    """Answer a challenge: the host certificate, the nonce and the signature.

    Returns:
        ``("sshpop", payload)``.

    Raises:
        MalformedAttestationError: see :func:`load_credentials`.
    """
    cert, key = load_credentials(config)
    return pop.make_answer(NAME, key, trust_domain=trust_domain, nonce=nonce, csr=csr,
                           credential={"certificate": cert.public_bytes().decode()})


# ---- server half ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerAttestorConfig:
    """The server's ``[node_attestors.sshpop]``.

    Attributes:
        cert_authorities: the trusted SSH CA public keys, OpenSSH form.
        agent_path_template: the agent ID's path after ``/sigil/agent/``.
    """

    cert_authorities: tuple[bytes, ...]
    agent_path_template: pop.PathTemplate


def parse_server_config(table: object) -> ServerAttestorConfig:
    """Validate ``[node_attestors.sshpop]`` and read its CA keys now.

    Raises:
        ValueError: an unknown key, a missing or bad value, or an unreadable file.
    """
    authorities, template = pop.parse_server_table(
        NAME, table, path_key="cert_authorities_path",
        path_help="a file of the SSH CA public keys that sign host certificates",
        load=load_cert_authorities, default_template=DEFAULT_TEMPLATE,
        placeholders=PLACEHOLDERS)
    return ServerAttestorConfig(cert_authorities=authorities, agent_path_template=template)


def _parse_payload(payload: bytes) -> tuple[str, bytes, bytes, bytes]:
    doc = pop.load_payload(NAME, payload, max_bytes=MAX_PAYLOAD_BYTES,
                           credential="certificate", kind=str, shape="...")
    return (doc["certificate"], *pop.proof_fields(NAME, doc))


def _parse_certificate(text: str) -> SSHCertificate:
    try:
        cert = load_ssh_public_identity(text.strip().encode())
    except (ValueError, TypeError, UnicodeError, IndexError, UnsupportedAlgorithm):
        cert = None  # UnsupportedAlgorithm: ssh-dss-cert-v01 or an unknown key type
    if not isinstance(cert, SSHCertificate):
        raise AttestationError(f"{NAME}: the host certificate cannot be parsed (truncated "
                               "or not an OpenSSH certificate)")
    return cert


@dataclass
class SshPopVerifier:
    """The server half.

    Attributes:
        trust_domain: the server's trust domain.
        config: the trusted SSH CAs and the agent path template.
        nonces: where issued nonces are kept (the datastore).
        clock: the time certificates and nonces are checked at.
    """

    trust_domain: TrustDomain
    config: ServerAttestorConfig
    nonces: pop.NonceStore
    clock: Clock

    def verify(self, payload: bytes) -> AttestationResult:
        """Verify an agent's answer (see the module docstring).

        Raises:
            MalformedAttestationError: the payload is not sshpop data.
            AttestationError: refused; the message says why.
        """
        text, binding, nonce, signature = _parse_payload(payload)
        cert = _parse_certificate(text)
        if cert.type != SSHCertificateType.HOST:
            raise AttestationError(f"{NAME}: the certificate is a user certificate, not a "
                                   "host certificate")
        try:
            cert.verify_cert_signature()
        except (InvalidSignature, ValueError, TypeError):
            raise AttestationError(f"{NAME}: the host certificate's signature does not "
                                   "verify") from None
        ca_key = _openssh(cert.signature_key())
        if ca_key not in self.config.cert_authorities:
            signer = key_fingerprint(cert.signature_key())
            raise AttestationError(f"{NAME}: the host certificate is signed by CA {signer}, "
                                   "which is not in cert_authorities_path")
        now = self.clock.now()
        unix_now = int(now.timestamp())
        if unix_now < cert.valid_after:
            raise AttestationError(f"{NAME}: the host certificate is not valid before "
                                   f"{_when(cert.valid_after)}")
        if unix_now >= cert.valid_before:
            raise AttestationError(f"{NAME}: the host certificate expired at "
                                   f"{_when(cert.valid_before)}")
        if cert.critical_options:
            names = ", ".join(sorted(k.decode(errors="replace") for k in cert.critical_options))
            raise AttestationError(f"{NAME}: the host certificate has critical options "
                                   f"({names}), which host certificates must not have")
        key = pop.check_key(NAME, cert.public_key())
        pop.verify_signature(NAME, key, signature,
                             pop.challenge_message(NAME, self.trust_domain, binding, nonce))
        result = self._result(cert, binding)  # may still refuse (the template)
        pop.take_nonce(self.nonces, nonce, attestor=NAME, now=now)
        return result

    def _result(self, cert: SSHCertificate, binding: bytes) -> AttestationResult:
        principals = [p.decode(errors="replace") for p in cert.valid_principals]
        key_id = cert.key_id.decode(errors="replace")
        fp = fingerprint(cert)
        agent = self.config.agent_path_template.render(self.trust_domain, {
            "fingerprint": fp, "key_id": key_id or None,
            "principal": principals[0] if principals else None,
        })
        selectors = [Selector(NAME, f"principal:{p}") for p in principals if p]
        if key_id:
            selectors.append(Selector(NAME, f"key_id:{key_id}"))
        selectors.append(Selector(NAME, f"ca:fingerprint:{key_fingerprint(cert.signature_key())}"))
        return AttestationResult(agent_id=agent, selectors=tuple(dict.fromkeys(selectors)),
                                 csr_binding=binding)


def _when(unix: int) -> str:
    return dt.datetime.fromtimestamp(min(unix, 253402300799), dt.UTC).isoformat()
