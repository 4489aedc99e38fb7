"""Audit trail: record schema, SQL store (SQLite, and PostgreSQL when BASTION_TEST_PG is set),
group-commit writer and JSONL export."""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from audit import writer as writer_mod
from audit.export import export_jsonl, run_export
from audit.record import (
    SCHEMA_VERSION,
    AuditRecord,
    args_hmac,
    canonical_json,
    canonical_json_plain,
    new_id,
    shape_of,
)
from audit.store import AuditStore, AuditStoreError
from audit.writer import AuditWriter

PG_URL = os.environ.get("BASTION_TEST_PG")
T0 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


def make_record(i: int, **over: Any) -> AuditRecord:
    fields: dict[str, Any] = {
        "id": new_id(),
        "ts": T0 + timedelta(seconds=i),
        "instance": "bastion-1",
        "trace_id": uuid.uuid4().hex,
        "call_id": f"call-{i}",
        "user": "alice",
        "tenant": "acme",
        "agent": "planner",
        "delegation_chain": ["alice", "planner"],
        "protocol": "mcp",
        "upstream": "notes",
        "tool": "read_note",
        "action": "call_tool",
        "args_redacted": {"note_id": "<string:4>"},
        "args_hmac": "ab" * 32,
        "decision": {
            "effect": "allow",
            "reasons": [{"policy": "notes-read", "reason": "readers may read"}],
            "policy_ids": ["notes-read"],
            "policy_version": "v1",
            "stage": "policy",
        },
        "budget": None,
        "pii": {"input": {}, "output": {}},
        "outcome": {"status": "ok", "latency_ms": 1.5, "upstream_status": 200, "error": None},
        "result_sha256": "cd" * 32,
    }
    fields.update(over)
    return AuditRecord(**fields)


def with_effect(rec: AuditRecord, effect: str) -> AuditRecord:
    return AuditRecord.from_json({**rec.to_json(), "decision": {**rec.decision, "effect": effect}})


def with_status(rec: AuditRecord, status: str) -> AuditRecord:
    return AuditRecord.from_json({**rec.to_json(), "outcome": {**rec.outcome, "status": status}})


async def _drop_pg_table(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            for table in ("audit_records", "audit_checkpoints", "bastion_audit_alembic_version"):
                await conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
    finally:
        await engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.pg)])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/audit.db"
    if not PG_URL:
        pytest.skip("BASTION_TEST_PG not set: PostgreSQL audit store tests skipped")
    await _drop_pg_table(PG_URL)
    return PG_URL


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[AuditStore]:
    s = await AuditStore.open(store_url)
    try:
        yield s
    finally:
        await s.close()


async def read_all(store: AuditStore, **filters: Any) -> list[AuditRecord]:
    return [r async for r in store.iter_records(**filters)]


# --- record -----------------------------------------------------------------------------------


def test_record_json_round_trip_and_utc_z() -> None:
    rec = make_record(0, ts=datetime(2025, 3, 1, 14, 0, 0, 5, tzinfo=timezone(timedelta(hours=2))))
    doc = rec.to_json()
    assert doc["ts"] == "2025-03-01T12:00:00.000005Z"
    assert doc["schema_version"] == SCHEMA_VERSION
    assert list(doc)[:3] == ["id", "ts", "schema_version"]
    assert AuditRecord.from_json(json.loads(json.dumps(doc))) == rec
    with pytest.raises(ValueError, match="timezone-aware"):
        make_record(0, ts=datetime(2025, 1, 1))
    with pytest.raises(ValueError, match="missing"):
        AuditRecord.from_json({k: v for k, v in doc.items() if k != "tool"})


def test_new_id_is_uuid7_and_time_ordered() -> None:
    first = new_id()
    u = uuid.UUID(first)
    assert u.version == 7 and u.variant == uuid.RFC_4122
    ids = []
    for _ in range(3):
        ids.append(new_id())
        time.sleep(0.002)  # ids within one millisecond are unordered; across milliseconds ordered
    assert ids == sorted(ids)


def test_shape_of_keeps_keys_and_drops_every_value() -> None:
    secrets = ["alice@example.com", "123-45-6789", "4111 1111 1111 1111", "hunter2", "x"]
    args = {
        "to": secrets[0],
        "meta": {"ssn": secrets[1], "tags": [secrets[2], 7, True, None, 2.5, {"pw": secrets[3]}]},
        "n": 12,
        "flag": False,
        "empty": {},
        "one": secrets[4],
    }
    shape = shape_of(args)
    assert shape == {
        "to": "<string:17>",
        "meta": {
            "ssn": "<string:11>",
            "tags": ["<string:19>", "<int>", "<bool>", "<null>", "<float>", {"pw": "<string:7>"}],
        },
        "n": "<int>",
        "flag": "<bool>",
        "empty": {},
        "one": "<string:1>",
    }

    def leaves(x: Any) -> Iterator[str]:
        if isinstance(x, dict):
            for v in x.values():
                yield from leaves(v)
        elif isinstance(x, list):
            for v in x:
                yield from leaves(v)
        else:
            yield str(x)

    dumped = json.dumps(shape)
    for secret in secrets[:4]:
        assert secret not in dumped
    for leaf in leaves(shape):
        assert leaf not in secrets


