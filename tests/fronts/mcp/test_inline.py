"""Inline approval of held calls inside the MCP exchange, through the real gateway: the SDK's client
in legacy mode (server-to-client `elicitation/create`) and in 2026-07-28 mode (`input_required`),
raw HTTP where a test must tamper with the wire, a real upstream that counts executions, real
tokens, Cedar and databases."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
import yaml
from conftest import POLICIES, LegacyOnly, free_port, running, running_gateway
from mcp import Client, types
from mcp.client.session import ClientRequestContext
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer
from starlette.types import Receive, Scope, Send

from gateway import config as config_mod
from gateway.app import Gateway
from gateway.call import Principal
from gateway.config import PolicyConfig, ToolSettings
from gateway.identity.devkeys import DEV_ISSUER, DevKey, ensure_dev_key
from gateway.policy.engine import PolicyEngine

POLICY = """
@id("finance-bank")
permit (principal in Group::"finance", action in [Action::"call_tool", Action::"list_tools"],
        resource in Upstream::"bank");

@id("large-amounts-need-approval")
@reason("amounts above 100 need a human")
@obligation("approval")
permit (principal in Group::"finance", action == Action::"call_tool", resource in Upstream::"bank")
when { context.args has amount && context.args.amount > 100 };

@id("finance-oldbank")
permit (principal in Group::"finance", action in [Action::"call_tool", Action::"list_tools"],
        resource in Upstream::"oldbank");

@id("oldbank-large-amounts-need-approval")
@obligation("approval")
permit (principal in Group::"finance", action == Action::"call_tool", resource in Upstream::"oldbank")
when { context.args has amount && context.args.amount > 100 };

