"""The test databases: where PostgreSQL and MariaDB are, and throwaway databases on them.

Shared by ``tests/run.py`` (which makes sure the servers are up before pytest) and
``tests/conftest.py`` (the ``database_url`` fixture). Connection settings come from
``SIGIL_TEST_POSTGRES_URL`` and ``SIGIL_TEST_MARIADB_URL``: an administrative URL
whose user may create and drop databases. Test databases are named
``sigil_t_<pid>_<worker>`` so concurrent test runs on one machine never share one;
databases of runs whose process is gone are dropped at the next run.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, inspect, text
from sqlalchemy.engine import URL, make_url

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DEFAULT_MARIADB_URL = "mysql+pymysql://root@127.0.0.1:3306/test"
TEST_DB_PREFIX = "sigil_t_"
_TEST_DB_RE = re.compile(rf"^{TEST_DB_PREFIX}(\d+)_\w+$")


@dataclass(frozen=True)
class Server:
    """One database server the suite needs."""

    name: str  # "PostgreSQL" | "MariaDB"
    param: str  # the database_url fixture's parameter
    env_var: str
    default_url: str
    start_commands: tuple[str, ...]

    @property
    def admin_url(self) -> URL:
        """The administrative URL (env override or default)."""
        return make_url(os.environ.get(self.env_var) or self.default_url)

    def describe(self) -> str:
        """Where we looked, without any password."""
        url = self.admin_url
        return f"{self.name} at {url.host}:{url.port} (user {url.username}, set {self.env_var})"


POSTGRES = Server(
    name="PostgreSQL",
    param="postgresql",
    env_var="SIGIL_TEST_POSTGRES_URL",
    default_url=DEFAULT_POSTGRES_URL,
    start_commands=(
        "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    ),
)
MARIADB = Server(
    name="MariaDB",
    param="mariadb",
    env_var="SIGIL_TEST_MARIADB_URL",
    default_url=DEFAULT_MARIADB_URL,
    start_commands=(
        "start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd",
    ),
)
SERVERS = {POSTGRES.param: POSTGRES, MARIADB.param: MARIADB}


def in_ci() -> bool:
    """CI requires every database; elsewhere missing servers only skip tests."""
    from tests.support.require import in_ci as ci

    return ci()


def admin_engine(server: Server) -> Engine:
    """An autocommit engine on the administrative database (CREATE/DROP DATABASE)."""
    return create_engine(
        server.admin_url, isolation_level="AUTOCOMMIT", pool_pre_ping=True,
        connect_args={"connect_timeout": 5},
    )


def probe(server: Server) -> str | None:
    """None when the server answers ``SELECT 1``; else why not, in one line."""
    engine = admin_engine(server)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return None
    except Exception as exc:  # any driver or network error means "unreachable"
        return f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        engine.dispose()


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def start(server: Server, *, wait_seconds: float = 30.0) -> list[str]:
    """Try this machine's commands to start ``server``; returns what was run and how it went."""
    tried: list[str] = []
    url = server.admin_url
    for cmd in server.start_commands:
        done = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=60)
        out = (done.stdout + done.stderr).strip().replace("\n", " | ")
        tried.append(f"`{cmd}` -> exit {done.returncode}{': ' + out if out else ''}")
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        if _port_open(url.host or "127.0.0.1", url.port or 0) and probe(server) is None:
            break
        time.sleep(0.5)
    return tried


def ensure_servers() -> dict[str, str]:
    """Make every server reachable if we can; returns {param: why unreachable} for the rest."""
    missing: dict[str, str] = {}
    for server in SERVERS.values():
        if probe(server) is None:
            continue
        tried = start(server)
        error = probe(server)
        if error is not None:
            missing[server.param] = (
                f"{server.describe()} is unreachable ({error}); tried: {'; '.join(tried)}"
            )
    return missing


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _list_databases(server: Server, engine: Engine) -> list[str]:
    query = "SELECT datname FROM pg_database" if server is POSTGRES else "SHOW DATABASES"
    with engine.connect() as conn:
        return [row[0] for row in conn.execute(text(query))]


