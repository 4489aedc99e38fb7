"""Tamper evidence: the hash chain, signed checkpoints, verify, crash recovery, purge, migrations.

Every kind of tampering is done to a real SQLite file with plain SQL, as an attacker with write
access to the database would, and `verify` must name where the chain breaks.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_audit import PG_URL, T0, _drop_pg_table, make_record

from audit.chain import document_hash
from audit.checkpoint import CheckpointSigner, load_or_create_signing_key, load_public_key
from audit.record import SCHEMA_VERSION, AuditRecord
from audit.retention import purge
from audit.store import AuditStore, AuditStoreError
from audit.verify import VerifyResult, verify
from audit.writer import AuditWriter

N = 20
OK_OUTCOME = {"status": "completed", "latency_ms": 2.5, "upstream_status": 200, "error": None}
PENDING_OUTCOME = {"status": "pending", "latency_ms": None, "upstream_status": None, "error": None}


def pending(i: int, **over: Any) -> AuditRecord:
    return make_record(i, outcome=dict(PENDING_OUTCOME), result_sha256=None, **over)


async def build_chain(url: str, key: Ed25519PrivateKey, n: int = N, instance: str = "bastion-1") -> list[str]:
    """n records: even ones written whole (denials), odd ones begun then completed; ids in chain order."""
    store = await AuditStore.open(url)
    order: list[str] = []
    try:
        async with AuditWriter(store, signer=CheckpointSigner(key), checkpoint_every=5) as writer:
            for i in range(n):
                if i % 2 == 0:
                    rec = make_record(i, instance=instance, decision={"effect": "deny", "reasons": []})
                    rec = AuditRecord.from_json(
                        {**rec.to_json(), "outcome": {**OK_OUTCOME, "status": "denied"}}
                    )
                    await writer.write(rec)
                else:
                    rec = pending(i, instance=instance)
                    await writer.begin(rec)
                    await writer.complete(rec.id, dict(OK_OUTCOME), "ab" * 32)
                order.append(rec.id)
    finally:
        await store.close()
    return order


async def run_verify(url: str, key: Ed25519PrivateKey | None) -> VerifyResult:
    store = await AuditStore.open(url, create=False)
    try:
        return await verify(store, key.public_key() if key else None)
    finally:
        await store.close()


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
async def chain_db(tmp_path: Path, key: Ed25519PrivateKey) -> tuple[Path, list[str]]:
    path = tmp_path / "pristine.db"
    ids = await build_chain(f"sqlite+aiosqlite:///{path}", key)
    return path, ids


def sql(path: Path, *statements: tuple[str, tuple[Any, ...]]) -> None:
    with sqlite3.connect(path) as db:
        for stmt, params in statements:
            db.execute(stmt, params)


def row_at(path: Path, seq: int) -> dict[str, Any]:
    with sqlite3.connect(path) as db:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM audit_records WHERE seq = ?", (seq,)).fetchone()
        return dict(row)


async def test_chain_is_complete_and_verifies(
    chain_db: tuple[Path, list[str]], key: Ed25519PrivateKey
) -> None:
    path, ids = chain_db
    url = f"sqlite+aiosqlite:///{path}"
    result = await run_verify(url, key)
    assert result.ok, result.lines()
    inst = result.instances[0]
    assert (inst.records, inst.first_seq, inst.last_seq) == (N, 1, N)
    assert inst.checkpoints == N // 5 and inst.newest_checkpoint and inst.newest_checkpoint.seq == N
    store = await AuditStore.open(url, create=False)
    try:
        records = {r.id: r async for r in store.iter_records()}
    finally:
        await store.close()
    prev = None
    for seq, rid in enumerate(ids, 1):
        rec = records[rid]
        assert rec.seq == seq and rec.prev_hash == prev and rec.schema_version == SCHEMA_VERSION == 2
        assert rec.hash == document_hash({**rec.to_json()})
        prev = rec.hash
    assert records[ids[1]].status == "completed" and records[ids[1]].result_sha256 == "ab" * 32
    assert records[ids[0]].status == "denied"


def _edit_json(path: Path, seq: int, change: Callable[[dict[str, Any]], None]) -> str:
    row = row_at(path, seq)
    doc = json.loads(row["record"])
    change(doc)
    sql(path, ("UPDATE audit_records SET record = ? WHERE id = ?", (json.dumps(doc), row["id"])))
    return str(row["id"])


def _rehash_from(path: Path, seq: int) -> None:
    """What an attacker without the signing key can do: recompute every later hash."""
    prev = row_at(path, seq - 1)["hash"]
    for s in range(seq, N + 1):
        row = row_at(path, s)
        doc = json.loads(row["record"])
        doc["prev_hash"] = prev
        doc["hash"] = document_hash(doc)
        sql(
            path,
            (
                "UPDATE audit_records SET record = ?, prev_hash = ?, hash = ? WHERE id = ?",
                (json.dumps(doc), prev, doc["hash"], row["id"]),
            ),
        )
        prev = doc["hash"]


def tamper_edit(path: Path) -> tuple[int, str]:
    _edit_json(path, 7, lambda d: d.update(user="mallory"))
    return 7, "does not match its hash"


def tamper_edit_column(path: Path) -> tuple[int, str]:
    sql(path, ("UPDATE audit_records SET effect = 'deny' WHERE seq = 8", ()))
    return 8, "disagree with the hashed record"


def tamper_edit_and_rehash(path: Path) -> tuple[int, str]:
    """Edited at 7 with every later hash recomputed: the signed checkpoint at 10 catches it."""
    row = row_at(path, 7)
    doc = json.loads(row["record"])
    doc["decision"]["effect"] = "allow"
    sql(
        path,
        ("UPDATE audit_records SET record = ?, effect = 'allow' WHERE id = ?", (json.dumps(doc), row["id"])),
    )
    _rehash_from(path, 7)
    return 10, "signed checkpoint"


def tamper_delete(path: Path) -> tuple[int, str]:
    sql(path, ("DELETE FROM audit_records WHERE seq = 7", ()))
    return 8, "seq 7..7 are missing"


def tamper_delete_head(path: Path) -> tuple[int, str]:
    sql(path, ("DELETE FROM audit_records WHERE seq <= 3", ()))
    return 4, "the chain starts at seq 4"


def tamper_insert_middle(path: Path) -> tuple[int, str]:
    """A forged record slipped in at seq 7 (later ones renumbered): the link after it breaks."""
    for s in range(N, 6, -1):
        sql(path, ("UPDATE audit_records SET seq = ? WHERE seq = ?", (s + 1, s)))
    prev = row_at(path, 6)["hash"]
    forged = make_record(99, user="mallory", ts=T0 + timedelta(seconds=6.5)).to_json()
    forged.update(seq=7, prev_hash=prev, hash=None)
    forged["hash"] = document_hash(forged)
    sql(
        path,
        (
            "INSERT INTO audit_records (id, ts, schema_version, instance, user, upstream, tool, action, "
            "effect, status, prev_hash, hash, record, seq, call_id, protocol) VALUES (?, ?, 2, 'bastion-1', "
            "'mallory', 'notes', 'read_note', 'call_tool', 'allow', 'ok', ?, ?, ?, 7, ?, ?)",
            (
                forged["id"],
                "2025-03-01 12:00:06.623456",
                prev,
                forged["hash"],
                json.dumps(forged),
                forged["call_id"],
                forged["protocol"],
            ),
        ),
    )
    return 8, "disagrees with the hashed record"


def tamper_insert_outside(path: Path) -> tuple[int | None, str]:
    forged = make_record(98, user="mallory").to_json()
    sql(
        path,
        (
            "INSERT INTO audit_records (id, ts, schema_version, instance, user, upstream, tool, action, "
            "effect, status, record) VALUES (?, '2025-03-01 12:00:06', 2, 'bastion-1', 'mallory', 'notes', "
            "'read_note', 'call_tool', 'allow', 'ok', ?)",
            (forged["id"], json.dumps(forged)),
        ),
    )
    return None, "outside the chain"


def tamper_reorder(path: Path) -> tuple[int, str]:
    sql(
        path,
        ("UPDATE audit_records SET seq = -1 WHERE seq = 7", ()),
        ("UPDATE audit_records SET seq = 7 WHERE seq = 8", ()),
        ("UPDATE audit_records SET seq = 8 WHERE seq = -1", ()),
    )
    return 7, "disagrees with the hashed record"


def tamper_truncate(path: Path) -> tuple[int, str]:
    sql(path, ("DELETE FROM audit_records WHERE seq > 12", ()))
    return 13, "truncated tail"


def tamper_truncate_and_unlink_checkpoints(path: Path) -> tuple[int, str]:
    """Cutting the tail and deleting the newest checkpoints still leaves an older one uncovered."""
    sql(
        path,
        ("DELETE FROM audit_records WHERE seq > 7", ()),
        ("DELETE FROM audit_checkpoints WHERE seq > 10", ()),
    )
    return 8, "truncated tail"


def tamper_checkpoint(path: Path) -> tuple[int, str]:
    sql(path, ("UPDATE audit_checkpoints SET seq = 12 WHERE seq = 15", ()))
    return 12, "bad signature"


TAMPERING = [
    tamper_edit,
    tamper_edit_column,
    tamper_edit_and_rehash,
    tamper_delete,
    tamper_delete_head,
    tamper_insert_middle,
    tamper_insert_outside,
    tamper_reorder,
    tamper_truncate,
    tamper_truncate_and_unlink_checkpoints,
    tamper_checkpoint,
]


@pytest.mark.parametrize("tamper", TAMPERING, ids=lambda f: f.__name__.removeprefix("tamper_"))
async def test_verify_detects_tampering(
    chain_db: tuple[Path, list[str]],
    key: Ed25519PrivateKey,
    tmp_path: Path,
    tamper: Callable[[Path], tuple[int | None, str]],
) -> None:
    pristine, ids = chain_db
    path = tmp_path / "tampered.db"
    shutil.copy(pristine, path)
    with sqlite3.connect(path) as db:
        before = {r[0]: r[1] for r in db.execute("SELECT seq, id FROM audit_records WHERE seq IS NOT NULL")}
    seq, words = tamper(path)
    result = await run_verify(f"sqlite+aiosqlite:///{path}", key)
    assert not result.ok
    problem = result.problems[0]
    assert words in problem.message, result.lines()
    assert problem.seq == seq
    if problem.record_id is not None and seq is not None and seq in before and "missing" not in words:
        assert problem.record_id in ids
    assert "verify: FAILED" in result.lines()[-1]


async def test_checkpoints_need_the_right_key(chain_db: tuple[Path, list[str]]) -> None:
    path, _ = chain_db
    url = f"sqlite+aiosqlite:///{path}"
    result = await run_verify(url, Ed25519PrivateKey.generate())
    assert not result.ok and "bad signature" in result.problems[0].message
    unchecked = await run_verify(url, None)
    assert unchecked.ok and "signatures were not checked" in "\n".join(unchecked.lines())


async def test_crash_leaves_pending_then_recovery_marks_interrupted(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/audit.db"
    store = await AuditStore.open(url)
    try:
        crashed = AuditWriter(store, signer=CheckpointSigner(key))
        await crashed.start()
        recs = [pending(i) for i in range(4)]
        for r in recs:
            await crashed.begin(r)
        await crashed.complete(recs[0].id, dict(OK_OUTCOME), None)
        assert crashed.in_flight == 3
        crashed._task.cancel()  # type: ignore[union-attr]  # the process dies: nothing more is written
        with pytest.raises(asyncio.CancelledError):
            await crashed._task  # type: ignore[misc]
        statuses = {r.id: r.status async for r in store.iter_records()}
        assert statuses == {recs[0].id: "completed", **{r.id: "pending" for r in recs[1:]}}
        mid = await run_verify(url, key)
        assert mid.ok and mid.pending == 3, mid.lines()

        async with AuditWriter(store, signer=CheckpointSigner(key)) as restarted:
            assert await restarted.recover("bastion-1") == 3
            assert await restarted.recover("bastion-1") == 0
        after = {r.id: r async for r in store.iter_records()}
    finally:
        await store.close()
    for r in recs[1:]:
        assert after[r.id].status == "interrupted" and after[r.id].seq is not None
        assert after[r.id].decision == r.decision, "the decision written ahead is kept"
    result = await run_verify(url, key)
    assert result.ok and result.pending == 0 and result.instances[0].records == 4


async def test_complete_of_unknown_id_fails(tmp_path: Path) -> None:
    store = await AuditStore.open(f"sqlite+aiosqlite:///{tmp_path}/audit.db")
    try:
        async with AuditWriter(store) as writer:
            with pytest.raises(AuditStoreError, match="no pending audit record"):
                await writer.complete("nope", dict(OK_OUTCOME), None)
            await writer.write(make_record(1))
        assert await store.count() == 1
    finally:
        await store.close()


async def test_begin_and_complete_are_group_committed(tmp_path: Path) -> None:
    store = await AuditStore.open(f"sqlite+aiosqlite:///{tmp_path}/audit.db")
    try:
        async with AuditWriter(store, window_ms=5) as writer:
            recs = [pending(i) for i in range(200)]
            await asyncio.gather(*(writer.begin(r) for r in recs))
            begun = writer.batches
            await asyncio.gather(*(writer.complete(r.id, dict(OK_OUTCOME), None) for r in recs))
            assert begun <= 5 and writer.batches - begun <= 5, "200 concurrent calls share a few commits"
        assert await store.count(status="completed") == 200
    finally:
        await store.close()


async def test_purge_keeps_the_chain_verifiable(
    chain_db: tuple[Path, list[str]], key: Ed25519PrivateKey
) -> None:
    path, ids = chain_db
    url = f"sqlite+aiosqlite:///{path}"
    store = await AuditStore.open(url, create=False)
    try:
        done = await purge(store, T0 + timedelta(seconds=8), CheckpointSigner(key))
        assert [(p.instance, p.through_seq, p.records) for p in done] == [("bastion-1", 8, 8)]
        assert await purge(store, T0 + timedelta(seconds=8), CheckpointSigner(key)) == []
        left = [r.id async for r in store.iter_records()]
    finally:
        await store.close()
    assert left == ids[8:]
    result = await run_verify(url, key)
    assert result.ok, result.lines()
    assert result.instances[0].purged_through == 8 and result.instances[0].first_seq == 9
    sql(path, ("DELETE FROM audit_checkpoints WHERE kind = 'purge'", ()))
    unsigned = await run_verify(url, key)
    assert not unsigned.ok and "the chain starts at seq 9" in unsigned.problems[0].message


async def test_schema_v1_database_is_migrated_and_readers_ask_for_it(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # the table as the first release created it, no Alembic
        db.execute(
            "CREATE TABLE audit_records (id VARCHAR(64) PRIMARY KEY, ts DATETIME NOT NULL, "
            "schema_version INTEGER NOT NULL, instance VARCHAR(255) NOT NULL, user VARCHAR(255), "
            "tenant VARCHAR(255), agent VARCHAR(255), upstream VARCHAR(255) NOT NULL, "
            "tool VARCHAR(255) NOT NULL, "
            "action VARCHAR(64) NOT NULL, effect VARCHAR(32), status VARCHAR(32), prev_hash VARCHAR(128), "
            "hash VARCHAR(128), record TEXT NOT NULL)"
        )
        old = make_record(0, schema_version=1).to_json()
        db.execute(
            "INSERT INTO audit_records VALUES (?, '2025-03-01 12:00:00.123456', 1, 'bastion-1', 'alice', "
            "'acme', 'planner', 'notes', 'read_note', 'call_tool', 'allow', 'ok', NULL, NULL, ?)",
            (old["id"], json.dumps(old)),
        )
    url = f"sqlite+aiosqlite:///{path}"
    with pytest.raises(AuditStoreError, match="run `bastion audit migrate`"):
        await AuditStore.open(url, create=False)
    store = await AuditStore.open(url)
    try:
        async with AuditWriter(store, signer=CheckpointSigner(key)) as writer:
            await writer.write(make_record(1))
        records = [r async for r in store.iter_records()]
    finally:
        await store.close()
    assert [r.schema_version for r in records] == [1, 2]
    assert records[0].seq is None and records[1].seq == 1
    result = await run_verify(url, key)
    assert result.ok and result.legacy == 1, result.lines()


async def test_signing_key_file_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "audit-signing.key"
    key = load_or_create_signing_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    again = load_or_create_signing_key(path)
    assert CheckpointSigner(again).key_id == CheckpointSigner(key).key_id
    assert CheckpointSigner(key).key_id == CheckpointSigner(load_or_create_signing_key(path)).key_id
    assert load_public_key(path) is not None


@pytest.mark.pg
async def test_postgres_replicas_keep_one_chain_each(key: Ed25519PrivateKey) -> None:
    if not PG_URL:
        pytest.skip("BASTION_TEST_PG not set: PostgreSQL audit store tests skipped")
    await _drop_pg_table(PG_URL)
    await asyncio.gather(build_chain(PG_URL, key, 10, "replica-a"), build_chain(PG_URL, key, 12, "replica-b"))
    result = await run_verify(PG_URL, key)
    assert result.ok, result.lines()
    assert {(i.instance, i.records) for i in result.instances} == {("replica-a", 10), ("replica-b", 12)}


async def test_cli_verify_and_purge(
    chain_db: tuple[Path, list[str]], key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives import serialization

    path, _ = chain_db
    key_file = tmp_path / "signing.key"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    config = tmp_path / "bastion.yaml"
    config.write_text(
        yaml.safe_dump({"audit": {"url": f"sqlite+aiosqlite:///{path}", "signing_key_file": str(key_file)}})
    )

    async def bastion(*args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "audit", *args, "--config", str(config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, out.decode()

    code, out = await bastion("verify")
    assert code == 0 and "verify: ok" in out and "instance bastion-1: ok, 20 records" in out, out
    code, out = await bastion("purge", "--before", "2025-03-01T12:00:05.5")
    assert code == 0 and "deleted 6 records through seq 6" in out, out
    tamper_edit(path)
    code, out = await bastion("verify")
    assert code == 1 and "seq 7" in out and "does not match its hash" in out, out
    code, out = await bastion("purge")
    assert code == 2 and "retention_days" in out


async def test_two_processes_with_one_instance_name_keep_one_valid_chain(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    """A misconfiguration (two gateways, same name, one database) must not break the chain."""
    url = f"sqlite+aiosqlite:///{tmp_path}/audit.db"
    a, b = await AuditStore.open(url), await AuditStore.open(url)
    try:
        async with (
            AuditWriter(a, signer=CheckpointSigner(key)) as wa,
            AuditWriter(b, signer=CheckpointSigner(key)) as wb,
        ):
            for i in range(10):
                await (wa if i % 2 else wb).write(make_record(i))
            await asyncio.gather(*(w.write(make_record(10 + i)) for i, w in enumerate([wa, wb] * 10)))
    finally:
        await a.close()
        await b.close()
    result = await run_verify(url, key)
    assert result.ok, result.lines()
    assert result.instances[0].records == 30