@id("tips-confirmed-by-the-caller")
permit (principal in Group::"finance", action == Action::"approve_own", resource == Tool::"bank/tip")
when { context.args has amount && context.args.amount < 1000 };
"""

EXECUTED: list[tuple[str, int, str]] = []
WAIT_S = 2.0
MODERN_META_KEY = "io.modelcontextprotocol/clientCapabilities"


def bank_server() -> MCPServer:
    srv = MCPServer("bank")

    @srv.tool()
    def pay(amount: int, to: str) -> str:
        """Move money (the test counts every execution)."""
        EXECUTED.append(("pay", amount, to))
        return f"paid {amount} to {to}"

    @srv.tool()
    def tip(amount: int, to: str) -> str:
        """Tip someone (the test counts every execution)."""
        EXECUTED.append(("tip", amount, to))
        return f"tipped {amount} to {to}"

    return srv


Callback = Callable[[ClientRequestContext, Any], Awaitable[types.ElicitResult | types.ErrorData]]


class Env:
    def __init__(self, base: str, gw: Gateway, key: DevKey) -> None:
        self.base, self.gw, self.key = base, gw, key
        self.tasks: list[asyncio.Task[Any]] = []

    def token(self, sub: str = "fin", groups: tuple[str, ...] = ("finance",), aud: str = "/mcp/bank") -> str:
        return self.key.mint(sub, groups=groups, audience=f"{self.base}{aud}")

    def admin(self, sub: str = "root", groups: tuple[str, ...] = ("admins",)) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token(sub, groups, aud='')}"}

    def client(
        self, mode: str, callback: Callback | None, token: str | None = None, path: str = "/mcp/bank"
    ) -> tuple[httpx2.AsyncClient, Client]:
        hc = httpx2.AsyncClient(headers={"authorization": f"Bearer {token or self.token()}"}, timeout=15)
        transport = streamable_http_client(f"{self.base}{path}", http_client=hc)
        client = Client(transport, mode=mode, elicitation_callback=callback)
        return hc, client

    def later(self, coro: Awaitable[Any]) -> None:
        """What the human does after the client answered (the approver acts in their browser)."""

        async def run() -> Any:
            await asyncio.sleep(0.2)
            return await coro

        self.tasks.append(asyncio.ensure_future(run()))

    async def settle(self) -> list[Any]:
        done = await asyncio.gather(*self.tasks)
        self.tasks.clear()
        return done

    async def approval(self, approval_id: str) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=10) as http:
            resp = await http.get(f"{self.base}/v1/approvals/{approval_id}", headers=self.admin())
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body

    async def approve(self, approval_id: str, **admin: Any) -> httpx.Response:
        async with httpx.AsyncClient(timeout=10) as http:
            url = f"{self.base}/v1/approvals/{approval_id}/approve"
            return await http.post(url, headers=self.admin(**admin))

    async def approve_on_page(self, url: str, headers: dict[str, str]) -> httpx.Response:
        """An approver opens the page the client was sent to and submits its form."""
        async with httpx.AsyncClient(timeout=10) as http:
            page = await http.get(url, headers=headers)
            assert page.status_code == 200, page.text
            token = page.text.split('name="token" value="')[1].split('"')[0]
            return await http.post(url, data={"token": token, "decision": "approve"}, headers=headers)

    async def audit(self) -> list[dict[str, Any]]:
        assert self.gw.store is not None
        return [r.to_json() async for r in self.gw.store.iter_records()]


@pytest.fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    root = tmp_path_factory.mktemp("inline")
    policies = root / "policies"
    policies.mkdir()
    for name in ("schema.cedarschema", "demo.cedar"):
        (policies / name).write_text((POLICIES / name).read_text())
    (policies / "bank.cedar").write_text(POLICY)
    key = ensure_dev_key(root)
    app = bank_server().streamable_http_app(streamable_http_path="/mcp")
    old_app = bank_server().streamable_http_app(streamable_http_path="/mcp")
    old_only = LegacyOnly(old_app)

    class Lifespanned:
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            await (old_app if scope["type"] == "lifespan" else old_only)(scope, receive, send)

    async with running(app, lifespan="on") as url, running(Lifespanned(), lifespan="on") as old_url:
        data = {
            "listen": {"host": "127.0.0.1", "port": free_port()},
            "identity": {"issuers": [{"issuer": DEV_ISSUER, "jwks_file": str(root / "dev-jwks.json")}]},
            "policy": {"dir": str(policies), "watch": False},
            "upstreams": {
                "bank": {"url": f"{url}/mcp", "tools": {"pay": {"risk": "external"}}},
                "oldbank": {"url": f"{old_url}/mcp", "protocol": "legacy"},
            },
            "audit": {"url": f"sqlite+aiosqlite:///{root / 'audit.db'}"},
            "state": {"url": f"sqlite+aiosqlite:///{root / 'state.db'}"},
            "admin": {"groups": ["admins"]},
            "approvals": {"ttl_s": 600, "approvers": "the payments desk", "inline_wait_s": WAIT_S},
            "data_dir": str(root),
        }
        cfg_file = root / "bastion.yaml"
        cfg_file.write_text(yaml.safe_dump(data))
        async with running_gateway(config_mod.load(cfg_file)) as (base, gw):
            yield Env(base, gw, key)


def _approval_id_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


def _held(result: types.CallToolResult) -> str:
    """The approval id of a held result (today's retry-flow answer), asserting its shape."""
    assert result.is_error
    structured = result.structured_content or {}
    approval = str(structured["approval_id"])
    assert structured["decision"] == "approval_required"
    text = result.content[0].text  # type: ignore[union-attr]
    assert text.startswith(f"approval required: {approval}; ask the payments desk")
    return approval


# -- legacy sessions: elicitation/create on the POST's stream ------------------------------------


async def test_legacy_url_mode_approved_on_the_page_runs_exactly_once(env: Env) -> None:
    before = len(EXECUTED)
    asked: list[Any] = []

    async def callback(ctx: ClientRequestContext, params: Any) -> types.ElicitResult:
        asked.append(params)
        assert len(EXECUTED) == before  # nothing ran before the approval
        env.later(env.approve_on_page(params.url, env.admin()))
        return types.ElicitResult(action="accept")

    hc, client = env.client("legacy", callback)
    async with hc, client:
        result = await client.call_tool("pay", {"amount": 500, "to": "legacy-url"})
    page = (await env.settle())[0]
    assert page.status_code == 200 and "approved by root" in page.text
    assert not result.is_error, result
    assert len(EXECUTED) == before + 1 and EXECUTED[-1] == ("pay", 500, "legacy-url")
    [params] = asked
    assert params.mode == "url"
    approval_id = _approval_id_of(params.url)
    assert params.url == f"{env.base}/approvals/{approval_id}"
    assert params.elicitation_id == approval_id and "the payments desk" in params.message

    shown = await env.approval(approval_id)
    assert shown["status"] == "consumed" and shown["decided_by"] == "root"
    records = {r["id"]: r for r in await env.audit()}
    held = records[shown["audit_id"]]
    assert held["outcome"]["status"] == "held" and held["decision"]["effect"] == "approval_required"
    used = records[shown["used_by_audit_id"]]
    assert used["decision"]["effect"] == "allow" and used["outcome"]["status"] == "completed"
    assert any(approval_id in r["reason"] for r in used["decision"]["reasons"])
    events = [r for r in records.values() if r["action"] == "approve" and r["call_id"] == approval_id]
    assert [e["outcome"]["status"] for e in events] == ["approved"]


async def test_legacy_client_of_a_legacy_upstream_runs_in_its_own_session(env: Env) -> None:
    """legacy -> legacy: the approved call is forwarded in the client's own upstream session."""
    before = len(EXECUTED)

    async def callback(ctx: ClientRequestContext, params: Any) -> types.ElicitResult:
        env.later(env.approve(_approval_id_of(params.url)))
        return types.ElicitResult(action="accept")

    token = env.token(aud="/mcp/oldbank")
    hc, client = env.client("legacy", callback, token=token, path="/mcp/oldbank")
    async with hc, client:
        result = await client.call_tool("pay", {"amount": 555, "to": "old"})
    assert (await env.settle())[0].status_code == 200
    assert not result.is_error, result
    assert EXECUTED[before:] == [("pay", 555, "old")]


@pytest.mark.parametrize("action", ["decline", "cancel"])
async def test_legacy_decline_or_cancel_is_held_and_the_retry_flow_still_works(env: Env, action: str) -> None:
    before = len(EXECUTED)
    to = f"legacy-{action}"
    asked: list[Any] = []

    async def callback(ctx: ClientRequestContext, params: Any) -> types.ElicitResult:
        asked.append(params)
        return types.ElicitResult(action=action)  # type: ignore[arg-type]

    hc, client = env.client("legacy", callback)
    async with hc, client:
        started = asyncio.get_running_loop().time()
        held = await client.call_tool("pay", {"amount": 600, "to": to})
        assert asyncio.get_running_loop().time() - started < WAIT_S  # no waiting after a decline
        approval_id = _held(held)
        assert [p.url for p in asked] == [f"{env.base}/approvals/{approval_id}"]
        assert len(EXECUTED) == before
        assert (await env.approval(approval_id))["status"] == "pending"  # a decline decides nothing
        ok = await env.approve(approval_id)
        assert ok.status_code == 200, ok.text
        ran = await client.call_tool("pay", {"amount": 600, "to": to})  # the retry flow
    assert not ran.is_error, ran
    assert len(EXECUTED) == before + 1
    assert (await env.approval(approval_id))["status"] == "consumed"


async def test_the_caller_cannot_approve_their_own_call_on_the_page(env: Env) -> None:
    before = len(EXECUTED)
    caller = ("finance", "admins")  # an admin whom Cedar lets approve, but this is their own call
    seen: list[httpx.Response] = []

    async def callback(ctx: ClientRequestContext, params: Any) -> types.ElicitResult:
        async with httpx.AsyncClient(timeout=10) as http:
            headers = env.admin("fin", caller)
            page = await http.get(params.url, headers=headers)
            token = page.text.split('name="token" value="')[1].split('"')[0]
            form = {"token": token, "decision": "approve"}
            seen.append(await http.post(params.url, data=form, headers=headers))
        return types.ElicitResult(action="accept")

    hc, client = env.client("legacy", callback, token=env.token("fin", caller))
    async with hc, client:
        started = asyncio.get_running_loop().time()
        held = await client.call_tool("pay", {"amount": 700, "to": "own-call"})
        waited = asyncio.get_running_loop().time() - started
    [refused] = seen
    assert refused.status_code == 403 and "their own call" in refused.text
    approval_id = _held(held)
    assert waited >= WAIT_S * 0.9  # accepted: Bastion waited for a decision that never came
    assert len(EXECUTED) == before
    assert (await env.approval(approval_id))["status"] == "pending"


async def test_a_human_denial_during_the_wait_is_final(env: Env) -> None:
    before = len(EXECUTED)

    async def deny(approval_id: str) -> httpx.Response:
        async with httpx.AsyncClient(timeout=10) as http:
            url = f"{env.base}/v1/approvals/{approval_id}/deny"
            return await http.post(url, json={"reason": "wrong vendor"}, headers=env.admin())

    async def callback(ctx: ClientRequestContext, params: Any) -> types.ElicitResult:
        env.later(deny(_approval_id_of(params.url)))
        return types.ElicitResult(action="accept")

    hc, client = env.client("legacy", callback)
    async with hc, client:
        result = await client.call_tool("pay", {"amount": 800, "to": "denied"})
    assert (await env.settle())[0].status_code == 200
    assert result.is_error and "wrong vendor" in json.dumps(result.structured_content)
    assert len(EXECUTED) == before


async def test_form_mode_only_where_cedar_grants_approve_own(env: Env) -> None:
    before = len(EXECUTED)
    asked: list[Any] = []

    async def callback(ctx: ClientRequestContext, params: Any) -> types.ElicitResult:
        asked.append(params)
        if params.mode == "form":
            assert params.requested_schema["properties"]["approve"]["type"] == "boolean"
            return types.ElicitResult(action="accept", content={"approve": True})
        return types.ElicitResult(action="decline")

    hc, client = env.client("legacy", callback)
    async with hc, client:
        tipped = await client.call_tool("tip", {"amount": 150, "to": "form"})  # approve_own granted
        paid = await client.call_tool("pay", {"amount": 150, "to": "form"})  # not granted: URL mode
        big_tip = await client.call_tool("tip", {"amount": 5000, "to": "form"})  # not granted: too big
    assert [p.mode for p in asked] == ["form", "url", "url"]
    assert not tipped.is_error, tipped
    assert EXECUTED[before:] == [("tip", 150, "form")]
    _held(paid)
    _held(big_tip)
    records = await env.audit()
    event = next(
        r
        for r in records
        if r["action"] == "approve" and r["tool"] == "tip" and r["outcome"]["status"] == "approved"
    )
    assert event["user"] == "fin" and "approve_own" in event["decision"]["reasons"][0]["reason"]


async def _legacy_session(http: httpx.AsyncClient, url: str, token: str) -> dict[str, str]:
    """Raw `initialize` declaring elicitation; the headers for the session's later requests."""
    init = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {"elicitation": {"form": {}, "url": {}}},
            "clientInfo": {"name": "raw", "version": "1"},
        },
    }
    auth = {"authorization": f"Bearer {token}", "accept": "application/json, text/event-stream"}
    resp = await http.post(url, json=init, headers=auth)
    assert resp.status_code == 200, resp.text
    return auth | {"mcp-session-id": resp.headers["mcp-session-id"], "mcp-protocol-version": "2025-11-25"}


