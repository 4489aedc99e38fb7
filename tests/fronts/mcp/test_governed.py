"""Every MCP message is classified: tried as an attacker would, through the real gateway.

Bastion fronts the rich test upstream three ways: `rich` (the SDK's server, 2026-07-28 toward
Bastion), `old` (the same server behind a 2025-era front: stateless clients share one upstream
session) and `io` (the same server as a stdio program: every client shares one process). Real
JWTs, real Cedar, real SQLite audit, the SDK's client and raw HTTP for what the SDK will not send.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from conftest import LegacyOnly, free_port, make_config, running, running_gateway
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from starlette.types import Receive, Scope, Send
from upstream_server import EVENTS, LOG_ENV, read_log, rich_server, stdio_params

from gateway.app import Gateway
from gateway.identity.devkeys import DevKey

MODES = ["legacy", "2026-07-28"]
MODERN_META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {"elicitation": {"form": {}}},
}
POLICY = """
@id("devs-call") permit (principal in Group::"developers", action == Action::"call_tool", resource);
@id("writes-for-admins") @reason("only admins may write")
forbid (principal, action == Action::"call_tool", resource)
when { resource.risk == "write" } unless { principal in Group::"admins" };
@id("guests-echo-hi") permit (principal in Group::"guests", action == Action::"call_tool", resource)
when { resource == Tool::"rich/echo" && context.args has text && context.args.text == "hi" };
@id("anyone-lists") permit (principal, action == Action::"list_tools", resource);

@id("devs-read") permit (principal in Group::"developers", action == Action::"read_resource", resource);
@id("secret-for-admins") @reason("the secret note is for admins")
forbid (principal, action == Action::"read_resource", resource)
when { resource.uri == "notes://secret" } unless { principal in Group::"admins" };

@id("devs-prompts") permit (principal in Group::"developers", action == Action::"get_prompt", resource);
@id("admin-prompt") @reason("the admin prompt is for admins")
forbid (principal, action == Action::"get_prompt", resource)
when { resource.name == "admin_prompt" } unless { principal in Group::"admins" };
@id("no-secret-topic") @reason("not that topic")
forbid (principal, action == Action::"get_prompt", resource)
when { context.args has topic && context.args.topic == "secrets" };
"""


@dataclass
class Env:
    base: str
    gw: Gateway
    key: DevKey
    stdio_log: Path
    legacy: Lifespanned

    def token(
        self, sub: str = "dev", groups: tuple[str, ...] = ("developers",), upstream: str = "rich"
    ) -> str:
        return self.key.mint(sub, groups=groups, audience=f"{self.base}/mcp/{upstream}")

    async def records(self, **match: Any) -> list[dict[str, Any]]:
        assert self.gw.store is not None
        rows = [r.to_json() async for r in self.gw.store.iter_records()]
        return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


class Lifespanned:
    """A `LegacyOnly` front whose lifespan still reaches the wrapped server."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.front = inner, LegacyOnly(inner)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await (self.inner if scope["type"] == "lifespan" else self.front)(scope, receive, send)


@pytest.fixture(scope="module")
async def env(
    tmp_path_factory: pytest.TempPathFactory, dev_key: DevKey, data_dir: Path
) -> AsyncIterator[Env]:
    tmp = tmp_path_factory.mktemp("governed")
    policies = tmp / "policies"
    policies.mkdir()
    (policies / "governed.cedar").write_text(POLICY)
    schema = Path(__file__).resolve().parents[3] / "policies" / "schema.cedarschema"
    (policies / "schema.cedarschema").write_text(schema.read_text())
    log = tmp / "stdio-events.log"
    modern_app = rich_server().streamable_http_app(streamable_http_path="/mcp")
    legacy_app = Lifespanned(rich_server().streamable_http_app(streamable_http_path="/mcp"))
    async with running(modern_app, lifespan="on") as modern, running(legacy_app, lifespan="on") as legacy:
        cfg = make_config(data_dir, {"rich": f"{modern}/mcp", "old": f"{legacy}/mcp"}, free_port(), policies)
        params = stdio_params(log)
        data = cfg.model_dump(mode="json", exclude_unset=True)
        data["upstreams"]["io"] = {
            "transport": "stdio",
            "command": params.command,
            "args": params.args,
            "env": {LOG_ENV: str(log)},
            "tools": {"delete_note": {"risk": "write"}},
        }
        data["data_dir"] = str(tmp)
        data["audit"] = {"url": f"sqlite+aiosqlite:///{tmp / 'audit.db'}"}
        data["state"] = {"url": f"sqlite+aiosqlite:///{tmp / 'state.db'}"}
        from gateway import config as config_mod

        cfg = config_mod.parse(data, tmp)
        async with running_gateway(cfg) as (base, gw):
            yield Env(base, gw, dev_key, log, legacy_app)


