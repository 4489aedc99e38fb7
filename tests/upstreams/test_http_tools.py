"""Plain HTTP tools: a real REST API (Starlette on loopback) served as governed MCP tools."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import POLICIES, free_port, make_config, running, running_gateway
from mcp_support import mcp_client
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from gateway import config as config_mod
from gateway.app import Gateway
from gateway.errors import ConfigError
from gateway.identity.devkeys import DevKey


class CRM:
    """A small REST API that records what reached it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes, str, bytes, dict[str, str]]] = []
        self.customers: dict[str, dict[str, Any]] = {"c1": {"id": "c1", "name": "Ada"}}

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/api/customers/{id:path}", self.customer, methods=["GET"]),
                Route("/api/customers", self.create, methods=["POST"]),
                Route("/api/boom", self.boom, methods=["GET"]),
            ]
        )

    async def _record(self, request: Request) -> bytes:
        body = await request.body()
        self.seen.append(
            (request.method, request.scope["raw_path"], request.url.query, body, dict(request.headers))
        )
        return body

    async def customer(self, request: Request) -> Response:
        await self._record(request)
        found = self.customers.get(request.path_params["id"])
        if found is None:
            return PlainTextResponse("no such customer", 404)
        return JSONResponse(found | {"fields": request.query_params.get("fields")})

    async def create(self, request: Request) -> Response:
        import json

        data = json.loads(await self._record(request))
        self.customers[data["id"]] = data
        return JSONResponse(data, 201)

    async def boom(self, request: Request) -> Response:
        await self._record(request)
        return PlainTextResponse("down", 500)


TOOLS: dict[str, Any] = {
    "get_customer": {
        "description": "Look up a customer by id",
        "input_schema": {
            "type": "object",
            "properties": {"id": {"type": "string"}, "fields": {"type": "string"}},
            "required": ["id"],
        },
        "method": "GET",
        "path": "/customers/{id}",
        "query": {"fields": "{fields}"},
        "idempotent": True,
    },
    "create_customer": {
        "description": "Create a customer",
        "input_schema": {
            "type": "object",
            "properties": {"id": {"type": "string"}, "name": {"type": "string"}},
            "required": ["id", "name"],
        },
        "method": "POST",
        "path": "/customers",
        "body": {"id": "{id}", "name": "{name}", "source": "bastion"},
        "risk": "external",
    },
    "boom": {"method": "GET", "path": "/boom"},
}


@pytest.fixture(scope="module")
async def crm_gateway(
    data_dir: Path, dev_key: DevKey, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[str, Gateway, CRM]]:
    tmp = tmp_path_factory.mktemp("http-tools")
    policies = tmp / "policies"
    shutil.copytree(POLICIES, policies)
    (policies / "crm.cedar").write_text(
        '@id("developers-use-crm")\n'
        'permit (principal in Group::"developers", action in [Action::"call_tool", Action::"list_tools"], '
        'resource in Upstream::"crm");\n'
    )
    crm = CRM()
    async with running(crm.app()) as api:
        state = {"url": f"sqlite+aiosqlite:///{tmp / 'state.db'}"}
        base = make_config(data_dir, {}, free_port(), policies, state=state).model_dump(
            mode="json", by_alias=True
        )
        upstream = {"transport": "http", "url": f"{api}/api", "headers": {"X-Api-Key": "bastions-own"}}
        cfg = config_mod.parse({**base, "upstreams": {"crm": upstream | {"tools": TOOLS}}}, data_dir)
        async with running_gateway(cfg) as (url, gw):
            yield url, gw, crm


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_declared_tools_are_listed_and_called_through_mcp(
    crm_gateway: tuple[str, Gateway, CRM], dev_key: DevKey, mode: str
) -> None:
    base, _, crm = crm_gateway
    url = f"{base}/mcp/crm"
    token = dev_key.mint("crm-user", audience=url, groups=["developers"])
    async with mcp_client(url, token, mode) as client:
        listed = {t.name: t for t in (await client.list_tools()).tools}
        assert set(listed) == {"get_customer", "create_customer", "boom"}
        assert listed["get_customer"].description == "Look up a customer by id"
        assert listed["get_customer"].input_schema["required"] == ["id"]
        result = await client.call_tool("get_customer", {"id": "c1", "fields": "name"})
    assert not result.is_error
    assert result.structured_content == {"id": "c1", "name": "Ada", "fields": "name"}
    method, path, query, _, headers = crm.seen[-1]
    assert (method, path, query) == ("GET", b"/api/customers/c1", "fields=name")
    assert headers["x-api-key"] == "bastions-own" and "authorization" not in headers