async def test_an_answer_to_an_elicitation_cannot_be_forged(env: Env, http: httpx.AsyncClient) -> None:
    """Answers to an elicitation from another principal, or to an altered id, decide nothing and
    never reach the upstream; the caller's own decline leaves the call held."""
    before = len(EXECUTED)
    url = f"{env.base}/mcp/bank"
    fin = await _legacy_session(http, url, env.token())
    mallory = await _legacy_session(http, url, env.token("mallory"))
    call = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "tip", "arguments": {}}}
    call["params"]["arguments"] = {"amount": 101, "to": "forged"}  # form mode: approve_own is granted
    yes = {"action": "accept", "content": {"approve": True}}
    events: list[dict[str, Any]] = []
    async with (
        httpx.AsyncClient(timeout=15) as streaming,
        streaming.stream("POST", url, json=call, headers=fin) as resp,
    ):
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = resp.aiter_lines()
        async for line in lines:
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                break
        [question] = events
        assert question["method"] == "elicitation/create" and question["params"]["mode"] == "form"
        elicitation_id = question["id"]
        for headers, rid in ((mallory, elicitation_id), (fin, elicitation_id[:-2] + "xx")):
            answer = {"jsonrpc": "2.0", "id": rid, "result": yes}
            forged = await http.post(url, json=answer, headers=headers)
            assert forged.status_code == 202, forged.text
        await asyncio.sleep(0.3)
        declined = {"jsonrpc": "2.0", "id": elicitation_id, "result": {"action": "decline"}}
        assert (await http.post(url, json=declined, headers=fin)).status_code == 202
        async for line in lines:
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    final = events[-1]
    assert final["id"] == 7 and final["result"]["isError"] is True
    approval_id = final["result"]["structuredContent"]["approval_id"]
    assert (await env.approval(approval_id))["status"] == "pending"
    assert len(EXECUTED) == before


