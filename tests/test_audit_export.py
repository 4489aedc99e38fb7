"""Export: csv and OCSF shapes, filters, the progress bar, and constant memory at 200,000 records."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sqlite3
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from alembic import command
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Connection, event, inspect, text
from sqlalchemy.ext.asyncio import create_async_engine
from test_audit import PG_URL, T0, _drop_pg_table, make_record

from audit import migrations
from audit.checkpoint import CheckpointSigner
from audit.export import CSV_COLUMNS, export_csv, export_ocsf, ocsf_event, run_export
from audit.record import AuditRecord
from audit.store import AuditStore, AuditStoreError, _row, audit_records
from audit.verify import verify
from audit.writer import AuditWriter
from gateway.cli import main as cli_main


def varied(i: int) -> AuditRecord:
    denied = i % 3 == 0
    rec = make_record(
        i,
        user=("alice", "bob", "=HYPERLINK(evil)")[i % 3 if i % 7 else 2],
        tool=("read_note", "transfer")[i % 2],
        decision={
            "effect": "deny" if denied else "allow",
            "reasons": [{"policy": "transfer-limit", "reason": "too much"}] if denied else [],
            "policy_ids": ["transfer-limit"] if denied else ["readers"],
            "policy_version": "v1",
            "stage": "policy",
        },
    )
    status = "denied" if denied else ("failed" if i % 5 == 0 else "completed")
    return AuditRecord.from_json({**rec.to_json(), "outcome": {**rec.outcome, "status": status}})


@pytest.fixture
async def filled(tmp_path: Path) -> tuple[str, list[AuditRecord]]:
    url = f"sqlite+aiosqlite:///{tmp_path}/audit.db"
    recs = [varied(i) for i in range(60)]
    store = await AuditStore.open(url)
    try:
        await store.write_many(recs)
    finally:
        await store.close()
    return url, recs


def export(url: str, fmt: str, out: Path, **filters: Any) -> int:
    args: dict[str, Any] = {k: None for k in ("since", "until", "user", "tool", "effect", "status")}
    args.update(filters)
    return run_export(url, fmt, str(out), progress=False, **args)


@pytest.mark.parametrize(
    "filters",
    [
        {},
        {"user": "bob"},
        {"tool": "transfer", "effect": "deny"},
        {"status": "failed"},
        {"since": T0 + timedelta(seconds=10), "until": T0 + timedelta(seconds=40)},
        {"user": "bob", "since": T0 + timedelta(seconds=30), "status": "completed"},
    ],
    ids=lambda f: ",".join(sorted(f)) or "all",
)
@pytest.mark.parametrize("fmt", ["jsonl", "csv", "ocsf"])
async def test_export_filters(
    filled: tuple[str, list[AuditRecord]], tmp_path: Path, fmt: str, filters: dict[str, Any]
) -> None:
    url, recs = filled
    since, until = filters.get("since"), filters.get("until")
    want = [
        r
        for r in recs
        if (since is None or r.ts >= since)
        and (until is None or r.ts < until)
        and all(getattr(r, k) == v for k, v in filters.items() if k in ("user", "tool", "effect", "status"))
    ]
    assert want, "every filter case selects something"
    out = tmp_path / f"out.{fmt}"
    assert await asyncio.to_thread(export, url, fmt, out, **filters) == len(want)
    text = out.read_text()
    if fmt == "jsonl":
        got = [json.loads(line)["id"] for line in text.splitlines()]
    elif fmt == "csv":
        got = [row["id"] for row in csv.DictReader(io.StringIO(text))]
    else:
        got = [json.loads(line)["metadata"]["uid"] for line in text.splitlines()]
    assert got == [r.id for r in want]


async def test_csv_columns_and_formula_injection(filled: tuple[str, list[AuditRecord]]) -> None:
    url, recs = filled
    store = await AuditStore.open(url, create=False)
    out = io.StringIO()
    try:
        assert await export_csv(store, out) == len(recs)
    finally:
        await store.close()
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert tuple(rows[0]) == CSV_COLUMNS
    first = rows[0]
    assert first["effect"] == "deny" and first["policy_ids"] == "transfer-limit"
    assert first["reasons"] == "transfer-limit: too much" and first["status"] == "denied"
    evil = [r for r in rows if "HYPERLINK" in r["user"]]
    assert evil and all(r["user"] == "'=HYPERLINK(evil)" for r in evil), "formulas are neutralised"


async def test_ocsf_api_activity_fields(filled: tuple[str, list[AuditRecord]]) -> None:
    url, recs = filled
    store = await AuditStore.open(url, create=False)
    out = io.StringIO()
    try:
        assert await export_ocsf(store, out) == len(recs)
    finally:
        await store.close()
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    by_id = {r.id: r for r in recs}
    for ev in events:
        rec = by_id[ev["metadata"]["uid"]]
        assert (ev["class_uid"], ev["category_uid"], ev["type_uid"]) == (6003, 6, 600399)
        assert ev["class_name"] == "API Activity" and ev["metadata"]["version"] == "1.3.0"
        assert ev["time"] == int(rec.ts.timestamp() * 1000) and ev["time_dt"] == rec.to_json()["ts"]
        assert ev["actor"]["user"]["uid"] == rec.user and ev["actor"]["user"]["org"]["uid"] == "acme"
        assert ev["actor"]["app_name"] == "planner"
        assert ev["api"]["operation"] == rec.tool and ev["api"]["service"]["name"] == "notes"
        assert ev["resources"][0]["uid"] == f"notes/{rec.tool}"
        assert ev["metadata"]["correlation_uid"] == rec.trace_id
        assert ev["unmapped"]["args_hmac"] == rec.args_hmac
        assert ev["actor"]["authorizations"][0]["policy"]["version"] == "v1"
        if rec.effect == "deny":
            assert (ev["status_id"], ev["action_id"], ev["disposition"], ev["severity_id"]) == (
                2,
                2,
                "Blocked",
                3,
            )
            assert ev["status_detail"] == "transfer-limit: too much"
        elif rec.status == "completed":
            assert (ev["status_id"], ev["action_id"], ev["disposition"], ev["severity_id"]) == (
                1,
                1,
                "Allowed",
                1,
            )
        else:
            assert ev["status_id"] == 2 and ev["action_id"] == 1
    assert {ev["status_code"] for ev in events} == {"denied", "completed", "failed"}
    pending = ocsf_event({**recs[1].to_json(), "outcome": {"status": "pending"}})
    assert pending["status_id"] == 0 and pending["action"] == "Allowed"


async def test_progress_bar_on_stderr(
    filled: tuple[str, list[AuditRecord]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, recs = filled
    out = tmp_path / "x.csv"
    n = await asyncio.to_thread(
        run_export, url, "csv", str(out),
        since=None, until=None, user=None, tool=None, effect=None, status=None, progress=True,
    )  # fmt: skip
    err = capsys.readouterr().err
    assert n == len(recs)
    assert f"exported {len(recs)}/{len(recs)} [" in err and "100%" in err
    assert "exported" not in out.read_text()


def _fill_raw(path: Path, n: int) -> None:
    """n realistic rows straight into SQLite (the writer would take far longer to make them)."""
    template = make_record(0).to_json()
    db = sqlite3.connect(path)
    try:
        rows = []
        for i in range(n):
            doc = {
                **template,
                "id": f"r{i:09d}",
                "ts": (T0 + timedelta(milliseconds=i)).isoformat()[:26] + "Z",
            }
            text = json.dumps(doc, separators=(",", ":"))
            ts = (T0 + timedelta(milliseconds=i)).replace(tzinfo=None).isoformat(" ", "microseconds")
            rows.append((doc["id"], ts, text))
            if len(rows) == 20_000:
                db.executemany(_INSERT, rows)
                rows.clear()
        db.executemany(_INSERT, rows)
        db.commit()
    finally:
        db.close()


_INSERT = (
    "INSERT INTO audit_records (id, ts, schema_version, instance, user, upstream, tool, action, effect, "
    "status, record) VALUES (?, ?, 2, 'bastion-1', 'alice', 'notes', 'read_note', 'call_tool', 'allow', "
    "'ok', ?)"
)


async def _peak_rss_kib(url: str, out: Path, fmt: str) -> tuple[int, int]:
    code = (
        "import resource, sys\n"
        "from gateway.cli import main\n"
        f"rc = main(['audit', 'export', '--url', {url!r}, '--format', {fmt!r}, '-o', {str(out)!r}])\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    lines = err.decode().strip().splitlines()
    count = int(lines[0].split()[1])
    return int(lines[-1]), count


async def test_export_of_200k_records_runs_in_constant_memory(tmp_path: Path) -> None:
    peaks = {}
    for n in (2_000, 200_000):
        url = f"sqlite+aiosqlite:///{tmp_path}/a{n}.db"
        await (await AuditStore.open(url)).close()
        await asyncio.to_thread(_fill_raw, tmp_path / f"a{n}.db", n)
        out = tmp_path / f"a{n}.jsonl"
        peaks[n], count = await _peak_rss_kib(url, out, "jsonl")
        assert count == n
        with out.open() as f:
            assert sum(1 for _ in f) == n
    size_mib = (tmp_path / "a200000.jsonl").stat().st_size / 2**20
    grew_mib = (peaks[200_000] - peaks[2_000]) / 1024
    print(f"export peak RSS: {peaks[2_000] / 1024:.0f} MiB for 2k, {peaks[200_000] / 1024:.0f} MiB for 200k "
          f"records ({size_mib:.0f} MiB of JSONL)")  # fmt: skip
    assert size_mib > 100, "the export is much larger than the memory it may use"
    assert grew_mib < 40, f"peak RSS grew {grew_mib:.1f} MiB from 2k to 200k records"


# --- one call across protocols: --call-id and --protocol ---------------------------------------

SHARED = "toolu_01XFDUDYJgAACzvnptvVoYEL"
PENDING_OUTCOME = {"status": "pending", "latency_ms": None, "upstream_status": None, "error": None}
DONE_OUTCOME = {"status": "completed", "latency_ms": 2.5, "upstream_status": 200, "error": None}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.pg)])
async def any_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/audit.db"
    if not PG_URL:
        pytest.skip("BASTION_TEST_PG not set: PostgreSQL audit store tests skipped")
    await _drop_pg_table(PG_URL)
    return PG_URL


def one_call_and_others() -> tuple[list[AuditRecord], list[AuditRecord]]:
    """The model's tool_use decided (llm) and the tool run over MCP, both under one call id; and
    records that must not match it: other call ids (one a prefix of it), none, other protocols."""
    decided = make_record(0, call_id=SHARED, protocol="llm", upstream="anthropic")
    ran = make_record(3, call_id=SHARED, protocol="mcp")
    others = [
        make_record(1, call_id="toolu_other", protocol="llm", upstream="anthropic"),
        make_record(2, call_id=SHARED + "2", protocol="mcp"),
        make_record(4, call_id=SHARED[:-1], protocol="mcp"),
        make_record(5, call_id=None, protocol="http"),
        make_record(6, call_id="c-6", protocol="http"),
    ]
    return [decided, ran], others


def write_config(tmp_path: Path, url: str) -> Path:
    config = tmp_path / "bastion.yaml"
    config.write_text(yaml.safe_dump({"audit": {"url": url, "signing_key_file": str(tmp_path / "k.key")}}))
    return config


async def cli_export(config: Path, out: Path, *args: str) -> list[str]:
    """`bastion audit export` through the CLI entry point; the exported record ids, in order."""
    argv = ["audit", "export", "--config", str(config), "-o", str(out), "--no-progress", *args]
    assert await asyncio.to_thread(cli_main, argv) == 0
    return [json.loads(line)["id"] for line in out.read_text().splitlines()]


async def stored_copies(url: str) -> dict[str, tuple[str | None, str | None, str]]:
    """id: (call_id, protocol, the stored document) for every row, as the database holds them."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(text("SELECT id, call_id, protocol, record FROM audit_records"))).all()
    finally:
        await engine.dispose()
    return {r.id: (r.call_id, r.protocol, r.record) for r in rows}


