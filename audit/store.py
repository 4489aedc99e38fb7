"""SQL storage of audit records (SQLite or PostgreSQL through SQLAlchemy's async engine)."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypedDict, Unpack

import orjson
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Dialect,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    delete,
    event,
    func,
    inspect,
    select,
    tuple_,
    update,
)
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeDecorator

from audit import migrations
from audit.chain import GENESIS, Head
from audit.checkpoint import Checkpoint
from audit.record import PENDING, AuditRecord
from audit.sqlite_thread import SQLiteThread, sqlite_file


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
    Column("seq", BigInteger),
    Column("call_id", String(255)),
    Column("protocol", String(16)),
    Index("ix_audit_records_ts_id", "ts", "id"),
    Index("ix_audit_records_user_ts", "user", "ts", "id"),
    Index("ix_audit_records_tool_ts", "tool", "ts", "id"),
    Index("ix_audit_records_effect_ts", "effect", "ts", "id"),
    Index("ix_audit_records_status_ts", "status", "ts", "id"),
    Index("ix_audit_records_call_id", "call_id", "ts", "id"),
    Index("ix_audit_records_upstream_ts", "upstream", "ts", "id"),
    Index("ix_audit_records_agent_ts", "agent", "ts", "id"),
    Index("ux_audit_records_instance_seq", "instance", "seq", unique=True),
)

audit_checkpoints = Table(
    "audit_checkpoints",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("instance", String(255), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(128), nullable=False),
    Column("ts", UTCDateTime(), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("key_id", String(64), nullable=False),
    Column("signature", String(256), nullable=False),
    Index("ix_audit_checkpoints_instance_seq", "instance", "seq"),
)


class RecordFilters(TypedDict, total=False):
    """Export filters: `since` inclusive, `until` exclusive; the rest are exact matches."""

    since: datetime | None
    until: datetime | None
    user: str | None
    tool: str | None
    effect: str | None
    status: str | None
    call_id: str | None
    """Every record of one call: e.g. the decision on a model's tool_use (`llm`) and the tool's
    later execution over MCP share it."""
    protocol: str | None
    agent: str | None
    upstream: str | None
    """The target: the tool server, the model provider's tool namespace, or the A2A agent."""
    contains: str | None
    """A substring of the stored record text (narrows a search by a field that has no index,
    such as a policy id; the caller checks the field itself)."""
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
        "seq": record.seq,
        "call_id": record.call_id,
        "protocol": record.protocol,
        "record": _document(doc),
    }


def _document(doc: dict[str, Any]) -> str:
    """A record's stored text: compact JSON in contract order (orjson; json for integers beyond
    64 bits). Floats may be written differently by the two, but read back as the same value."""
    try:
        return orjson.dumps(doc).decode()
    except (orjson.JSONEncodeError, TypeError):
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _checkpoint_row(cp: Checkpoint) -> dict[str, Any]:
    return {
        "instance": cp.instance,
        "seq": cp.seq,
        "hash": cp.hash,
        "ts": cp.ts,
        "kind": cp.kind,
        "key_id": cp.key_id,
        "signature": cp.signature,
    }


def _conditions(filters: RecordFilters) -> list[ColumnElement[bool]]:
    t = audit_records.c
    conds: list[ColumnElement[bool]] = []
    if (since := filters.get("since")) is not None:
        conds.append(t.ts >= as_utc(since))
    if (until := filters.get("until")) is not None:
        conds.append(t.ts < as_utc(until))
    exact = (
        (t.user, "user"),
        (t.tool, "tool"),
        (t.effect, "effect"),
        (t.status, "status"),
        (t.call_id, "call_id"),
        (t.protocol, "protocol"),
        (t.agent, "agent"),
        (t.upstream, "upstream"),
    )
    for col, key in exact:
        value = filters.get(key)
        if value is not None:
            conds.append(col == value)
    if (text := filters.get("contains")) is not None:
        conds.append(t.record.contains(text, autoescape=True))
    return conds


def _schema_problem(conn: Connection) -> str | None:
    """Why a reader cannot use this database as it is, or None."""
    if not inspect(conn).has_table(audit_records.name):
        return f"has no {audit_records.name} table"
    have, want = migrations.current(conn), migrations.head()
    if have != want:
        return (
            f"has audit schema revision {have or 'none'}, this version needs {want}: "
            "run `bastion audit migrate` (or start Bastion once) to upgrade it"
        )
    return None


@dataclass(frozen=True, slots=True)
class ChainRow:
    """One chained row as stored: the indexed copies and the record document text."""

    id: str
    seq: int
    ts: datetime
    user: str | None
    tool: str
    effect: str | None
    status: str | None
    prev_hash: str | None
    hash: str | None
    record: str
    call_id: str | None
    protocol: str | None


