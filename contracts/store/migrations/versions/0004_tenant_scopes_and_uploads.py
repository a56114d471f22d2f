"""Tenant walls: idempotency keys unique per tenant (qvq_tasks.idempotency_scope), and qvq_uploads (images
uploaded over HTTP, each bound to the tenant that uploaded it, deleted after a retention period).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

#: Names for SQLite's unnamed constraints, so batch mode can find the one to drop.
_NAMING = {"uq": "uq_%(table_name)s_%(column_0_name)s"}


def upgrade() -> None:
    old_unique = [
        constraint["name"] or "uq_qvq_tasks_idempotency_key"
        for constraint in sa.inspect(op.get_bind()).get_unique_constraints("qvq_tasks")
        if constraint["column_names"] == ["idempotency_key"]
    ]
    with op.batch_alter_table("qvq_tasks", naming_convention=_NAMING) as batch:
        batch.add_column(sa.Column("idempotency_scope", sa.String(400)))
        for name in old_unique:  # SQLite rebuilds the table without it anyway when it is not reflected
            batch.drop_constraint(name, type_="unique")
        batch.create_index("ix_qvq_tasks_idempotency_key", ["idempotency_key"])
        batch.create_unique_constraint("uq_qvq_tasks_idempotency_scope", ["idempotency_scope"])
    op.execute(sa.text(
        "UPDATE qvq_tasks SET idempotency_scope = COALESCE(tenant, '') || '/' || idempotency_key "
        "WHERE idempotency_key IS NOT NULL"))
    op.create_table(
        "qvq_uploads",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(128), index=True),
        sa.Column("filename", sa.String(256)),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("bytes", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False, index=True),
    )


def downgrade() -> None:
    op.drop_table("qvq_uploads")
    with op.batch_alter_table("qvq_tasks") as batch:
        batch.drop_constraint("uq_qvq_tasks_idempotency_scope", type_="unique")
        batch.drop_index("ix_qvq_tasks_idempotency_key")
        batch.drop_column("idempotency_scope")
        batch.create_unique_constraint("qvq_tasks_idempotency_key_key", ["idempotency_key"])