@asynccontextmanager
async def sdk(env: Env, token: str, mode: str, upstream: str = "rich") -> AsyncIterator[Client]:
    async with (
        httpx2.AsyncClient(headers={"authorization": f"Bearer {token}"}, timeout=10) as hc,
        Client(streamable_http_client(f"{env.base}/mcp/{upstream}", http_client=hc), mode=mode) as client,
    ):
        yield client


def modern(token: str, method: str, name: str | None = None) -> dict[str, str]:
    hdrs = {
        "authorization": f"Bearer {token}",
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": method,
    }
    if name is not None:
        hdrs["mcp-name"] = name
    return hdrs


def message(method: str, params: dict[str, Any] | None = None, msg_id: int | None = 1) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "jsonrpc": "2.0",
        "method": method,
        "params": {**(params or {}), "_meta": MODERN_META},
    }
    if msg_id is not None:
        msg["id"] = msg_id
    return msg


def sse_messages(text: str) -> list[dict[str, Any]]:
    return [
        json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:") and line[5:].strip()
    ]


# -- resources and prompts are Cedar actions ----------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_resources_are_decided_listed_and_recorded(env: Env, mode: str) -> None:
    async with sdk(env, env.token(), mode) as client:
        listed = {str(r.uri) for r in (await client.list_resources()).resources}
        assert listed == {"notes://welcome"}  # the secret note is hidden: no arguments could unlock it
        assert "Welcome" in (await client.read_resource("notes://welcome")).contents[0].text  # type: ignore[union-attr]
        with pytest.raises(MCPError) as refused:
            await client.read_resource("notes://secret")
    assert refused.value.error.code == -32003
    assert "secret-for-admins" in refused.value.error.message
    assert "the secret note is for admins" in refused.value.error.message
    audit_id = refused.value.error.data["audit_id"]
    [record] = await env.records(id=audit_id)
    assert record["action"] == "read_resource"
    assert record["tool"] == "notes://secret"
    assert record["decision"]["effect"] == "deny"
    assert record["decision"]["policy_ids"] == ["secret-for-admins"]
    assert record["outcome"]["status"] == "denied"

    async with sdk(env, env.token("root", ("developers", "admins")), mode) as client:
        listed = {str(r.uri) for r in (await client.list_resources()).resources}
        assert listed == {"notes://welcome", "notes://secret"}
        read = await client.read_resource("notes://secret")
        assert "alice@example.com" in read.contents[0].text  # type: ignore[union-attr]
    allowed = await env.records(action="read_resource", tool="notes://secret", user="root")
    assert allowed and allowed[-1]["outcome"]["status"] == "completed"
    assert allowed[-1]["result_sha256"]


@pytest.mark.parametrize("mode", MODES)
async def test_prompts_are_decided_listed_and_recorded(env: Env, mode: str) -> None:
    async with sdk(env, env.token(), mode) as client:
        names = {p.name for p in (await client.list_prompts()).prompts}
        assert names == {"summarize"}
        got = await client.get_prompt("summarize", {"topic": "cedar"})
        assert "cedar" in json.dumps(got.model_dump(mode="json"))
        with pytest.raises(MCPError) as by_argument:
            await client.get_prompt("summarize", {"topic": "secrets"})
        with pytest.raises(MCPError) as refused:
            await client.get_prompt("admin_prompt")
    # the prompt's arguments, learned from the upstream at start-up, type `context.args`
    assert "no-secret-topic" in by_argument.value.error.message
    assert "admin-prompt" in refused.value.error.message
    [record] = await env.records(id=refused.value.error.data["audit_id"])
    assert (record["action"], record["tool"], record["decision"]["effect"]) == (
        "get_prompt",
        "admin_prompt",
        "deny",
    )
    summarized = await env.records(action="get_prompt", tool="summarize")
    done = [r for r in summarized if r["decision"]["effect"] == "allow"]
    assert done and done[-1]["outcome"]["status"] == "completed"
    assert "topic" in json.dumps(done[-1]["args_redacted"])
    assert [r["decision"]["policy_ids"] for r in summarized if r["decision"]["effect"] == "deny"][-1] == [
        "no-secret-topic"
    ]


