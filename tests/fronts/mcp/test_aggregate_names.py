"""`/mcp` names read one way only: `<upstream><sep><tool>` never resolves to two (upstream, tool)
pairs, whatever the upstream and tool names."""

from __future__ import annotations

import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import POLICIES, free_port, make_config, running, running_gateway
from mcp.server.mcpserver import MCPServer

from gateway.app import Gateway
from gateway.errors import ConfigError
from gateway.identity.devkeys import DevKey

META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}
RAN: list[str] = []


def notes_server() -> MCPServer:
    srv = MCPServer("notes")

    def plain() -> str:
        RAN.append("x")
        return "x"

    def underscored() -> str:
        RAN.append("_x")
        return "_x"

    srv.add_tool(plain, name="x", description="An ordinary tool.")
    srv.add_tool(underscored, name="_x", description="A tool whose name begins with an underscore.")
    return srv


@pytest.fixture(scope="module")
async def notes(
    data_dir: Path, dev_key: DevKey, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[str, Gateway]]:
    tmp = tmp_path_factory.mktemp("aggregate-names")
    policies = tmp / "policies"
    shutil.copytree(POLICIES, policies)
    (policies / "notes.cedar").write_text(
        '@id("developers-use-notes")\n'
        'permit (principal in Group::"developers", action in [Action::"call_tool", Action::"list_tools"], '
        'resource in Upstream::"notes");\n'
    )
    app = notes_server().streamable_http_app(streamable_http_path="/mcp")
    async with running(app, lifespan="on") as url:
        cfg = make_config(
            data_dir,
            {"notes": f"{url}/mcp"},
            free_port(),
            policies,
            audit={"url": f"sqlite+aiosqlite:///{tmp / 'audit.db'}"},
            state={"url": f"sqlite+aiosqlite:///{tmp / 'state.db'}"},
        )
        async with running_gateway(cfg) as running_gw:
            yield running_gw


async def rpc(
    http: httpx.AsyncClient, url: str, token: str, method: str, params: dict[str, Any]
) -> dict[str, Any]:
    headers = {
        "authorization": f"Bearer {token}",
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": method,
    }
    if "name" in params:
        headers["mcp-name"] = params["name"]
    msg = {"jsonrpc": "2.0", "id": 1, "method": method, "params": {**params, "_meta": META}}
    resp = await http.post(url, json=msg, headers=headers)
    assert resp.status_code == 200, resp.text
    answer: dict[str, Any] = resp.json()
    return answer


@pytest.mark.parametrize("name", ["notes_", "notes-"])
def test_an_upstream_name_ending_with_a_separator_character_is_refused(data_dir: Path, name: str) -> None:
    separator = "__" if name.endswith("_") else "--"
    with pytest.raises(ConfigError, match=rf"upstreams\.{name}: .*namespace_separator") as refused:
        make_config(data_dir, {name: "http://127.0.0.1:1/mcp"}, 0, mcp={"namespace_separator": separator})
    assert "rename the upstream, or choose another mcp.namespace_separator" in str(refused.value)
    cfg = make_config(data_dir, {name: "http://127.0.0.1:1/mcp"}, 0, mcp={"namespace_separator": "."})
    assert name in cfg.upstreams  # no character of "." in it: it reads one way


async def test_a_name_that_reads_two_ways_is_neither_listed_nor_routed(
    notes: tuple[str, Gateway], dev_key: DevKey, http: httpx.AsyncClient
) -> None:
    base, gw = notes
    token = dev_key.mint("dev", audience=base, groups=["developers"])
    listed = await rpc(http, f"{base}/mcp", token, "tools/list", {})
    assert [t["name"] for t in listed["result"]["tools"]] == ["notes__x"]

    before = list(RAN)
    refused = await rpc(http, f"{base}/mcp", token, "tools/call", {"name": "notes___x", "arguments": {}})
    assert refused["error"]["code"] == -32602, refused
    assert "/mcp/<upstream>" in refused["error"]["message"]
    assert len(RAN) == len(before)  # nothing reached notes/_x
    assert gw.store is not None
    rows = [r.to_json() async for r in gw.store.iter_records()]
    row = next(r for r in rows if r["id"] == refused["error"]["data"]["audit_id"])
    assert (row["tool"], row["decision"]["effect"], row["decision"]["policy_ids"]) == (
        "notes___x",
        "deny",
        ["ambiguous-tool"],
    )

    ran = await rpc(http, f"{base}/mcp", token, "tools/call", {"name": "notes__x", "arguments": {}})
    assert ran["result"]["isError"] is False and RAN[-1] == "x"
    # the tool is still served, under its own name, on its upstream's endpoint
    own = dev_key.mint("dev", audience=f"{base}/mcp/notes", groups=["developers"])
    direct = await rpc(http, f"{base}/mcp/notes", own, "tools/call", {"name": "_x", "arguments": {}})
    assert direct["result"]["isError"] is False and RAN[-1] == "_x"

    text = (await http.get(f"{base}/metrics")).text
    omitted = re.search(
        r'bastion_mcp_tools_omitted_total\{reason="ambiguous-name",upstream="notes"\} (\S+)', text
    )
    assert omitted is not None and float(omitted.group(1)) >= 1