def _on_sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
    finally:
        cur.close()


def _insert_sql(table: Table, columns: Sequence[str]) -> str:
    names = ", ".join(f'"{c}"' for c in columns)
    marks = ", ".join("?" * len(columns))
    return f"INSERT INTO {table.name} ({names}) VALUES ({marks})"  # noqa: S608 (our own names)


_INSERT_COLUMNS = tuple(c.name for c in audit_records.columns)
_INSERT_SQL = _insert_sql(audit_records, _INSERT_COLUMNS)
_COMPLETE_COLUMNS = ("effect", "status", "seq", "prev_hash", "hash", "call_id", "protocol", "record")
"""What completing a pending row rewrites, from the final record (both write paths use it)."""
_COMPLETE_SQL = (
    f"UPDATE audit_records SET {', '.join(f'{c} = ?' for c in _COMPLETE_COLUMNS)} "  # noqa: S608 (our names)
    "WHERE id = ? AND status = 'pending'"
)
_CHECKPOINT_COLUMNS = tuple(c.name for c in audit_checkpoints.columns if c.name != "id")
_CHECKPOINT_SQL = _insert_sql(audit_checkpoints, _CHECKPOINT_COLUMNS)


def _ts_sqlite(value: datetime) -> str:
    """What SQLAlchemy stores for `UTCDateTime` on SQLite, so both paths read and sort alike."""
    return as_utc(value).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")


