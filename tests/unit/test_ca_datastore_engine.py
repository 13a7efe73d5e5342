"""ca.datastore.engine: which database_url forms are accepted, and the CLI's answer to the rest."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from ca.config.server import ConfigError
from ca.datastore.engine import POOL_SIZE, dialect_of, make_engine, parse_database_url
from tests.integration.conftest import server_command


@pytest.mark.parametrize(("url", "dialect"), [
    ("sqlite:////var/lib/sigil/datastore.sqlite3", "sqlite"),
    ("sqlite:///relative.sqlite3", "sqlite"),
    ("postgresql+psycopg://sigil:pw@db.example:5432/sigil", "postgresql"),
    ("postgresql://sigil@db.example/sigil", "postgresql"),  # SQLAlchemy 2.1: psycopg 3
    ("mysql+pymysql://sigil:pw@db.example:3306/sigil", "mysql"),
    ("mariadb+pymysql://sigil@db.example/sigil", "mysql"),
])
def test_accepted_urls(url: str, dialect: str) -> None:
    assert dialect_of(url) == dialect


@pytest.mark.parametrize(("url", "message"), [
    ("::not a url", "database_url is not a valid URL"),
    ("sqlite://", "SQLite needs a file path"),
    ("sqlite:///:memory:", "SQLite needs a file path"),
    ("mysql+mysqldb://u@h/d", "scheme 'mysql+mysqldb' is not supported"),
    ("postgresql+psycopg2://u@h/d", "scheme 'postgresql+psycopg2' is not supported"),
    ("oracle://u:secretpw@h/d", "scheme 'oracle' is not supported"),
    ("foo://x", "scheme 'foo' is not supported"),
    ("postgresql+psycopg://u@h:abc/db", "database_url is not a valid URL"),
])
def test_refused_urls(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        parse_database_url(url)
    assert "secretpw" not in str(info.value)


def test_server_pools_are_bounded_and_utf8mb4() -> None:
    pg = make_engine("postgresql+psycopg://u@127.0.0.1/d")
    maria = make_engine("mysql+pymysql://u@127.0.0.1/d")
    try:
        assert pg.pool.size() == maria.pool.size() == POOL_SIZE  # type: ignore[attr-defined]
        assert maria.url.query["charset"] == "utf8mb4"
    finally:
        pg.dispose()
        maria.dispose()


@pytest.mark.parametrize("url", ["mysql+mysqldb://u@h/d", "sqlite://"])
def test_cli_refuses_bad_database_url_and_creates_nothing(tmp_path: Path, url: str) -> None:
    data_dir = tmp_path / "data"
    done = subprocess.run(
        [*server_command(), "run", "--trust-domain", "example.org", "--data-dir", str(data_dir),
         "--socket-path", str(tmp_path / "admin.sock"), "--database-url", url],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("Error: database_url")
    assert len(done.stderr.strip().splitlines()) == 1
    assert not data_dir.exists()
