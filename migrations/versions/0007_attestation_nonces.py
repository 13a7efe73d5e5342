"""Attestation nonces: the challenges of the x509pop and sshpop node attestors.

Revision ID: 0007
Revises: 0006

One row per nonce the server issued (GetAttestationChallenge) and no agent has
answered yet: the SHA-256 of the nonce, the attestor it is for, and when it
expires. Answering deletes the row, so a nonce is good once across every worker
process and every server on the database (docs/internals.md, "Challenge nonces").
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "attestation_nonces",
        sa.Column("nonce_sha256", sa.String(length=64), nullable=False),
        sa.Column("attestor", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("nonce_sha256", name=op.f("pk_attestation_nonces")),
    )
    op.create_index(op.f("ix_attestation_nonces_expires_at"), "attestation_nonces",
                    ["expires_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_attestation_nonces_expires_at"), table_name="attestation_nonces")
    op.drop_table("attestation_nonces")
