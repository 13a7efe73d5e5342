"""Alembic, configured in code: the only way the schema changes.

The scripts (env.py, versions/) live in the top-level ``migrations`` package; this
runner finds their directory by the package's import spec without importing it, so
the arrow points one way: ``migrations`` (env.py) imports the datastore, never the
reverse. ``script_location`` comes from that path, so migrations run the same from a
source tree, an installed wheel, or any working directory.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from ca.errors import DatastoreError


def _scripts_dir() -> Path:
    spec = importlib.util.find_spec("migrations")  # finds, does not import, the package
    assert spec is not None and spec.submodule_search_locations is not None
    return Path(next(iter(spec.submodule_search_locations))).resolve()


HERE = _scripts_dir()


def alembic_config(url: str) -> Config:
    """An Alembic config for ``url`` with the scripts of the ``migrations`` package."""
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
