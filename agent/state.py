"""What the agent keeps on disk: its SVID, its key, the trust bundle, and the
workloads' cache.

The data directory is 0700 and the key file 0600 (security invariant: key files
are 0600). Files are replaced atomically (write a temporary file, then rename), so
a crash leaves the old SVID or the new one, never half of either.

The workloads' cache (``workload_cache.json``, 0600: it holds their private
keys) keeps the authorized entries, the bundles and the X.509-SVIDs with their
keys, so an agent that restarts while the server is down still serves the SVIDs
it held until they expire (docs/agent.md, "Offline behaviour").
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import log
from agent.cache import CachedEntry, Snapshot
from identity.bundle import Bundle
from identity.errors import SigilError
from identity.keys import private_key_to_pem
from identity.selectors import Selector
from identity.spiffeid import SpiffeId, TrustDomain
from identity.x509svid import X509Svid

# The agent SVID's chain and key share one file (0600), replaced atomically: with
# two files a crash between the two renames would pair a new key with the old
# certificate, and the agent could not prove its identity after the restart.
SVID_FILE = "agent_svid.pem"
BUNDLE_FILE = "bundle.json"
WORKLOAD_CACHE_FILE = "workload_cache.json"
WORKLOAD_CACHE_FORMAT = 1


@dataclass(frozen=True, slots=True)
class PersistedCache:
    """The workloads' cache as read back from the data directory."""

    entries: tuple[CachedEntry, ...]
    bundles: Mapping[TrustDomain, Bundle]
    svids: Mapping[str, X509Svid]


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
        path = self.data_dir / SVID_FILE
        if not path.exists():
            return None
        try:
            data = path.read_bytes()
            return X509Svid.parse(data, data)
        except (OSError, SigilError) as exc:
            log.event("persisted agent svid unusable", level=logging.WARNING, reason=str(exc))
            return None

    def save_svid(self, svid: X509Svid) -> None:
        """Persist the agent SVID: chain and key in one file, replaced in one rename."""
        assert svid.private_key is not None
        data = svid.chain_pem() + private_key_to_pem(svid.private_key)
        write_file_atomic(self.data_dir / SVID_FILE, data, mode=0o600)

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

    # The workloads' cache -------------------------------------------------------

    def save_workload_cache(self, snapshot: Snapshot) -> None:
        """Persist entries, bundles and X.509-SVIDs with their keys (0600, atomic)."""
        doc = {
            "format": WORKLOAD_CACHE_FORMAT,
            "trust_domain": snapshot.trust_domain.name,
            "entries": [_entry_to_json(e) for e in snapshot.entries],
            "bundles": {td.name: json.loads(b.to_json()) for td, b in snapshot.bundles.items()},
            "svids": {
                entry_id: {"chain": svid.chain_pem().decode(), "key": svid.key_pem().decode()}
                for entry_id, svid in snapshot.svids.items()
            },
        }
        write_file_atomic(
            self.data_dir / WORKLOAD_CACHE_FILE,
            json.dumps(doc, separators=(",", ":")).encode(),
            mode=0o600,
        )

    def load_workload_cache(
        self, trust_domain: TrustDomain, *, now: dt.datetime
    ) -> PersistedCache | None:
        """The persisted cache without expired SVIDs, or None (absent or unusable).

        An unusable file is logged and ignored: the agent then starts empty and
        fills its cache from the server, as on a first start.
        """
        path = self.data_dir / WORKLOAD_CACHE_FILE
        if not path.exists():
            return None
        try:
            doc = json.loads(path.read_bytes())
            if doc.get("format") != WORKLOAD_CACHE_FORMAT:
                raise SigilError(f"unknown format {doc.get('format')!r}")
            if doc.get("trust_domain") != trust_domain.name:
                raise SigilError(f"it belongs to trust domain {doc.get('trust_domain')!r}")
            entries = tuple(_entry_from_json(e) for e in doc["entries"])
            bundles = {
                TrustDomain.parse(name): Bundle.from_jwks(TrustDomain.parse(name), json.dumps(b))
                for name, b in doc["bundles"].items()
            }
            svids = {}
            for entry_id, item in doc["svids"].items():
                svid = X509Svid.parse(item["chain"].encode(), item["key"].encode())
                if svid.expires_at > now:
                    svids[str(entry_id)] = svid
        except (OSError, ValueError, KeyError, TypeError, AttributeError, SigilError) as exc:
            log.event("persisted workload cache unusable", level=logging.WARNING,
                      path=path, reason=str(exc) or type(exc).__name__)
            return None
        return PersistedCache(entries=entries, bundles=bundles, svids=svids)


def _entry_to_json(e: CachedEntry) -> dict[str, Any]:
    return {
        "id": e.id, "spiffe_id": str(e.spiffe_id), "parent_id": str(e.parent_id),
        "selectors": sorted(str(s) for s in e.selectors),
        "x509_svid_ttl": e.x509_svid_ttl, "jwt_svid_ttl": e.jwt_svid_ttl,
        "dns_names": list(e.dns_names),
        "federates_with": [td.name for td in e.federates_with],
        "hint": e.hint, "revision": e.revision,
    }


def _entry_from_json(d: Mapping[str, Any]) -> CachedEntry:
    return CachedEntry(
        id=str(d["id"]),
        spiffe_id=SpiffeId.parse(d["spiffe_id"]),
        parent_id=SpiffeId.parse(d["parent_id"]),
        selectors=frozenset(Selector.parse(s) for s in d["selectors"]),
        x509_svid_ttl=int(d["x509_svid_ttl"]),
        jwt_svid_ttl=int(d["jwt_svid_ttl"]),
        dns_names=tuple(str(n) for n in d["dns_names"]),
        federates_with=tuple(TrustDomain.parse(td) for td in d["federates_with"]),
        hint=str(d["hint"]),
        revision=int(d["revision"]),
    )