async def test_completion_is_refused_where_the_prompt_is(env: Env, http: httpx.AsyncClient) -> None:
    url = f"{env.base}/mcp/rich"
    hdrs = modern(env.token(), "completion/complete")
    ok = {"ref": {"type": "ref/prompt", "name": "summarize"}, "argument": {"name": "topic", "value": "ce"}}
    got = (await http.post(url, json=message("completion/complete", ok), headers=hdrs)).json()
    assert got["result"]["completion"]["values"] == ["cedar"]
    denied = {"ref": {"type": "ref/prompt", "name": "admin_prompt"}, "argument": {"name": "x", "value": ""}}
    got = (await http.post(url, json=message("completion/complete", denied), headers=hdrs)).json()
    assert got["error"]["code"] == -32003 and "admin-prompt" in got["error"]["message"]
    [record] = await env.records(id=got["error"]["data"]["audit_id"])
    assert (record["action"], record["tool"]) == ("get_prompt", "admin_prompt")
    nameless = {"ref": {"type": "ref/prompt"}, "argument": {"name": "x", "value": ""}}
    got = (await http.post(url, json=message("completion/complete", nameless), headers=hdrs)).json()
    assert got["error"]["code"] == -32602


# -- listings agree with the call decision --------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_tools_list_shows_what_could_be_called(env: Env, mode: str) -> None:
    """`permit list_tools on all` is in force: a tool is listed only if calling it can be allowed."""
    expected = {
        ("guest", ("guests",)): {"echo"},  # allowed for some arguments (text == "hi")
        ("dev", ("developers",)): {"echo", "slow", "write_note", "ask"},
        ("root", ("developers", "admins")): {"echo", "slow", "write_note", "ask", "delete_note"},
    }
    for (sub, groups), tools in expected.items():
        async with sdk(env, env.token(sub, groups), mode) as client:
            assert {t.name for t in (await client.list_tools()).tools} == tools, sub
    async with sdk(env, env.token("guest", ("guests",)), mode) as client:
        assert not (await client.call_tool("echo", {"text": "hi"})).is_error
        assert (await client.call_tool("echo", {"text": "other"})).is_error
        assert (await client.call_tool("slow", {"seconds": 0})).is_error


# -- anything else is refused and recorded --------------------------------------------------------


@pytest.mark.parametrize("method", ["sampling/createMessage", "roots/list", "x-vendor/do"])
async def test_unlisted_methods_are_refused_and_recorded(
    env: Env, http: httpx.AsyncClient, method: str
) -> None:
    got = await http.post(
        f"{env.base}/mcp/rich", json=message(method, {"taskId": "t1"}), headers=modern(env.token(), method)
    )
    body = got.json()
    assert body["error"]["code"] == -32601
    assert ("tasks are not relayed" if method.startswith("tasks/") else "mcp.allow_methods") in body["error"][
        "message"
    ]
    [record] = await env.records(id=body["error"]["data"]["audit_id"])
    assert (record["action"], record["tool"], record["decision"]["effect"]) == ("message", method, "deny")


async def test_resource_read_without_a_token_is_recorded(env: Env, http: httpx.AsyncClient) -> None:
    msg = message("resources/read", {"uri": "notes://secret"})
    hdrs = {k: v for k, v in modern("", "resources/read", "notes://secret").items() if k != "authorization"}
    got = await http.post(f"{env.base}/mcp/rich", json=msg, headers=hdrs)
    assert got.status_code == 401
    rows = await env.records(action="read_resource", tool="notes://secret", user=None)
    assert rows and rows[-1]["decision"]["stage"] == "identity"


