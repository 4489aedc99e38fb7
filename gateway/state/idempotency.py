"""Repeated call_ids: a tool not marked idempotent never runs twice for one call_id.

A call with a stable `call_id` (the HTTP API's `call_id`; for MCP, derived from the session and
the JSON-RPC request id, or `_meta["bastion/call_id"]`) claims `(principal, call_id)` in the
state database before it is forwarded. A repeat within `idempotency.ttl_s` finds the claim and
is answered from it instead of running the tool: with the first response when it was kept (up
to `max_result_bytes`, as the client received it, after redaction), else with a "duplicate of
audit record <id>" answer. A claim is given up when the first call never reached the upstream,
so that the caller can try again. The claim is shared by replicas (it lives in SQL).

The arguments are compared by keyed hash, so a call_id reused for a different call is refused
rather than answered with another call's result.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Boolean, Column, Float, LargeBinary, String, Table, delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.sqlite_thread import SQLiteThread
from gateway.config import IdempotencyConfig
from gateway.errors import StateUnavailable
from gateway.state.db import STATE_ERRORS, metadata

log = logging.getLogger("bastion.idempotency")

CLEANUP_EVERY_S = 60.0

call_ids = Table(
    "bastion_call_ids",
    metadata,
    Column("principal", String(64), primary_key=True),
    Column("call_id", String(200), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("audit_id", String(64), nullable=False),
    Column("expires_at", Float, nullable=False, index=True),
    Column("done", Boolean, nullable=False, default=False),
    Column("response", LargeBinary, nullable=True),
)


@dataclass(frozen=True, slots=True)
class Previous:
    """What a repeated call_id found: the first call's audit record, and its response if kept."""

    call_id: str
    audit_id: str
    same_call: bool
    done: bool
    response: bytes | None

    @property
    def message(self) -> str:
        if not self.same_call:
            return (
                f"call_id {self.call_id!r} was already used for a different call (audit record "
                f"{self.audit_id}); use a new call_id"
            )
        state = "" if self.done else ", still running"
        return (
            f"duplicate of audit record {self.audit_id}{state}: call_id {self.call_id!r} was already "
            "used for this call, and the tool is not run twice"
        )


@dataclass(frozen=True, slots=True)
class Claim:
    principal: str
    call_id: str
    audit_id: str


