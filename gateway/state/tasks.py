"""Who owns which upstream task: a task belongs to the principal whose call created it.

A task-augmented `tools/call` (MCP 2025-11-25) is answered with a task id instead of a result;
the client then polls `tasks/get`, fetches `tasks/result` and may `tasks/cancel`. The id is the
upstream's, so any client that learns or guesses one could read another user's result or cancel
their work. Bastion records the owner (and the tool, whose redaction rules apply to the result)
when the task is created, in the state DB so that every replica agrees; only the owner may then
name the task, and `tasks/list` shows each caller only their own.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Column, Float, String, Table, delete, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.sqlite_thread import SQLiteThread
from gateway.state.db import metadata

SWEEP_EVERY_S = 60.0
"""How often expired bindings are deleted (an expired one in the way of a new task goes at once)."""
DEFAULT_TTL_S = 24 * 3600.0
MAX_TTL_S = 7 * 24 * 3600.0

tasks_table = Table(
    "bastion_tasks",
    metadata,
    Column("upstream", String(64), primary_key=True),
    Column("task_id", String(256), primary_key=True),
    Column("principal", String(64), nullable=False, index=True),
    Column("tool", String(200), nullable=False),
    Column("audit_id", String(64), nullable=False),
    Column("expires_at", Float, nullable=False, index=True),
)


@dataclass(frozen=True, slots=True)
class Task:
    upstream: str
    task_id: str
    principal: str
    tool: str
    audit_id: str
    """The record of the call that created the task."""


class TaskOwners:
    """Task ids bound to their creator; `principal` is a digest of the principal's key.

    On SQLite the bindings are written by the state DB's writer thread, in its group commits (an
    A2A message creates a task each time: through the connection pool, concurrent writers would
    queue on SQLite's lock, some for seconds); expired bindings are swept once a minute."""

    def __init__(self, engine: AsyncEngine, writer: SQLiteThread | None = None) -> None:
        self.engine = engine
        self._writer = writer
        self._next_sweep = 0.0

    async def own(
        self, upstream: str, task_id: str, principal: str, tool: str, audit_id: str, ttl_s: float | None
    ) -> bool:
        """Record a new task; False when the id is already someone's (it is then not theirs twice)."""
        keep = min(MAX_TTL_S, ttl_s if ttl_s and ttl_s > 0 else DEFAULT_TTL_S)
        now = time.time()
        row = {
            "upstream": upstream,
            "task_id": task_id,
            "principal": principal,
            "tool": tool,
            "audit_id": audit_id,
            "expires_at": now + keep,
        }
        sweep = now >= self._next_sweep
        if sweep:
            self._next_sweep = now + SWEEP_EVERY_S
        if self._writer is not None:
            return await self._writer.run(lambda conn: _own_sqlite(conn, row, now, sweep))
        try:
            async with self.engine.begin() as conn:
                t = tasks_table.c
                mine = (t.upstream == upstream) & (t.task_id == task_id) & (t.expires_at < now)
                await conn.execute(delete(tasks_table).where(t.expires_at < now if sweep else mine))
                await conn.execute(insert(tasks_table).values(**row))
        except IntegrityError:
            return False
        return True

    async def get(self, upstream: str, task_id: str) -> Task | None:
        async with self.engine.connect() as conn:
            found = (
                await conn.execute(
                    select(tasks_table).where(
                        tasks_table.c.upstream == upstream,
                        tasks_table.c.task_id == task_id,
                        tasks_table.c.expires_at >= time.time(),
                    )
                )
            ).first()
        if found is None:
            return None
        return Task(found.upstream, found.task_id, found.principal, found.tool, found.audit_id)

    async def mine(self, upstream: str, principal: str) -> set[str]:
        """The ids of the tasks `principal` created on `upstream` that are still remembered."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(tasks_table.c.task_id).where(
                    tasks_table.c.upstream == upstream,
                    tasks_table.c.principal == principal,
                    tasks_table.c.expires_at >= time.time(),
                )
            )
            return {r.task_id for r in rows}


def _own_sqlite(conn: sqlite3.Connection, row: dict[str, Any], now: float, sweep: bool) -> bool:
    """`own` on the SQLite writer thread."""
    if sweep:
        conn.execute("DELETE FROM bastion_tasks WHERE expires_at < ?", (now,))
    else:
        conn.execute(
            "DELETE FROM bastion_tasks WHERE upstream = ? AND task_id = ? AND expires_at < ?",
            (row["upstream"], row["task_id"], now),
        )
    found = conn.execute(
        "INSERT INTO bastion_tasks (upstream, task_id, principal, tool, audit_id, expires_at) "
        "VALUES (:upstream, :task_id, :principal, :tool, :audit_id, :expires_at) ON CONFLICT DO NOTHING",
        row,
    )
    return found.rowcount == 1
