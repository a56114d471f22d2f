"""qvq_tasks.retry_base: the attempts made before the last manual retry (the attempt cap counts from it).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("qvq_tasks") as batch:
        batch.add_column(sa.Column("retry_base", sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("qvq_tasks") as batch:
        batch.drop_column("retry_base")
