"""Fault handling against real misbehaving upstreams: deadlines, retries, breaker, dead letters.

The upstream is a small 2026-07-28 MCP server written for the occasion (a Starlette app on
loopback) whose tools misbehave on purpose and count how often they ran. A raw TCP server
stands in where only a socket can misbehave (a connection reset).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import POLICIES, free_port, make_config, running, running_gateway
from mcp_support import mcp_client
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway import config as config_mod
from gateway import metrics
from gateway.app import Gateway
from gateway.identity.devkeys import DevKey

TOOLS = [
    "ok",
    "headers",
    "redirect",
    "charge",
    "lookup",
    "slow",
    "fail500",
    "flaky",
    "flaky_write",
    "always500",
    "malformed",
    "stall",
    "sometimes",
]


class FaultyServer:
    """An MCP upstream (2026-07-28, stateless) whose tools fail in chosen ways."""

    def __init__(self) -> None:
        self.runs: Counter[str] = Counter()
        self.seen_headers: dict[str, str] = {}
        self.redirect_to = ""
        self.healthy = False
        """`sometimes` fails with 500 until a test sets this."""

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/mcp", self.handle, methods=["POST"])])

    async def handle(self, request: Request) -> Response:
        msg = json.loads(await request.body())
        method, msg_id = msg.get("method"), msg.get("id")
        if method == "server/discover":
            return _result(msg_id, {"supportedVersions": ["2026-07-28"], "capabilities": {"tools": {}}})
        if method == "tools/list":
            tools = [{"name": t, "inputSchema": {"type": "object"}} for t in TOOLS]
            return _result(
                msg_id, {"tools": tools, "resultType": "complete", "ttlMs": 0, "cacheScope": "private"}
            )
        name = msg["params"]["name"]
        self.runs[name] += 1
        n = self.runs[name]
        if name == "slow":
            await asyncio.sleep(2)
        elif name in ("fail500", "always500", "flaky_write") or (name == "flaky" and n <= 2):
            return JSONResponse({"error": "boom"}, 500)
        elif name == "sometimes" and not self.healthy:
            return JSONResponse({"error": "down"}, 500)
        elif name == "malformed":
            return Response(b'{"jsonrpc": "2.0", "id": ', media_type="application/json")
        elif name == "headers":
            self.seen_headers = dict(request.headers)
            headers = {"x-upstream-private": "1", "keep-alive": "timeout=99", "proxy-authenticate": "Basic"}
            return JSONResponse(
                {"jsonrpc": "2.0", "id": msg_id, "result": {"content": [], "resultType": "complete"}},
                headers=headers,
            )
        elif name == "redirect":
            return RedirectResponse(self.redirect_to, 307)
        elif name == "stall":
            return StreamingResponse(_stalling(msg_id), media_type="text/event-stream")
        text = [{"type": "text", "text": f"{name} ran {n}"}]
        return _result(msg_id, {"content": text, "resultType": "complete"})


def _result(msg_id: Any, result: dict[str, Any]) -> JSONResponse:
    return JSONResponse({"jsonrpc": "2.0", "id": msg_id, "result": result})


async def _stalling(msg_id: Any) -> AsyncIterator[bytes]:
    note = {
        "jsonrpc": "2.0",
        "method": "notifications/message",
        "params": {"level": "info", "data": "started"},
    }
    yield f"event: message\ndata: {json.dumps(note)}\n\n".encode()
    await asyncio.sleep(3)
    yield f"event: message\ndata: {json.dumps({'jsonrpc': '2.0', 'id': msg_id, 'result': {}})}\n\n".encode()


class ResettingServer:
    """Answers discovery like an MCP server, then resets the connection of every tools/call."""

    def __init__(self) -> None:
        self.calls = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        msg = json.loads(await reader.readexactly(length))
        if msg.get("method") == "tools/call":
            self.calls += 1
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        result = {
            "supportedVersions": ["2026-07-28"],
            "capabilities": {"tools": {}},
            "tools": [{"name": "anything", "inputSchema": {"type": "object"}}],
        }
        body = json.dumps({"jsonrpc": "2.0", "id": msg.get("id"), "result": result}).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()
        await writer.wait_closed()


@pytest.fixture(scope="module")
async def faulty() -> AsyncIterator[tuple[str, FaultyServer]]:
    server = FaultyServer()
    async with running(server.app()) as url:
        yield f"{url}/mcp", server


@pytest.fixture(scope="module")
async def resetting() -> AsyncIterator[tuple[str, ResettingServer]]:
    server = ResettingServer()
    srv = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/mcp", server
    finally:
        srv.close()
        await srv.wait_closed()


@pytest.fixture(scope="module")
async def fault_gateway(
    data_dir: Path,
    dev_key: DevKey,
    faulty: tuple[str, FaultyServer],
    resetting: tuple[str, ResettingServer],
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[str, Gateway]]:
    tmp = tmp_path_factory.mktemp("faults")
    policies = tmp / "policies"
    shutil.copytree(POLICIES, policies)
    (policies / "faults.cedar").write_text(
        '@id("developers-use-faulty")\n'
        'permit (principal in Group::"developers", action in [Action::"call_tool", Action::"list_tools"], '
        'resource) when { resource in Upstream::"faulty" || resource in Upstream::"breaking" '
        '|| resource in Upstream::"resetting" || resource in Upstream::"budgeted" };\n'
    )
    url = faulty[0]
    ups = {
        "faulty": {
            "url": url,
            "timeout_s": 5,
            "retries": {"attempts": 3, "backoff_s": 0.01, "budget_min": 50},
            "tools": {
                "slow": {"timeout_s": 0.3},
                "stall": {"timeout_s": 0.5, "idempotent": True},
                "flaky": {"idempotent": True},
                "always500": {"idempotent": True},
                "malformed": {"idempotent": True},
                "lookup": {"idempotent": True},
            },
        },
        "breaking": {"url": url, "breaker": {"failures": 2, "reset_s": 0.5}},
        "resetting": {"url": resetting[0]},
        "budgeted": {
            "url": url,
            "retries": {"attempts": 3, "backoff_s": 0.01, "budget_min": 0, "budget_ratio": 0.5},
            "tools": {"always500": {"idempotent": True}},
        },
    }
    state = {"url": f"sqlite+aiosqlite:///{tmp / 'state.db'}"}
    base = make_config(data_dir, {}, free_port(), policies, state=state).model_dump(
        mode="json", by_alias=True
    )
    cfg = config_mod.parse({**base, "upstreams": ups}, data_dir)
    async with running_gateway(cfg) as gw:
        yield gw


@pytest.fixture(scope="module")
def call(fault_gateway: tuple[str, Gateway], dev_key: DevKey) -> Callable[..., Any]:
    base = fault_gateway[0]
    token = dev_key.mint("fault-tester", audience=base, groups=["developers"])

    async def post(
        upstream: str, tool: str, headers: dict[str, str] | None = None, **body: Any
    ) -> httpx.Response:
        async with httpx.AsyncClient(timeout=10) as http:
            return await http.post(
                f"{base}/v1/tool-calls",
                json={"upstream": upstream, "tool": tool, "arguments": {}, **body},
                headers={"authorization": f"Bearer {token}", **(headers or {})},
            )

    return post


async def outcome(gw: Gateway, audit_id: str) -> dict[str, Any]:
    assert gw.store is not None
    rows = [r async for r in gw.store.iter_records(user="fault-tester") if r.id == audit_id]
    assert len(rows) == 1
    return dict(rows[0].outcome)


async def test_a_tool_slower_than_its_timeout_is_cut_off(
    fault_gateway: tuple[str, Gateway], call: Callable[..., Any]
) -> None:
    t0 = time.perf_counter()
    r = await call("faulty", "slow")
    assert time.perf_counter() - t0 < 1.5, "the tool's 0.3 s deadline applies, not the upstream's 5 s"
    assert r.status_code == 504, r.text
    assert "within 0.3 s" in r.json()["error"]["message"]
    row = await outcome(fault_gateway[1], r.json()["audit_id"])
    assert row["status"] == "timeout"


async def test_http_500_is_recorded_and_not_retried_for_a_non_idempotent_tool(
    fault_gateway: tuple[str, Gateway], call: Callable[..., Any], faulty: tuple[str, FaultyServer]
) -> None:
    r = await call("faulty", "flaky_write")
    assert r.status_code == 502
    assert faulty[1].runs["flaky_write"] == 1, "a tool not marked idempotent runs at most once"
    row = await outcome(fault_gateway[1], r.json()["audit_id"])
    assert row["status"] == "failed" and row["upstream_status"] == 500


async def test_an_idempotent_tool_is_retried_until_it_succeeds(
    fault_gateway: tuple[str, Gateway], call: Callable[..., Any], faulty: tuple[str, FaultyServer]
) -> None:
    before = metrics.UPSTREAM_RETRIES.labels("faulty")._value.get()
    r = await call("faulty", "flaky")
    assert r.status_code == 200, r.text
    assert r.json()["result"]["content"][0]["text"] == "flaky ran 3"
    assert faulty[1].runs["flaky"] == 3
    assert metrics.UPSTREAM_RETRIES.labels("faulty")._value.get() == before + 2
    assert (await outcome(fault_gateway[1], r.json()["audit_id"]))["status"] == "completed"


async def test_exhausted_retries_are_dead_letters_exportable_by_status(
    fault_gateway: tuple[str, Gateway], call: Callable[..., Any], faulty: tuple[str, FaultyServer]
) -> None:
    r = await call("faulty", "always500", call_id="dl-1")
    assert r.status_code == 502
    assert "gave up on faulty/always500 after 3 attempt(s)" in r.json()["error"]["message"]
    assert faulty[1].runs["always500"] == 3
    gw = fault_gateway[1]
    assert gw.store is not None
    dead = [rec async for rec in gw.store.iter_records(status="dead_letter")]
    assert [rec.id for rec in dead if rec.call_id == "dl-1"] == [r.json()["audit_id"]]
    assert dead[-1].outcome["upstream_status"] == 500


async def test_malformed_json_rpc_is_an_upstream_failure(
    fault_gateway: tuple[str, Gateway], call: Callable[..., Any], faulty: tuple[str, FaultyServer]
) -> None:
    r = await call("faulty", "malformed")
    assert r.status_code == 502
    assert "malformed JSON-RPC" in r.json()["error"]["message"]
    assert faulty[1].runs["malformed"] == 3, "idempotent: retried, then given up"
    assert (await outcome(fault_gateway[1], r.json()["audit_id"]))["status"] == "dead_letter"


async def test_a_connection_reset_is_a_clean_502(
    fault_gateway: tuple[str, Gateway], call: Callable[..., Any], resetting: tuple[str, ResettingServer]
) -> None:
    r = await call("resetting", "anything")
    assert r.status_code == 502, r.text
    assert resetting[1].calls == 1
    row = await outcome(fault_gateway[1], r.json()["audit_id"])
    assert row["status"] == "failed" and "unreachable" in row["error"]


MODERN_META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}


def modern_headers(token: str, name: str) -> dict[str, str]:
    return {
        "authorization": f"Bearer {token}",
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": "tools/call",
        "mcp-name": name,
    }


async def test_a_stream_that_stalls_after_its_first_event_times_out_without_a_retry(
    fault_gateway: tuple[str, Gateway], dev_key: DevKey, faulty: tuple[str, FaultyServer]
) -> None:
    base, gw = fault_gateway
    url = f"{base}/mcp/faulty"
    token = dev_key.mint("fault-tester", audience=url, groups=["developers"])
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    body = {
        "jsonrpc": "2.0",
        "id": 5,
        "method": "tools/call",
        "params": {"name": "stall", "arguments": {}, "_meta": meta},
    }
    headers = {
        "authorization": f"Bearer {token}",
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": "tools/call",
        "mcp-name": "stall",
    }
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(url, json=body, headers=headers)
    assert time.perf_counter() - t0 < 2
    events = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:")]
    assert events[0]["method"] == "notifications/message", "the first event was relayed as it came"
    assert events[-1]["id"] == 5 and "did not finish within 0.5 s" in events[-1]["error"]["message"]
    assert faulty[1].runs["stall"] == 1, "bytes reached the client: no retry, although idempotent"
    rows = [rec async for rec in gw.store.iter_records(tool="stall")]  # type: ignore[union-attr]
    assert rows[-1].outcome["status"] == "timeout"


async def test_the_breaker_opens_fails_fast_and_recovers(
    fault_gateway: tuple[str, Gateway], call: Callable[..., Any], faulty: tuple[str, FaultyServer]
) -> None:
    base, gw = fault_gateway
    server = faulty[1]
    assert (await call("breaking", "sometimes")).status_code == 502
    earliest = time.monotonic()
    assert (await call("breaking", "sometimes")).status_code == 502
    latest = time.monotonic()  # the circuit opened in between (reset_s 0.5)
    runs = server.runs["sometimes"]
    r = await call("breaking", "sometimes")
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "circuit open after 2 consecutive failures" in r.json()["error"]["message"]
    assert server.runs["sometimes"] == runs, "an open circuit sends nothing"
    assert (await outcome(gw, r.json()["audit_id"]))["status"] == "failed"
    assert metrics.CIRCUIT_STATE.labels("breaking")._value.get() == 2
    async with httpx.AsyncClient() as http:
        asked = time.monotonic()
        ready = (await http.get(f"{base}/readyz")).json()
    # a loaded machine may take longer than reset_s to get here: the circuit is half-open by then
    states = (
        {"open"}
        if time.monotonic() - earliest < 0.5
        else {"half-open"}
        if asked - latest >= 0.5
        else {"open", "half-open"}
    )
    assert ready["circuits"]["breaking"] in states
    assert ready["circuits"]["faulty"] == "none"

    await asyncio.sleep(0.55)
    r = await call("breaking", "sometimes")  # the half-open probe fails: open again
    assert r.status_code == 502 and server.runs["sometimes"] == runs + 1
    assert (await call("breaking", "sometimes")).status_code == 503

    server.healthy = True
    await asyncio.sleep(0.55)
    r = await call("breaking", "sometimes")
    assert r.status_code == 200, r.text
    assert metrics.CIRCUIT_STATE.labels("breaking")._value.get() == 0
    assert (await call("breaking", "sometimes")).status_code == 200


async def test_the_retry_budget_caps_retries(
    call: Callable[..., Any], faulty: tuple[str, FaultyServer]
) -> None:
    server = faulty[1]
    runs = server.runs["always500"]
    r = await call("budgeted", "always500")
    assert "after 2 attempt(s) (retry budget spent)" in r.json()["error"]["message"]
    r = await call("budgeted", "always500")
    assert "after 1 attempt(s) (retry budget spent)" in r.json()["error"]["message"]
    assert server.runs["always500"] == runs + 3


# -- repeated call_ids ---------------------------------------------------------------------------


async def test_a_repeated_call_id_does_not_run_the_tool_again(
    fault_gateway: tuple[str, Gateway], call: Callable[..., Any], faulty: tuple[str, FaultyServer]
) -> None:
    gw = fault_gateway[1]
    runs = faulty[1].runs
    first = await call("faulty", "charge", call_id="pay-1", arguments={"amount": 5})
    assert first.status_code == 200, first.text
    again = await call("faulty", "charge", call_id="pay-1", arguments={"amount": 5})
    assert runs["charge"] == 1, "the side effect ran once"
    assert again.status_code == 200
    assert again.json()["result"] == first.json()["result"], "the first outcome is answered again"
    assert again.json()["duplicate_of"] == first.json()["audit_id"]
    row = await outcome(gw, again.json()["audit_id"])
    assert row["status"] == "duplicate" and first.json()["audit_id"] in row["error"]

    other = await call("faulty", "charge", call_id="pay-1", arguments={"amount": 500})
    assert other.status_code == 409 and runs["charge"] == 1
    assert "already used for a different call" in other.json()["message"]

    fresh = await call("faulty", "charge", call_id="pay-2", arguments={"amount": 5})
    assert fresh.status_code == 200 and runs["charge"] == 2


async def test_a_repeated_call_id_of_a_failed_call_names_its_audit_record(
    call: Callable[..., Any], faulty: tuple[str, FaultyServer]
) -> None:
    first = await call("faulty", "fail500", call_id="f-1")
    assert first.status_code == 502
    runs = faulty[1].runs["fail500"]
    again = await call("faulty", "fail500", call_id="f-1")
    assert again.status_code == 409 and faulty[1].runs["fail500"] == runs
    assert again.json()["message"].startswith(f"duplicate of audit record {first.json()['audit_id']}")


async def test_idempotent_tools_may_run_again_under_the_same_call_id(
    call: Callable[..., Any], faulty: tuple[str, FaultyServer]
) -> None:
    for _ in range(2):
        assert (await call("faulty", "lookup", call_id="l-1")).status_code == 200
    assert faulty[1].runs["lookup"] == 2


async def test_mcp_call_ids_from_meta_and_from_legacy_sessions(
    fault_gateway: tuple[str, Gateway], dev_key: DevKey, faulty: tuple[str, FaultyServer]
) -> None:
    base = fault_gateway[0]
    url = f"{base}/mcp/faulty"
    token = dev_key.mint("fault-tester", audience=url, groups=["developers"])
    runs = faulty[1].runs
    before = runs["charge"]
    async with httpx.AsyncClient(timeout=10) as http:
        answers = []
        for _ in range(2):
            meta = {**MODERN_META, "bastion/call_id": "mcp-pay-1"}
            body = {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "tools/call",
                "params": {"name": "charge", "arguments": {}, "_meta": meta},
            }
            r = await http.post(url, json=body, headers=modern_headers(token, "charge"))
            answers.append(r.json())
    assert runs["charge"] == before + 1
    assert answers[1]["result"]["content"] == answers[0]["result"]["content"]
    assert "bastion/duplicate_of" in answers[1]["result"]["_meta"]

    # Two separate stateless clients both start at request id 1: not a repeat of each other.
    for _ in range(2):
        async with mcp_client(url, token, "2026-07-28") as client:
            await client.call_tool("charge", {})
    assert runs["charge"] == before + 3
    # A legacy session derives call_ids from its id: its calls are all different.
    async with mcp_client(url, token, "legacy") as client:
        await client.call_tool("charge", {})
        await client.call_tool("charge", {})
    assert runs["charge"] == before + 5


async def test_a_legacy_session_repeating_a_request_id_is_a_repeat(
    fault_gateway: tuple[str, Gateway], dev_key: DevKey, faulty: tuple[str, FaultyServer]
) -> None:
    url = f"{fault_gateway[0]}/mcp/faulty"
    token = dev_key.mint("fault-tester", audience=url, groups=["developers"])
    hdrs = {"authorization": f"Bearer {token}", "accept": "application/json, text/event-stream"}
    init = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        },
    }
    before = faulty[1].runs["charge"]
    async with httpx.AsyncClient(timeout=10) as http:
        sessions = []
        for _ in range(2):
            r = await http.post(url, json=init, headers=hdrs)
            sessions.append(r.headers["mcp-session-id"])
        call = {
            "jsonrpc": "2.0",
            "id": 7,
            "method": "tools/call",
            "params": {"name": "charge", "arguments": {}},
        }
        texts = []
        for session in (sessions[0], sessions[0], sessions[1]):
            session_hdrs = hdrs | {"mcp-session-id": session, "mcp-protocol-version": "2025-11-25"}
            r = await http.post(url, json=call, headers=session_hdrs)
            texts.append(r.json()["result"]["content"][0]["text"])
    assert faulty[1].runs["charge"] == before + 2, "same session and id: once; another session: again"
    assert texts[0] == texts[1] != texts[2]


# -- hygiene -------------------------------------------------------------------------------------


async def test_bodies_over_the_size_limit_are_413_in_both_fronts(
    fault_gateway: tuple[str, Gateway], dev_key: DevKey
) -> None:
    base = fault_gateway[0]
    big = b'{"jsonrpc": "2.0", "pad": "' + b"x" * 1_048_576 + b'"}'
    async with httpx.AsyncClient(timeout=10) as http:
        for path in ("/mcp/faulty", "/v1/tool-calls"):
            r = await http.post(f"{base}{path}", content=big, headers={"content-type": "application/json"})
            assert r.status_code == 413, (path, r.text)
            assert "over 1048576 bytes (listen.max_body_bytes)" in r.text


async def test_json_nested_too_deeply_is_400_in_both_fronts(
    fault_gateway: tuple[str, Gateway], dev_key: DevKey
) -> None:
    base = fault_gateway[0]
    deep: Any = "bottom"
    for _ in range(70):
        deep = {"d": deep}
    async with httpx.AsyncClient(timeout=10) as http:
        token = dev_key.mint("fault-tester", audience=f"{base}/mcp/faulty", groups=["developers"])
        body = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "ok", "arguments": deep},
        }
        r = await http.post(f"{base}/mcp/faulty", json=body, headers=modern_headers(token, "ok"))
        assert r.status_code == 400 and "nested deeper than 64 levels" in r.json()["error"]["message"]
        api = {"upstream": "faulty", "tool": "ok", "arguments": deep}
        r = await http.post(f"{base}/v1/tool-calls", json=api)
        assert r.status_code == 400 and "nested deeper than 64 levels" in r.json()["message"]
        shallow: Any = "bottom"
        for _ in range(20):
            shallow = [shallow]
        r = await http.post(
            f"{base}/v1/decisions",
            json={"upstream": "faulty", "tool": "ok", "arguments": {"a": shallow}},
            headers={"authorization": f"Bearer {dev_key.mint('fault-tester', audience=base)}"},
        )
        assert r.status_code == 200, r.text


async def test_hop_by_hop_and_client_headers_are_not_forwarded_either_way(
    call: Callable[..., Any], faulty: tuple[str, FaultyServer]
) -> None:
    r = await call(
        "faulty",
        "headers",
        headers={
            "connection": "keep-alive, x-private",
            "keep-alive": "timeout=5",
            "te": "trailers",
            "proxy-authorization": "Basic c2VjcmV0",
            "x-private": "secret",
        },
    )
    assert r.status_code == 200, r.text
    seen = faulty[1].seen_headers
    for name in ("keep-alive", "te", "proxy-authorization", "x-private"):
        assert name not in seen, name
    assert "x-private" not in seen.get("connection", "")
    assert "fault-tester" not in seen.get("authorization", ""), "the client's token stays at Bastion"
    for name in ("x-upstream-private", "keep-alive", "proxy-authenticate"):
        assert name not in r.headers, name


async def test_redirects_are_not_followed(
    fault_gateway: tuple[str, Gateway], call: Callable[..., Any], faulty: tuple[str, FaultyServer]
) -> None:
    hits: list[str] = []

    async def elsewhere(request: Request) -> Response:
        hits.append(request.url.path)
        return JSONResponse({"jsonrpc": "2.0", "id": 1, "result": {"content": []}})

    app = Starlette(routes=[Route("/{path:path}", elsewhere, methods=["GET", "POST"])])
    async with running(app) as other:
        faulty[1].redirect_to = f"{other}/steal"
        r = await call("faulty", "redirect")
    assert r.status_code == 502, r.text
    assert "answered a redirect (HTTP 307" in r.json()["error"]["message"]
    assert hits == [], "the redirect target never saw the call"
    assert (await outcome(fault_gateway[1], r.json()["audit_id"]))["status"] == "failed"


def test_fault_settings_are_checked_at_start_up(tmp_path: Path) -> None:
    from gateway.errors import ConfigError

    def parse(upstream: dict[str, Any]) -> None:
        config_mod.parse({"upstreams": {"pay": {"url": "http://127.0.0.1:1/mcp", **upstream}}}, tmp_path)

    with pytest.raises(
        ConfigError, match=r"tools.get.timeout_s \(60\) exceeds the upstream's timeout_s \(30\)"
    ):
        parse({"timeout_s": 30, "tools": {"get": {"timeout_s": 60}}})
    with pytest.raises(ConfigError, match=r"upstreams.pay.retries.attempts: Input should be greater"):
        parse({"retries": {"attempts": 0}})
    with pytest.raises(ConfigError, match=r"upstreams.pay.breaker.reset: unknown key"):
        parse({"breaker": {"reset": 3}})
    with pytest.raises(ConfigError, match=r"listen.max_json_depth"):
        config_mod.parse({"listen": {"max_json_depth": 1}}, tmp_path)
