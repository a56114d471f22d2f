"""Alembic environment: always driven from code (contracts.store.schema.upgrade), with a live connection."""

from __future__ import annotations

from alembic import context

from contracts.store.tables import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True,
                  transaction_per_migration=True)
with context.begin_transaction():
    context.run_migrations()
