"""Entry owner: which controller keeps an entry (the Kubernetes registration controller).

Revision ID: 0004
Revises: 0003

``owner`` is NULL for entries an operator made, and a stable key such as
``k8s/<cluster>/<pod-uid>/<template>`` for entries a controller keeps. It is unique:
two controllers (two servers of an HA pair, or a restarted one) can never both
create the entry of one pod and template; the second insert fails and re-reads.
NULLs never clash under a unique index on SQLite, PostgreSQL and MariaDB alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("registration_entries") as batch:
        batch.add_column(sa.Column("owner", sa.String(length=512), nullable=True))
        batch.create_unique_constraint("uq_registration_entries_owner", ["owner"])


def downgrade() -> None:
    with op.batch_alter_table("registration_entries") as batch:
        batch.drop_constraint("uq_registration_entries_owner", type_="unique")
        batch.drop_column("owner")
