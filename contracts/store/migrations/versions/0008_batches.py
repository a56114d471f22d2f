"""Batches: the `qvq_batches` table, and on each task the batch it belongs to (`batch_id`, `batch_item`:
its place in the batch's stable order) and, for a cached answer, the task it came from (`cached_from`).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "qvq_batches",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("tenant", sa.String(128), index=True),
        sa.Column("request", sa.JSON, nullable=False),
        sa.Column("items", sa.Integer, nullable=False),
        sa.Column("listed", sa.Boolean, nullable=False),
        sa.Column("estimate", sa.JSON),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True)),
        sa.Column("cancelled_at", sa.DateTime(timezone=True)),
    )
    with op.batch_alter_table("qvq_tasks") as batch:
        batch.add_column(sa.Column("batch_id", sa.String(128)))
        batch.add_column(sa.Column("batch_item", sa.Integer))
        batch.add_column(sa.Column("cached_from", sa.String(128)))
        batch.create_index("ix_qvq_tasks_batch_item", ["batch_id", "batch_item"])
        batch.create_index("ix_qvq_tasks_batch_status", ["batch_id", "status"])


def downgrade() -> None:
    with op.batch_alter_table("qvq_tasks") as batch:
        batch.drop_index("ix_qvq_tasks_batch_status")
        batch.drop_index("ix_qvq_tasks_batch_item")
        batch.drop_column("cached_from")
        batch.drop_column("batch_item")
        batch.drop_column("batch_id")
    op.drop_table("qvq_batches")