# -- 2026-07-28: input_required and the retry ----------------------------------------------------


async def test_modern_url_mode_approved_inline_runs_exactly_once(env: Env) -> None:
    before = len(EXECUTED)
    asked: list[Any] = []

    async def callback(ctx: ClientRequestContext, params: Any) -> types.ElicitResult:
        asked.append(params)
        assert len(EXECUTED) == before
        env.later(env.approve(_approval_id_of(params.url)))
        return types.ElicitResult(action="accept")

    hc, client = env.client("2026-07-28", callback)
    async with hc, client:
        result = await client.call_tool("pay", {"amount": 900, "to": "modern-url"})
    assert (await env.settle())[0].status_code == 200
    assert not result.is_error, result
    assert EXECUTED[before:] == [("pay", 900, "modern-url")]
    [params] = asked
    assert params.mode == "url" and params.url.startswith(f"{env.base}/approvals/")
    shown = await env.approval(_approval_id_of(params.url))
    assert shown["status"] == "consumed" and shown["decided_by"] == "root"


async def test_modern_decline_is_held_and_form_mode_confirms(env: Env) -> None:
    before = len(EXECUTED)

    asked: list[Any] = []

    async def decline(ctx: ClientRequestContext, params: Any) -> types.ElicitResult:
        asked.append(params)
        return types.ElicitResult(action="decline")

    hc, client = env.client("2026-07-28", decline)
    async with hc, client:
        approval_id = _held(await client.call_tool("pay", {"amount": 901, "to": "modern-decline"}))
    assert [p.url for p in asked] == [f"{env.base}/approvals/{approval_id}"]
    assert len(EXECUTED) == before
    assert (await env.approval(approval_id))["status"] == "pending"

    async def confirm(ctx: ClientRequestContext, params: Any) -> types.ElicitResult:
        assert params.mode == "form"
        return types.ElicitResult(action="accept", content={"approve": True})

    hc, client = env.client("2026-07-28", confirm)
    async with hc, client:
        tipped = await client.call_tool("tip", {"amount": 300, "to": "modern-form"})
    assert not tipped.is_error, tipped
    assert EXECUTED[before:] == [("tip", 300, "modern-form")]


def _modern_call(
    args: dict[str, Any],
    msg_id: int,
    capabilities: dict[str, Any] | None,
    name: str = "pay",
    **extra: Any,
) -> tuple[dict[str, Any], dict[str, str]]:
    meta: dict[str, Any] = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
        MODERN_META_KEY: capabilities or {},
    }
    body = {
        "jsonrpc": "2.0",
        "id": msg_id,
        "method": "tools/call",
        "params": {"name": name, "arguments": args, "_meta": meta, **extra},
    }
    headers = {"mcp-protocol-version": "2026-07-28", "mcp-method": "tools/call", "mcp-name": name}
    return body, headers


