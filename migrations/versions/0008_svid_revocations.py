"""SVID revocations: serials, SPIFFE IDs, JWT ids and key ids an operator revoked.

Revision ID: 0008
Revises: 0007

One row per revocation; its autoincrement id is the revocation revision agents
sync by (docs/internals.md, "Revocations"). Revoking by SPIFFE ID records a
notBefore cutoff rather than every issued serial, so issuance writes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "svid_revocations",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                  autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("value", sa.String(length=2048), nullable=False),
        sa.Column("not_before_max", sa.BigInteger(), nullable=True),
        sa.Column("expires_at", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_svid_revocations")),
    )
    op.create_index("ix_svid_revocations_kind_value", "svid_revocations", ["kind", "value"],
                    mysql_length={"value": 255})
    op.create_index(op.f("ix_svid_revocations_expires_at"), "svid_revocations",
                    ["expires_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_svid_revocations_expires_at"), table_name="svid_revocations")
    op.drop_index("ix_svid_revocations_kind_value", table_name="svid_revocations")
    op.drop_table("svid_revocations")
