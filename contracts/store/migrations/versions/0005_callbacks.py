"""qvq_callbacks: one durable delivery per terminal event POSTed to a job's callback_url, with its tries.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "qvq_callbacks",
        sa.Column("event_id", sa.String(200), primary_key=True),
        sa.Column("task_id", sa.String(128), nullable=False, index=True),
        sa.Column("run", sa.Integer, nullable=False),
        sa.Column("tenant", sa.String(128)),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("event", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_status_code", sa.Integer),
        sa.Column("last_error", sa.Text),
        sa.Column("attempt_log", sa.JSON, nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), index=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True)),
        sa.UniqueConstraint("task_id", "run", name="uq_qvq_callbacks_task_run"),
    )


def downgrade() -> None:
    op.drop_table("qvq_callbacks")
