"""Where each audit sink stands in each instance's chain, and which replica delivers it.

One row per (sink, instance chain): `seq` is the last record the sink confirmed, so delivery
resumes after it whatever restarted. `holder` holds a lease on the chain until `lease_until`;
only the holder may move the cursor, so with several replicas each record goes to each sink once
(at least once: a batch sent but not yet confirmed when its sender died is sent again). A replica
delivers its own chain first and takes over another's when that replica's lease has run out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import BigInteger, Column, Float, String, Table, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.state.db import metadata

ERROR_MAX = 500
"""Longest last-error text kept (it is shown by `bastion audit sinks` and /readyz)."""

sink_cursors = Table(
    "bastion_sink_cursors",
    metadata,
    Column("sink", String(64), primary_key=True),
    Column("instance", String(255), primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Column("holder", String(255)),
    Column("lease_until", Float, nullable=False),
    Column("delivered", BigInteger, nullable=False),
    Column("delivered_at", Float),
    Column("error", String(ERROR_MAX)),
    Column("error_at", Float),
)


@dataclass(frozen=True, slots=True)
class Cursor:
    sink: str
    instance: str
    seq: int
    holder: str | None
    lease_until: float
    delivered: int
    """Records confirmed by the sink since the row was made (duplicates after a retry included)."""
    delivered_at: float | None
    error: str | None
    error_at: float | None


class SinkCursors:
    """The cursor rows in the state DB. Every method is one short transaction."""

    def __init__(self, engine: AsyncEngine, holder: str) -> None:
        self.engine = engine
        self.holder = holder

    async def claim(self, sink: str, instance: str, lease_s: float) -> int | None:
        """Take or renew the lease on `instance`'s chain for `sink`; the cursor if this replica
        holds it now, None if another replica's lease is still running."""
        t = sink_cursors.c
        now = time.time()
        for _ in range(2):
            async with self.engine.begin() as conn:
                result = await conn.execute(
                    update(sink_cursors)
                    .where(
                        t.sink == sink,
                        t.instance == instance,
                        or_(t.holder.is_(None), t.holder == self.holder, t.lease_until < now),
                    )
                    .values(holder=self.holder, lease_until=now + lease_s)
                )
                if result.rowcount == 1:
                    seq = (
                        await conn.execute(select(t.seq).where(t.sink == sink, t.instance == instance))
                    ).scalar_one()
                    return int(seq)
                exists = (
                    await conn.execute(select(t.seq).where(t.sink == sink, t.instance == instance))
                ).first()
                if exists is not None:
                    return None
            try:
                async with self.engine.begin() as conn:
                    await conn.execute(
                        insert(sink_cursors).values(
                            sink=sink,
                            instance=instance,
                            seq=0,
                            holder=self.holder,
                            lease_until=now + lease_s,
                            delivered=0,
                        )
                    )
                return 0
            except IntegrityError:
                continue  # another replica made the row at the same moment: try to claim it
        return None

    async def advance(self, sink: str, instance: str, seq: int, count: int, lease_s: float) -> bool:
        """Move the cursor to `seq` after the sink confirmed `count` records, renewing the lease.
        False when this replica no longer holds the chain (it must stop delivering it)."""
        t = sink_cursors.c
        now = time.time()
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(sink_cursors)
                .where(t.sink == sink, t.instance == instance, t.holder == self.holder, t.seq < seq)
                .values(
                    seq=seq,
                    delivered=t.delivered + count,
                    delivered_at=now,
                    error=None,
                    error_at=None,
                    lease_until=now + lease_s,
                )
            )
        return result.rowcount == 1

    async def failed(self, sink: str, instance: str, error: str) -> None:
        """Note why the last delivery failed (kept until the next success)."""
        t = sink_cursors.c
        async with self.engine.begin() as conn:
            await conn.execute(
                update(sink_cursors)
                .where(t.sink == sink, t.instance == instance, t.holder == self.holder)
                .values(error=error[:ERROR_MAX], error_at=time.time())
            )

    async def release(self, sink: str, instance: str) -> None:
        """Give the chain up at shutdown, so another replica need not wait for the lease to run out."""
        t = sink_cursors.c
        async with self.engine.begin() as conn:
            await conn.execute(
                update(sink_cursors)
                .where(t.sink == sink, t.instance == instance, t.holder == self.holder)
                .values(holder=None, lease_until=0.0)
            )

    async def all(self) -> list[Cursor]:
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(sink_cursors).order_by(sink_cursors.c.sink, sink_cursors.c.instance)
                )
            ).all()
        return [
            Cursor(
                sink=r.sink,
                instance=r.instance,
                seq=int(r.seq),
                holder=r.holder,
                lease_until=float(r.lease_until),
                delivered=int(r.delivered),
                delivered_at=r.delivered_at,
                error=r.error,
                error_at=r.error_at,
            )
            for r in rows
        ]
