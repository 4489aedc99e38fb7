"""An attacker smuggles a second request upstream through a header Bastion builds from the body.

A legacy-session client in front of a 2026-07-28 upstream: Bastion copies the JSON-RPC method
(and the tool name) into the `Mcp-Method` / `Mcp-Name` headers it sends upstream. Here a caller
whom policy denies `delete_note` hides CR/LF (or LF, or NUL) in those values to make the upstream
run `delete_note` anyway; the upstream is the SDK's `MCPServer` under uvicorn on loopback, and it
notes every HTTP request it receives and every time `delete_note` runs.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import POLICIES, free_port, make_config, running, running_gateway
from mcp.server.mcpserver import MCPServer
from mcp_support import audit_rows
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.app import Gateway
from gateway.identity.devkeys import DevKey

LEGACY = "2025-11-25"
MODERN_META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}


@dataclass(frozen=True)
class Seen:
    """One HTTP request as the upstream received it."""

    mcp_method: str | None
    mcp_name: str | None
    body: bytes


class Upstream:
    """The notes server behind a wrapper that notes every HTTP request it gets."""

    def __init__(self) -> None:
        self.deleted: list[str] = []
        self.requests: list[Seen] = []
        srv = MCPServer("notes")

        @srv.tool()
        def echo(text: str) -> str:
            """Return the text unchanged."""
            return text

        @srv.tool()
        def delete_note(name: str) -> str:
            """Delete a note by name."""
            self.deleted.append(name)
            return "deleted"

        def cafe() -> str:
            return "served"

        srv.add_tool(cafe, name="caf\u00e9", description="A tool whose name is not ASCII.")

        self.app: ASGIApp = srv.streamable_http_app(streamable_http_path="/mcp")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        body = b"".join(chunks)
        self.requests.append(Seen(headers.get("mcp-method"), headers.get("mcp-name"), body))
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


@dataclass
class Env:
    base: str
    gw: Gateway
    upstream: Upstream
    upstream_url: str
    token: str
    http: httpx.AsyncClient = field(repr=False)

    @property
    def url(self) -> str:
        return f"{self.base}/mcp/notes"

    async def legacy_session(self) -> dict[str, str]:
        """`initialize` as a 2025-11-25 client; the headers for the session's next requests."""
        r = await self.http.post(
            self.url,
            json={
                "jsonrpc": "2.0",
                "id": 0,
                "method": "initialize",
                "params": {
                    "protocolVersion": LEGACY,
                    "capabilities": {},
                    "clientInfo": {"name": "mallory", "version": "1.0"},
                },
            },
            headers=self.headers(),
        )
        assert r.status_code == 200, r.text
        return self.headers(r.headers["mcp-session-id"])

    def headers(self, session: str | None = None) -> dict[str, str]:
        hdrs = {
            "authorization": f"Bearer {self.token}",
            "accept": "application/json, text/event-stream",
            "content-type": "application/json",
        }
        if session is not None:
            hdrs |= {"mcp-session-id": session, "mcp-protocol-version": LEGACY}
        return hdrs


@dataclass(frozen=True)
class Attempt:
    """What one attacker POST got, and what it caused."""

    status: int
    answer: dict[str, Any]
    upstream_got: list[Seen]
    """The HTTP requests the upstream received while the POST was in flight."""
    audit: list[dict[str, Any]]
    """Audit records written while the POST was in flight."""


async def attempt(env: Env, session: dict[str, str], body: bytes) -> Attempt:
    seen = len(env.upstream.requests)
    recorded = len(await audit_rows(env.gw))
    r = await env.http.post(env.url, content=body, headers=session)
    answer = r.json()
    return Attempt(
        r.status_code,
        answer,
        env.upstream.requests[seen:],
        (await audit_rows(env.gw))[recorded:],
    )


