"""The state database: replicas that start together on a new PostgreSQL database all come up."""

from __future__ import annotations

import asyncio
import os

import pytest
from sqlalchemy import text

from gateway.state.db import metadata, open_state

PG = os.environ.get("BASTION_TEST_PG")


@pytest.mark.skipif(not PG, reason="BASTION_TEST_PG not set: state tables on PostgreSQL skipped")
async def test_replicas_creating_the_tables_together_all_start() -> None:
    assert PG is not None
    engine = await open_state(PG)
    try:
        async with engine.begin() as conn:
            for table in reversed(metadata.sorted_tables):
                await conn.execute(text(f"DROP TABLE IF EXISTS {table.name}"))
    finally:
        await engine.dispose()
    # Without the advisory lock one of these failed: duplicate key in pg_type_typname_nsp_index.
    engines = await asyncio.gather(*(open_state(PG) for _ in range(4)))
    try:
        async with engines[0].connect() as conn:
            query = text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            names = {r[0] for r in await conn.execute(query)}
        assert {t.name for t in metadata.sorted_tables} <= names
    finally:
        await asyncio.gather(*(e.dispose() for e in engines))
