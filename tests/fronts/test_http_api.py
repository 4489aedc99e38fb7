"""The HTTP tool API (`/v1/tool-calls`, `/v1/decisions`) through a real gateway and upstream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import dead_url, free_port, make_config, running_gateway

from gateway.app import Gateway

ECHO_BUDGET = {
    "name": "api-echo",
    "match": {"tools": ["demo/echo"]},
    "per": ["user"],
    "limit": 2,
    "window": "1d",
}


@pytest.fixture(scope="module")
async def api_gateway(
    data_dir: Path, upstream_url: str, policy_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[str, Gateway]]:
    state = tmp_path_factory.mktemp("api") / "state.db"
    cfg = make_config(
        data_dir,
        {"demo": upstream_url},
        free_port(),
        policy_dir,
        budgets=[ECHO_BUDGET],
        state={"url": f"sqlite+aiosqlite:///{state}"},
        admin={"groups": ["ops"]},
    )
    async with running_gateway(cfg) as running:
        yield running


@pytest.fixture(scope="module")
def api_token(api_gateway: tuple[str, Gateway], dev_key: Any) -> Callable[..., str]:
    def mint(sub: str = "api-user", groups: tuple[str, ...] = ("developers",)) -> str:
        return str(dev_key.mint(sub, audience=api_gateway[0], groups=list(groups)))

    return mint


async def post(base: str, path: str, token: str | None, body: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.post(f"{base}{path}", json=body, headers=headers)


async def test_allowed_call_returns_the_tool_result(
    api_gateway: tuple[str, Gateway], api_token: Callable[..., str]
) -> None:
    base, gw = api_gateway
    r = await post(
        base,
        "/v1/tool-calls",
        api_token(),
        {"upstream": "demo", "tool": "add", "arguments": {"a": 1, "b": 2}, "call_id": "c-1"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["decision"] == "allow"
    assert body["result"]["structuredContent"] == {"result": 3}
    assert gw.store is not None
    rows = [rec async for rec in gw.store.iter_records(user="api-user")]
    row = next(rec for rec in rows if rec.id == body["audit_id"])
    assert row.protocol == "http" and row.call_id == "c-1" and row.outcome["status"] == "completed"


async def test_denied_call_is_403_with_reasons(
    api_gateway: tuple[str, Gateway], api_token: Callable[..., str]
) -> None:
    base, _ = api_gateway
    r = await post(
        base,
        "/v1/tool-calls",
        api_token(),
        {"upstream": "demo", "tool": "transfer", "arguments": {"amount": 5000, "to": "x"}},
    )
    assert r.status_code == 403
    body = r.json()
    assert (
        body["decision"] == "deny" and body["reasons"][0]["policy"] == "transfer-limit" and body["audit_id"]
    )


async def test_over_budget_is_429_with_retry_after(
    api_gateway: tuple[str, Gateway], api_token: Callable[..., str]
) -> None:
    base, _ = api_gateway
    tok = api_token("budget-api-user")
    codes = []
    for i in range(3):
        r = await post(
            base, "/v1/tool-calls", tok, {"upstream": "demo", "tool": "echo", "arguments": {"text": str(i)}}
        )
        codes.append(r.status_code)
    assert codes == [200, 200, 429]
    assert 0 < int(r.headers["retry-after"]) <= 86400
    assert r.json()["reasons"][0]["policy"] == "budget/api-echo"


async def test_a_repeated_call_id_gives_its_budget_charge_back(
    api_gateway: tuple[str, Gateway], api_token: Callable[..., str]
) -> None:
    """A retry with the same call_id is answered from the first call and never runs: the budget
    it was charged on the way is refunded, so retries do not eat the limit (2 a day here)."""
    base, gw = api_gateway
    tok = api_token("budget-retry-user")
    body = {"upstream": "demo", "tool": "echo", "arguments": {"text": "once"}, "call_id": "retry-1"}
    first = await post(base, "/v1/tool-calls", tok, body)
    assert first.status_code == 200, first.text
    for _ in range(3):
        again = await post(base, "/v1/tool-calls", tok, body)
        assert again.status_code != 429, "a repeat was charged"
    other = await post(base, "/v1/tool-calls", tok, {**body, "call_id": "retry-2"})
    assert other.status_code == 200, other.text  # the second unit of two is still there
    third = await post(base, "/v1/tool-calls", tok, {**body, "call_id": "retry-3"})
    assert third.status_code == 429
    assert gw.store is not None
    repeats = [r async for r in gw.store.iter_records(user="budget-retry-user", call_id="retry-1")]
    assert sorted(r.status for r in repeats) == ["completed", "duplicate", "duplicate", "duplicate"]


async def test_decisions_decide_without_forwarding(
    api_gateway: tuple[str, Gateway], api_token: Callable[..., str], upstream_url: str
) -> None:
    base, gw = api_gateway
    r = await post(
        base,
        "/v1/decisions",
        api_token(),
        {"upstream": "demo", "tool": "delete_note", "arguments": {"name": "welcome"}},
    )
    assert r.status_code == 200
    assert r.json()["decision"] == "deny" and r.json()["reasons"][0]["policy"] == "delete-needs-admin"
    admin = api_token("api-admin", ("developers", "admins"))
    r = await post(
        base,
        "/v1/decisions",
        admin,
        {"upstream": "demo", "tool": "delete_note", "arguments": {"name": "welcome"}},
    )
    assert r.json()["decision"] == "allow"
    assert gw.store is not None
    (row,) = [rec async for rec in gw.store.iter_records(user="api-admin")]
    assert row.outcome["status"] == "decided"
    # nothing was forwarded: the note is still there
    r = await post(
        base,
        "/v1/tool-calls",
        api_token(),
        {"upstream": "demo", "tool": "read_note", "arguments": {"name": "welcome"}},
    )
    assert "governs every tool call" in r.json()["result"]["content"][0]["text"]


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"upstream": "demo"}, 400, '"tool" must be'),
        ({"upstream": "demo", "tool": "echo", "arguments": [1]}, 400, '"arguments" must be an object'),
        ({"upstream": "demo", "tool": "echo", "extra": 1}, 400, "unknown field(s): extra"),
        ({"upstream": "nope", "tool": "echo"}, 404, "no upstream named 'nope'"),
    ],
)
async def test_bad_bodies_name_the_problem(
    api_gateway: tuple[str, Gateway], api_token: Callable[..., str], body: Any, status: int, fragment: str
) -> None:
    base, _ = api_gateway
    r = await post(base, "/v1/tool-calls", api_token(), body)
    assert r.status_code == status
    assert fragment in r.json()["message"]


async def test_missing_token_is_401_and_audited(api_gateway: tuple[str, Gateway]) -> None:
    base, gw = api_gateway
    r = await post(
        base, "/v1/tool-calls", None, {"upstream": "demo", "tool": "echo", "arguments": {"text": "x"}}
    )
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith('Bearer resource_metadata="')
    assert gw.store is not None
    row = [rec async for rec in gw.store.iter_records()][-1]
    assert row.id == r.json()["audit_id"] and row.decision["stage"] == "identity"


async def test_unreachable_upstream_is_502_and_recorded(
    data_dir: Path, policy_dir: Path, dev_key: Any
) -> None:
    dead = dead_url()
    cfg = make_config(data_dir, {"demo": dead}, free_port(), policy_dir)
    async with running_gateway(cfg) as (base, gw):
        tok = dev_key.mint("dead-user", audience=base, groups=["developers"])
        r = await post(
            base, "/v1/tool-calls", tok, {"upstream": "demo", "tool": "echo", "arguments": {"text": "x"}}
        )
        assert r.status_code == 502
        assert gw.store is not None
        (row,) = [rec async for rec in gw.store.iter_records(user="dead-user")]
        assert row.outcome["status"] == "failed" and "unreachable" in row.outcome["error"]


async def test_openapi_document(api_gateway: tuple[str, Gateway]) -> None:
    base, _ = api_gateway
    async with httpx.AsyncClient() as http:
        spec = (await http.get(f"{base}/openapi.json")).json()
    assert spec["openapi"].startswith("3.1")
    assert set(spec["paths"]) == {"/v1/tool-calls", "/v1/decisions"}
    assert "429" in spec["paths"]["/v1/tool-calls"]["post"]["responses"]


async def test_admin_budgets_view(api_gateway: tuple[str, Gateway], api_token: Callable[..., str]) -> None:
    base, _ = api_gateway
    tok = api_token("budget-view-user")
    await post(base, "/v1/tool-calls", tok, {"upstream": "demo", "tool": "echo", "arguments": {"text": "x"}})
    async with httpx.AsyncClient() as http:
        anonymous = await http.get(f"{base}/v1/budgets")
        agent = await http.get(f"{base}/v1/budgets", headers={"authorization": f"Bearer {tok}"})
        ops = {"authorization": f"Bearer {api_token('operator', ('ops',))}"}
        view = await http.get(f"{base}/v1/budgets", params={"user": "budget-view-user"}, headers=ops)
    assert anonymous.status_code == 401
    assert agent.status_code == 403 and "not an admin" in agent.json()["message"]
    assert view.status_code == 200
    (row,) = view.json()["budgets"]
    assert row["budget"] == "api-echo" and row["subject"] == "user=budget-view-user" and row["used"] == 1
