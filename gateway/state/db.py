"""The state database shared by replicas: one engine and one metadata for every table.

Budget usage, API keys (here); approvals, pins, call ids, tasks and session taint (defined
beside the code that owns them, on this metadata).

SQLite (WAL) on one machine, PostgreSQL when several replicas run. The engine is created once
at start-up. SQLite state uses `synchronous=NORMAL`: a process crash loses nothing, a power
loss may lose the last few commits (budget counters only; the audit trail is stricter).
"""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, DateTime, MetaData, String, Table, event, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from audit.sqlite_thread import SQLiteThread, sqlite_file
from audit.store import safe_url
from gateway.errors import ConfigError

metadata = MetaData()

STATE_ERRORS: tuple[type[BaseException], ...] = (SQLAlchemyError, sqlite3.Error, OSError)
"""What a state DB operation raises when the database is unreachable or failing: SQLAlchemy's
errors, the SQLite writer thread's, and the socket errors asyncpg lets through while PostgreSQL
restarts (a refused connection is an `OSError`, not a `SQLAlchemyError`). Catch this, not a part."""
_PG_LOCK = 0x62617374_73746174  # "bast" "stat": the advisory lock that serialises creating the tables

api_keys_table = Table(
    "bastion_api_keys",
    metadata,
    Column("prefix", String(32), primary_key=True),
    Column("sha256", String(64), nullable=False),
    Column("sub", String(512), nullable=False),
    Column("attributes", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True)),
    Column("revoked_at", DateTime(timezone=True)),
    Column("description", String(512)),
)
"""API keys of service agents (gateway.identity.apikeys): hashes only."""

budget_usage = Table(
    "bastion_budget_usage",
    metadata,
    Column("budget", String(128), primary_key=True),
    Column("subject", String(512), primary_key=True),
    Column("window_start", BigInteger, primary_key=True, autoincrement=False),
    Column("used", BigInteger, nullable=False),
)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


async def open_state(url: str) -> AsyncEngine:
    """Create the engine and the tables once; a bad URL stops start-up naming `state.url`."""
    try:
        engine = create_async_engine(url, pool_pre_ping=False)
    except (SQLAlchemyError, ValueError, ImportError) as exc:
        raise ConfigError(f"state.url: cannot use {safe_url(url)}: {exc}") from exc
    if engine.dialect.name == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    try:
        async with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                # Replicas starting together on a new database would race to create the same
                # tables (one fails on PostgreSQL's catalog): one at a time.
                await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK})
            await conn.run_sync(metadata.create_all)
    except (SQLAlchemyError, OSError) as exc:
        await engine.dispose()
        raise ConfigError(f"state.url: cannot open {safe_url(url)}: {type(exc).__name__}: {exc}") from exc
    return engine


async def sqlite_writer(engine: AsyncEngine) -> SQLiteThread | None:
    """A group-committing writer thread for a state DB in an SQLite file (None otherwise): the
    per-call writes (budget charges) go through it instead of one aiosqlite transaction each."""
    path = sqlite_file(engine)
    if path is None:
        return None
    try:
        return await asyncio.to_thread(SQLiteThread, path, synchronous="NORMAL", name="state-sqlite")
    except sqlite3.Error as exc:
        raise ConfigError(f"state.url: cannot open {safe_url(str(engine.url))}: {exc}") from exc
