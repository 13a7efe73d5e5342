"""``database_url``: which databases and drivers the server supports, and the check.

Kept apart from :mod:`ca.datastore` (whose package import loads SQLAlchemy, the
models and the repository) so that loading and validating the configuration, and
every admin CLI command, stay cheap: SQLAlchemy's URL parser is imported only when
a URL is actually checked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ca.errors import ConfigError

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

# The drivers we ship and test (pyproject.toml); a bare "postgresql://" or
# "mysql://" would pick a driver SQLAlchemy defaults to and we do not install.
SUPPORTED_DRIVERS = {
    "sqlite": ("sqlite", "pysqlite"),
    "postgresql": ("postgresql", "psycopg"),
    "mysql": ("mysql", "pymysql"),
    "mariadb": ("mariadb", "pymysql"),
}


def parse_database_url(url: str) -> URL:
    """Parse and check a ``database_url``.

    Raises:
        ConfigError: not a URL, or not one of the supported database/driver forms.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    invalid = ConfigError(
        "database_url is not a valid URL: expected sqlite:///PATH, "
        "postgresql+psycopg://USER@HOST:PORT/DB or mysql+pymysql://USER@HOST:PORT/DB"
    )
    try:
        # A non-numeric port surfaces as ValueError from SQLAlchemy's parser.
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise invalid from None
    try:
        # Asking for the driver name loads the dialect, which fails for an unknown one.
        backend, driver = parsed.get_backend_name(), parsed.get_driver_name()
    except NoSuchModuleError:
        backend, driver = parsed.get_backend_name(), ""
    allowed = SUPPORTED_DRIVERS.get(backend)
    if allowed is None or driver not in allowed[1:]:
        forms = ", ".join(f"{b}+{d}" if b != "sqlite" else b for b, d in SUPPORTED_DRIVERS.values())
        raise ConfigError(
            f"database_url scheme {parsed.drivername!r} is not supported; use one of: {forms}"
        )
    if backend == "sqlite" and parsed.database in (None, "", ":memory:"):
        # Each pooled connection would get its own empty in-memory database.
        raise ConfigError("database_url: SQLite needs a file path (sqlite:///PATH)")
    return parsed


def dialect_of(url: str) -> str:
    """``"sqlite"``, ``"postgresql"`` or ``"mysql"`` (MariaDB counts as mysql)."""
    backend = parse_database_url(url).get_backend_name()
    return "mysql" if backend == "mariadb" else backend