async def test_export_by_call_id_finds_every_protocol_of_one_call(any_url: str, tmp_path: Path) -> None:
    (decided, ran), others = one_call_and_others()
    key = Ed25519PrivateKey.generate()
    store = await AuditStore.open(any_url)
    try:
        async with AuditWriter(store, signer=CheckpointSigner(key)) as writer:
            await writer.write(decided)
            await writer.begin(make_record(3, id=ran.id, call_id=SHARED, protocol="mcp",
                                           outcome=dict(PENDING_OUTCOME), result_sha256=None))  # fmt: skip
            for rec in others:
                await writer.write(rec)
            await writer.complete(ran.id, dict(DONE_OUTCOME), "ef" * 32)
        assert (await verify(store, key.public_key())).ok
    finally:
        await store.close()

    copies = await stored_copies(any_url)
    for call in (decided, ran, *others):  # written whole, or begun and completed: the copies are set
        call_id, protocol, doc = copies[call.id]
        assert (call_id, protocol) == (call.call_id, call.protocol)
        assert (json.loads(doc)["call_id"], json.loads(doc)["protocol"]) == (call_id, protocol)
    assert json.loads(copies[ran.id][2])["outcome"]["status"] == "completed"

    config = write_config(tmp_path, any_url)
    out = tmp_path / "out.jsonl"
    assert await cli_export(config, out, "--call-id", SHARED) == [decided.id, ran.id]
    assert await cli_export(config, out, "--call-id", SHARED, "--protocol", "mcp") == [ran.id]
    assert await cli_export(config, out, "--call-id", SHARED, "--protocol", "http") == []
    assert await cli_export(config, out, "--call-id", "nope") == []
    assert await cli_export(config, out, "--protocol", "llm") == [decided.id, others[0].id]
    assert await cli_export(config, out, "--protocol", "http") == [others[3].id, others[4].id]
    csv_out = tmp_path / "out.csv"
    argv = ["audit", "export", "--config", str(config), "--format", "csv", "-o", str(csv_out),
            "--call-id", SHARED]  # fmt: skip
    assert await asyncio.to_thread(cli_main, argv) == 0
    rows = list(csv.DictReader(io.StringIO(csv_out.read_text())))
    assert [(r["id"], r["protocol"], r["call_id"]) for r in rows] == [
        (decided.id, "llm", SHARED),
        (ran.id, "mcp", SHARED),
    ]


