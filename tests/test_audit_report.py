"""The review report: render it from a real store, parse the HTML, check it against the DB."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from datetime import timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import text
from test_audit import T0, make_record

from audit.checkpoint import CheckpointSigner
from audit.record import AuditRecord
from audit.store import AuditStore
from audit.writer import AuditWriter
from gateway.cli import main

SECTIONS = ("summary", "decisions", "denied", "users", "pii", "budgets", "approvals", "chain")


class Page(HTMLParser):
    """Sections, tables (rows of cell text), metrics, and every tag seen."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, str] = {}
        self.tables: dict[str, list[list[str]]] = {}
        self.metrics: dict[str, int] = {}
        self.tags: Counter[str] = Counter()
        self.bars: list[dict[str, str]] = []
        self._section: str | None = None
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._metric: str | None = None
        self._in_body = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags[tag] += 1
        if tag == "section":
            self._section = a["id"]
            self.sections[self._section] = ""
        elif tag == "table":
            self._table = a["id"]
            self.tables[self._table] = []
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self._row = []
        elif tag == "td":
            self._cell = []
        elif tag == "dd":
            self._metric = a.get("data-metric")
        elif tag == "rect" and "data-kind" in a:
            self.bars.append(a)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._row is not None and self._cell is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "tbody":
            self._in_body = False
        elif tag == "section":
            self._section = None

    def handle_data(self, data: str) -> None:
        if self._section:
            self.sections[self._section] += data
        if self._cell is not None:
            self._cell.append(data)
        if self._metric:
            self.metrics[self._metric] = int(data)
            self._metric = None


def rich(i: int) -> AuditRecord:
    """Calls over three hours from three users, with denials, budgets, approvals, PII, two policy sets."""
    kind = i % 10
    effect, stage, policy = "allow", "policy", "readers"
    if kind in (1, 2):
        effect, policy = "deny", "transfer-limit"
    elif kind == 3:
        effect, stage, policy = "deny", "budget", "budget/daily-calls"
    elif kind == 4:
        effect, stage, policy = "approval_required", "approval", "payments-need-approval"
    rec = make_record(
        i,
        ts=T0 + timedelta(minutes=3 * i),
        user=("alice", "bob", "carol")[i % 3],
        agent=("planner", "coder")[i % 2],
        tool=("read_note", "transfer", "echo")[i % 3],
        decision={
            "effect": effect,
            "reasons": [{"policy": policy, "reason": f"because {policy}"}],
            "policy_ids": [policy],
            "policy_version": "v1" if i < 30 else "v2",
            "stage": stage,
        },
        pii={
            "input": {"EMAIL_ADDRESS": 1} if i % 4 == 0 else {},
            "output": {"US_SSN": 2} if i % 6 == 0 else {},
        },
    )
    status = "completed" if effect == "allow" else "denied"
    return AuditRecord.from_json({**rec.to_json(), "outcome": {**rec.outcome, "status": status}})


async def write(url: str, key: Ed25519PrivateKey, recs: list[AuditRecord]) -> None:
    store = await AuditStore.open(url)
    try:
        async with AuditWriter(store, signer=CheckpointSigner(key)) as writer:
            for r in recs:
                await writer.write(r)
    finally:
        await store.close()


def config_for(tmp_path: Path, url: str, key: Ed25519PrivateKey) -> Path:
    key_file = tmp_path / "signing.key"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    config = tmp_path / "bastion.yaml"
    config.write_text(yaml.safe_dump({"audit": {"url": url, "signing_key_file": str(key_file)}}))
    return config


async def render(tmp_path: Path, config: Path, *extra: str) -> tuple[Page, str]:
    out = tmp_path / "report.html"
    rc = await asyncio.to_thread(main, ["audit", "report", "--config", str(config), "-o", str(out), *extra])
    assert rc == 0
    html = out.read_text()
    page = Page()
    page.feed(html)
    return page, html


