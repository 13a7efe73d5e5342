"""What the agent keeps on disk: its SVID, its key and the trust bundle.

The data directory is 0700 and the key file 0600 (security invariant: key files
are 0600). Files are replaced atomically (write a temporary file, then rename), so
a crash leaves the old SVID or the new one, never half of either.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from agent import log
from identity.bundle import Bundle
from identity.errors import SigilError
from identity.keys import private_key_to_pem
from identity.spiffeid import TrustDomain
from identity.x509svid import X509Svid

SVID_FILE = "agent_svid.pem"
KEY_FILE = "agent_svid.key"
BUNDLE_FILE = "bundle.json"


def write_file_atomic(path: Path, data: bytes, *, mode: int) -> None:
    """Replace ``path`` with ``data``; the new file has ``mode`` from its creation."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    # Created with the final mode (O_EXCL: never through a planted symlink), so a
    # key is never readable by others, not even for an instant.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    os.replace(tmp, path)


class AgentState:
    """The agent's data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def prepare(self) -> None:
        """Create the data directory 0700 (and tighten it if it exists)."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)

    def load_svid(self) -> X509Svid | None:
        """The persisted agent SVID with its key, or None (absent or unreadable)."""
        cert_path, key_path = self.data_dir / SVID_FILE, self.data_dir / KEY_FILE
        if not cert_path.exists() or not key_path.exists():
            return None
        try:
            return X509Svid.parse(cert_path.read_bytes(), key_path.read_bytes())
        except (OSError, SigilError) as exc:
            log.event("persisted agent svid unusable", level=logging.WARNING, reason=str(exc))
            return None

    def save_svid(self, svid: X509Svid) -> None:
        """Persist the agent SVID: key first, so a crash never pairs a new cert with an old key."""
        assert svid.private_key is not None
        write_file_atomic(
            self.data_dir / KEY_FILE, private_key_to_pem(svid.private_key), mode=0o600
        )
        write_file_atomic(self.data_dir / SVID_FILE, svid.chain_pem(), mode=0o644)

    def load_bundle(self, trust_domain: TrustDomain) -> Bundle | None:
        """The persisted bundle of our trust domain, or None."""
        path = self.data_dir / BUNDLE_FILE
        if not path.exists():
            return None
        try:
            return Bundle.from_jwks(trust_domain, path.read_bytes())
        except (OSError, SigilError) as exc:
            log.event("persisted bundle unusable", level=logging.WARNING, reason=str(exc))
            return None

    def save_bundle(self, bundle: Bundle) -> None:
        """Persist our trust domain's bundle (SPIFFE bundle format)."""
        write_file_atomic(self.data_dir / BUNDLE_FILE, bundle.to_json(), mode=0o644)