# -- correlated messages: only about the sender's own requests ---------------------------------


async def _slow_call(
    http: httpx.AsyncClient, url: str, token: str, msg_id: int, seconds: float
) -> httpx.Response:
    msg = message("tools/call", {"name": "slow", "arguments": {"seconds": seconds}}, msg_id)
    return await http.post(url, json=msg, headers=modern(token, "tools/call", "slow"), timeout=15)


async def _cancel(http: httpx.AsyncClient, url: str, token: str, request_id: int) -> int:
    msg = message("notifications/cancelled", {"requestId": request_id, "reason": "test"}, None)
    got = await http.post(url, json=msg, headers=modern(token, "notifications/cancelled"))
    return got.status_code


async def _events(env: Env, upstream: str) -> list[str]:
    return read_log(env.stdio_log) if upstream == "io" else list(EVENTS)


@pytest.mark.parametrize("upstream", ["old", "io"])
async def test_a_client_cannot_cancel_another_clients_call(
    env: Env, http: httpx.AsyncClient, upstream: str
) -> None:
    """Both clients share one upstream session (or process) and both number their requests from 7."""
    url = f"{env.base}/mcp/{upstream}"
    alice, mallory = env.token("alice", upstream=upstream), env.token("mallory", upstream=upstream)
    EVENTS.clear()
    env.stdio_log.write_text("")
    call = asyncio.create_task(_slow_call(http, url, alice, 7, 1.0))
    for _ in range(100):
        if "slow:started" in await _events(env, upstream):
            break
        await asyncio.sleep(0.02)
    assert await _cancel(http, url, mallory, 7) == 202  # accepted on the wire, never forwarded
    answer = await call
    messages = sse_messages(answer.text) if answer.text.startswith(("event", "data")) else [answer.json()]
    assert messages[-1]["id"] == 7 and not messages[-1]["result"].get("isError")
    events = await _events(env, upstream)
    assert "slow:completed" in events and "slow:cancelled" not in events

    # the owner's own cancellation is translated to the private id and reaches the upstream
    EVENTS.clear()
    env.stdio_log.write_text("")
    call = asyncio.create_task(_slow_call(http, url, alice, 8, 3.0))
    for _ in range(100):
        if "slow:started" in await _events(env, upstream):
            break
        await asyncio.sleep(0.02)
    assert await _cancel(http, url, alice, 8) == 202
    for _ in range(100):
        if "slow:cancelled" in await _events(env, upstream):
            break
        await asyncio.sleep(0.02)
    call.cancel()
    assert "slow:cancelled" in await _events(env, upstream)


@pytest.mark.parametrize("upstream", ["old", "io"])
async def test_an_answer_to_no_server_request_of_the_sender_is_refused(
    env: Env, http: httpx.AsyncClient, upstream: str
) -> None:
    """On a shared upstream session, a client's "answer" with a guessed id could answer the
    upstream's question to another client: it is refused, recorded, and never sent upstream."""
    before = list(env.legacy.front.seen_methods)
    forged = {"jsonrpc": "2.0", "id": 1, "result": {"action": "accept", "content": {"answer": "yes"}}}
    got = await http.post(
        f"{env.base}/mcp/{upstream}",
        json=forged,
        headers=modern(env.token("mallory", upstream=upstream), "x"),
    )
    assert got.status_code == 400
    refused = got.json()["error"]
    assert "no server request that was sent to this client" in refused["message"]
    [record] = await env.records(id=refused["data"]["audit_id"])
    assert (record["user"], record["action"], record["decision"]["effect"]) == ("mallory", "message", "deny")
    assert env.legacy.front.seen_methods == before  # nothing reached the upstream


# -- whatever happens on the way, the record is made ------------------------------------------


