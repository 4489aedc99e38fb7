"""A hostile upstream cannot make Bastion hold unbounded answers or wait for ever.

A raw ASGI server speaking 2026-07-28 stands in for a tool server gone bad: it answers a tool
call with a body over `max_response_bytes`, or with one SSE event over it, and answers a listing
with a stream that trickles a notification every 100 ms and never ends. Through the real gateway
each is cut off, answered as an error and (for governed calls) recorded as a failure.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import free_port, make_config, running, running_gateway
from mcp_support import modern_call, modern_headers
from starlette.types import Receive, Scope, Send

from gateway import config as config_mod
from gateway.app import Gateway
from gateway.identity.devkeys import DevKey

LIMIT = 256 * 1024
POLICY = '@id("devs") permit (principal in Group::"developers", action, resource in Upstream::"bad");\n'


class BadUpstream:
    """Just enough 2026-07-28 to be detected and listed, then answers that never fit."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        msg = json.loads(body)
        method, params = msg.get("method"), msg.get("params") or {}

        async def answer(result: Any) -> None:
            data = json.dumps({"jsonrpc": "2.0", "id": msg.get("id"), "result": result}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": data})

        if method == "server/discover":
            await answer({"supportedVersions": ["2026-07-28"], "capabilities": {"tools": {}, "prompts": {}}})
        elif method == "tools/list":
            await answer(
                {"tools": [{"name": n, "inputSchema": {"type": "object"}} for n in ("huge", "bigevent")]}
            )
        elif method == "prompts/list" and msg.get("id") != 0:  # Bastion's own start-up listing uses id 0
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")],
                }
            )
            note = {
                "jsonrpc": "2.0",
                "method": "notifications/message",
                "params": {"level": "info", "data": "."},
            }
            try:
                while True:
                    await send(
                        {
                            "type": "http.response.body",
                            "body": f"data: {json.dumps(note)}\n\n".encode(),
                            "more_body": True,
                        }
                    )
                    await asyncio.sleep(0.1)
            except OSError:
                return
        elif method == "tools/call" and params.get("name") == "huge":
            await answer({"content": [{"type": "text", "text": "x" * (2 * LIMIT)}]})
        elif method == "tools/call" and params.get("name") == "bigevent":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")],
                }
            )
            event = {
                "jsonrpc": "2.0",
                "id": msg.get("id"),
                "result": {"content": [{"type": "text", "text": "y" * (2 * LIMIT)}]},
            }
            await send({"type": "http.response.body", "body": f"data: {json.dumps(event)}\n\n".encode()})
        else:
            await answer({})


@pytest.fixture(scope="module")
async def env(
    tmp_path_factory: pytest.TempPathFactory, dev_key: DevKey
) -> AsyncIterator[tuple[str, Gateway, str]]:
    tmp = tmp_path_factory.mktemp("limits-upstream")
    (tmp / "dev-jwks.json").write_bytes(dev_key.jwks_path.read_bytes())
    policies = tmp / "policies"
    policies.mkdir()
    (policies / "bad.cedar").write_text(POLICY)
    schema = Path(__file__).resolve().parents[2] / "policies" / "schema.cedarschema"
    (policies / "schema.cedarschema").write_text(schema.read_text())
    async with running(BadUpstream()) as url:
        cfg = make_config(tmp, {"bad": f"{url}/mcp"}, free_port(), policies)
        data = cfg.model_dump(mode="json", exclude_unset=True)
        data["upstreams"]["bad"] |= {"timeout_s": 1, "max_response_bytes": LIMIT}
        async with running_gateway(config_mod.parse(data, tmp)) as (base, gw):
            token = dev_key.mint("dev", groups=["developers"], audience=f"{base}/mcp/bad")
            yield base, gw, token


async def _record(gw: Gateway, tool: str) -> dict[str, Any]:
    assert gw.store is not None
    rows = [r.to_json() async for r in gw.store.iter_records() if r.tool == tool]
    return rows[-1]


@pytest.mark.parametrize("tool", ["huge", "bigevent"])
async def test_an_answer_over_max_response_bytes_is_a_recorded_failure(
    env: tuple[str, Gateway, str], tool: str
) -> None:
    base, gw, token = env
    async with httpx.AsyncClient(timeout=10) as http:
        got = await http.post(
            f"{base}/mcp/bad", json=modern_call(tool, {}), headers=modern_headers(token, "tools/call", tool)
        )
    text = got.text
    assert len(text) < LIMIT, "the oversized answer must not be relayed"
    assert "max_response_bytes" in text
    record = await _record(gw, tool)
    assert record["outcome"]["status"] == "failed"
    assert "max_response_bytes" in record["outcome"]["error"]


async def test_a_listing_that_never_ends_is_cut_off_at_the_upstream_timeout(
    env: tuple[str, Gateway, str],
) -> None:
    base, _, token = env
    msg = {
        "jsonrpc": "2.0",
        "id": 3,
        "method": "prompts/list",
        "params": {
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {},
            }
        },
    }
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with httpx.AsyncClient(timeout=10) as http:
        got = await http.post(f"{base}/mcp/bad", json=msg, headers=modern_headers(token, "prompts/list"))
    waited = loop.time() - t0
    assert 0.8 < waited < 5, waited
    last = [line for line in got.text.splitlines() if line.startswith("data:")][-1]
    assert "did not finish its answer in time" in last
