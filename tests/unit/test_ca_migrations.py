"""migrations/: upgrade head, no drift against the models, downgrade base leaves nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

import migrations
from ca.datastore.models import Base


def test_up_check_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'm.sqlite3'}"
    monkeypatch.chdir("/")  # nothing may depend on the working directory
    migrations.upgrade(url)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(ctx, Base.metadata) == []
        assert set(inspect(engine).get_table_names()) >= {
            "registration_entries", "entry_selectors", "entry_dns_names",
            "entry_federates_with", "attested_nodes", "node_selectors", "join_tokens",
            "bundles", "ca_keys", "change_events", "alembic_version"}
        migrations.downgrade(url)
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()


def test_scripts_ship_with_the_package() -> None:
    here = Path(migrations.__file__).parent
    assert (here / "alembic.ini").is_file()
    assert (here / "script.py.mako").is_file()
    assert any(p.name.endswith(".py") and p.name != "__init__.py"
               for p in os.scandir(here / "versions"))