async def test_a_forged_or_moved_request_state_is_refused(env: Env, http: httpx.AsyncClient) -> None:
    before = len(EXECUTED)
    url = f"{env.base}/mcp/bank"
    auth = {"authorization": f"Bearer {env.token()}"}
    args = {"amount": 950, "to": "raw"}
    caps = {"elicitation": {"url": {}}}
    body, headers = _modern_call(args, 1, caps)
    first = (await http.post(url, json=body, headers=headers | auth)).json()["result"]
    assert first["resultType"] == "input_required"
    question = first["inputRequests"]["bastion/approval"]
    assert question["method"] == "elicitation/create" and question["params"]["mode"] == "url"
    approval_id = _approval_id_of(question["params"]["url"])
    state = first["requestState"]
    ok = await env.approve(approval_id)  # approved: only the forgeries below are in the way
    assert ok.status_code == 200, ok.text

    answers = {"bastion/approval": {"action": "accept"}}
    payload = state.rsplit(".", 1)[0]
    tampered = [
        (state[:-3] + ("aaa" if not state.endswith("aaa") else "bbb"), args, auth),  # a changed MAC
        (payload.replace(payload[-5:], "AAAAA") + "." + state.rsplit(".", 1)[1], args, auth),  # changed body
        (state, {"amount": 950, "to": "someone else"}, auth),  # another call's arguments
        (state, args, {"authorization": f"Bearer {env.token('mallory')}"}),  # another principal
        ("bastion-approval.e30.AAAA", args, auth),  # made up
    ]
    for i, (forged, call_args, who) in enumerate(tampered, start=2):
        body, headers = _modern_call(call_args, i, caps, requestState=forged, inputResponses=answers)
        resp = await http.post(url, json=body, headers=headers | who)
        assert resp.status_code == 200, resp.text
        error = resp.json()["error"]
        assert error["code"] == -32602 and "invalid requestState" in error["message"], (i, error)
    assert len(EXECUTED) == before
    assert (await env.approval(approval_id))["status"] == "approved"  # nothing consumed it

    records = await env.audit()
    refused = [r for r in records if r["decision"]["reasons"][0]["policy"] == "invalid-request-state"]
    assert len(refused) >= len(tampered)
    assert all(r["outcome"]["status"] == "denied" for r in refused)

    body, headers = _modern_call(args, 99, caps, requestState=state, inputResponses=answers)
    resp = await http.post(url, json=body, headers=headers | auth)  # the genuine retry runs, once
    assert resp.json()["result"]["isError"] is False, resp.text
    assert EXECUTED[before:] == [("pay", 950, "raw")]
    again = await http.post(url, json=body, headers=headers | auth)  # replayed: held as a new request
    assert again.json()["result"]["isError"] is True
    assert again.json()["result"]["structuredContent"]["approval_id"] != approval_id
    assert len(EXECUTED) == before + 1


# -- clients without elicitation: exactly the retry flow -----------------------------------------


async def test_clients_without_elicitation_get_the_held_result(env: Env, http: httpx.AsyncClient) -> None:
    before = len(EXECUTED)
    hc, client = env.client("legacy", None)
    async with hc, client:
        legacy = await client.call_tool("pay", {"amount": 333, "to": "no-elicitation"})
    hc, client = env.client("2026-07-28", None)
    async with hc, client:
        modern = await client.call_tool("pay", {"amount": 334, "to": "no-elicitation"})
    for result in (legacy, modern):
        _held(result)
        structured = result.structured_content or {}
        expected = {"decision", "reasons", "audit_id", "approval_id", "approval_url"}
        assert set(structured) - {"result"} == expected
        if "result" in structured:  # fitted to the tool's listed outputSchema, as for any denial
            assert structured["result"] == result.content[0].text  # type: ignore[union-attr]

    body, headers = _modern_call({"amount": 335, "to": "raw"}, 1, None)
    raw = (
        await http.post(
            f"{env.base}/mcp/bank", json=body, headers=headers | {"authorization": f"Bearer {env.token()}"}
        )
    ).json()["result"]
    assert raw["resultType"] == "complete" and raw["isError"] is True
    assert "inputRequests" not in raw and "requestState" not in raw
    assert len(EXECUTED) == before


async def test_inline_approval_on_the_aggregate_endpoint(env: Env) -> None:
    before = len(EXECUTED)

    async def callback(ctx: ClientRequestContext, params: Any) -> types.ElicitResult:
        env.later(env.approve(_approval_id_of(params.url)))
        return types.ElicitResult(action="accept")

    for mode in ("legacy", "2026-07-28"):
        hc, client = env.client(mode, callback, token=env.token(aud=""), path="/mcp")
        async with hc, client:
            result = await client.call_tool("bank__pay", {"amount": 444, "to": f"aggregate-{mode}"})
        assert (await env.settle())[0].status_code == 200
        assert not result.is_error, (mode, result)
    assert EXECUTED[before:] == [("pay", 444, "aggregate-legacy"), ("pay", 444, "aggregate-2026-07-28")]


def _grants_approve_own(policy_dir: Path) -> bool:
    """Whether Cedar, over this policy set, lets anyone of the usual groups approve their own call."""
    engine = PolicyEngine.load(PolicyConfig(dir=policy_dir, schema=POLICIES / "schema.cedarschema"), {})
    return any(
        engine.decide(
            Principal(sub="someone", issuer=DEV_ISSUER, groups=frozenset(groups)),
            "approve_own",
            upstream,
            tool,
            {"amount": 5000, "to": "x"},
            ToolSettings(risk="external"),
        ).effect
        != "deny"
        for groups in (("admins",), ("finance",), ("developers",))
        for upstream, tool in (("demo", "echo"), ("demo", "transfer"), ("bank", "pay"))
    )


