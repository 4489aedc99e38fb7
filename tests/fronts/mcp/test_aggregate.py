"""`/mcp`: the union of every upstream's tools, namespaced so that no server shadows another."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from conftest import POLICIES, LegacyOnly, free_port, make_config, running, running_gateway
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer
from starlette.types import Receive, Scope, Send

from gateway.app import Gateway
from gateway.identity.devkeys import DevKey

META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}


def server(name: str) -> MCPServer:
    srv = MCPServer(name)

    def whoami() -> str:
        return name

    srv.add_tool(whoami, description="Which server answers.")
    return srv


@pytest.fixture(scope="module")
async def two_servers() -> AsyncIterator[tuple[str, str]]:
    """`alpha` speaks both eras; `beta` is a 2025-era server. Both have a tool `whoami`."""
    alpha = server("alpha").streamable_http_app(streamable_http_path="/mcp")
    beta_inner = server("beta").streamable_http_app(streamable_http_path="/mcp")
    beta = LegacyOnly(beta_inner)

    async def beta_app(scope: Scope, receive: Receive, send: Send) -> None:
        await (beta_inner if scope["type"] == "lifespan" else beta)(scope, receive, send)

    async with running(alpha, lifespan="on") as a, running(beta_app, lifespan="on") as b:
        yield f"{a}/mcp", f"{b}/mcp"


@pytest.fixture(scope="module")
async def aggregated(
    two_servers: tuple[str, str], data_dir: Path, dev_key: DevKey, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[str, Gateway]]:
    tmp = tmp_path_factory.mktemp("aggregate")
    policies = tmp / "policies"
    shutil.copytree(POLICIES, policies)
    (policies / "two.cedar").write_text(
        '@id("developers-use-alpha")\n'
        'permit (principal in Group::"developers", action in [Action::"call_tool", Action::"list_tools"], '
        'resource in Upstream::"alpha");\n'
        '@id("developers-use-beta")\n'
        'permit (principal in Group::"developers", action in [Action::"call_tool", Action::"list_tools"], '
        'resource in Upstream::"beta");\n'
        '@id("beta-whoami-admins")\n@reason("only admins ask beta")\n'
        'forbid (principal, action == Action::"call_tool", resource == Tool::"beta/whoami") '
        'unless { principal.groups.contains("admins") };\n'
    )
    cfg = make_config(
        data_dir,
        {"alpha": two_servers[0], "beta": two_servers[1]},
        free_port(),
        policies,
        audit={"url": f"sqlite+aiosqlite:///{tmp / 'audit.db'}"},
        state={"url": f"sqlite+aiosqlite:///{tmp / 'state.db'}"},
    )
    async with running_gateway(cfg) as running_gw:
        yield running_gw


@asynccontextmanager
async def client(url: str, token: str, mode: str) -> AsyncIterator[Client]:
    async with (
        httpx2.AsyncClient(headers={"authorization": f"Bearer {token}"}, timeout=10) as hc,
        Client(streamable_http_client(url, http_client=hc), mode=mode) as c,
    ):
        yield c


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_same_tool_name_on_two_upstreams_stays_distinct(
    aggregated: tuple[str, Gateway], dev_key: DevKey, mode: str
) -> None:
    base, _ = aggregated
    token = dev_key.mint("root", audience=base, groups=["developers", "admins"])
    async with client(f"{base}/mcp", token, mode) as c:
        names = sorted(t.name for t in (await c.list_tools()).tools)
        assert names == ["alpha__whoami", "beta__whoami"]
        for upstream in ("alpha", "beta"):
            result = await c.call_tool(f"{upstream}__whoami", {})
            assert not result.is_error and result.content[0].text == upstream  # type: ignore[union-attr]


async def post(
    http: httpx.AsyncClient, url: str, token: str, method: str, params: dict[str, Any]
) -> dict[str, Any]:
    hdrs = {
        "authorization": f"Bearer {token}",
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": method,
    }
    if "name" in params:
        hdrs["mcp-name"] = params["name"]
    msg = {"jsonrpc": "2.0", "id": 7, "method": method, "params": {**params, "_meta": META}}
    resp = await http.post(url, json=msg, headers=hdrs)
    assert resp.status_code == 200, resp.text
    answer: dict[str, Any] = resp.json()
    return answer


async def test_calls_are_governed_as_on_the_upstreams_own_endpoint(
    aggregated: tuple[str, Gateway], dev_key: DevKey, http: httpx.AsyncClient
) -> None:
    base, gw = aggregated
    token = dev_key.mint("dev", audience=base, groups=["developers"])
    denied = (
        await post(http, f"{base}/mcp", token, "tools/call", {"name": "beta__whoami", "arguments": {}})
    )["result"]
    assert denied["isError"] is True and "beta-whoami-admins" in denied["content"][0]["text"]
    assert gw.store is not None
    rows = [r.to_json() async for r in gw.store.iter_records()]
    row = next(r for r in rows if r["id"] == denied["structuredContent"]["audit_id"])
    assert (row["upstream"], row["tool"], row["decision"]["effect"]) == ("beta", "whoami", "deny")

    unknown = await post(http, f"{base}/mcp", token, "tools/call", {"name": "gamma__whoami", "arguments": {}})
    assert unknown["error"]["code"] == -32602 and "<upstream>__<tool>" in unknown["error"]["message"]
    other = await post(http, f"{base}/mcp", token, "resources/list", {})
    assert other["error"]["code"] == -32601

    # a token meant only for /mcp/alpha sees and calls only alpha's tools through /mcp
    alpha_only = dev_key.mint("dev", audience=f"{base}/mcp/alpha", groups=["developers"])
    listed = await post(http, f"{base}/mcp", alpha_only, "tools/list", {})
    assert [t["name"] for t in listed["result"]["tools"]] == ["alpha__whoami"]
    hdrs = {
        "authorization": f"Bearer {alpha_only}",
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": "tools/call",
        "mcp-name": "beta__whoami",
    }
    msg = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "beta__whoami", "_meta": META},
    }
    refused = await http.post(
        f"{base}/mcp", json={**msg, "params": {**msg["params"], "arguments": {}}}, headers=hdrs
    )
    assert refused.status_code == 401 and "audience" in refused.json()["error"]["message"]


def test_separator_may_not_appear_in_upstream_names(data_dir: Path) -> None:
    from gateway.errors import ConfigError

    with pytest.raises(ConfigError, match="namespace_separator '__' appears in upstream name"):
        make_config(data_dir, {"my__server": "http://127.0.0.1:1/mcp"}, 0)
    cfg = make_config(data_dir, {"my__server": "http://127.0.0.1:1/mcp"}, 0, mcp={"namespace_separator": "."})
    assert cfg.mcp.namespace_separator == "."