def test_cli_rejects_an_unknown_protocol(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["audit", "export", "--url", f"sqlite+aiosqlite:///{tmp_path}/a.db", "--protocol", "smtp"])
    assert exc.value.code == 2 and "invalid choice: 'smtp'" in capsys.readouterr().err


async def test_call_id_lookup_uses_its_index_on_sqlite(tmp_path: Path) -> None:
    """The queries export runs (first page and the keyset pages after it) search the index."""
    path = tmp_path / "audit.db"
    url = f"sqlite+aiosqlite:///{path}"
    (decided, ran), others = one_call_and_others()
    store = await AuditStore.open(url)
    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if "FROM audit_records" in statement and "call_id" in statement:
            seen.append((statement, params))

    try:
        await store.write_many([decided, ran, *others])
        event.listen(store.engine.sync_engine, "before_cursor_execute", capture)
        got = [json.loads(t)["id"] async for t in store.iter_raw(call_id=SHARED, batch=1)]
        assert await store.count(call_id=SHARED) == 2
    finally:
        await store.close()
    assert got == [decided.id, ran.id]
    assert len(seen) >= 3, "a first page, a keyset page and the count"
    with sqlite3.connect(path) as db:
        for statement, params in seen:
            plan = " ".join(row[-1] for row in db.execute(f"EXPLAIN QUERY PLAN {statement}", params))
            assert "ix_audit_records_call_id" in plan, (statement, plan)


