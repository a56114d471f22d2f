"""The usage ledger: every billed attempt (failed and cancelled ones too) with its run, how it ended,
whether its tokens are our estimate, and the prices used; an index for per-tenant budget sums.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("qvq_usage") as batch:
        batch.add_column(sa.Column("run", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("outcome", sa.String(16)))
        batch.add_column(sa.Column("estimated", sa.Boolean, nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("input_price", sa.Numeric(18, 6)))
        batch.add_column(sa.Column("output_price", sa.Numeric(18, 6)))
        batch.create_index("ix_qvq_usage_tenant_created_at", ["tenant", "created_at"])


def downgrade() -> None:
    with op.batch_alter_table("qvq_usage") as batch:
        batch.drop_index("ix_qvq_usage_tenant_created_at")
        for name in ("output_price", "input_price", "estimated", "outcome", "run"):
            batch.drop_column(name)
