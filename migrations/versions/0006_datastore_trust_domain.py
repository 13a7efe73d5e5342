"""The database records its trust domain: a server of another one refuses to start.

Revision ID: 0006
Revises: 0005

A new table of facts about the database, ``datastore_info`` (name -> value). Its
``trust_domain`` row names the trust domain the database belongs to. An existing
database gets it from its CA slots: an X.509 slot's certificate carries the trust
domain as its URI SAN (X509-SVID §4.1: a signing certificate's SPIFFE ID is the
trust domain's). The oldest slot decides, should a database already hold slots of
two trust domains. A database without slots gets the row at the next server start.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from cryptography import x509

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TRUST_DOMAIN = "trust_domain"


def _trust_domain_of(der: bytes) -> str | None:
    try:
        cert = x509.load_der_x509_certificate(der)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.lower().startswith("spiffe://"):
            name = uri[len("spiffe://"):].split("/", 1)[0]
            if name:
                return name
    return None


def upgrade() -> None:
    info = op.create_table(
        "datastore_info",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.String(length=255), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_datastore_info")),
    )
    ca_keys = sa.table("ca_keys", sa.column("kind", sa.String), sa.column("id", sa.String),
                       sa.column("certificate", sa.LargeBinary),
                       sa.column("created_at", sa.BigInteger))
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(ca_keys.c.certificate)
        .where(ca_keys.c.kind == "x509", ca_keys.c.certificate.is_not(None))
        .order_by(ca_keys.c.created_at, ca_keys.c.id)
    ).all()  # a handful of rows; read them all before writing on this connection
    for (der,) in rows:
        name = _trust_domain_of(bytes(der))
        if name is not None:
            op.bulk_insert(info, [{"name": TRUST_DOMAIN, "value": name}])
            break


def downgrade() -> None:
    op.drop_table("datastore_info")