def _drop(server: Server, engine: Engine, name: str) -> None:
    with engine.connect() as conn:
        if server is POSTGRES:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        else:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))


def create_database(server: Server, name: str) -> str:
    """Create an empty database ``name`` (dropping leftovers of dead runs first); its URL."""
    assert re.fullmatch(r"\w+", name), name
    engine = admin_engine(server)
    try:
        for existing in _list_databases(server, engine):
            match = _TEST_DB_RE.match(existing)
            if existing == name or (match and not _pid_alive(int(match.group(1)))):
                _drop(server, engine, existing)
        with engine.connect() as conn:
            if server is POSTGRES:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            else:
                # Binary collation: SPIFFE IDs and selectors compare case-sensitively.
                conn.execute(text(
                    f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
                ))
    finally:
        engine.dispose()
    return server.admin_url.set(database=name).render_as_string(hide_password=False)


def drop_database(server: Server, name: str) -> None:
    """Drop ``name`` if it exists."""
    engine = admin_engine(server)
    try:
        _drop(server, engine, name)
    finally:
        engine.dispose()


def worker_database_name(worker: str) -> str:
    """``sigil_t_<pid>_<worker>``: unique per process and xdist worker."""
    safe = re.sub(r"\W", "_", worker)
    return f"{TEST_DB_PREFIX}{os.getpid()}_{safe}"


def sqlite_url(path: Path) -> str:
    """The SQLAlchemy URL of a SQLite file."""
    return f"sqlite:///{path}"


def _kill_other_connections(server: Server, conn: Connection, name: str) -> None:
    # A test that failed midway, or a SIGKILLed server, may leave a session holding
    # locks; TRUNCATE would wait for it.
    if server is POSTGRES:
        conn.execute(text(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = :db AND pid <> pg_backend_pid()"
        ), {"db": name})
        return
    ids = conn.execute(text(
        "SELECT id FROM information_schema.processlist WHERE db = :db AND id <> CONNECTION_ID()"
    ), {"db": name}).scalars().all()
    for conn_id in ids:
        try:
            conn.execute(text(f"KILL {int(conn_id)}"))
        except Exception:  # it ended on its own meanwhile
            pass


def truncate_all(server: Server, url: str) -> None:
    """Empty every table but ``alembic_version`` and restart the id counters.

    PostgreSQL: DELETE, children first, then reset the sequences; on tables this
    small that is ten times faster than TRUNCATE, which makes and syncs new files.
    MariaDB: TRUNCATE, which is cheap there and also restarts AUTO_INCREMENT.
    """
    from ca.datastore.models import Base

    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    name = make_url(url).database or ""
    try:
        with engine.connect() as conn:
            _kill_other_connections(server, conn, name)
            present = set(inspect(conn).get_table_names()) - {"alembic_version"}
            ordered = [t.name for t in reversed(Base.metadata.sorted_tables) if t.name in present]
            ordered += sorted(present - set(ordered))
            if server is POSTGRES:
                conn.execute(text("SET lock_timeout = '10s'"))
                for table in ordered:
                    conn.execute(text(f'DELETE FROM "{table}"'))
                conn.execute(text(
                    "SELECT setval(c.oid::regclass, 1, false) FROM pg_class c "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE c.relkind = 'S' AND n.nspname = current_schema()"
                ))
                return
            conn.execute(text("SET SESSION lock_wait_timeout = 10"))
            conn.execute(text("SET FOREIGN_KEY_CHECKS = 0"))
            for table in ordered:
                conn.execute(text(f"TRUNCATE TABLE `{table}`"))
            conn.execute(text("SET FOREIGN_KEY_CHECKS = 1"))
    finally:
        engine.dispose()


def schema_at_head(url: str) -> bool:
    """True when the database is migrated to the single head and has all model tables."""
    from alembic.script import ScriptDirectory

    import migrations
    from ca.datastore.models import Base

    head = ScriptDirectory.from_config(migrations.alembic_config(url)).get_current_head()
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            if "alembic_version" not in tables:
                return False
            current = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    finally:
        engine.dispose()
    return current == [head] and set(Base.metadata.tables) <= tables
