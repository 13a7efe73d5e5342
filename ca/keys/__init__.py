"""Where the server's private keys live: a small Protocol with disk, memory and PKCS#11 stores.

The PKCS#11 store is in :mod:`ca.keys.pkcs11` (it needs the python-pkcs11 module).

Private keys never leave this layer except as signing objects handed to the CA in
the same process; they are never logged.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ca.errors import KeyManagerError
from identity.errors import InvalidKeyError
from identity.keys import (
    JwtPrivateKey,
    JwtPublicKey,
    KeyType,
    PrivateKey,
    PublicKey,
    generate_jwt_key,
    jwt_key_type_of,
    load_jwt_private_key_pem,
    private_key_to_pem,
)

_KEY_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True, slots=True)
class KeyHandle:
    """A key the manager holds: its id, its public half and a signer."""

    key_id: str
    key_type: KeyType
    private_key: JwtPrivateKey
    """EC or RSA; ML-DSA only for a JWT key (``key_type.jwt_only``)."""
    external: bool = False
    """The key lives outside this process (an HSM): what it signs is verified."""

    @property
    def public_key(self) -> JwtPublicKey:
        """The public half."""
        return self.private_key.public_key()

    @property
    def x509_key(self) -> PrivateKey:
        """The key as a certificate signer (EC or RSA).

        Raises:
            KeyManagerError: an ML-DSA key (JWT-SVIDs only).
        """
        key = self.private_key
        if isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
            return key
        raise KeyManagerError(f"key {self.key_id} is {self.key_type.value}: it signs "
                              "JWT-SVIDs only, not certificates")

    @property
    def x509_public_key(self) -> PublicKey:
        """The public half of :attr:`x509_key`."""
        return self.x509_key.public_key()

    def __repr__(self) -> str:  # never print key material, even by accident
        return f"KeyHandle(key_id={self.key_id!r}, key_type={self.key_type.value})"


class KeyManager(Protocol):
    """Creates and finds signing keys by id."""

    def generate_key(self, key_id: str, key_type: KeyType) -> KeyHandle:
        """Create (or replace) the key ``key_id``.

        Raises:
            KeyManagerError: the id is invalid or the key cannot be stored.
        """
        ...

    def get_key(self, key_id: str) -> KeyHandle | None:
        """The key ``key_id``, or None when there is none.

        Raises:
            KeyManagerError: the key exists but cannot be read.
        """
        ...


def check_key_id(key_id: str) -> None:
    """Reject a key id that is not a safe file name / token label.

    Raises:
        KeyManagerError: naming the id and the rule.
    """
    if not _KEY_ID_RE.match(key_id):
        raise KeyManagerError(f"invalid key id {key_id!r}: letters, digits, '.', '_', '-'")


class MemoryKeyManager:
    """Keys in process memory only; for tests and ephemeral servers."""

    def __init__(self) -> None:
        self._keys: dict[str, KeyHandle] = {}
        self._lock = threading.Lock()

    def generate_key(self, key_id: str, key_type: KeyType) -> KeyHandle:
        """Create (or replace) the key ``key_id`` in memory."""
        check_key_id(key_id)
        handle = KeyHandle(key_id, key_type, generate_jwt_key(key_type))
        with self._lock:
            self._keys[key_id] = handle
        return handle

    def get_key(self, key_id: str) -> KeyHandle | None:
        """The key ``key_id``, or None."""
        check_key_id(key_id)
        with self._lock:
            return self._keys.get(key_id)


class DiskKeyManager:
    """PKCS#8 PEM files, mode 0600, in a directory of mode 0700."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()

    def _ensure_dir(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # mkdir's mode is filtered by the umask and ignored for an existing directory.
        os.chmod(self.directory, 0o700)

    def _path(self, key_id: str) -> Path:
        check_key_id(key_id)
        return self.directory / f"{key_id}.pem"

    def generate_key(self, key_id: str, key_type: KeyType) -> KeyHandle:
        """Create (or replace) the key ``key_id`` and write it atomically."""
        path = self._path(key_id)
        key = generate_jwt_key(key_type)
        pem = private_key_to_pem(key)
        with self._lock:
            try:
                self._ensure_dir()
                tmp = path.with_suffix(".pem.tmp")
                # O_EXCL|0600 from the start: the key is never readable by others,
                # not even between create and chmod.
                if tmp.exists():
                    tmp.unlink()
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(pem)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except OSError as exc:
                raise KeyManagerError(f"cannot write key {key_id}: {exc.strerror}") from None
        return KeyHandle(key_id, key_type, key)

    def get_key(self, key_id: str) -> KeyHandle | None:
        """Load the key ``key_id`` from disk, or None when its file is absent."""
        path = self._path(key_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise KeyManagerError(f"cannot read key {key_id}: {exc.strerror}") from None
        try:
            key = load_jwt_private_key_pem(data)
        except InvalidKeyError as exc:
            raise KeyManagerError(f"key file for {key_id} is invalid: {exc}") from None
        return KeyHandle(key_id, jwt_key_type_of(key), key)
