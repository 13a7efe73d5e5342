"""Fixtures every test directory shares: ``database_url`` on SQLite, PostgreSQL and MariaDB.

``database_url`` is parametrized ``["sqlite", "postgresql", "mariadb"]``. Each test
gets a database migrated to head with no rows in it:

- SQLite: a copy of a file migrated once per session, in the test's tmp_path;
- PostgreSQL / MariaDB: one database per xdist worker (``sigil_t_<pid>_<worker>``),
  created and migrated at its first use, emptied (TRUNCATE, identities restarted)
  after each test, re-created when a test left it at another revision, and dropped
  at the end of the session. Creating and migrating a database per test would cost
  seconds each on MariaDB.

A server that is unreachable skips its tests with a message saying where we
looked; in CI (``CI=true``) it fails them instead, since CI requires all three.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import migrations
from tests import databases as dbs
from tests.support.require import missing

DATABASE_PARAMS = ["sqlite", "postgresql", "mariadb"]


class _WorkerDatabases:
    """The per-worker databases of this session, created on first use."""

    def __init__(self, tmp_root: Path) -> None:
        self._tmp_root = tmp_root
        self._sqlite_template: Path | None = None
        self._urls: dict[str, str] = {}
        self._unreachable: dict[str, str | None] = {}
        self._worker = os.environ.get("PYTEST_XDIST_WORKER", "main")

    def sqlite_copy(self, target: Path) -> str:
        if self._sqlite_template is None:
            template = self._tmp_root / "template.sqlite3"
            migrations.upgrade(dbs.sqlite_url(template))
            self._sqlite_template = template
        shutil.copyfile(self._sqlite_template, target)
        return dbs.sqlite_url(target)

    def unreachable(self, server: dbs.Server) -> str | None:
        if server.param not in self._unreachable:
            error = dbs.probe(server)
            self._unreachable[server.param] = (
                None if error is None else f"{server.describe()} is unreachable: {error}"
            )
        return self._unreachable[server.param]

    def url(self, server: dbs.Server) -> str:
        url = self._urls.get(server.param)
        if url is None:
            url = self._recreate(server)
        return url

    def _recreate(self, server: dbs.Server) -> str:
        url = dbs.create_database(server, dbs.worker_database_name(self._worker))
        migrations.upgrade(url)
        self._urls[server.param] = url
        return url

    def reset(self, server: dbs.Server) -> None:
        url = self._urls[server.param]
        if dbs.schema_at_head(url):
            dbs.truncate_all(server, url)
        else:
            self._recreate(server)

    def drop_all(self) -> None:
        for param in list(self._urls):
            dbs.drop_database(dbs.SERVERS[param], dbs.worker_database_name(self._worker))
        self._urls.clear()


@pytest.fixture(scope="session")
def _worker_databases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_WorkerDatabases]:
    pool = _WorkerDatabases(tmp_path_factory.mktemp("databases"))
    try:
        yield pool
    finally:
        pool.drop_all()


@pytest.fixture(params=DATABASE_PARAMS)
def database_url(
    request: pytest.FixtureRequest, tmp_path: Path, _worker_databases: _WorkerDatabases
) -> Iterator[str]:
    """A SQLAlchemy URL of an empty database at the head revision (see module doc)."""
    param: str = request.param
    if param == "sqlite":
        yield _worker_databases.sqlite_copy(tmp_path / "datastore.sqlite3")
        return
    server = dbs.SERVERS[param]
    why = _worker_databases.unreachable(server)
    if why is not None:
        missing(why, "see docs/development.md, 'Databases'")
    url = _worker_databases.url(server)
    try:
        yield url
    finally:
        _worker_databases.reset(server)
