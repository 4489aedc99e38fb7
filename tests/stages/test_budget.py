"""Budgets hold exactly: real SQLite and PostgreSQL, real concurrency, real gateway processes."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import POLICIES, dead_url, free_port, make_config, running_gateway
from sqlalchemy import delete, text
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway import config as config_mod
from gateway import metrics
from gateway.call import API_KEY_ISSUER, Identities, Principal, ToolCall
from gateway.config import BudgetMatch, BudgetRule
from gateway.errors import ConfigError
from gateway.stages.budget import BudgetStage, usage
from gateway.state.db import budget_usage, open_state

PG = os.environ.get("BASTION_TEST_PG")
ALICE = Principal(sub="alice", issuer="test", groups=frozenset({"developers"}))


def rule(**kw: Any) -> BudgetRule:
    data = {"name": "b", "limit": 100, "window": "1d"} | kw
    return config_mod.parse({"budgets": [data]}, Path(".")).budgets[0]


def call(tool: str = "transfer", principal: Principal = ALICE, **args: Any) -> ToolCall:
    return ToolCall("pay", tool, args, principal=principal)


@pytest.fixture(params=["sqlite", "postgresql"])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    if request.param == "sqlite":
        eng = await open_state(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}")
    else:
        if not PG:
            pytest.skip("BASTION_TEST_PG not set: PostgreSQL budget tests skipped")
        eng = await open_state(PG)
        async with eng.begin() as conn:
            await conn.execute(delete(budget_usage))
    try:
        yield eng
    finally:
        await eng.dispose()


async def test_200_concurrent_calls_against_100_allow_exactly_100(engine: AsyncEngine) -> None:
    stage = BudgetStage([rule(limit=100)], engine)
    decisions = await asyncio.gather(*(stage(call()) for _ in range(200)))
    assert sum(d is None for d in decisions) == 100
    denied = [d for d in decisions if d is not None]
    assert len(denied) == 100
    reason = denied[0].reasons[0]
    assert reason.policy == "budget/b"
    assert "budget b exceeded: limit 100 per 1d, 0 left, resets at " in reason.reason
    assert denied[0].retry_after_s is not None and 0 < denied[0].retry_after_s <= 86400
    rows = await usage(engine, stage.rules)
    assert [(r["subject"], r["used"]) for r in rows] == [("user=alice", 100)]


async def test_argument_cost_is_a_spending_cap(engine: AsyncEngine) -> None:
    stage = BudgetStage([rule(limit=1000, cost="args.amount")], engine)
    assert await stage(c := call(amount=600)) is None
    assert c.budget is not None and c.budget["charged"][0]["remaining"] == 400
    over = await stage(call(amount=401))
    assert over is not None and "400 left" in over.reasons[0].reason
    assert await stage(call(amount=400)) is None
    bad = await stage(call(amount="lots"))
    assert (
        bad is not None
        and bad.reasons[0].policy == "budget-cost"
        and "args.amount" not in bad.reasons[0].reason
    )
    assert (await stage(call(amount=-5))) is not None


async def test_several_budgets_consume_all_or_none(engine: AsyncEngine) -> None:
    small = rule(name="small", limit=3)
    big = rule(name="big", limit=100, per=["tool"])
    stage = BudgetStage([big, small], engine)
    results = [await stage(call()) for _ in range(5)]
    assert [r is None for r in results] == [True, True, True, False, False]
    used = {r["budget"]: r["used"] for r in await usage(engine, stage.rules)}
    assert used == {"big": 3, "small": 3}, "a denied call must not consume the budgets it passed"


async def test_windows_roll_over(engine: AsyncEngine) -> None:
    stage = BudgetStage([rule(limit=2, window="2s")], engine)
    assert await stage(call()) is None
    assert await stage(call()) is None
    assert await stage(call()) is not None
    await asyncio.sleep(2.05)
    assert await stage(call()) is None


async def test_match_and_per_dimensions(engine: AsyncEngine) -> None:
    only_transfer = rule(name="t", limit=1, match={"tools": ["pay/transfer"], "groups": ["developers"]})
    stage = BudgetStage([only_transfer], engine)
    assert await stage(call("balance")) is None
    assert await stage(call("balance")) is None, "other tools are not counted"
    bob = Principal(sub="bob", issuer="test", groups=frozenset({"developers"}))
    outsider = Principal(sub="eve", issuer="test", groups=frozenset({"guests"}))
    assert await stage(call()) is None
    assert await stage(call()) is not None
    assert await stage(call(principal=bob)) is None, "per user"
    assert await stage(call(principal=outsider)) is None and await stage(call(principal=outsider)) is None


async def test_delegation_charges_the_delegator(engine: AsyncEngine) -> None:
    per_agent = rule(name="agents", limit=2, per=["agent"])
    stage = BudgetStage([per_agent], engine)
    planner = Principal(sub="alice", issuer="test", agent="planner", delegation_chain=("planner",))
    worker = Principal(sub="alice", issuer="test", agent="worker", delegation_chain=("worker", "planner"))
    assert await stage(call(principal=worker)) is None
    assert await stage(call(principal=worker)) is None
    denied = await stage(call(principal=planner))
    assert denied is not None, "the sub-agent's two calls used up its delegator's budget"
    subjects = {r["subject"]: r["used"] for r in await usage(engine, stage.rules)}
    assert subjects == {"agent=planner": 2, "agent=worker": 2}


async def test_users_are_counted_by_issuer_and_subject(engine: AsyncEngine) -> None:
    ids = Identities(("https://a.test", "https://b.test"))

    def alice_of(issuer: str) -> Principal:
        return Principal(sub="alice", issuer=issuer, id=ids.id_of(issuer, "alice"))

    stage = BudgetStage([rule(name="per-id", limit=1)], engine, identities=ids)
    for issuer in ("https://a.test", "https://b.test", API_KEY_ISSUER):
        assert await stage(call(principal=alice_of(issuer))) is None, f"{issuer}'s alice has her own"
        assert await stage(call(principal=alice_of(issuer))) is not None
    subjects = {r["subject"]: r["used"] for r in await usage(engine, stage.rules)}
    assert subjects == {"user=alice": 1, "user=https://b.test#alice": 1, "user=bastion:api-key#alice": 1}
    assert [r["subject"] for r in await usage(engine, stage.rules, "https://b.test#alice")] == [
        "user=https://b.test#alice"
    ]


async def test_match_users_names_issuer_and_subject(engine: AsyncEngine) -> None:
    ids = Identities(("https://a.test", "https://b.test"))
    only = BudgetRule(name="only-b", limit=5, window="1d", match=BudgetMatch(users=["https://b.test#alice"]))
    stage = BudgetStage([only], engine, identities=ids)
    first = Principal(sub="alice", issuer="https://a.test", id=ids.id_of("https://a.test", "alice"))
    second = Principal(sub="alice", issuer="https://b.test", id=ids.id_of("https://b.test", "alice"))
    assert stage.charges(call(principal=first), 0) == []
    assert [c.subject for c in stage.charges(call(principal=second), 0)] == ["user=https://b.test#alice"]
    bare = BudgetRule(name="bare", limit=5, window="1d", match=BudgetMatch(users=["alice"]))
    assert BudgetStage([bare], engine, identities=ids).charges(call(principal=second), 0) == []
    stray = BudgetRule(name="stray", limit=5, window="1d", match=BudgetMatch(users=["https://c.test#alice"]))
    with pytest.raises(ConfigError, match=re.escape("'https://c.test' is not a configured issuer")):
        BudgetStage([stray], engine, identities=ids)


async def test_dry_run_peeks_without_consuming(engine: AsyncEngine) -> None:
    stage = BudgetStage([rule(limit=1)], engine)
    probe = call()
    probe.dry_run = True
    assert await stage(probe) is None
    assert probe.budget is not None and probe.budget["charged"][0]["dry_run"] is True
    assert await usage(engine, stage.rules) == []
    assert await stage(call()) is None
    probe = call()
    probe.dry_run = True
    assert await stage(probe) is not None, "a dry run reports the budget as exhausted"


async def test_refund(engine: AsyncEngine) -> None:
    stage = BudgetStage([rule(limit=1, refund_on_upstream_failure=True)], engine)
    first = call()
    assert await stage(first) is None
    await stage.refund(first)
    assert await stage(call()) is None, "the refunded unit can be spent again"


# Through real gateways ---------------------------------------------------------------------------

ECHO_BUDGET = {
    "name": "echo-limit",
    "match": {"tools": ["demo/echo"]},
    "per": ["user"],
    "limit": 100,
    "window": "1d",
}


def modern_call(msg_id: int, text: str = "hi") -> dict[str, Any]:
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    return {
        "jsonrpc": "2.0",
        "id": msg_id,
        "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": text}, "_meta": meta},
    }


def headers(token: str) -> dict[str, str]:
    return {
        "authorization": f"Bearer {token}",
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": "tools/call",
        "mcp-name": "echo",
    }


async def fire(urls_and_tokens: list[tuple[str, str]], n: int) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=n)) as http:

        async def one(i: int) -> dict[str, Any]:
            url, tok = urls_and_tokens[i % len(urls_and_tokens)]
            r = await http.post(f"{url}/mcp/demo", json=modern_call(i), headers=headers(tok))
            assert r.status_code == 200, r.text
            return r.json()["result"]  # type: ignore[no-any-return]

        return await asyncio.gather(*(one(i) for i in range(n)))


async def test_gateway_200_concurrent_calls_allow_exactly_100(
    upstream_url: str, data_dir: Path, dev_key: Any, tmp_path: Path
) -> None:

    cfg = make_config(
        data_dir,
        {"demo": upstream_url},
        free_port(),
        budgets=[ECHO_BUDGET],
        state={"url": f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"},
    )
    async with running_gateway(cfg) as (base, gw):
        tok = dev_key.mint("budget-user", audience=f"{base}/mcp/demo", groups=["developers"])
        results = await fire([(base, tok)], 200)
        allowed = [r for r in results if not r["isError"]]
        denied = [r for r in results if r["isError"]]
        assert len(allowed) == 100 and len(denied) == 100
        assert denied[0]["content"][0]["text"].startswith(
            "denied by policy budget/echo-limit: budget echo-limit exceeded"
        )
        assert gw.store is not None
        rows = [r async for r in gw.store.iter_records(user="budget-user")]
        assert len(rows) == 200
        charged = [r for r in rows if r.decision["effect"] == "allow"]
        assert all(r.budget and r.budget["charged"][0]["budget"] == "echo-limit" for r in charged)
        assert max(r.budget["charged"][0]["used"] for r in charged if r.budget) == 100


async def test_unreachable_upstream_refunds(data_dir: Path, dev_key: Any, tmp_path: Path) -> None:

    refunding = ECHO_BUDGET | {"limit": 1, "refund_on_upstream_failure": True}
    dead = dead_url()
    cfg = make_config(
        data_dir,
        {"demo": dead},
        free_port(),
        budgets=[refunding],
        state={"url": f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"},
    )
    async with running_gateway(cfg) as (base, gw):
        tok = dev_key.mint("refund-user", audience=f"{base}/mcp/demo", groups=["developers"])
        async with httpx.AsyncClient(timeout=10) as http:
            for i in range(3):
                r = await http.post(f"{base}/mcp/demo", json=modern_call(i), headers=headers(tok))
                assert r.status_code == 502, "the upstream is down"
        assert gw.state is not None
        rows = await usage(gw.state, cfg.budgets, user="refund-user")
        assert rows == [] or rows[0]["used"] == 0, "every failed call was refunded"


@pytest.mark.skipif(not PG, reason="BASTION_TEST_PG not set: two-process PostgreSQL budget test skipped")
async def test_two_gateway_processes_share_one_budget(
    upstream_url: str, data_dir: Path, dev_key: Any, tmp_path: Path
) -> None:

    assert PG is not None
    eng = await open_state(PG)
    async with eng.begin() as conn:
        await conn.execute(delete(budget_usage).where(budget_usage.c.budget == "echo-limit"))
    await eng.dispose()
    procs, targets = [], []
    try:
        for i in range(2):
            port = free_port()
            cfg = {
                "listen": {"port": port},
                "identity": {
                    "issuers": [{"issuer": "bastion-dev", "jwks_file": str(data_dir / "dev-jwks.json")}]
                },
                "policy": {"dir": str(POLICIES)},
                "upstreams": {"demo": {"url": upstream_url}},
                "budgets": [ECHO_BUDGET],
                "state": {"url": PG},
                "audit": {"url": f"sqlite+aiosqlite:///{tmp_path / f'audit{i}.db'}"},
                "data_dir": str(tmp_path / f"data{i}"),
            }
            path = tmp_path / f"bastion{i}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "gateway.cli",
                    "serve",
                    "--config",
                    str(path),
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
            )
            base = f"http://127.0.0.1:{port}"
            targets.append(
                (base, dev_key.mint("pg-user", audience=f"{base}/mcp/demo", groups=["developers"]))
            )
        async with httpx.AsyncClient(timeout=2) as http:
            for base, _ in targets:
                for _ in range(200):
                    try:
                        if (await http.get(f"{base}/readyz")).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    await asyncio.sleep(0.1)
        results = await fire(targets, 200)
        assert sum(not r["isError"] for r in results) == 100
    finally:
        for proc in procs:
            proc.terminate()
            await proc.wait()


async def test_policies_see_the_remaining_budget(
    upstream_url: str, data_dir: Path, dev_key: Any, tmp_path: Path, policy_dir: Path
) -> None:
    """A policy can demand more when a budget runs low: here it forbids the last 10%."""
    policies = tmp_path / "policies"
    policies.mkdir()
    for f in ("schema.cedarschema", "demo.cedar"):
        (policies / f).write_text((policy_dir / f).read_text())
    (policies / "low-budget.cedar").write_text(
        '@id("keep-a-reserve")\n@reason("less than 10% of the echo budget is left")\n'
        'forbid (principal, action == Action::"call_tool", resource)\n'
        'when { context.budget has "echo-limit" && context.budget["echo-limit"].remaining * 10 '
        '< context.budget["echo-limit"].limit };\n'
    )
    budget = ECHO_BUDGET | {"limit": 20}
    cfg = make_config(
        data_dir,
        {"demo": upstream_url},
        free_port(),
        policies,
        budgets=[budget],
        state={"url": f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"},
    )
    async with running_gateway(cfg) as (base, gw):
        assert gw.policy is not None and gw.policy.uses_budget
        tok = dev_key.mint("reserve-user", audience=f"{base}/mcp/demo", groups=["developers"])
        results: list[dict[str, Any]] = []
        for _ in range(26):  # one at a time: each call sees the budget the previous one left
            results += await fire([(base, tok)], 1)
        texts = [r["content"][0]["text"] for r in results if r["isError"]]
        assert sum(not r["isError"] for r in results) == 19, (
            "remaining 2 of 20 is under 10%: the 19th call is the last"
        )
        assert texts[0] == "denied by policy keep-a-reserve: less than 10% of the echo budget is left"


async def test_a_budget_store_that_fails_denies_and_is_counted(tmp_path: Path) -> None:
    """Fail closed: the charge cannot be made, so the call is refused (and the alert's counter moves)."""
    eng = await open_state(f"sqlite+aiosqlite:///{tmp_path / 'state.db'}")
    try:
        async with eng.begin() as conn:
            await conn.execute(text("DROP TABLE bastion_budget_usage"))
        before = metrics.BUDGET_STORE_ERRORS._value.get()
        decision = await BudgetStage([rule(limit=10)], eng)(call())
        assert decision is not None and decision.effect == "deny"
        assert decision.reasons[0].policy == "budget-unavailable"
        assert "budget store unavailable: OperationalError" in decision.reasons[0].reason
        assert metrics.BUDGET_STORE_ERRORS._value.get() == before + 1
    finally:
        await eng.dispose()
