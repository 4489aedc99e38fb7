"""SQL storage of audit records (SQLite or PostgreSQL through SQLAlchemy's async engine)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any, TypedDict

from sqlalchemy import (
    Column,
    DateTime,
    Dialect,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    event,
    func,
    inspect,
    select,
    tuple_,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeDecorator

from audit.record import AuditRecord


class AuditStoreError(Exception):
    """The audit store could not read or write; callers fail closed on it."""


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on every backend.

    SQLite keeps naive text that sorts in time order; PostgreSQL keeps `timestamptz`.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = as_utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def as_utc(value: datetime) -> datetime:
    """Naive datetimes (e.g. a CLI `--since 2025-01-01`) are read as UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = MetaData()

audit_records = Table(
    "audit_records",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("ts", UTCDateTime(), nullable=False),
    Column("schema_version", Integer, nullable=False),
    Column("instance", String(255), nullable=False),
    Column("user", String(255)),
    Column("tenant", String(255)),
    Column("agent", String(255)),
    Column("upstream", String(255), nullable=False),
    Column("tool", String(255), nullable=False),
    Column("action", String(64), nullable=False),
    Column("effect", String(32)),
    Column("status", String(32)),
    Column("prev_hash", String(128)),
    Column("hash", String(128)),
    Column("record", Text, nullable=False),
    Index("ix_audit_records_ts_id", "ts", "id"),
    Index("ix_audit_records_user_ts", "user", "ts", "id"),
    Index("ix_audit_records_tool_ts", "tool", "ts", "id"),
    Index("ix_audit_records_effect_ts", "effect", "ts", "id"),
    Index("ix_audit_records_status_ts", "status", "ts", "id"),
)


class RecordFilters(TypedDict, total=False):
    """Export filters: `since` inclusive, `until` exclusive; the rest are exact matches."""

    since: datetime | None
    until: datetime | None
    user: str | None
    tool: str | None
    effect: str | None
    status: str | None
    batch: int


def safe_url(url: str) -> str:
    """The URL with any password masked, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


def _row(record: AuditRecord) -> dict[str, Any]:
    doc = record.to_json()
    return {
        "id": record.id,
        "ts": record.ts,
        "schema_version": record.schema_version,
        "instance": record.instance,
        "user": record.user,
        "tenant": record.tenant,
        "agent": record.agent,
        "upstream": record.upstream,
        "tool": record.tool,
        "action": record.action,
        "effect": record.effect,
        "status": record.status,
        "prev_hash": record.prev_hash,
        "hash": record.hash,
        "record": json.dumps(doc, ensure_ascii=False, separators=(",", ":"), allow_nan=False),
    }


def _on_sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
    finally:
        cur.close()


class AuditStore:
    """One engine per process; every write is one transaction, every read a short one."""

    def __init__(self, engine: AsyncEngine, url: str) -> None:
        self._engine: AsyncEngine | None = engine
        self.url = safe_url(url)

    @classmethod
    async def open(cls, url: str, *, create: bool = True) -> AuditStore:
        """Connect and create the table if missing. SQLite runs in WAL with synchronous=FULL.

        With `create=False` (readers such as export) a missing database or table is an error,
        so a mistyped URL is not mistaken for an empty audit trail.
        """
        where = safe_url(url)
        try:
            engine = create_async_engine(url)
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            raise AuditStoreError(f"audit store {where}: open failed: {_describe(exc)}") from exc
        if engine.dialect.name == "sqlite":
            path = engine.url.database
            on_disk = bool(path) and path != ":memory:"
            if not create and on_disk and not await asyncio.to_thread(os.path.exists, str(path)):
                await engine.dispose()
                raise AuditStoreError(f"audit store {where}: no such database file")
            event.listen(engine.sync_engine, "connect", _on_sqlite_connect)
        store = cls(engine, url)
        try:
            async with engine.begin() as conn:
                if create:
                    await conn.run_sync(metadata.create_all)
                    return store
                exists = await conn.run_sync(lambda c: inspect(c).has_table(audit_records.name))
        except _DB_ERRORS as exc:
            await engine.dispose()
            raise store._error("open", exc) from exc
        if not exists:
            await engine.dispose()
            raise AuditStoreError(f"audit store {where} has no {audit_records.name} table")
        return store

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise AuditStoreError(f"audit store {self.url} is closed")
        return self._engine

    async def write_many(self, records: Sequence[AuditRecord]) -> None:
        """Insert all records in one transaction: all are committed, or none and an error."""
        if not records:
            return
        rows = [_row(r) for r in records]
        try:
            async with self.engine.begin() as conn:
                await conn.execute(audit_records.insert(), rows)
        except _DB_ERRORS as exc:
            raise self._error(f"writing {len(rows)} record(s)", exc) from exc

    async def iter_records(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        user: str | None = None,
        tool: str | None = None,
        effect: str | None = None,
        status: str | None = None,
        batch: int = 1000,
    ) -> AsyncIterator[AuditRecord]:
        """Records in (ts, id) order, `batch` rows per query (keyset pagination).

        Memory stays constant, and no connection or transaction is held between pages, so a
        slow or abandoned consumer never pins a database snapshot. Every record committed
        before the call started is included.
        """
        if batch < 1:
            raise ValueError("batch must be at least 1")
        t = audit_records.c
        conds: list[ColumnElement[bool]] = []
        if since is not None:
            conds.append(t.ts >= as_utc(since))
        if until is not None:
            conds.append(t.ts < as_utc(until))
        for col, value in ((t.user, user), (t.tool, tool), (t.effect, effect), (t.status, status)):
            if value is not None:
                conds.append(col == value)
        base = select(t.ts, t.id, t.record).order_by(t.ts, t.id).limit(batch)
        last: tuple[datetime, str] | None = None
        while True:
            query = base.where(*conds)
            if last is not None:
                query = query.where(tuple_(t.ts, t.id) > tuple_(*last))
            try:
                async with self.engine.connect() as conn:
                    rows = (await conn.execute(query)).all()
            except _DB_ERRORS as exc:
                raise self._error("reading records", exc) from exc
            for row in rows:
                yield AuditRecord.from_json(json.loads(row.record))
            if len(rows) < batch:
                return
            last = (rows[-1].ts, rows[-1].id)

    async def count(self) -> int:
        try:
            async with self.engine.connect() as conn:
                return int((await conn.execute(select(func.count()).select_from(audit_records))).scalar_one())
        except _DB_ERRORS as exc:
            raise self._error("counting records", exc) from exc

    async def ping(self) -> None:
        """Round trip to the database, for readiness checks."""
        try:
            async with self.engine.connect() as conn:
                await conn.execute(select(1))
        except _DB_ERRORS as exc:
            raise self._error("ping", exc) from exc

    async def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.dispose()

    def _error(self, what: str, exc: BaseException) -> AuditStoreError:
        return AuditStoreError(f"audit store {self.url}: {what} failed: {_describe(exc)}")


_DB_ERRORS = (SQLAlchemyError, OSError, TimeoutError)


def _describe(exc: BaseException) -> str:
    """The driver's own message, without the SQL text and parameters SQLAlchemy appends."""
    orig = getattr(exc, "orig", None)
    source = orig if isinstance(orig, BaseException) else exc
    lines = str(source).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > 300:
        text = text[:300] + "..."
    return f"{type(source).__name__}: {text}" if text else type(source).__name__