async def test_an_error_inside_the_gateway_still_leaves_a_record(
    env: Env, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: the result step raises something no code path expects."""

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected")

    assert env.gw.pipeline is not None
    monkeypatch.setattr(env.gw.pipeline, "redact_result", broken)
    msg = message("tools/call", {"name": "echo", "arguments": {"text": "boom"}})
    got = await http.post(f"{env.base}/mcp/rich", json=msg, headers=modern(env.token(), "tools/call", "echo"))
    assert got.status_code == 500
    assert got.json()["error"]["code"] == -32603 and "RuntimeError" in got.json()["error"]["message"]
    for _ in range(50):
        rows = [
            r for r in await env.records(action="call_tool", tool="echo") if r["outcome"]["status"] == "error"
        ]
        if rows:
            break
        await asyncio.sleep(0.02)
    assert rows, "no record with status error"
    assert rows[-1]["decision"]["effect"] == "allow"
    assert "RuntimeError" in rows[-1]["outcome"]["error"]


Token = Callable[..., str]


# -- tasks belong to whoever created them ------------------------------------------------------


async def test_a_task_is_its_creators_alone(env: Env, http: httpx.AsyncClient) -> None:
    """A task-augmented call (MCP 2025-11-25) on the legacy upstream: another user who learns the
    task id can neither poll, fetch, cancel nor list it."""
    url = f"{env.base}/mcp/old"
    alice, mallory = env.token("alice", upstream="old"), env.token("mallory", upstream="old")

    async def send(
        token: str, method: str, params: dict[str, Any], name: str | None = None
    ) -> dict[str, Any]:
        got = await http.post(url, json=message(method, params), headers=modern(token, method, name))
        if got.headers["content-type"].startswith("text/event-stream"):
            return sse_messages(got.text)[-1]
        return dict(got.json())

    created = await send(
        alice, "tools/call", {"name": "echo", "arguments": {"text": "t1"}, "task": {"ttl": 30000}}, "echo"
    )
    task_id = created["result"]["task"]["taskId"]
    [record] = await env.records(id=(await env.records(action="call_tool", user="alice"))[-1]["id"])
    assert record["outcome"]["status"] == "completed"

    for method in ("tasks/get", "tasks/result", "tasks/cancel"):
        refused = (await send(mallory, method, {"taskId": task_id}))["error"]
        assert refused["code"] == -32602 and "unknown task" in refused["message"], method
        [row] = await env.records(id=refused["data"]["audit_id"])
        assert (row["user"], row["tool"], row["decision"]["policy_ids"]) == (
            "mallory",
            method,
            ["not-your-task"],
        )
    assert (await send(mallory, "tasks/list", {}))["result"]["tasks"] == []

    assert task_id in {t["taskId"] for t in (await send(alice, "tasks/list", {}))["result"]["tasks"]}
    assert (await send(alice, "tasks/get", {"taskId": task_id}))["result"]["taskId"] == task_id
    result = (await send(alice, "tasks/result", {"taskId": task_id}))["result"]
    assert result["content"][0]["text"] == "t1"
    fetched = [
        r for r in await env.records(user="alice", call_id=task_id) if r["decision"]["stage"] == "task"
    ]
    assert fetched and fetched[-1]["outcome"]["status"] == "completed" and fetched[-1]["result_sha256"]
    assert fetched[-1]["decision"]["policy_ids"] == ["task-owner"]


async def test_the_aggregate_endpoint_refuses_and_records_what_it_does_not_serve(
    env: Env, http: httpx.AsyncClient
) -> None:
    token = env.key.mint("dev", groups=("developers",), audience=env.base)
    for method, params in (("resources/read", {"uri": "notes://secret"}), ("prompts/get", {"name": "x"})):
        name = params.get("uri") or params.get("name")
        got = await http.post(
            f"{env.base}/mcp", json=message(method, params), headers=modern(token, method, name)
        )
        error = got.json()["error"]
        assert error["code"] == -32601 and "use /mcp/<upstream>" in error["message"]
        [record] = await env.records(id=error["data"]["audit_id"])
        assert (record["upstream"], record["tool"], record["action"]) == ("*", method, "message")
    cancel = message("notifications/cancelled", {"requestId": 1}, None)
    got = await http.post(f"{env.base}/mcp", json=cancel, headers=modern(token, "notifications/cancelled"))
    assert got.status_code == 202  # names no request of this caller in flight anywhere: dropped
