"""Several replicas on one trail: each record reaches each sink once (a lease per instance chain),
and a replica whose delivery died has its chain taken over when its lease runs out. SQLite files
shared by two gateways, and PostgreSQL when BASTION_TEST_PG is set."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, make_config, running_gateway
from sqlalchemy import delete
from test_audit import _drop_pg_table

from gateway.identity.devkeys import DevKey
from gateway.state.db import open_state
from gateway.state.sink_cursors import sink_cursors

from .conftest import chain, eventually, first_seen, http_receiver, make_calls

PG = os.environ.get("BASTION_TEST_PG")


async def _fresh_pg(url: str) -> None:
    await _drop_pg_table(url)
    state = await open_state(url)
    try:
        async with state.begin() as conn:
            await conn.execute(delete(sink_cursors))
    finally:
        await state.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.pg)])
async def urls(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}", f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"
    if not PG:
        pytest.skip("BASTION_TEST_PG not set: audit sinks on PostgreSQL skipped")
    await _fresh_pg(PG)
    return PG, PG


def _replica(data_dir: Path, upstream_url: str, urls: tuple[str, str], name: str, sink_url: str) -> Any:
    sink = {"name": "soc", "type": "http", "url": sink_url, "format": "jsonl", "lease_s": 1.5, "timeout_s": 2}
    return make_config(
        data_dir,
        {"demo": upstream_url},
        free_port(),
        audit={"url": urls[0], "instance": name, "sinks": [sink]},
        state={"url": urls[1]},
    )


async def test_two_replicas_deliver_each_record_once_and_take_over_a_dead_ones_chain(
    urls: tuple[str, str], data_dir: Path, dev_key: DevKey, upstream_url: str
) -> None:
    async with http_receiver() as rx:
        one = _replica(data_dir, upstream_url, urls, "replica-a", rx.url)
        two = _replica(data_dir, upstream_url, urls, "replica-b", rx.url)
        async with running_gateway(one) as (base_a, _), running_gateway(two) as (base_b, gw_b):
            await asyncio.gather(make_calls(base_a, dev_key, 12), make_calls(base_b, dev_key, 12))
            a = [s for s, _ in await chain(urls[0], "replica-a")]
            b = [s for s, _ in await chain(urls[0], "replica-b")]
            want = {("replica-a", s) for s in a} | {("replica-b", s) for s in b}
            got = lambda: [(d["instance"], d["seq"]) for d in rx.docs()]  # noqa: E731
            await eventually(lambda: want <= set(got()))
            await asyncio.sleep(0.5)  # anything sent twice would have arrived by now
            counts = Counter(got())
            assert max(counts.values()) == 1, "a healthy receiver gets each record once"
            for inst, seqs in (("replica-a", a), ("replica-b", b)):
                assert [s for i, s in got() if i == inst] == seqs

            # replica-b's delivery dies (its lease is left in place, as a crash leaves it) while it
            # still takes calls: replica-a takes its chain over once the lease has run out.
            assert gw_b.sinks is not None
            for task in gw_b.sinks._tasks:
                task.cancel()
            await make_calls(base_b, dev_key, 6)
            b_now = [s for s, _ in await chain(urls[0], "replica-b")]
            await eventually(lambda: {("replica-b", s) for s in b_now} <= set(got()), timeout=15)
            seqs_b = [s for i, s in got() if i == "replica-b"]
            assert first_seen(seqs_b) == b_now