def test_the_shipped_policies_let_nobody_approve_their_own_call(tmp_path: Path) -> None:
    """`approve_own` is granted by no shipped policy set (the demo's and every example), asked of
    Cedar itself, not of the policy text: a permit over every action would grant it too."""
    sets = [POLICIES, *sorted(d for d in (POLICIES / "examples").iterdir() if d.is_dir())]
    assert len(sets) > 5
    assert [d.name for d in sets if _grants_approve_own(d)] == []

    lax = tmp_path / "lax"  # the check itself can say yes
    lax.mkdir()
    (lax / "all.cedar").write_text("permit (principal, action, resource);\n")
    assert _grants_approve_own(lax)


# -- leaving, racing, waiting ---------------------------------------------------------------------


def _event_waits() -> list[asyncio.Task[Any]]:
    """Tasks still waiting on an `asyncio.Event` (what an abandoned approval wait leaves behind)."""
    return [t for t in asyncio.all_tasks() if "Event.wait" in repr(t.get_coro())]


async def _modern_held(
    http: httpx.AsyncClient, env: Env, args: dict[str, Any], path: str = "/mcp/bank", name: str = "pay"
) -> tuple[str, str]:
    """A raw 2026-07-28 call that is held and asked inline (URL mode): its approval id and state."""
    body, headers = _modern_call(args, 1, {"elicitation": {"url": {}}}, name)
    auth = {"authorization": f"Bearer {env.token(aud=path if path != '/mcp' else '')}"}
    first = (await http.post(f"{env.base}{path}", json=body, headers=headers | auth)).json()["result"]
    assert first["resultType"] == "input_required", first
    return _approval_id_of(first["inputRequests"]["bastion/approval"]["params"]["url"]), first["requestState"]


@pytest.mark.parametrize(("path", "name"), [("/mcp/bank", "pay"), ("/mcp", "bank__pay")])
async def test_a_modern_client_that_leaves_mid_wait_runs_nothing(
    env: Env, http: httpx.AsyncClient, path: str, name: str
) -> None:
    """The retry waits for the approver; a client that gives up meanwhile (its own read timeout)
    must not have the call run behind its back: the approval stays for its next retry. The same
    on the `/mcp` union endpoint."""
    before = len(EXECUTED)
    seen = {r["id"] for r in await env.audit()}
    url = f"{env.base}{path}"
    auth = {"authorization": f"Bearer {env.token(aud=path if path != '/mcp' else '')}"}
    args = {"amount": 234, "to": f"left-modern{path}"}
    approval_id, state = await _modern_held(http, env, args, path, name)
    answers = {"bastion/approval": {"action": "accept"}}
    body, headers = _modern_call(
        args, 2, {"elicitation": {"url": {}}}, name, requestState=state, inputResponses=answers
    )
    async with httpx.AsyncClient(timeout=0.3) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            await impatient.post(url, json=body, headers=headers | auth)
    await asyncio.sleep(0.2)
    assert (await env.approve(approval_id)).status_code == 200
    await asyncio.sleep(WAIT_S + 0.3)  # past the wait the retry would have had
    assert len(EXECUTED) == before
    assert (await env.approval(approval_id))["status"] == "approved"
    assert not _event_waits()
    gone = [r for r in await env.audit() if r["decision"]["reasons"][0]["policy"] == "client-gone"]
    assert [(r["tool"], r["outcome"]["status"]) for r in gone if r["id"] not in seen] == [("pay", "denied")]

    again = await http.post(url, json=body, headers=headers | auth)  # the client comes back: runs once
    assert again.json()["result"]["isError"] is False, again.text
    assert EXECUTED[before:] == [("pay", 234, f"left-modern{path}")]
    assert (await env.approval(approval_id))["status"] == "consumed"


async def test_a_legacy_client_that_leaves_mid_wait_runs_nothing(env: Env, http: httpx.AsyncClient) -> None:
    before = len(EXECUTED)
    url = f"{env.base}/mcp/bank"
    fin = await _legacy_session(http, url, env.token())
    call = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": "pay", "arguments": {"amount": 432, "to": "left-legacy"}},
    }
    question: dict[str, Any] = {}
    async with (
        httpx.AsyncClient(timeout=15) as streaming,
        streaming.stream("POST", url, json=call, headers=fin) as resp,
    ):
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                question = json.loads(line[6:])
                break
        accept = {"jsonrpc": "2.0", "id": question["id"], "result": {"action": "accept"}}
        assert (await http.post(url, json=accept, headers=fin)).status_code == 202
        await asyncio.sleep(0.2)
    await asyncio.sleep(0.2)
    assert not env.gw._mcp.inline._answers and not _event_waits()  # type: ignore[union-attr]
    approval_id = question["params"]["elicitationId"]
    assert (await env.approve(approval_id)).status_code == 200
    await asyncio.sleep(WAIT_S + 0.3)
    assert len(EXECUTED) == before
    assert (await env.approval(approval_id))["status"] == "approved"