@pytest.fixture(scope="module")
async def env(
    dev_key: DevKey, data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Env]:
    """Bastion in front of `notes` (a 2026-07-28 upstream); `dev` may call everything but delete_note."""
    tmp = tmp_path_factory.mktemp("smuggling")
    policies = tmp / "policies"
    shutil.copytree(POLICIES, policies)
    (policies / "notes.cedar").write_text(
        '@id("developers-use-notes")\n'
        'permit (principal in Group::"developers", action in [Action::"call_tool", Action::"list_tools"], '
        'resource in Upstream::"notes");\n'
    )
    upstream = Upstream()
    async with running(upstream, lifespan="on") as up_base:
        cfg = make_config(
            data_dir,
            {"notes": f"{up_base}/mcp"},
            free_port(),
            policies,
            audit={"url": f"sqlite+aiosqlite:///{tmp / 'audit.db'}"},
            state={"url": f"sqlite+aiosqlite:///{tmp / 'state.db'}"},
        )
        async with running_gateway(cfg) as (base, gw), httpx.AsyncClient(timeout=10) as http:
            token = dev_key.mint("dev", audience=f"{base}/mcp/notes", groups=["developers"])
            yield Env(base, gw, upstream, up_base, token, http)


def call(msg_id: int, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": msg_id,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments},
    }


def smuggled(env: Env, eol: str, prefix: str) -> str:
    """`prefix`, then the end of the request Bastion is writing and a whole second request: a
    2026-07-28 `tools/call` of `delete_note`. What Bastion writes after the header becomes a third
    request, which the upstream answers and nobody reads."""
    host = env.upstream_url.removeprefix("http://")
    body = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 666,
            "method": "tools/call",
            "params": {"name": "delete_note", "arguments": {"name": "smuggled"}, "_meta": MODERN_META},
        }
    )
    lines = [
        prefix,
        "Content-Length: 0",
        "",
        "POST /mcp HTTP/1.1",
        f"Host: {host}",
        "Content-Type: application/json",
        "Accept: application/json, text/event-stream",
        "Mcp-Protocol-Version: 2026-07-28",
        "Mcp-Method: tools/call",
        "Mcp-Name: delete_note",
        f"Content-Length: {len(body)}",
        "",
        f"{body}GET /ignored HTTP/1.1",
        "X-Ignored: ",
    ]
    return eol.join(lines)


async def assert_still_serving(env: Env, session: dict[str, str]) -> None:
    """The gateway answers health checks and still runs an allowed call in the same session."""
    assert (await env.http.get(f"{env.base}/healthz")).json() == {"status": "ok"}
    ok = await attempt(env, session, json.dumps(call(7, "echo", {"text": "still here"})).encode())
    assert ok.status == 200
    assert ok.answer["result"]["content"][0]["text"] == "still here"
    assert [s.mcp_name for s in ok.upstream_got] == ["echo"]


async def test_policy_denies_delete_note_to_the_caller(env: Env) -> None:
    """The control: asked plainly, delete_note is refused and never reaches the upstream."""
    session = await env.legacy_session()
    got = await attempt(env, session, json.dumps(call(1, "delete_note", {"name": "plain"})).encode())
    assert got.status == 200
    assert got.answer["result"]["isError"] is True
    assert got.answer["result"]["structuredContent"]["decision"] == "deny"
    assert got.upstream_got == []
    assert env.upstream.deleted == []


@pytest.mark.parametrize(
    ("eol", "prefix", "named"),
    [
        ("\r\n", "tools/list", "U+000D at offset 10"),
        ("\n", "tools/list", "U+000A at offset 10"),
        ("\r\n", "tools/list\x00", "U+0000 at offset 10"),
        ("\x00", "tools/list", "U+0000 at offset 10"),
    ],
    ids=["crlf", "lf", "nul-then-crlf", "nul"],
)
async def test_control_characters_in_the_method_smuggle_nothing(
    env: Env, eol: str, prefix: str, named: str
) -> None:
    session = await env.legacy_session()
    method = smuggled(env, eol, prefix)
    got = await attempt(env, session, json.dumps({"jsonrpc": "2.0", "id": 2, "method": method}).encode())
    assert got.status == 400
    assert got.answer["id"] is None
    assert got.answer["error"]["code"] == -32600
    message = got.answer["error"]["message"]
    assert message.startswith(f'"method" holds the character {named}')
    assert not any(c in message for c in "\r\n\x00"), "the refusal must not echo control characters"
    assert got.upstream_got == [], "nothing of this message may reach the upstream"
    assert env.upstream.deleted == []
    await assert_still_serving(env, session)
    assert env.upstream.deleted == []


