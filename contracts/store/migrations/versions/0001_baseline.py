"""The schema before migrations: qvq_tasks and qvq_usage as the first release created them.

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "qvq_tasks",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("tenant", sa.String(128), index=True),
        sa.Column("conversation_id", sa.String(128), index=True),
        sa.Column("idempotency_key", sa.String(256), unique=True),
        sa.Column("request", sa.JSON, nullable=False),
        sa.Column("reasoning", sa.Text),
        sa.Column("answer", sa.Text),
        sa.Column("error_code", sa.String(64)),
        sa.Column("error_message", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("images", sa.JSON),
        sa.Column("usage", sa.JSON),
        sa.Column("cost", sa.JSON),
        sa.Column("timings", sa.JSON),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
    )
    op.create_table(
        "qvq_usage",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("task_id", sa.String(128), sa.ForeignKey("qvq_tasks.id"), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("tenant", sa.String(128)),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("total_tokens", sa.Integer, nullable=False),
        sa.Column("input_cost", sa.Numeric(18, 6), nullable=False),
        sa.Column("output_cost", sa.Numeric(18, 6), nullable=False),
        sa.Column("total_cost", sa.Numeric(18, 6), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("task_id", "attempt", name="uq_qvq_usage_task_attempt"),
    )


def downgrade() -> None:
    op.drop_table("qvq_usage")
    op.drop_table("qvq_tasks")