async def test_arguments_are_checked_and_cannot_escape_the_path(
    crm_gateway: tuple[str, Gateway, CRM], dev_key: DevKey
) -> None:
    base, _, crm = crm_gateway
    url = f"{base}/mcp/crm"
    token = dev_key.mint("crm-user", audience=url, groups=["developers"])
    async with mcp_client(url, token, "2026-07-28") as client:
        before = len(crm.seen)
        bad = await client.call_tool("get_customer", {"id": 7})
        assert bad.is_error
        assert len(crm.seen) == before, "nothing was sent"
        escaped = await client.call_tool("get_customer", {"id": "../boom"})
        assert escaped.is_error and "HTTP 404" in escaped.content[0].text  # type: ignore[union-attr]
    assert crm.seen[-1][1] == b"/api/customers/..%2Fboom"


async def test_body_mapping_4xx_and_5xx_through_the_http_api(
    crm_gateway: tuple[str, Gateway, CRM], dev_key: DevKey
) -> None:
    base, gw, crm = crm_gateway
    token = dev_key.mint("crm-user", audience=base, groups=["developers"])
    async with httpx.AsyncClient(timeout=10) as http:

        async def call(tool: str, arguments: dict[str, Any]) -> httpx.Response:
            body = {"upstream": "crm", "tool": tool, "arguments": arguments}
            return await http.post(
                f"{base}/v1/tool-calls", json=body, headers={"authorization": f"Bearer {token}"}
            )

        r = await call("create_customer", {"id": "c2", "name": "Grace"})
        assert r.status_code == 200, r.text
        assert r.json()["result"]["structuredContent"] == {"id": "c2", "name": "Grace", "source": "bastion"}
        assert crm.seen[-1][3] == b'{"id": "c2", "name": "Grace", "source": "bastion"}'

        r = await call("get_customer", {"id": "nobody"})
        assert r.status_code == 200 and r.json()["result"]["isError"] is True

        r = await call("boom", {})
        assert r.status_code == 502
    assert gw.store is not None
    rows = [rec async for rec in gw.store.iter_records(user="crm-user", tool="boom")]
    assert rows[-1].outcome["status"] == "failed" and rows[-1].outcome["upstream_status"] == 502


def test_http_tools_config_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tools get need method and path"):
        config_mod.parse(
            {"upstreams": {"x": {"transport": "http", "url": "http://a", "tools": {"get": {}}}}}, tmp_path
        )
    with pytest.raises(ConfigError, match="are only for transport http"):
        config_mod.parse(
            {"upstreams": {"x": {"url": "http://a", "tools": {"get": {"path": "/x"}}}}}, tmp_path
        )


async def test_the_bridge_checks_arguments_itself(tmp_path: Path) -> None:
    """Defence in depth: the bridge validates even when no policy looked at the schema."""
    import json

    from gateway.upstreams.http_tools import HTTPToolsUpstream

    cfg = config_mod.parse(
        {"upstreams": {"crm": {"transport": "http", "url": "http://127.0.0.1:1/api", "tools": TOOLS}}},
        tmp_path,
    )
    bridge = HTTPToolsUpstream("crm", cfg.upstreams["crm"])
    try:
        for args, why in (
            ({"id": 7}, "id: 7 is not of type 'string'"),
            ({"id": ".."}, "may not be '..'"),
            ({"fields": "x"}, "'id' is a required property"),
        ):
            msg = {
                "jsonrpc": "2.0",
                "id": 3,
                "method": "tools/call",
                "params": {"name": "get_customer", "arguments": args},
            }
            answer = json.loads(await (await bridge.send("POST", json.dumps(msg).encode())).body())
            assert answer["result"]["isError"] is True and why in answer["result"]["content"][0]["text"]
    finally:
        await bridge.aclose()
