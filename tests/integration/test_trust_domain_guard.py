"""A database belongs to one trust domain: recorded at creation, checked at start.

A server configured for another trust domain refuses to start on it with a
one-line error naming both, and writes nothing (revision 0006, datastore_info).
"""

from __future__ import annotations

import datetime as dt
import subprocess
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import create_engine, func, insert, select, text
from sqlalchemy.engine import make_url

import migrations
from ca.authority.setup import build_authority, check_trust_domain
from ca.config.server import ServerConfig, load_config
from ca.datastore import Datastore
from ca.datastore import models as m
from ca.errors import ConfigError
from ca.keys import MemoryKeyManager
from identity.clock import FakeClock
from identity.keys import generate_private_key, public_key_der
from identity.spiffeid import TrustDomain
from identity.x509svid import new_ca_certificate
from tests.integration.conftest import server_command

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def _config(tmp_path: Path, url: str, trust_domain: str) -> ServerConfig:
    data = tmp_path / f"data-{trust_domain}"
    data.mkdir(exist_ok=True)
    conf = tmp_path / f"{trust_domain}.toml"
    conf.write_text(f'trust_domain = "{trust_domain}"\ndata_dir = "{data}"\n')
    return load_config(conf, env={}, overrides={"database_url": url})


def _counts(url: str) -> dict[str, int]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return {t.name: int(conn.scalar(select(func.count()).select_from(t)) or 0)
                    for t in m.Base.metadata.sorted_tables}
    finally:
        engine.dispose()


def test_server_of_another_trust_domain_refuses_the_database(
        tmp_path: Path, database_url: str) -> None:
    first = _config(tmp_path, database_url, "example.org")
    ds = Datastore(database_url)
    try:
        build_authority(first, ds, FakeClock(NOW),
                        key_manager=MemoryKeyManager())
        before = _counts(database_url)
        # datastore_info: the trust domain, and the host of this server instance;
        # ca_keys: the X.509 CA, the JWT-SVID key and the WIT-SVID key.
        assert before["datastore_info"] == 2 and before["ca_keys"] == 3
        other = _config(tmp_path, database_url, "other.org")
        with pytest.raises(ConfigError) as refused:
            build_authority(other, ds, FakeClock(NOW),
                            key_manager=MemoryKeyManager())
        message = str(refused.value)
        assert "\n" not in message
        assert message.startswith("the database at ")
        assert message.endswith("belongs to trust domain example.org; "
                                "this server is configured for other.org")
        password = make_url(database_url).password
        assert not password or str(password) not in message
        assert _counts(database_url) == before
        # The rightful server still starts.
        check_trust_domain(first, ds)
    finally:
        ds.close()


def test_sigil_server_run_refuses_with_one_line(tmp_path: Path, database_url: str) -> None:
    ds = Datastore(database_url)
    try:
        assert ds.claim_trust_domain(TrustDomain("example.org")) == "example.org"
        assert ds.claim_trust_domain(TrustDomain("other.org")) == "example.org"
    finally:
        ds.close()
    before = _counts(database_url)
    data = tmp_path / "d"
    proc = subprocess.run(
        [*server_command(), "run", "--trust-domain", "other.org", "--data-dir", str(data),
         "--bind-address", "127.0.0.1:0", "--socket-path", str(tmp_path / "s" / "a.sock"),
         "--database-url", database_url],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines()
              if "belongs to trust domain" in line]
    assert len(errors) == 1, proc.stderr
    assert errors[0].endswith("belongs to trust domain example.org; "
                              "this server is configured for other.org"), errors
    assert _counts(database_url) == before
    assert not (data / "server-instance-id").exists()


def _slot(trust_domain: str, created_at: int) -> dict[str, object]:
    key = generate_private_key()
    cert = new_ca_certificate(trust_domain=TrustDomain(trust_domain),
                              public_key=key.public_key(), signer_key=key,
                              not_before=NOW, not_after=NOW + dt.timedelta(hours=1))
    return {"id": str(uuid.uuid4()), "kind": "x509", "status": "active", "key_id": "k",
            "public_key": public_key_der(key.public_key()),
            "certificate": cert.public_bytes(Encoding.DER),
            "not_after": int(NOW.timestamp()) + 3600, "created_at": created_at}


def _recorded(url: str) -> list[tuple[str, str]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text("SELECT name, value FROM datastore_info"))]
    finally:
        engine.dispose()


def test_migration_records_the_trust_domain_of_existing_ca_slots(database_url: str) -> None:
    migrations.downgrade(database_url, "0005")
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            # The oldest slot decides (a database already mixed by the bug).
            conn.execute(insert(m.CaKey), [_slot("later.org", 200), _slot("first.org", 100)])
    finally:
        engine.dispose()
    migrations.upgrade(database_url, "head")
    assert _recorded(database_url) == [("trust_domain", "first.org")]
    ds = Datastore(database_url)
    try:
        assert ds.claim_trust_domain(TrustDomain("later.org")) == "first.org"
    finally:
        ds.close()
    migrations.downgrade(database_url, "0005")
    migrations.upgrade(database_url, "head")


def test_migration_without_slots_leaves_it_to_the_next_start(database_url: str) -> None:
    migrations.downgrade(database_url, "0005")
    migrations.upgrade(database_url, "head")
    assert _recorded(database_url) == []
    ds = Datastore(database_url)
    try:
        assert ds.claim_trust_domain(TrustDomain("next.org")) == "next.org"
    finally:
        ds.close()
    assert _recorded(database_url) == [("trust_domain", "next.org")]