async def test_a_cancelled_wait_leaves_no_task_behind(env: Env, http: httpx.AsyncClient) -> None:
    approval_id, _ = await _modern_held(http, env, {"amount": 111, "to": "cancelled-wait"})
    approvals = env.gw.approvals
    assert approvals is not None
    waiting = asyncio.ensure_future(approvals.await_decision(approval_id, 5))
    await asyncio.sleep(0.3)
    waiting.cancel()
    await asyncio.sleep(0.05)
    assert not _event_waits() and not approvals._waiting


async def test_every_wait_on_one_approval_is_woken_by_the_decision(env: Env, http: httpx.AsyncClient) -> None:
    """Two calls wait on one approval; the first stops waiting early. The decision must still wake
    the second at once rather than on its next read of the state DB (up to 500 ms later)."""
    approval_id, _ = await _modern_held(http, env, {"amount": 112, "to": "two-waits"})
    approvals = env.gw.approvals
    assert approvals is not None
    loop = asyncio.get_running_loop()
    short = asyncio.ensure_future(approvals.await_decision(approval_id, 0.2))
    long = asyncio.ensure_future(approvals.await_decision(approval_id, 10))
    assert (found := await short) is not None and found.status == "pending"
    await asyncio.sleep(1.1)  # the long wait now reads the DB only every 500 ms
    assert (await env.approve(approval_id)).status_code == 200
    decided = loop.time()  # after the approval is recorded: a loaded machine makes the call itself slow
    assert (found := await long) is not None and found.status == "approved"
    assert loop.time() - decided < 0.25


async def test_two_clients_waiting_on_one_approval_run_it_once(env: Env, http: httpx.AsyncClient) -> None:
    """Legacy: two sessions of one principal make the same held call; both are asked about the same
    approval and both wait. One approval: one execution, the other call gets no second run."""
    before = len(EXECUTED)
    url = f"{env.base}/mcp/bank"
    call = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": "pay", "arguments": {"amount": 777, "to": "race-legacy"}},
    }
    sessions = [await _legacy_session(http, url, env.token()) for _ in range(2)]
    asked: list[str] = []
    finals: list[dict[str, Any]] = []

    async def wait_in(headers: dict[str, str]) -> None:
        async with (
            httpx.AsyncClient(timeout=15) as streaming,
            streaming.stream("POST", url, json=call, headers=headers) as resp,
        ):
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if event.get("method") == "elicitation/create":
                    accept = {"jsonrpc": "2.0", "id": event["id"], "result": {"action": "accept"}}
                    assert (await http.post(url, json=accept, headers=headers)).status_code == 202
                    asked.append(event["params"]["elicitationId"])
                else:
                    finals.append(event)

    first = asyncio.ensure_future(wait_in(sessions[0]))
    while not asked:
        await asyncio.sleep(0.02)
    second = asyncio.ensure_future(wait_in(sessions[1]))
    while len(asked) < 2:
        await asyncio.sleep(0.02)
    assert asked[0] == asked[1]  # the repeat is held on the same request
    assert (await env.approve(asked[0])).status_code == 200
    await asyncio.gather(first, second)
    assert EXECUTED[before:] == [("pay", 777, "race-legacy")]
    results = [e["result"] for e in finals if e.get("id") == 7]
    assert sorted(r["isError"] for r in results) == [False, True]
    assert (await env.approval(asked[0]))["status"] == "consumed"


async def test_two_modern_retries_on_one_approval_run_it_once(env: Env, http: httpx.AsyncClient) -> None:
    before = len(EXECUTED)
    url = f"{env.base}/mcp/bank"
    auth = {"authorization": f"Bearer {env.token()}"}
    args = {"amount": 778, "to": "race-modern"}
    approval_id, state = await _modern_held(http, env, args)
    answers = {"bastion/approval": {"action": "accept"}}
    body, headers = _modern_call(
        args, 2, {"elicitation": {"url": {}}}, requestState=state, inputResponses=answers
    )
    retries = [asyncio.ensure_future(http.post(url, json=body, headers=headers | auth)) for _ in range(2)]
    await asyncio.sleep(0.3)
    assert (await env.approve(approval_id)).status_code == 200
    results = [r.json()["result"] for r in await asyncio.gather(*retries)]
    assert EXECUTED[before:] == [("pay", 778, "race-modern")]
    assert sorted(r["isError"] for r in results) == [False, True]
    loser = next(r for r in results if r["isError"])["structuredContent"]["reasons"][-1]
    # The loser either lost the race to consume the approval, or (on a slow machine) came back
    # after it was consumed and was asked afresh; it never runs on the used approval.
    fresh = loser["reason"].startswith("approval required: ") and approval_id not in loser["reason"]
    assert loser["policy"] == "approval-used" or fresh, loser


