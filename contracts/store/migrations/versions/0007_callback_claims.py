"""Callback deliveries get their own single-flight claim: `claimed_until`, set when a try starts and
cleared when it is recorded, so a redelivery asked while a try is in flight does not start a second POST.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("qvq_callbacks") as batch:
        batch.add_column(sa.Column("claimed_until", sa.DateTime(timezone=True)))


def downgrade() -> None:
    with op.batch_alter_table("qvq_callbacks") as batch:
        batch.drop_column("claimed_until")
