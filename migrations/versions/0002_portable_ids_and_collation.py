"""Portable schema: 64-bit autoincrement ids; binary utf8mb4 collation on MariaDB/MySQL.

- Change events and child rows (selectors, DNS names, federated trust domains)
  churn with every entry write; a 32-bit id runs out after about two billion
  changes, which a busy cluster's registration controller can reach. SQLite's
  INTEGER PRIMARY KEY is already 64-bit (and only that exact type autoincrements),
  so nothing changes there.
- MariaDB's default utf8mb4 collation compares case- and accent-insensitively:
  ``spiffe://example.org/Web`` would equal ``.../web`` in a lookup and collide in a
  primary key. SPIFFE IDs, selectors and token ids are compared byte for byte
  everywhere else, so every table, and the database default (for tables later
  revisions create), becomes ``utf8mb4_bin``.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

AUTOINCREMENT_TABLES = (
    "change_events",
    "entry_selectors",
    "entry_dns_names",
    "entry_federates_with",
    "node_selectors",
)


def _set_id_type(bind: sa.Connection, type_name: str) -> None:
    dialect = bind.dialect.name
    for table in AUTOINCREMENT_TABLES:
        if dialect == "postgresql":
            op.execute(f"ALTER TABLE {table} ALTER COLUMN id TYPE {type_name}")
            seq = bind.execute(
                sa.text("SELECT pg_get_serial_sequence(:t, 'id')"), {"t": table}
            ).scalar()
            if seq:
                op.execute(f"ALTER SEQUENCE {seq} AS {type_name}")
        elif dialect in ("mysql", "mariadb"):
            op.execute(f"ALTER TABLE {table} MODIFY id {type_name} NOT NULL AUTO_INCREMENT")


def _set_collation(bind: sa.Connection, collation: str) -> None:
    op.execute(f"ALTER DATABASE CHARACTER SET utf8mb4 COLLATE {collation}")
    inspector = sa.inspect(bind)
    tables = [t for t in inspector.get_table_names() if t != "alembic_version"]
    # MariaDB refuses to change the collation of a column a foreign key uses, even
    # with foreign_key_checks off (error 1833): drop the keys, convert, re-add them.
    foreign_keys = [(t, fk) for t in tables for fk in inspector.get_foreign_keys(t)]
    for table, fk in foreign_keys:
        op.drop_constraint(fk["name"], table, type_="foreignkey")
    for table in tables:
        op.execute(f"ALTER TABLE `{table}` CONVERT TO CHARACTER SET utf8mb4 COLLATE {collation}")
    for table, fk in foreign_keys:
        op.create_foreign_key(
            fk["name"], table, fk["referred_table"], fk["constrained_columns"],
            fk["referred_columns"], **fk.get("options", {}),
        )


def upgrade() -> None:
    bind = op.get_bind()
    _set_id_type(bind, "BIGINT")
    if bind.dialect.name in ("mysql", "mariadb"):
        _set_collation(bind, "utf8mb4_bin")


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name in ("mysql", "mariadb"):
        default = bind.execute(sa.text(
            "SELECT DEFAULT_COLLATE_NAME FROM information_schema.CHARACTER_SETS "
            "WHERE CHARACTER_SET_NAME = 'utf8mb4'"
        )).scalar()
        _set_collation(bind, str(default or "utf8mb4_general_ci"))
    # Fails, as it must, if an id already needs 64 bits.
    _set_id_type(bind, "INTEGER")
