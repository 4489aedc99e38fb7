"""Micro-benchmarks of single parts, in this process: JWT verify, audit commit rate, optional others.

Optional parts written by their owners are picked up when their module exists: `bench/cedar.py`
(Cedar decision µs for 10 / 200 / 2,000 policies), `bench/budgets.py` (budget consume µs),
`bench/redaction.py` (redaction µs per KB), `bench/shadow.py` (the policy stage without and with
a shadow policy set). Each exposes `run()` (or `measure`, `speed`, `bench`)
returning a mapping of labels to values, or rows; until a module exists the report says "not
available yet".
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from audit.record import SCHEMA_VERSION, AuditRecord, new_id
from audit.store import AuditStore
from audit.writer import AuditWriter
from gateway.config import IdentityConfig, IssuerConfig
from gateway.identity.authenticator import Authenticator
from gateway.identity.devkeys import DEV_ISSUER, ensure_dev_key


@dataclass(frozen=True)
class Micro:
    """One micro-benchmark result line: `value` is a number with `unit`, or a note why it is missing."""

    name: str
    value: float | None
    unit: str
    note: str = ""

    def text(self) -> str:
        if self.value is None:
            return self.note
        shown = f"{self.value:,.1f}" if self.value < 1000 else f"{self.value:,.0f}"
        return f"{shown} {self.unit}" + (f" ({self.note})" if self.note else "")


async def jwt_verify(data_dir: Path, n: int = 2000) -> list[Micro]:
    """Median µs of `Authenticator.authenticate`: every token new (cold) and one token reused (cached)."""
    key = ensure_dev_key(data_dir)
    audience = "http://127.0.0.1:1/mcp/bench"
    cfg = IdentityConfig(issuers=[IssuerConfig(issuer=DEV_ISSUER, jwks_file=key.jwks_path)])
    auth = Authenticator(cfg, "http://127.0.0.1:1", ["bench"])
    await auth.start()
    try:
        tokens = [f"Bearer {key.mint('bench', audience=audience, groups=['bench'])}" for _ in range(n)]
        cold = []
        for t in tokens:
            t0 = time.perf_counter()
            await auth.authenticate(t)
            cold.append(time.perf_counter() - t0)
        warm = []
        for _ in range(n):
            t0 = time.perf_counter()
            await auth.authenticate(tokens[0])
            warm.append(time.perf_counter() - t0)
    finally:
        await auth.aclose()
    return [
        Micro("JWT verify, new token (ES256)", statistics.median(cold) * 1e6, "µs"),
        Micro("JWT verify, cached token", statistics.median(warm) * 1e6, "µs"),
    ]


def _record(i: int) -> AuditRecord:
    return AuditRecord(
        id=new_id(),
        ts=datetime.now(UTC),
        schema_version=SCHEMA_VERSION,
        instance="bench",
        trace_id=uuid.uuid4().hex,
        call_id=str(i),
        user="bench",
        tenant=None,
        agent=None,
        delegation_chain=[],
        protocol="mcp",
        upstream="bench",
        tool="echo",
        action="call_tool",
        args_redacted={"text": "<string:16>"},
        args_hmac="0" * 64,
        decision={
            "effect": "allow",
            "reasons": [],
            "policy_ids": [],
            "policy_version": "v",
            "stage": "policy",
        },
        budget=None,
        pii={"input": {}, "output": {}},
        outcome={"status": "completed", "latency_ms": 1.0, "upstream_status": 200, "error": None},
        result_sha256="0" * 64,
    )


async def audit_commit_rate(url: str, n: int = 4000, concurrency: int = 16) -> float:
    """Records/s that `AuditWriter.write` confirms durable, with `concurrency` callers waiting."""
    store = await AuditStore.open(url)
    try:
        async with AuditWriter(store) as writer:
            remaining = n

            async def caller() -> None:
                nonlocal remaining
                while remaining > 0:
                    remaining -= 1
                    await writer.write(_record(remaining))

            t0 = time.perf_counter()
            await asyncio.gather(*(caller() for _ in range(concurrency)))
            return n / (time.perf_counter() - t0)
    finally:
        await store.close()


async def _pg_bench_url(base: str) -> str:
    """A scratch database `bastion_bench` next to the configured one, created if missing."""
    import asyncpg  # type: ignore[import-untyped]
    from sqlalchemy.engine import make_url

    u = make_url(base)
    conn = await asyncpg.connect(
        host=u.host, port=u.port or 5432, user=u.username, password=u.password, database=u.database
    )
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = 'bastion_bench'")
        if not exists:
            await conn.execute("CREATE DATABASE bastion_bench")
    finally:
        await conn.close()
    return u.set(database="bastion_bench").render_as_string(hide_password=False)


async def audit_rates(data_dir: Path, concurrency: int, n: int = 4000) -> list[Micro]:
    out = []
    for c in (concurrency, 256):
        try:
            rate = await audit_commit_rate(f"sqlite+aiosqlite:///{data_dir / f'micro-audit-{c}.db'}", n, c)
            out.append(Micro(f"audit records/s committed, SQLite, {c} writers", rate, "records/s"))
        except Exception as exc:  # the writer's API is being changed by others: report, don't crash
            out.append(
                Micro(f"audit records/s committed, SQLite, {c} writers", None, "", f"not measured: {exc!r}")
            )
    pg = os.environ.get("BASTION_TEST_PG")
    if not pg:
        out.append(
            Micro("audit records/s committed, PostgreSQL", None, "", "skipped: BASTION_TEST_PG is not set")
        )
        return out
    try:
        url = await _pg_bench_url(pg)
        for c in (concurrency, 256):
            rate = await audit_commit_rate(url, n, c)
            out.append(Micro(f"audit records/s committed, PostgreSQL, {c} writers", rate, "records/s"))
    except Exception as exc:
        out.append(Micro("audit records/s committed, PostgreSQL", None, "", f"not measured: {exc!r}"))
    return out


OPTIONAL = {
    "cedar": "Cedar decision, median",
    "budgets": "budget consume (SQLite, PostgreSQL)",
    "redaction": "redaction µs per KB",
    "shadow": "policy stage µs, shadow policy set",
}
_ENTRY_POINTS = ("run", "measure", "speed", "bench")


def _entry(module: Any) -> Callable[[], Any] | None:
    """The module's benchmark function: a known name, else its only public no-argument function."""
    for name in _ENTRY_POINTS:
        fn = getattr(module, name, None)
        if callable(fn):
            return fn  # type: ignore[no-any-return]
    candidates = [
        fn
        for name, fn in vars(module).items()
        if inspect.isfunction(fn)
        and not name.startswith("_")
        and fn.__module__ == module.__name__
        and all(
            p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            for p in inspect.signature(fn).parameters.values()
        )
    ]
    return candidates[0] if len(candidates) == 1 else None


