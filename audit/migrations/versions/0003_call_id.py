"""Find records by call: indexed copies of `call_id` and `protocol`, filled in for existing rows.

One call id can name several records (the decision on a model's tool_use, protocol `llm`, and
the later execution of that tool over MCP), which a reviewer exports together.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import json
import logging

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

log = logging.getLogger(__name__)

# Rows whose stored document is not valid JSON (an edit that `bastion audit verify` reports) are
# left NULL instead of failing the migration, and so the start-up of the gateway.
_BACKFILL = {
    "sqlite": (
        "UPDATE audit_records SET call_id = json_extract(record, '$.call_id'), "
        "protocol = json_extract(record, '$.protocol') WHERE json_valid(record)"
    ),
    "postgresql": (
        "UPDATE audit_records SET call_id = (record::json ->> 'call_id'), "
        "protocol = (record::json ->> 'protocol')"
    ),
}


def upgrade() -> None:
    op.add_column("audit_records", sa.Column("call_id", sa.String(255)))
    op.add_column("audit_records", sa.Column("protocol", sa.String(16)))
    _backfill(op.get_bind())
    op.create_index("ix_audit_records_call_id", "audit_records", ["call_id", "ts", "id"])


def _backfill(bind: sa.Connection) -> None:
    dialect = bind.dialect.name
    sql = _BACKFILL.get(dialect)
    if sql is None:
        _backfill_rows(bind)
        return
    if dialect != "postgresql":
        bind.execute(sa.text(sql))
        return
    try:
        with bind.begin_nested():  # PostgreSQL before 16 cannot test a text for JSON in SQL
            bind.execute(sa.text(sql))
    except sa.exc.DBAPIError as exc:
        if _sqlstate(exc)[:2] != "22":  # not a data exception: 22P02 is "invalid input syntax for type json"
            raise
        log.warning("an audit record is not valid JSON: filling call_id and protocol row by row")
        _backfill_rows(bind)


def _sqlstate(exc: sa.exc.DBAPIError) -> str:
    """The SQLSTATE code (asyncpg's adapter has `sqlstate` and `pgcode`, psycopg `sqlstate`)."""
    code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    return code if isinstance(code, str) else ""


def _backfill_rows(bind: sa.Connection, batch: int = 1000) -> None:
    """The portable (slow) way: read each document in Python, skipping those that do not parse."""
    t = sa.table(
        "audit_records",
        sa.column("id", sa.String),
        sa.column("record", sa.Text),
        sa.column("call_id", sa.String),
        sa.column("protocol", sa.String),
    )
    update = (
        sa.update(t)
        .where(t.c.id == sa.bindparam("b_id"))
        .values(call_id=sa.bindparam("call_id"), protocol=sa.bindparam("protocol"))
    )
    last = ""
    while True:
        rows = bind.execute(
            sa.select(t.c.id, t.c.record).where(t.c.id > last).order_by(t.c.id).limit(batch)
        ).all()
        params = []
        for row in rows:
            try:
                doc = json.loads(row.record)
            except ValueError:
                continue
            if not isinstance(doc, dict):
                continue
            call_id, protocol = _text(doc.get("call_id")), _text(doc.get("protocol"))
            if call_id is not None or protocol is not None:
                params.append({"b_id": row.id, "call_id": call_id, "protocol": protocol})
        if params:
            bind.execute(update, params)
        if len(rows) < batch:
            return
        last = rows[-1].id


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def downgrade() -> None:
    op.drop_index("ix_audit_records_call_id", "audit_records")
    op.drop_column("audit_records", "protocol")
    op.drop_column("audit_records", "call_id")