# --- a store at revision 0002 -------------------------------------------------------------------


@pytest.mark.parametrize("edited", [False, True], ids=["clean", "with-edited-row"])
async def test_revision_0002_store_is_backfilled_and_searchable(
    any_url: str, tmp_path: Path, edited: bool
) -> None:
    """Rows written before 0003 get their call_id and protocol from the stored document. A row
    whose document is not JSON (an edit that verify reports) is left without them."""
    (decided, ran), others = one_call_and_others()
    written = (decided, ran, *others)
    garbled = make_record(7, call_id=SHARED)
    rows = [_row(r) for r in written]
    if edited:
        rows.append({**_row(garbled), "record": "{not json"})
    for row in rows:  # as 0002 stored them: no such columns
        del row["call_id"], row["protocol"]
    engine = create_async_engine(any_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(lambda c: command.upgrade(migrations._config(c), "0002"))
            assert "call_id" not in {c["name"] for c in await conn.run_sync(_columns)}
            await conn.execute(audit_records.insert(), rows)
    finally:
        await engine.dispose()
    with pytest.raises(AuditStoreError, match="revision 0002, this version needs 0004"):
        await AuditStore.open(any_url, create=False)

    config = write_config(tmp_path, any_url)
    assert await asyncio.to_thread(cli_main, ["audit", "migrate", "--config", str(config)]) == 0
    copies = await stored_copies(any_url)
    assert {r.id: copies[r.id][:2] for r in written} == {r.id: (r.call_id, r.protocol) for r in written}
    if edited:
        assert copies[garbled.id][:2] == (None, None)
    out = tmp_path / "out.jsonl"
    assert await cli_export(config, out, "--call-id", SHARED) == [decided.id, ran.id]
    assert await cli_export(config, out, "--protocol", "llm") == [decided.id, others[0].id]


def _columns(conn: Connection) -> list[Any]:
    return list(inspect(conn).get_columns("audit_records"))