async def test_report_sections_and_numbers_match_the_db(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    url = f"sqlite+aiosqlite:///{tmp_path}/audit.db"
    await write(url, key, [rich(i) for i in range(60)])
    since, until = T0 + timedelta(minutes=30), T0 + timedelta(minutes=150)
    page, html = await render(
        tmp_path, config_for(tmp_path, url, key), "--since", since.isoformat(), "--until", until.isoformat()
    )

    store = await AuditStore.open(url, create=False)
    try:
        db = [r async for r in store.iter_records(since=since, until=until)]
    finally:
        await store.close()
    assert len(db) == 40

    assert tuple(page.sections) == SECTIONS
    allowed = sum(r.effect == "allow" for r in db)
    assert page.metrics["total"] == len(db)
    assert page.metrics["allowed"] == allowed and page.metrics["denied"] == len(db) - allowed
    assert page.metrics["status-completed"] == allowed

    per_bucket: Counter[tuple[str, str]] = Counter()
    for bar in page.bars:
        per_bucket[(bar["data-bucket"], bar["data-kind"])] += int(bar["data-count"])
    assert sum(per_bucket.values()) == len(db)
    assert sum(v for (_, kind), v in per_bucket.items() if kind == "deny") == len(db) - allowed

    denied = Counter(f"{r.upstream}/{r.tool}" for r in db if r.effect != "allow")
    assert {row[0]: int(row[1]) for row in page.tables["denied-tools"]} == dict(denied)
    reasons = Counter(
        f"{r.decision['policy_ids'][0]}: because {r.decision['policy_ids'][0]}"
        for r in db
        if r.effect != "allow"
    )
    assert {row[0]: int(row[1]) for row in page.tables["denied-reasons"]} == dict(reasons)

    users = Counter(r.user for r in db)
    assert {row[0]: int(row[1]) for row in page.tables["users"]} == dict(users)
    agents = Counter(r.agent for r in db)
    assert {row[0]: int(row[1]) for row in page.tables["agents"]} == dict(agents)

    pii_in = sum(r.pii["input"].get("EMAIL_ADDRESS", 0) for r in db)
    pii_out = sum(r.pii["output"].get("US_SSN", 0) for r in db)
    pii = {row[0]: (int(row[1]), int(row[2])) for row in page.tables["pii-types"]}
    assert pii == {"EMAIL_ADDRESS": (pii_in, 0), "US_SSN": (0, pii_out)}

    budget = sum(r.decision["stage"] == "budget" for r in db)
    assert page.tables["budget-denials"] == [["budget/daily-calls", str(budget)]]
    approvals = sum(r.effect == "approval_required" for r in db)
    assert sum(int(row[1]) for row in page.tables["approval-calls"]) == approvals > 0

    assert "verified: every chain and checkpoint checks out" in page.sections["chain"]
    versions = {row[0]: int(row[1]) for row in page.tables["policy-versions"]}
    assert versions == dict(Counter(r.decision["policy_version"] for r in db)) == {"v1": 20, "v2": 20}

    assert page.tags["script"] == 0 and page.tags["link"] == 0 and page.tags["img"] == 0
    assert page.tags["svg"] >= 3
    assert not re.search(r"(src|href)=", html), "nothing is loaded from elsewhere"


async def test_report_says_none_recorded_and_flags_a_broken_chain(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    url = f"sqlite+aiosqlite:///{tmp_path}/audit.db"
    await write(url, key, [make_record(i) for i in range(5)])
    store = await AuditStore.open(url)
    try:
        async with store.engine.begin() as conn:
            await conn.execute(text("DELETE FROM audit_records WHERE seq = 2"))
    finally:
        await store.close()
    page, _ = await render(tmp_path, config_for(tmp_path, url, key))
    for section in ("pii", "budgets", "approvals"):
        assert "none recorded" in page.sections[section], section
    assert "FAILED" in page.sections["chain"] and "seq 2..2 are missing" in page.sections["chain"]
    assert page.metrics["total"] == 4


@pytest.mark.parametrize("args", [["--since", "yesterday"]])
def test_report_rejects_a_bad_time(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["audit", "report", *args])
    assert exc.value.code == 2
    assert "not an ISO 8601 time: 'yesterday'" in capsys.readouterr().err