async def test_a_form_yes_to_a_url_question_approves_nothing(
    env: Env, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller Cedar does not let approve their own call is asked in URL mode; answering it as if it
    were the form ("accept", approve: true) decides nothing, in either era. The legacy stream keeps
    itself alive while it waits and ends with the held result."""
    from gateway.fronts.mcp import inline

    monkeypatch.setattr(inline, "KEEPALIVE_S", 0.4)
    before = len(EXECUTED)
    url = f"{env.base}/mcp/bank"
    yes = {"action": "accept", "content": {"approve": True}}
    fin = await _legacy_session(http, url, env.token())
    call = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": "pay", "arguments": {"amount": 433, "to": "yes-to-url"}},
    }
    lines: list[str] = []
    async with (
        httpx.AsyncClient(timeout=15) as streaming,
        streaming.stream("POST", url, json=call, headers=fin) as resp,
    ):
        async for line in resp.aiter_lines():
            lines.append(line)
            if line.startswith("data: ") and "elicitation/create" in line:
                question = json.loads(line[6:])
                assert question["params"]["mode"] == "url"
                answer = {"jsonrpc": "2.0", "id": question["id"], "result": yes}
                assert (await http.post(url, json=answer, headers=fin)).status_code == 202
    assert lines.count(": waiting for approval") >= WAIT_S / 0.4 - 1
    final = json.loads(next(line for line in reversed(lines) if line.startswith("data: "))[6:])
    assert final["id"] == 7 and _approval_id_of(final["result"]["structuredContent"]["approval_url"])
    legacy_id = question["params"]["elicitationId"]

    args = {"amount": 434, "to": "yes-to-url"}
    approval_id, state = await _modern_held(http, env, args)
    body, headers = _modern_call(
        args, 2, {"elicitation": {"url": {}}}, requestState=state, inputResponses={"bastion/approval": yes}
    )
    auth = {"authorization": f"Bearer {env.token()}"}
    retried = (await http.post(url, json=body, headers=headers | auth)).json()["result"]
    assert retried["isError"] is True and retried["structuredContent"]["approval_id"] == approval_id
    for held in (legacy_id, approval_id):
        assert (await env.approval(held))["status"] == "pending"
    assert len(EXECUTED) == before


async def test_a_request_state_cannot_move_to_another_tool(env: Env, http: httpx.AsyncClient) -> None:
    args = {"amount": 150, "to": "moved"}
    approval_id, state = await _modern_held(http, env, args)
    assert (await env.approve(approval_id)).status_code == 200
    body, headers = _modern_call(
        args, 2, {}, requestState=state, inputResponses={"bastion/approval": {"action": "accept"}}
    )
    body["params"]["name"] = headers["mcp-name"] = "tip"
    auth = {"authorization": f"Bearer {env.token()}"}
    error = (await http.post(f"{env.base}/mcp/bank", json=body, headers=headers | auth)).json()["error"]
    assert "another call" in error["message"]
    assert (await env.approval(approval_id))["status"] == "approved"


def _scope(url: str, headers: dict[str, str]) -> dict[str, Any]:
    """An ASGI scope for a POST to `url` (for tests that must control the connection itself)."""
    path = "/" + url.split("/", 3)[3]
    headers = {**headers, "content-type": "application/json", "host": url.split("/")[2]}
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }


def _pay(amount: int, to: str) -> dict[str, Any]:
    args = {"amount": amount, "to": to}
    return {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "pay", "arguments": args}}


async def test_a_client_gone_before_the_stream_starts_leaves_nothing_registered(
    env: Env, http: httpx.AsyncClient
) -> None:
    """A legacy client that sends the held call and leaves before the answer's first byte: the
    stream is never run, and nothing about it may stay in memory."""
    from gateway.app import build_app

    url = f"{env.base}/mcp/bank"
    fin = await _legacy_session(http, url, env.token())
    incoming = [{"type": "http.request", "body": json.dumps(_pay(435, "never-streamed")).encode()}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        await asyncio.sleep(0)  # the disconnect is noticed while the headers go out

    await build_app(env.gw)(_scope(url, fin), receive, send)
    assert sent and sent[0]["status"] == 200
    assert not any(m.get("body") for m in sent)  # not one byte of the stream was made
    assert not env.gw._mcp.inline._answers  # type: ignore[union-attr]


async def test_a_decline_that_comes_at_once_ends_the_wait_at_once(env: Env, http: httpx.AsyncClient) -> None:
    """The client's decline arrives before the stream has looked at the state DB even once."""
    from gateway.app import build_app

    url = f"{env.base}/mcp/bank"
    fin = await _legacy_session(http, url, env.token())
    incoming = [{"type": "http.request", "body": json.dumps(_pay(436, "quick-decline")).encode()}]
    finished = asyncio.Event()
    events: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop(0)
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        for line in message.get("body", b"").decode().splitlines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if events[-1].get("method") == "elicitation/create":  # answered while it goes out
                    decline = {"jsonrpc": "2.0", "id": events[-1]["id"], "result": {"action": "decline"}}
                    assert (await http.post(url, json=decline, headers=fin)).status_code == 202

    loop = asyncio.get_running_loop()
    started = loop.time()
    await build_app(env.gw)(_scope(url, fin), receive, send)
    finished.set()
    assert loop.time() - started < WAIT_S / 2
    assert events[-1]["id"] == 7 and events[-1]["result"]["isError"] is True