class CallRegistry:
    """Claims, completes and releases call_ids in the state database."""

    def __init__(
        self, engine: AsyncEngine, cfg: IdempotencyConfig, key: bytes, writer: SQLiteThread | None = None
    ) -> None:
        self.engine = engine
        self._writer = writer
        """SQLite file: claims and completions share the state DB's group-committing thread."""
        self.cfg = cfg
        self._key = key
        self._claims: dict[str, Claim] = {}
        """Claims of calls in flight on this replica, by audit id."""
        self._next_cleanup = 0.0

    def fingerprint(self, upstream: str, tool: str, arguments: dict[str, Any]) -> str:
        canon = json.dumps([upstream, tool, arguments], sort_keys=True, separators=(",", ":"), default=str)
        return hmac.new(self._key, canon.encode(), hashlib.sha256).hexdigest()

    @staticmethod
    def principal_id(principal_key: str) -> str:
        return hashlib.sha256(principal_key.encode()).hexdigest()

    async def claim(
        self, principal_key: str, call_id: str, fingerprint: str, audit_id: str
    ) -> Previous | None:
        """Claim the call_id for this call (None), or return what the first call with it left."""
        t = call_ids.c
        who = self.principal_id(principal_key)
        now = time.time()
        row = {
            "principal": who,
            "call_id": call_id,
            "fingerprint": fingerprint,
            "audit_id": audit_id,
            "expires_at": now + self.cfg.ttl_s,
            "done": False,
            "response": None,
        }
        cleanup = now >= self._next_cleanup
        if cleanup:
            self._next_cleanup = now + CLEANUP_EVERY_S
        try:
            for _ in range(2):
                if self._writer is not None:
                    found = await self._writer.run(lambda conn: _claim_sqlite(conn, row, now, cleanup))
                    if found is None:
                        self._claims[audit_id] = Claim(who, call_id, audit_id)
                        return None
                    if found:
                        audit, fp, done, response = found
                        return Previous(call_id, audit, fp == fingerprint, bool(done), response)
                    continue
                try:
                    async with self.engine.begin() as conn:  # one commit: the expired claim goes, ours comes
                        if cleanup:
                            await conn.execute(delete(call_ids).where(t.expires_at < now))
                        else:
                            mine = (t.principal == who) & (t.call_id == call_id) & (t.expires_at < now)
                            await conn.execute(delete(call_ids).where(mine))
                        await conn.execute(insert(call_ids).values(**row))
                except IntegrityError:
                    pass
                else:
                    self._claims[audit_id] = Claim(who, call_id, audit_id)
                    return None
                async with self.engine.connect() as conn:
                    query = select(t.audit_id, t.fingerprint, t.done, t.response).where(
                        t.principal == who, t.call_id == call_id
                    )
                    found = (await conn.execute(query)).first()
                if found is not None:
                    return Previous(
                        call_id, found.audit_id, found.fingerprint == fingerprint, found.done, found.response
                    )
        except STATE_ERRORS as exc:
            raise StateUnavailable(
                f"the state database cannot check call_id {call_id!r} ({type(exc).__name__}); "
                "the call was not forwarded"
            ) from exc
        raise StateUnavailable(f"call_id {call_id!r} is being claimed concurrently; try again")

    def holds(self, audit_id: str) -> bool:
        return audit_id in self._claims

    async def complete(self, audit_id: str, response: bytes | None) -> None:
        """The first call finished (or may have run): keep its response for repeats, if small enough."""
        claim = self._claims.pop(audit_id, None)
        if claim is None:
            return
        kept = response if response is not None and len(response) <= self.cfg.max_result_bytes else None
        t = call_ids.c
        try:
            if self._writer is not None:
                done = (kept, claim.principal, claim.call_id, audit_id)
                await self._writer.run(lambda conn: conn.execute(_COMPLETE, done))
                return
            async with self.engine.begin() as conn:
                await conn.execute(
                    update(call_ids)
                    .where(t.principal == claim.principal, t.call_id == claim.call_id, t.audit_id == audit_id)
                    .values(done=True, response=kept)
                )
        except STATE_ERRORS as exc:
            log.error("could not record the outcome of call_id for %s: %s", audit_id, type(exc).__name__)

    async def release(self, audit_id: str) -> None:
        """The first call never reached the upstream: the call_id may be used again."""
        claim = self._claims.pop(audit_id, None)
        if claim is None:
            return
        t = call_ids.c
        try:
            if self._writer is not None:
                gone = (claim.principal, claim.call_id, audit_id)
                await self._writer.run(lambda conn: conn.execute(_RELEASE, gone))
                return
            async with self.engine.begin() as conn:
                await conn.execute(
                    delete(call_ids).where(
                        t.principal == claim.principal, t.call_id == claim.call_id, t.audit_id == audit_id
                    )
                )
        except STATE_ERRORS as exc:
            log.error("could not release call_id for %s: %s", audit_id, type(exc).__name__)


_COMPLETE = (
    "UPDATE bastion_call_ids SET done = 1, response = ? WHERE principal = ? AND call_id = ? AND audit_id = ?"
)
_RELEASE = "DELETE FROM bastion_call_ids WHERE principal = ? AND call_id = ? AND audit_id = ?"


def _claim_sqlite(
    conn: sqlite3.Connection, row: dict[str, Any], now: float, cleanup: bool
) -> tuple[Any, ...] | None:
    """`claim` on the SQLite writer thread: None when claimed; else the first call's
    (audit_id, fingerprint, done, response), or () when that claim vanished meanwhile."""
    if cleanup:
        conn.execute("DELETE FROM bastion_call_ids WHERE expires_at < ?", (now,))
    else:
        conn.execute(
            "DELETE FROM bastion_call_ids WHERE principal = ? AND call_id = ? AND expires_at < ?",
            (row["principal"], row["call_id"], now),
        )
    try:
        conn.execute(
            "INSERT INTO bastion_call_ids (principal, call_id, fingerprint, audit_id, expires_at, done,"
            " response) VALUES (?, ?, ?, ?, ?, 0, NULL)",
            (row["principal"], row["call_id"], row["fingerprint"], row["audit_id"], row["expires_at"]),
        )
    except sqlite3.IntegrityError:
        found = conn.execute(
            "SELECT audit_id, fingerprint, done, response FROM bastion_call_ids"
            " WHERE principal = ? AND call_id = ?",
            (row["principal"], row["call_id"]),
        ).fetchone()
        return tuple(found) if found is not None else ()
    return None