def optional_part(name: str) -> list[Micro]:
    """Run `bench/<name>.py` if it exists; its result becomes lines of the report."""
    title = OPTIONAL[name]
    try:
        module = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"bench.{name}":
            return [Micro(title, None, "", f"not measured: {exc}")]
        return [Micro(title, None, "", f"not available yet (no bench/{name}.py)")]
    fn = _entry(module)
    if fn is None:
        return [Micro(title, None, "", f"bench/{name}.py has no entry function ({', '.join(_ENTRY_POINTS)})")]
    try:
        result = fn()
        if inspect.iscoroutine(result):
            result = asyncio.run(result) if not _loop_running() else None
    except Exception as exc:
        return [Micro(title, None, "", f"failed: {exc!r}")]
    if isinstance(result, Mapping):
        return [_as_micro(f"{title}: {_size(k)}", v) for k, v in result.items()]
    if isinstance(result, list | tuple):
        return [_row_micro(title, r) for r in result]
    return [Micro(title, None, "", str(result))]


def _row_micro(title: str, row: Any) -> Micro:
    """One row of an optional part: its `*_us` median as the value, the rest as name and note."""
    if isinstance(row, Micro):
        return row
    if not isinstance(row, Mapping):
        return Micro(title, None, "", str(row))
    keys = [k for k in row if str(k).endswith("_us")]
    main = "median_us" if "median_us" in row else (keys[0] if keys else None)
    labels = [f"{v} {k}" if isinstance(v, int) else str(v) for k, v in row.items() if k in _LABEL_KEYS]
    labels += [str(v) for k, v in row.items() if isinstance(v, str) and k not in _LABEL_KEYS]
    rest = [
        f"{k} {v}" for k, v in row.items() if k != main and k not in _LABEL_KEYS and not isinstance(v, str)
    ]
    name = f"{title}: {', '.join(labels)}" if labels else title
    if main is None or not isinstance(row[main], int | float):
        return Micro(name, None, "", "; ".join(rest))
    return Micro(name, float(row[main]), "µs", ", ".join(rest))


_LABEL_KEYS = frozenset({"policies", "backend", "size", "kb", "payload"})


def _size(key: Any) -> str:
    """Byte counts as KB / MB (the redaction part keys its results by payload size)."""
    if isinstance(key, int) and key >= 1024:
        return f"{key // 1024:,} KB" if key < 1024 * 1024 else f"{key // (1024 * 1024):,} MB"
    return str(key)


def _as_micro(name: str, value: Any) -> Micro:
    if isinstance(value, int | float):
        return Micro(name, float(value), "µs/KB" if "per KB" in name else "µs")
    return Micro(name, None, "", str(value))


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def run_all(concurrency: int, n: int = 2000, optional: bool = True) -> list[Micro]:
    """Every micro-benchmark; `n` scales the repetitions (JWT verifies: n, audit records: 2n)."""
    with tempfile.TemporaryDirectory(prefix="bastion-micro-") as tmp:
        data_dir = Path(tmp)
        results = asyncio.run(jwt_verify(data_dir, n))
        results += asyncio.run(audit_rates(data_dir, concurrency, 2 * n))
    if optional:
        for name in OPTIONAL:
            results += optional_part(name)
    return results
