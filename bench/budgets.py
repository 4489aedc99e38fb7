"""Budget consume cost: µs per call for one matching budget, SQLite and (when set) PostgreSQL.

SQLite goes through the state DB's group-committing writer thread, as in the gateway.

`python -m bench.budgets` prints a table; `run()` returns rows for the harness.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import delete

from gateway import config as config_mod
from gateway.call import Principal, ToolCall
from gateway.stages.budget import BudgetStage
from gateway.state.db import budget_usage, open_state, sqlite_writer

RULE = {"name": "bench", "per": ["user"], "limit": 10**12, "window": "1d"}
USER = Principal(sub="bench-user", issuer="bench")


async def _measure(url: str, n: int, concurrency: int) -> dict[str, Any]:
    rule = config_mod.parse({"budgets": [RULE]}, Path(".")).budgets[0]
    engine = await open_state(url)
    writer = await sqlite_writer(engine)  # as the gateway runs it: None on PostgreSQL
    try:
        async with engine.begin() as conn:
            await conn.execute(delete(budget_usage).where(budget_usage.c.budget == "bench"))
        stage = BudgetStage([rule], engine, writer)
        for _ in range(50):
            await stage(ToolCall("bench", "echo", {}, principal=USER))
        samples: list[float] = []

        async def worker(k: int) -> None:
            for _ in range(k):
                t0 = time.perf_counter()
                verdict = await stage(ToolCall("bench", "echo", {}, principal=USER))
                samples.append((time.perf_counter() - t0) * 1e6)
                assert verdict is None

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(n // concurrency) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    finally:
        if writer is not None:
            await asyncio.to_thread(writer.close)
        await engine.dispose()
    return {
        "store": url.split("+")[0],
        "concurrency": concurrency,
        "median_us": round(statistics.median(samples), 1),
        "calls_per_s": round(len(samples) / elapsed),
    }


async def _run(n: int = 2000) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for c in (1, 16):
            rows.append(await _measure(f"sqlite+aiosqlite:///{tmp}/state.db", n, c))
    if pg := os.environ.get("BASTION_TEST_PG"):
        for c in (1, 16):
            rows.append(await _measure(pg, n, c))
    return rows


def run() -> list[dict[str, Any]]:
    return asyncio.run(_run())


if __name__ == "__main__":
    print("| store | concurrency | median µs per consume | consumes/s |")
    print("|---|---:|---:|---:|")
    for r in run():
        print(f"| {r['store']} | {r['concurrency']} | {r['median_us']} | {r['calls_per_s']:,} |")