@pytest.mark.parametrize(
    ("eol", "prefix", "refused_by"),
    [
        ("\r\n", "echo", "name"),
        ("\n", "echo", "name"),
        ("\x00", "echo", "name"),
        ("\r\n", "caf\u00e9", "name"),
    ],
    ids=["crlf", "lf", "nul", "non-ascii-then-crlf"],
)
async def test_a_tool_name_that_cannot_be_a_header_smuggles_nothing(
    env: Env, eol: str, prefix: str, refused_by: str
) -> None:
    """The name starts with a tool policy lets `dev` call; it would go into `Mcp-Name`."""
    session = await env.legacy_session()
    name = smuggled(env, eol, prefix)
    got = await attempt(env, session, json.dumps(call(3, name, {"text": "hi"})).encode())
    assert got.answer["id"] == 3
    assert got.answer["error"]["code"] == -32602
    message = got.answer["error"]["message"]
    assert refused_by in message
    assert not any(c in message for c in "\r\n\x00"), "the refusal must not echo control characters"
    assert got.upstream_got == [], "nothing of this message may reach the upstream"
    assert env.upstream.deleted == []
    await assert_still_serving(env, session)
    assert env.upstream.deleted == []


async def test_a_non_ascii_tool_name_travels_encoded(env: Env) -> None:
    """`café` is listed by the upstream and allowed by policy: its name goes upstream in the
    transport's `=?base64?...?=` header form, which the upstream decodes, and the call runs."""
    session = await env.legacy_session()
    listed = await attempt(
        env, session, json.dumps({"jsonrpc": "2.0", "id": 8, "method": "tools/list"}).encode()
    )
    assert "caf\u00e9" in {t["name"] for t in listed.answer["result"]["tools"]}
    got = await attempt(env, session, json.dumps(call(5, "caf\u00e9", {})).encode())
    assert got.answer["id"] == 5 and "result" in got.answer, got.answer
    assert [s.mcp_name for s in got.upstream_got] == ["=?base64?Y2Fmw6k=?="]
    await assert_still_serving(env, session)


@pytest.mark.parametrize(
    "arguments",
    [b'{"text": "\\ud800"}', b'{"text": "ok", "\\uDC00": 1}', b'{"text": {"deep": ["\\udbff x"]}}'],
    ids=["value", "key", "nested"],
)
async def test_a_lone_surrogate_in_arguments_is_a_jsonrpc_error(env: Env, arguments: bytes) -> None:
    session = await env.legacy_session()
    body = (
        b'{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"echo","arguments":%s}}' % arguments
    )
    got = await attempt(env, session, body)
    assert got.status == 400
    assert got.answer["error"]["code"] == -32700
    assert "lone UTF-16 surrogate" in got.answer["error"]["message"]
    assert got.upstream_got == []
    await assert_still_serving(env, session)


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
async def test_nan_and_infinity_are_not_json(env: Env, constant: bytes) -> None:
    """Python's parser takes them; nothing else agrees on them (no canonical form, no hash, Cedar
    refuses them), so they are a parse error, never an argument."""
    session = await env.legacy_session()
    body = (
        b'{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"echo","arguments":{"text":%s}}}'
        % constant
    )
    got = await attempt(env, session, body)
    assert got.status == 400 and got.answer["error"]["code"] == -32700
    assert constant.decode().lstrip("-") in got.answer["error"]["message"]
    assert got.upstream_got == []
    await assert_still_serving(env, session)
