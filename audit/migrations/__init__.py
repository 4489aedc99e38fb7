"""Alembic migrations of the audit store, applied by `AuditStore.open`.

The version is kept in its own table so the audit schema can share a database with other
Bastion tables (or other applications) that also use Alembic.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text

VERSION_TABLE = "bastion_audit_alembic_version"
_HERE = Path(__file__).resolve().parent
log = logging.getLogger(__name__)
_PG_LOCK = 0x6261_7564  # any constant: serialises replicas that migrate an empty database together


def _config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_HERE))
    cfg.set_main_option("path_separator", "os")
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    revision = ScriptDirectory.from_config(_config()).get_current_head()
    assert revision is not None
    return revision


def current(connection: Connection) -> str | None:
    ctx = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return ctx.get_current_revision()


def upgrade(connection: Connection) -> None:
    """Bring the schema to the newest revision inside the caller's transaction."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK})
    before = current(connection)
    command.upgrade(_config(connection), "head")
    after = current(connection)
    if after != before:
        log.info("audit store schema upgraded from revision %s to %s", before or "(empty)", after)