def test_args_hmac_stable_across_key_order_and_keyed() -> None:
    a = {"user": "alice", "amount": 12.5, "nested": {"b": [1, 2], "a": None}}
    b = {"nested": {"a": None, "b": [1, 2]}, "amount": 12.5, "user": "alice"}
    h = args_hmac(b"k1" * 16, a)
    assert len(h) == 64 and int(h, 16) >= 0
    assert args_hmac(b"k1" * 16, b) == h
    assert args_hmac(b"k2" * 16, a) != h
    assert args_hmac(b"k1" * 16, {**a, "user": "bob"}) != h


def test_canonical_json_follows_rfc8785() -> None:
    assert canonical_json({"b": 1, "a": [1.0, 1e21, 1e-7, 0.000001, -0.0, "é\n", None, True]}) == (
        '{"a":[1,1e+21,1e-7,0.000001,0,"é\\n",null,true],"b":1}'.encode()
    )
    # keys sort by UTF-16 code units: U+1F600 (D83D DE00) before U+E000
    assert canonical_json({"\ue000": 1, "\U0001f600": 2}) == '{"\U0001f600":2,"\ue000":1}'.encode()
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


# --- store ------------------------------------------------------------------------------------


async def test_round_trip_every_field(store: AuditStore) -> None:
    full = make_record(
        1,
        call_id=None,
        tenant=None,
        agent="sub-agent",
        delegation_chain=["alice", "planner", "sub-agent"],
        protocol="http",
        args_redacted={"q": "<string:3>", "opts": ["<int>", {"deep": "<null>"}], "ü": "<bool>"},
        args_hmac=None,
        decision={
            "effect": "deny",
            "reasons": [{"policy": "no-delete", "reason": "délétion interdite"}],
            "policy_ids": ["no-delete"],
            "policy_version": "sha256:abc",
            "stage": "policy",
        },
        budget={"window": "1d", "used": 3, "limit": 10, "cost": 0.25},
        pii={"input": {"EMAIL_ADDRESS": 2}, "output": {"US_SSN": 1}},
        outcome={"status": "denied", "latency_ms": 0.731, "upstream_status": None, "error": "forbidden"},
        result_sha256=None,
        prev_hash="00" * 32,
        hash="ff" * 32,
    )
    minimal = make_record(2, user=None, agent=None, delegation_chain=[])
    await store.write_many([full, minimal])
    got = await read_all(store)
    assert got == [full, minimal]
    assert got[0].ts.tzinfo is not None and got[0].ts.microsecond == 123456
    assert await store.count() == 2
    await store.ping()


async def test_filters(store: AuditStore) -> None:
    recs = []
    for i in range(24):
        r = make_record(i, user=["alice", "bob", None][i % 3], tool=["read_note", "delete_note"][i % 2])
        r = with_effect(r, ["allow", "deny", "transform", "approval_required"][i % 4])
        recs.append(with_status(r, "ok" if i % 5 else "error"))
    await store.write_many(recs)

    async def check(expected: list[AuditRecord], **filters: Any) -> None:
        got = await read_all(store, batch=5, **filters)
        assert [r.id for r in got] == [r.id for r in expected], filters

    since, until = T0 + timedelta(seconds=5), T0 + timedelta(seconds=17)
    await check(recs[5:17], since=since, until=until)
    await check(recs[5:], since=since.astimezone(timezone(timedelta(hours=-5))))
    await check(recs[:5], until=since)
    await check([r for r in recs if r.user == "bob"], user="bob")
    await check([r for r in recs if r.tool == "delete_note"], tool="delete_note")
    await check([r for r in recs if r.effect == "deny"], effect="deny")
    await check([r for r in recs if r.status == "error"], status="error")
    await check(
        [r for r in recs[5:17] if r.user == "alice" and r.tool == "read_note" and r.effect == "transform"],
        since=since,
        until=until,
        user="alice",
        tool="read_note",
        effect="transform",
    )
    await check([], user="nobody")


