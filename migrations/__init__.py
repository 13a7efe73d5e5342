"""Alembic, configured in code: the only way the schema changes.

``script_location`` comes from this package's path, so migrations run the same
from a source tree, an installed wheel, or any working directory.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from ca.errors import DatastoreError

HERE = Path(__file__).resolve().parent


def alembic_config(url: str) -> Config:
    """An Alembic config for ``url`` with this package's scripts."""
    cfg = Config(str(HERE / "alembic.ini"))
    cfg.set_main_option("script_location", str(HERE))
    # Percent signs in a URL (encoded passwords) would be read as interpolation.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` up to ``revision``.

    Raises:
        DatastoreError: the database cannot be reached or refused a statement; the
            message names the database without its password.
    """
    try:
        command.upgrade(alembic_config(url), revision)
    except DBAPIError as exc:
        where = make_url(url).render_as_string(hide_password=True)
        reason = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else ""
        raise DatastoreError(
            f"cannot migrate the datastore at {where}: {exc.orig.__class__.__name__}: {reason}"
        ) from exc


def downgrade(url: str, revision: str = "base") -> None:
    """Migrate the database at ``url`` down to ``revision``."""
    command.downgrade(alembic_config(url), revision)