class AuditStore:
    """One engine per process; every write is one transaction, every read a short one.

    On an SQLite file, `apply` (the writer's hot path) goes through one `SQLiteThread` with a
    raw connection instead: one thread hand-off per batch instead of one per statement.
    """

    def __init__(self, engine: AsyncEngine, url: str, writer: SQLiteThread | None = None) -> None:
        self._engine: AsyncEngine | None = engine
        self._writer = writer
        self.url = safe_url(url)

    @classmethod
    async def open(cls, url: str, *, create: bool = True) -> AuditStore:
        """Connect and migrate the schema to the newest revision (Alembic). SQLite runs in WAL
        with synchronous=FULL.

        With `create=False` (readers such as export and verify) nothing is changed: a missing
        database or table is an error, so a mistyped URL is not mistaken for an empty audit
        trail, and an older schema asks to be migrated first.
        """
        where = safe_url(url)
        try:
            engine = create_async_engine(url)
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            raise AuditStoreError(f"audit store {where}: open failed: {_describe(exc)}") from exc
        path = sqlite_file(engine)
        if engine.dialect.name == "sqlite":
            if not create and path is not None and not await asyncio.to_thread(os.path.exists, path):
                await engine.dispose()
                raise AuditStoreError(f"audit store {where}: no such database file")
            event.listen(engine.sync_engine, "connect", _on_sqlite_connect)
        store = cls(engine, url)
        problem: str | None = None
        try:
            async with engine.begin() as conn:
                if create:
                    await conn.run_sync(migrations.upgrade)
                else:
                    problem = await conn.run_sync(_schema_problem)
        except _DB_ERRORS as exc:
            await engine.dispose()
            raise store._error("open", exc) from exc
        except Exception as exc:  # Alembic raises its own and plain errors for a broken version table
            await engine.dispose()
            raise AuditStoreError(f"audit store {where}: migration failed: {exc}") from exc
        if problem is not None:
            await engine.dispose()
            raise AuditStoreError(f"audit store {where} {problem}")
        if create and path is not None:
            try:
                store._writer = await asyncio.to_thread(
                    SQLiteThread, path, synchronous="FULL", name="audit-sqlite"
                )
            except sqlite3.Error as exc:
                await engine.dispose()
                raise store._error("open", exc) from exc
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

    async def apply(
        self,
        inserts: Sequence[AuditRecord] = (),
        completions: Sequence[AuditRecord] = (),
        checkpoints: Sequence[Checkpoint] = (),
    ) -> None:
        """One transaction: insert records, turn pending rows into their final records, add
        checkpoints. A completion whose pending row is missing fails the whole transaction."""
        if self._writer is not None:
            await self._apply_sqlite(self._writer, inserts, completions, checkpoints)
            return
        try:
            async with self.engine.begin() as conn:
                if inserts:
                    await conn.execute(audit_records.insert(), [_row(r) for r in inserts])
                if completions:
                    await self._complete(conn, completions)
                if checkpoints:
                    await conn.execute(audit_checkpoints.insert(), [_checkpoint_row(c) for c in checkpoints])
        except _DB_ERRORS as exc:
            n = len(inserts) + len(completions)
            raise self._error(f"writing {n} record(s)", exc) from exc

    async def _apply_sqlite(
        self,
        writer: SQLiteThread,
        inserts: Sequence[AuditRecord],
        completions: Sequence[AuditRecord],
        checkpoints: Sequence[Checkpoint],
    ) -> None:
        """`apply` on the raw connection: the rows are built here, the thread only executes."""
        rows = []
        for r in inserts:
            row = _row(r)
            row["ts"] = _ts_sqlite(row["ts"])
            rows.append(tuple(row[c] for c in _INSERT_COLUMNS))
        done = []
        for r in completions:
            row = _row(r)
            done.append((*(row[c] for c in _COMPLETE_COLUMNS), r.id))
        cps = []
        for cp in checkpoints:
            row = _checkpoint_row(cp)
            row["ts"] = _ts_sqlite(row["ts"])
            cps.append(tuple(row[c] for c in _CHECKPOINT_COLUMNS))

        def apply(conn: sqlite3.Connection) -> None:
            if rows:
                conn.executemany(_INSERT_SQL, rows)
            if done:
                changed = conn.executemany(_COMPLETE_SQL, done).rowcount
                if changed != len(done):
                    missing = len(done) - changed
                    raise AuditStoreError(f"{missing} of {len(done)} completed record(s) had no pending row")
            if cps:
                conn.executemany(_CHECKPOINT_SQL, cps)

        try:
            await writer.run(apply)
        except sqlite3.Error as exc:
            raise self._error(f"writing {len(rows) + len(done)} record(s)", exc) from exc

    async def _complete(self, conn: AsyncConnection, records: Sequence[AuditRecord]) -> None:
        t = audit_records.c
        stmt = (
            update(audit_records)
            .where(t.id == bindparam("b_id"), t.status == PENDING)
            .values({c: bindparam(c) for c in _COMPLETE_COLUMNS})
        )
        params = []
        for r in records:
            row = _row(r)
            params.append({"b_id": r.id, **{k: row[k] for k in _COMPLETE_COLUMNS}})
        result = await conn.execute(stmt, params)
        if result.rowcount >= 0 and result.rowcount != len(params):
            missing = len(params) - result.rowcount
            raise AuditStoreError(f"{missing} of {len(params)} completed record(s) had no pending row")

    async def chain_head(self, instance: str) -> tuple[Head, int]:
        """The last chained record of `instance` and the seq of its newest checkpoint (0: none)."""
        t, c = audit_records.c, audit_checkpoints.c
        try:
            async with self.engine.connect() as conn:
                row = (
                    await conn.execute(
                        select(t.seq, t.hash)
                        .where(t.instance == instance, t.seq.is_not(None))
                        .order_by(t.seq.desc())
                        .limit(1)
                    )
                ).first()
                cp = (
                    await conn.execute(select(func.max(c.seq)).where(c.instance == instance))
                ).scalar_one_or_none()
        except _DB_ERRORS as exc:
            raise self._error("reading the chain head", exc) from exc
        head = GENESIS if row is None else Head(int(row.seq), row.hash)
        return head, int(cp or 0)

    async def pending(self, instance: str) -> list[AuditRecord]:
        """Records of `instance` still waiting for their outcome (after a crash: interrupted)."""
        t = audit_records.c
        query = select(t.record).where(t.instance == instance, t.status == PENDING).order_by(t.ts, t.id)
        try:
            async with self.engine.connect() as conn:
                rows = (await conn.execute(query)).all()
        except _DB_ERRORS as exc:
            raise self._error("reading pending records", exc) from exc
        return [AuditRecord.from_json(json.loads(r.record)) for r in rows]

    async def instances(self) -> list[str]:
        """Every instance that has records or checkpoints."""
        t, c = audit_records.c, audit_checkpoints.c
        try:
            async with self.engine.connect() as conn:
                a = (await conn.execute(select(t.instance).distinct())).scalars().all()
                b = (await conn.execute(select(c.instance).distinct())).scalars().all()
        except _DB_ERRORS as exc:
            raise self._error("listing instances", exc) from exc
        return sorted({*a, *b})

    async def checkpoints(self, instance: str | None = None) -> list[Checkpoint]:
        """Checkpoints in the order they were written (one per thousands of records: few)."""
        c = audit_checkpoints.c
        query = select(audit_checkpoints).order_by(c.id)
        if instance is not None:
            query = query.where(c.instance == instance)
        try:
            async with self.engine.connect() as conn:
                rows = (await conn.execute(query)).all()
        except _DB_ERRORS as exc:
            raise self._error("reading checkpoints", exc) from exc
        return [
            Checkpoint(
                instance=r.instance,
                seq=int(r.seq),
                hash=r.hash,
                ts=r.ts,
                kind=r.kind,
                key_id=r.key_id,
                signature=r.signature,
            )
            for r in rows
        ]

    async def iter_chain(self, instance: str, batch: int = 1000) -> AsyncIterator[ChainRow]:
        """The chained rows of `instance` in `seq` order, `batch` per query (constant memory)."""
        t = audit_records.c
        cols = (
            t.id, t.seq, t.ts, t.user, t.tool, t.effect, t.status, t.prev_hash, t.hash, t.record,
            t.call_id, t.protocol,
        )  # fmt: skip
        base = select(*cols).where(t.instance == instance, t.seq.is_not(None)).order_by(t.seq).limit(batch)
        last = -1
        while True:
            try:
                async with self.engine.connect() as conn:
                    rows = (await conn.execute(base.where(t.seq > last))).all()
            except _DB_ERRORS as exc:
                raise self._error("reading the chain", exc) from exc
            for row in rows:
                yield ChainRow(
                    row.id, int(row.seq), row.ts, row.user, row.tool, row.effect, row.status,
                    row.prev_hash, row.hash, row.record, row.call_id, row.protocol,
                )  # fmt: skip
            if len(rows) < batch:
                return
            last = int(rows[-1].seq)

    async def chained_after(self, instance: str, seq: int, limit: int) -> list[tuple[int, str]]:
        """(seq, stored text) of `instance`'s chained records after `seq`, in order, at most
        `limit`: what an audit sink delivers next. One query on the (instance, seq) index."""
        t = audit_records.c
        query = (
            select(t.seq, t.record).where(t.instance == instance, t.seq > seq).order_by(t.seq).limit(limit)
        )
        try:
            async with self.engine.connect() as conn:
                rows = (await conn.execute(query)).all()
        except _DB_ERRORS as exc:
            raise self._error("reading the chain", exc) from exc
        return [(int(r.seq), r.record) for r in rows]

    async def last_seq(self, instance: str) -> int:
        """The seq of `instance`'s newest chained record (0: none)."""
        t = audit_records.c
        try:
            async with self.engine.connect() as conn:
                value = (
                    await conn.execute(select(func.max(t.seq)).where(t.instance == instance))
                ).scalar_one_or_none()
        except _DB_ERRORS as exc:
            raise self._error("reading the chain head", exc) from exc
        return int(value or 0)

    async def unchained(self, limit: int = 100) -> tuple[list[tuple[str, str, str | None, int]], int]:
        """Final rows outside every chain, (id, instance, status, schema_version) of the first
        `limit`, and how many rows are pending."""
        t = audit_records.c
        try:
            async with self.engine.connect() as conn:
                rows = (
                    await conn.execute(
                        select(t.id, t.instance, t.status, t.schema_version)
                        .where(t.seq.is_(None), t.status != PENDING)
                        .order_by(t.ts, t.id)
                        .limit(limit)
                    )
                ).all()
                pending = (await conn.execute(select(func.count()).where(t.status == PENDING))).scalar_one()
        except _DB_ERRORS as exc:
            raise self._error("reading unchained records", exc) from exc
        return [(r.id, r.instance, r.status, int(r.schema_version)) for r in rows], int(pending)

    async def purge_prefix(self, instance: str, upto_seq: int, anchor: Checkpoint | None) -> int:
        """Delete `instance`'s chained records with seq <= `upto_seq`, after writing `anchor`
        (the signed checkpoint at `upto_seq`), in one transaction."""
        t = audit_records.c
        try:
            async with self.engine.begin() as conn:
                if anchor is not None:
                    await conn.execute(audit_checkpoints.insert(), [_checkpoint_row(anchor)])
                result = await conn.execute(
                    delete(audit_records).where(t.instance == instance, t.seq <= upto_seq)
                )
        except _DB_ERRORS as exc:
            raise self._error("purging records", exc) from exc
        return int(result.rowcount)

    async def purge_unchained(self, before: datetime) -> int:
        """Delete completed records older than `before` that were never chained (schema version 1)."""
        t = audit_records.c
        try:
            async with self.engine.begin() as conn:
                result = await conn.execute(
                    delete(audit_records).where(t.seq.is_(None), t.status != PENDING, t.ts < as_utc(before))
                )
        except _DB_ERRORS as exc:
            raise self._error("purging records", exc) from exc
        return int(result.rowcount)

    async def first_kept_seq(self, instance: str, before: datetime) -> int | None:
        """The lowest seq of `instance` whose record is not older than `before` (None: all are)."""
        t = audit_records.c
        query = select(func.min(t.seq)).where(
            t.instance == instance, t.seq.is_not(None), t.ts >= as_utc(before)
        )
        try:
            async with self.engine.connect() as conn:
                value = (await conn.execute(query)).scalar_one_or_none()
        except _DB_ERRORS as exc:
            raise self._error("finding the purge point", exc) from exc
        return None if value is None else int(value)

    async def record_at(self, instance: str, seq: int) -> tuple[str, str | None] | None:
        """(id, hash) of the record at `seq` in `instance`'s chain."""
        t = audit_records.c
        try:
            async with self.engine.connect() as conn:
                row = (
                    await conn.execute(select(t.id, t.hash).where(t.instance == instance, t.seq == seq))
                ).first()
        except _DB_ERRORS as exc:
            raise self._error("reading a record", exc) from exc
        return None if row is None else (row.id, row.hash)

    async def iter_raw(self, **filters: Unpack[RecordFilters]) -> AsyncIterator[str]:
        """The stored JSON text of each record in (ts, id) order: what was hashed, byte for byte."""
        async for row in self._pages(filters):
            yield row.record

    async def iter_records(self, **filters: Unpack[RecordFilters]) -> AsyncIterator[AuditRecord]:
        """Records in (ts, id) order, `batch` rows per query (keyset pagination).

        Memory stays constant, and no connection or transaction is held between pages, so a
        slow or abandoned consumer never pins a database snapshot. Every record committed
        before the call started is included.
        """
        async for row in self._pages(filters):
            yield AuditRecord.from_json(json.loads(row.record))

    async def _pages(self, filters: RecordFilters) -> AsyncIterator[Any]:
        batch = filters.get("batch", 1000)
        if batch < 1:
            raise ValueError("batch must be at least 1")
        t = audit_records.c
        conds = _conditions(filters)
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
                yield row
            if len(rows) < batch:
                return
            last = (rows[-1].ts, rows[-1].id)

    async def page(
        self,
        limit: int,
        before: tuple[datetime, str] | None = None,
        after: tuple[datetime, str] | None = None,
        **filters: Unpack[RecordFilters],
    ) -> list[tuple[datetime, str, str]]:
        """(ts, id, stored text) of up to `limit` records, newest first before the `(ts, id)` key
        `before`, or oldest first after `after` (a live tail). Keyset pagination on the (ts, id)
        indexes: a page costs the same on the millionth record as on the first."""
        t = audit_records.c
        query = select(t.ts, t.id, t.record).where(*_conditions(filters)).limit(limit)
        if after is not None:
            query = query.where(tuple_(t.ts, t.id) > tuple_(as_utc(after[0]), after[1])).order_by(t.ts, t.id)
        else:
            if before is not None:
                query = query.where(tuple_(t.ts, t.id) < tuple_(as_utc(before[0]), before[1]))
            query = query.order_by(t.ts.desc(), t.id.desc())
        try:
            async with self.engine.connect() as conn:
                rows = (await conn.execute(query)).all()
        except _DB_ERRORS as exc:
            raise self._error("reading records", exc) from exc
        return [(r.ts, r.id, r.record) for r in rows]

    async def get(self, record_id: str) -> str | None:
        """One record's stored text by id."""
        t = audit_records.c
        try:
            async with self.engine.connect() as conn:
                row = (await conn.execute(select(t.record).where(t.id == record_id))).first()
        except _DB_ERRORS as exc:
            raise self._error("reading a record", exc) from exc
        return None if row is None else str(row.record)

    async def count(self, **filters: Unpack[RecordFilters]) -> int:
        query = select(func.count()).select_from(audit_records).where(*_conditions(filters))
        try:
            async with self.engine.connect() as conn:
                return int((await conn.execute(query)).scalar_one())
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
        writer, self._writer = self._writer, None
        if writer is not None:
            await asyncio.to_thread(writer.close)
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.dispose()

    def _error(self, what: str, exc: BaseException) -> AuditStoreError:
        return AuditStoreError(f"audit store {self.url}: {what} failed: {_describe(exc)}")


_DB_ERRORS = (SQLAlchemyError, sqlite3.Error, OSError, TimeoutError)


def _describe(exc: BaseException) -> str:
    """The driver's own message, without the SQL text and parameters SQLAlchemy appends."""
    orig = getattr(exc, "orig", None)
    source = orig if isinstance(orig, BaseException) else exc
    lines = str(source).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > 300:
        text = text[:300] + "..."
    return f"{type(source).__name__}: {text}" if text else type(source).__name__
