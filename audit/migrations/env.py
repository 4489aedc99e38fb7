"""Alembic environment: runs on the connection `audit.migrations.upgrade` hands over."""

from __future__ import annotations

from alembic import context

from audit.migrations import VERSION_TABLE

connection = context.config.attributes["connection"]
context.configure(connection=connection, version_table=VERSION_TABLE)
with context.begin_transaction():
    context.run_migrations()
