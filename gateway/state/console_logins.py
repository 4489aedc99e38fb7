"""Console login links are good once: each link's nonce is spent in the state DB, so a link
copied from a terminal's scroll-back or a proxy log after use opens nothing (any replica)."""

from __future__ import annotations

import time

from sqlalchemy import Column, Float, String, Table, delete, insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.state.db import metadata

console_logins = Table(
    "bastion_console_logins",
    metadata,
    Column("nonce", String(64), primary_key=True),
    Column("expires_at", Float, nullable=False, index=True),
)


async def spend(engine: AsyncEngine, nonce: str, expires_at: float) -> bool:
    """True the first time `nonce` is spent; False ever after (until it has expired anyway)."""
    t = console_logins.c
    try:
        async with engine.begin() as conn:
            await conn.execute(delete(console_logins).where(t.expires_at < time.time()))
            await conn.execute(insert(console_logins).values(nonce=nonce, expires_at=expires_at))
    except IntegrityError:
        return False
    return True
