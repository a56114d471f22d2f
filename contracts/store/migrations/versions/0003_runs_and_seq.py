"""qvq_tasks.run (a manual retry starts run 1, 2, ...) and qvq_tasks.last_seq (the highest event seq
known to the store, so seq never goes back even when Redis restarts without persistence).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("qvq_tasks") as batch:
        batch.add_column(sa.Column("run", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("last_seq", sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("qvq_tasks") as batch:
        batch.drop_column("last_seq")
        batch.drop_column("run")
