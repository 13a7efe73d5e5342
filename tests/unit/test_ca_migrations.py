"""migrations/ and the models, without a database: one head, scripts shipped, and the
portability rules of ca/datastore/models.py. Migrating real databases is in
tests/integration/test_migrations.py."""

from __future__ import annotations

import os
from pathlib import Path

from alembic.script import ScriptDirectory
from sqlalchemy import Column, DateTime, PrimaryKeyConstraint, String, UniqueConstraint

import migrations
from ca.datastore.models import Base


def test_scripts_ship_with_the_package() -> None:
    here = Path(migrations.__file__).parent
    assert (here / "alembic.ini").is_file()
    assert (here / "script.py.mako").is_file()
    assert any(p.name.endswith(".py") and p.name != "__init__.py"
               for p in os.scandir(here / "versions"))


def test_single_head() -> None:
    script = ScriptDirectory.from_config(migrations.alembic_config("sqlite:///unused"))
    assert len(script.get_heads()) == 1, script.get_heads()


# InnoDB keys are at most 3072 bytes: 768 characters of utf8mb4.
MARIADB_MAX_INDEX_CHARS = 768


def test_models_are_portable() -> None:
    for table in Base.metadata.sorted_tables:
        for column in table.columns:
            # Times are unix seconds: a DateTime would be naive on MariaDB and SQLite.
            assert not isinstance(column.type, DateTime), f"{table.name}.{column.name}"
        indexed: list[tuple[str, Column[object], int | None]] = []
        for index in table.indexes:
            prefix = index.dialect_options["mysql"]["length"]
            for column in index.columns:
                length = prefix.get(column.name) if isinstance(prefix, dict) else prefix
                indexed.append((index.name or "", column, length))
        for constraint in table.constraints:
            if isinstance(constraint, PrimaryKeyConstraint | UniqueConstraint):
                indexed += [(constraint.name or "", c, None) for c in constraint.columns]
        for name, column, prefix in indexed:
            if isinstance(column.type, String):
                chars = prefix or column.type.length
                assert chars is not None and chars <= MARIADB_MAX_INDEX_CHARS, (
                    f"{table.name}.{column.name} in {name}: {chars} characters")
