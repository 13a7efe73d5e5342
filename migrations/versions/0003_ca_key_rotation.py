"""CA key rotation: which server owns a slot, when it was active, what it signed.

Revision ID: 0003
Revises: 0002

- ``owner``: the server instance that holds the private key (each server of an HA
  pair has its own CA key; rotation only ever touches its own slots);
- ``not_before``, ``activated_at``, ``deactivated_at``: the rotation timeline;
- ``signed_until``: the latest notAfter of anything the slot signed, so an old
  authority leaves the bundle once all of it has expired.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("ca_keys") as batch:
        batch.add_column(sa.Column("owner", sa.String(length=64), nullable=False,
                                   server_default=""))
        batch.add_column(sa.Column("not_before", sa.BigInteger(), nullable=False,
                                   server_default="0"))
        batch.add_column(sa.Column("activated_at", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("deactivated_at", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("signed_until", sa.BigInteger(), nullable=False,
                                   server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("ca_keys") as batch:
        batch.drop_column("signed_until")
        batch.drop_column("deactivated_at")
        batch.drop_column("activated_at")
        batch.drop_column("not_before")
        batch.drop_column("owner")
