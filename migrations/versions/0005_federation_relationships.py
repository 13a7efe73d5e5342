"""Federation relationships: foreign trust domains and their bundle endpoints.

Revision ID: 0005
Revises: 0004

One row per foreign trust domain (SPIFFE Federation §5.3: trust domain, endpoint URL,
profile, and for https_spiffe the endpoint's SPIFFE ID). The bootstrap bundle is not
kept here: it is stored as that trust domain's row of ``bundles``, which the
refresher then replaces with what it fetches.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "federation_relationships",
        sa.Column("trust_domain", sa.String(length=255), nullable=False),
        sa.Column("bundle_endpoint_url", sa.String(length=2048), nullable=False),
        sa.Column("profile", sa.String(length=16), nullable=False),
        sa.Column("endpoint_spiffe_id", sa.String(length=2048), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("trust_domain", name=op.f("pk_federation_relationships")),
    )


def downgrade() -> None:
    op.drop_table("federation_relationships")
