"""Assemble the CA from the server config: key manager, upstream, instance id.

Each server instance has an id of its own, kept in ``<data_dir>/server-instance-id``:
servers that share one database (HA) each own their CA slots by it, and a restart
of the same data directory finds its slots again.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

from sqlalchemy.engine import make_url

from ca.authority import AuthorityConfig, CertificateAuthority, log_ttl_warnings
from ca.authority.upstream import load_upstream
from ca.config.authority import pkcs11_pin
from ca.config.federation import oidc_issuer
from ca.config.server import ServerConfig
from ca.datastore import Datastore
from ca.errors import ConfigError
from ca.keys import DiskKeyManager, KeyManager, MemoryKeyManager
from identity.clock import Clock

INSTANCE_ID_FILE = "server-instance-id"


def instance_id(data_dir: Path) -> str:
    """This data directory's server instance id, created on first use.

    Raises:
        ConfigError: the file cannot be read or written.
    """
    path = data_dir / INSTANCE_ID_FILE
    try:
        text = path.read_text().strip()
        if text:
            return text
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    value = str(uuid.uuid4())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(value + "\n")
    except FileExistsError:  # another process of this server won the race
        return path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
    return value


def make_key_manager(cfg: ServerConfig) -> KeyManager:
    """The key manager ``key_manager`` names.

    Raises:
        ConfigError: PKCS#11 settings missing, or its PIN variable unset.
        KeyManagerError: the PKCS#11 token cannot be opened.
    """
    if cfg.ca.key_manager == "memory":
        return MemoryKeyManager()
    if cfg.ca.key_manager == "pkcs11":
        if cfg.ca.pkcs11 is None:  # pragma: no cover - validated in caconfig
            raise ConfigError("key_manager pkcs11 needs a [pkcs11] table")
        from ca.keys.pkcs11 import Pkcs11KeyManager

        p11 = cfg.ca.pkcs11
        return Pkcs11KeyManager(p11.module_path, p11.token_label, pkcs11_pin(p11))
    return DiskKeyManager(cfg.key_dir)


def check_trust_domain(cfg: ServerConfig, datastore: Datastore) -> None:
    """Refuse a database that belongs to another trust domain (record ours if none).

    Runs before anything else is written: two trust domains' CAs in one database
    would mix into each other's authorities and bundles.

    Raises:
        ConfigError: the database records another trust domain.
    """
    recorded = datastore.claim_trust_domain(cfg.trust_domain)
    if recorded != cfg.trust_domain.name:
        where = make_url(cfg.database_url).render_as_string(hide_password=True)
        raise ConfigError(f"the database at {where} belongs to trust domain {recorded}; "
                          f"this server is configured for {cfg.trust_domain}")


def build_authority(cfg: ServerConfig, datastore: Datastore, clock: Clock, *,
                    key_manager: KeyManager | None = None,
                    rotate: bool = True) -> CertificateAuthority:
    """A loaded CertificateAuthority for this server (slots created on first start).

    Args:
        rotate: False for extra worker processes: they follow the main process's
            slots instead of rotating them.
    """
    check_trust_domain(cfg, datastore)
    if rotate:
        log_ttl_warnings(cfg.ca_ttl, cfg.x509_svid_ttl, cfg.jwt_svid_ttl)
        # Which host this instance is on, so `sigil-server status` names the servers
        # holding each key by host, not only by instance id.
        datastore.record_server_host(instance_id(cfg.data_dir), socket.gethostname())
    authority = CertificateAuthority(AuthorityConfig(
        trust_domain=cfg.trust_domain, datastore=datastore,
        key_manager=key_manager or make_key_manager(cfg), clock=clock,
        ca_ttl=cfg.ca_ttl, ca_key_type=cfg.ca_key_type, jwt_key_type=cfg.jwt_key_type,
        owner=instance_id(cfg.data_dir),
        upstream=load_upstream(cfg.ca.upstream) if cfg.ca.upstream is not None else None,
        safety_margin=cfg.ca.safety_margin, rotate=rotate,
        jwt_issuer=oidc_issuer(cfg.federation.oidc_discovery.domain)
        if cfg.federation.oidc_discovery is not None else None,
    ))
    authority.load_or_create()
    return authority
