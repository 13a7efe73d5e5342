"""Initial schema: entries, nodes, join tokens, bundles, CA keys, change events.

Revision ID: 0001
Revises:
Create Date: 2026-11-26 07:31:33.921634
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "attested_nodes",
        sa.Column("spiffe_id", sa.String(length=512), nullable=False),
        sa.Column("attestor", sa.String(length=64), nullable=False),
        sa.Column("serial", sa.String(length=64), nullable=False),
        sa.Column("new_serial", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.Column("banned", sa.Boolean(), nullable=False),
        sa.Column("can_reattest", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("spiffe_id", name=op.f("pk_attested_nodes")),
    )
    op.create_table(
        "bundles",
        sa.Column("trust_domain", sa.String(length=255), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("trust_domain", name=op.f("pk_bundles")),
    )
    op.create_table(
        "ca_keys",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("key_id", sa.String(length=255), nullable=False),
        sa.Column("public_key", sa.LargeBinary(), nullable=False),
        sa.Column("certificate", sa.LargeBinary(), nullable=True),
        sa.Column("not_after", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ca_keys")),
    )
    op.create_table(
        "change_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("entry_id", sa.String(length=36), nullable=False),
        sa.Column("at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_change_events")),
    )
    op.create_table(
        "join_tokens",
        sa.Column("token_id", sa.String(length=64), nullable=False),
        sa.Column("secret_sha256", sa.String(length=64), nullable=False),
        sa.Column("alias", sa.String(length=2048), nullable=True),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.Column("used_at", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("token_id", name=op.f("pk_join_tokens")),
    )
    op.create_table(
        "registration_entries",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("spiffe_id", sa.String(length=2048), nullable=False),
        sa.Column("parent_id", sa.String(length=2048), nullable=False),
        sa.Column("selector_hash", sa.String(length=64), nullable=False),
        sa.Column("x509_svid_ttl", sa.Integer(), nullable=False),
        sa.Column("jwt_svid_ttl", sa.Integer(), nullable=False),
        sa.Column("hint", sa.String(length=1024), nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("downstream", sa.Boolean(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_registration_entries")),
        sa.UniqueConstraint("selector_hash", name=op.f("uq_registration_entries_selector_hash")),
    )
    with op.batch_alter_table("registration_entries", schema=None) as batch_op:
        batch_op.create_index(
            "ix_registration_entries_parent_id", ["parent_id"], unique=False, mysql_length=255
        )
        batch_op.create_index(
            "ix_registration_entries_spiffe_id", ["spiffe_id"], unique=False, mysql_length=255
        )

    op.create_table(
        "entry_dns_names",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("entry_id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.ForeignKeyConstraint(
            ["entry_id"],
            ["registration_entries.id"],
            name=op.f("fk_entry_dns_names_entry_id_registration_entries"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_entry_dns_names")),
    )
    with op.batch_alter_table("entry_dns_names", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_entry_dns_names_entry_id"), ["entry_id"], unique=False)

    op.create_table(
        "entry_federates_with",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("entry_id", sa.String(length=36), nullable=False),
        sa.Column("trust_domain", sa.String(length=255), nullable=False),
        sa.ForeignKeyConstraint(
            ["entry_id"],
            ["registration_entries.id"],
            name=op.f("fk_entry_federates_with_entry_id_registration_entries"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_entry_federates_with")),
    )
    with op.batch_alter_table("entry_federates_with", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_entry_federates_with_entry_id"), ["entry_id"], unique=False
        )

    op.create_table(
        "entry_selectors",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("entry_id", sa.String(length=36), nullable=False),
        sa.Column("type", sa.String(length=255), nullable=False),
        sa.Column("value", sa.String(length=1024), nullable=False),
        sa.ForeignKeyConstraint(
            ["entry_id"],
            ["registration_entries.id"],
            name=op.f("fk_entry_selectors_entry_id_registration_entries"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_entry_selectors")),
    )
    with op.batch_alter_table("entry_selectors", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_entry_selectors_entry_id"), ["entry_id"], unique=False)

    op.create_table(
        "node_selectors",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("spiffe_id", sa.String(length=512), nullable=False),
        sa.Column("type", sa.String(length=255), nullable=False),
        sa.Column("value", sa.String(length=1024), nullable=False),
        sa.ForeignKeyConstraint(
            ["spiffe_id"],
            ["attested_nodes.spiffe_id"],
            name=op.f("fk_node_selectors_spiffe_id_attested_nodes"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_node_selectors")),
    )
    with op.batch_alter_table("node_selectors", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_node_selectors_spiffe_id"), ["spiffe_id"], unique=False
        )


def downgrade() -> None:
    # Dropping a table drops its indexes. Dropping an index first fails on MariaDB
    # when a foreign key uses it (error 1553), so children go first, then parents.
    op.drop_table("node_selectors")
    op.drop_table("entry_selectors")
    op.drop_table("entry_federates_with")
    op.drop_table("entry_dns_names")
    op.drop_table("registration_entries")
    op.drop_table("join_tokens")
    op.drop_table("change_events")
    op.drop_table("ca_keys")
    op.drop_table("bundles")
    op.drop_table("attested_nodes")