async def test_order_is_ts_then_id_across_pages(store: AuditStore) -> None:
    recs = [make_record(i // 4, id=str(uuid.UUID(int=random.getrandbits(128)))) for i in range(40)]
    shuffled = recs[:]
    random.shuffle(shuffled)
    await store.write_many(shuffled[:20])
    await store.write_many(shuffled[20:])
    expected = sorted(recs, key=lambda r: (r.ts, r.id))
    for batch in (1, 3, 4, 7, 40, 1000):
        assert [r.id for r in await read_all(store, batch=batch)] == [r.id for r in expected]


async def test_duplicate_id_fails_the_whole_transaction(store: AuditStore) -> None:
    a = make_record(1)
    await store.write_many([a])
    with pytest.raises(AuditStoreError):
        await store.write_many([make_record(2), a])
    assert await store.count() == 1


async def test_store_error_when_directory_removed(tmp_path: Path) -> None:
    folder = tmp_path / "gone"
    folder.mkdir()
    url = f"sqlite+aiosqlite:///{folder}/audit.db"
    store = await AuditStore.open(url)
    try:
        await store.write_many([make_record(0)])
        await store.engine.dispose()
        shutil.rmtree(folder)
        with pytest.raises(AuditStoreError, match="unable to open database file") as err:
            await store.write_many([make_record(1)])
        assert str(folder) in str(err.value)
        assert err.value.__cause__ is not None
        with pytest.raises(AuditStoreError):
            await store.count()
        with pytest.raises(AuditStoreError):
            await store.ping()
        async with AuditWriter(store) as writer:
            with pytest.raises(AuditStoreError, match="unable to open database file"):
                await writer.write(make_record(2))
    finally:
        await store.close()
    with pytest.raises(AuditStoreError, match="closed"):
        await store.write_many([make_record(3)])
    async with AuditWriter(store) as writer:
        with pytest.raises(AuditStoreError, match="closed"):
            await writer.write(make_record(4))
    assert writer.failed == 1


async def test_store_error_hides_password() -> None:
    with pytest.raises(AuditStoreError) as err:
        await AuditStore.open("postgresql+asyncpg://bastion:s3cret-pw@127.0.0.1:1/audit")
    assert "s3cret-pw" not in str(err.value)
    assert "bastion:***@127.0.0.1:1/audit" in str(err.value)
    assert err.value.__cause__ is not None


async def test_readers_do_not_create_a_store(tmp_path: Path) -> None:
    with pytest.raises(AuditStoreError, match="no such database file"):
        await AuditStore.open(f"sqlite+aiosqlite:///{tmp_path}/typo.db", create=False)
    assert not (tmp_path / "typo.db").exists()


async def test_sqlite_is_wal_with_full_sync(tmp_path: Path) -> None:
    store = await AuditStore.open(f"sqlite+aiosqlite:///{tmp_path}/audit.db")
    try:
        async with store.engine.connect() as conn:
            assert (await conn.execute(text("PRAGMA journal_mode"))).scalar_one() == "wal"
            assert (await conn.execute(text("PRAGMA synchronous"))).scalar_one() == 2
    finally:
        await store.close()


# --- writer -----------------------------------------------------------------------------------


async def test_writer_1000_concurrent_writes_group_commit(store: AuditStore) -> None:
    recs = [make_record(i) for i in range(1000)]
    async with AuditWriter(store) as writer:
        await asyncio.gather(*(writer.write(r) for r in recs))
        assert writer.pending == 0
    assert writer.written == 1000 and writer.failed == 0
    assert 2 <= writer.batches <= 20, writer.batches
    assert await store.count() == 1000
    assert sorted(r.id for r in await read_all(store)) == sorted(r.id for r in recs)


async def test_writer_flushes_everything_on_close(store: AuditStore) -> None:
    writer = AuditWriter(store, batch_max=64, window_ms=50)
    await writer.start()
    tasks = [asyncio.create_task(writer.write(make_record(i))) for i in range(300)]
    await asyncio.sleep(0)
    assert writer.pending == 300
    await writer.close()
    await asyncio.gather(*tasks)
    assert await store.count() == 300 and writer.written == 300
    with pytest.raises(AuditStoreError, match="closed"):
        await writer.write(make_record(301))


async def test_writer_commits_early_when_batch_is_full(store: AuditStore) -> None:
    async with AuditWriter(store, batch_max=10, window_ms=60_000) as writer:
        async with asyncio.timeout(5):
            await asyncio.gather(*(writer.write(make_record(i)) for i in range(10)))
    assert writer.batches == 1


async def test_writer_failed_batch_fails_every_waiter_then_recovers(tmp_path: Path) -> None:
    store = await AuditStore.open(f"sqlite+aiosqlite:///{tmp_path}/audit.db")
    try:
        async with store.engine.begin() as conn:
            await conn.execute(
                text(
                    "CREATE TRIGGER refuse BEFORE INSERT ON audit_records "
                    "BEGIN SELECT RAISE(ABORT, 'disk says no'); END"
                )
            )
        async with AuditWriter(store) as writer:
            results = await asyncio.gather(
                *(writer.write(make_record(i)) for i in range(10)), return_exceptions=True
            )
            assert all(isinstance(r, AuditStoreError) for r in results), results
            assert "disk says no" in str(results[0])
            assert writer.failed == 10 and writer.written == 0
            async with store.engine.begin() as conn:
                await conn.execute(text("DROP TRIGGER refuse"))
            await writer.write(make_record(11))
        assert writer.written == 1
        assert await store.count() == 1
    finally:
        await store.close()


# --- export -----------------------------------------------------------------------------------


async def test_export_jsonl_equals_what_was_written(store: AuditStore) -> None:
    recs = [make_record(i, user="bob" if i % 2 else "alice") for i in range(30)]
    await store.write_many(recs)
    out = io.StringIO()
    assert await export_jsonl(store, out) == 30
    lines = out.getvalue().splitlines()
    assert [json.loads(line) for line in lines] == [r.to_json() for r in recs]
    out = io.StringIO()
    assert await export_jsonl(store, out, user="bob", since=T0 + timedelta(seconds=10), batch=4) == 10
    assert [AuditRecord.from_json(json.loads(x)) for x in out.getvalue().splitlines()] == [
        r for r in recs[10:] if r.user == "bob"
    ]


async def test_run_export_to_file(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/audit.db"
    store = await AuditStore.open(url)
    recs = [with_effect(make_record(i), "deny" if i % 3 == 0 else "allow") for i in range(9)]
    try:
        await store.write_many(recs)
    finally:
        await store.close()
    target = tmp_path / "out.jsonl"
    n = await asyncio.to_thread(
        run_export, url, "jsonl", str(target),
        since=None, until=None, user=None, tool=None, effect="deny", status=None,
    )  # fmt: skip
    assert n == 3
    assert [json.loads(x) for x in target.read_text().splitlines()] == [r.to_json() for r in recs[::3]]
    assert not (tmp_path / "out.jsonl.partial").exists()
    with pytest.raises(ValueError, match="format xml is not supported; use one of jsonl, csv, ocsf"):
        run_export(url, "xml", None, since=None, until=None, user=None, tool=None, effect=None, status=None)
    with pytest.raises(AuditStoreError):
        await asyncio.to_thread(
            run_export, f"sqlite+aiosqlite:///{tmp_path}/nope.db", "jsonl", str(tmp_path / "x.jsonl"),
            since=None, until=None, user=None, tool=None, effect=None, status=None,
        )  # fmt: skip
    assert not (tmp_path / "x.jsonl").exists() and not (tmp_path / "x.jsonl.partial").exists()


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=("Cs",))),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(st.characters(exclude_categories=("Cs",)), max_size=6), inner, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(_JSON)
def test_canonical_json_fast_path_writes_the_plain_encoders_bytes(value: Any) -> None:
    """orjson (with ECMAScript floats) must produce exactly the reference encoder's RFC 8785 bytes."""
    assert canonical_json(value) == canonical_json_plain(value)


async def test_complete_later_rides_with_the_next_batch(store: AuditStore) -> None:
    """`audit.durability: intent`: completions are not awaited; they join the next batch someone
    waits for (no commit of their own), else they are committed alone within `LAZY_S`."""
    pending = [with_status(make_record(i), "pending") for i in range(5)]
    async with AuditWriter(store, window_ms=0) as writer:
        await asyncio.gather(*(writer.begin(r) for r in pending))
        batches = writer.batches
        for r in pending[:3]:
            writer.complete_later(r.id, {"status": "completed", "latency_ms": 1.0}, None)
        assert {r.status for r in await read_all(store)} == {"pending"}  # nothing committed yet
        await writer.write(make_record(10))  # a denial: the completions ride with it
        assert writer.batches == batches + 1
        stored = {r.id: r.status for r in await read_all(store)}
        assert [stored[r.id] for r in pending] == ["completed"] * 3 + ["pending"] * 2
        writer.complete_later(pending[3].id, {"status": "completed", "latency_ms": 1.0}, None)
        await asyncio.sleep(writer_mod.LAZY_S * 4)  # nobody else writes: committed alone
        assert {r.id: r.status for r in await read_all(store)}[pending[3].id] == "completed"
        writer.complete_later(pending[4].id, {"status": "completed", "latency_ms": 1.0}, None)
    # closing commits what is left
    assert {r.status for r in await read_all(store) if r.id in {p.id for p in pending}} == {"completed"}
