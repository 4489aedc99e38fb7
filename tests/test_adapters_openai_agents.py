"""OpenAI Agents SDK through a real Bastion: function tools and the SDK's MCP client."""

from __future__ import annotations

import json
from typing import Any

import pytest
from adapters_support import api_token, records, unique

from gateway.app import Gateway

pytest.importorskip("agents", reason="openai-agents is not installed (pip install 'bastion[openai-agents]')")

from agents import RunContextWrapper
from agents.tool_context import ToolContext

from adapters.client import AsyncBastionClient
from adapters.openai_agents import CLIENT_INFO, function_tools, mcp_server


def context(name: str, call_id: str, args: dict[str, Any]) -> ToolContext[Any]:
    """What the SDK's runner hands a function tool for one model tool call."""
    return ToolContext(context=None, tool_name=name, tool_call_id=call_id, tool_arguments=json.dumps(args))


async def test_function_tools_run_through_bastion(gateway: tuple[str, Gateway], dev_key: Any) -> None:
    base, gw = gateway
    sub = unique("oai")
    async with AsyncBastionClient(base, api_token(dev_key, base, sub)) as client:
        tools = {t.name: t for t in await function_tools(client, "demo")}
        assert "delete_note" not in tools and tools["add"].params_json_schema["required"] == ["a", "b"]
        args = {"a": 1, "b": 2}
        ok = await tools["add"].on_invoke_tool(context("add", "call_ok", args), json.dumps(args))
        args = {"amount": 5000, "to": "x"}
        denied = await tools["transfer"].on_invoke_tool(
            context("transfer", "call_no", args), json.dumps(args)
        )
        bad = await tools["add"].on_invoke_tool(context("add", "call_bad", {}), "{not json")
    assert ok == "3"
    assert denied == "denied by policy transfer-limit: transfers above 1000 need a human"
    assert "not valid JSON" in bad
    rows = {r.call_id: r for r in await records(gw, sub)}
    assert set(rows) == {"call_ok", "call_no"}
    assert rows["call_ok"].outcome["status"] == "completed" and rows["call_no"].effect == "deny"
    assert rows["call_ok"].client == rows["call_no"].client == CLIENT_INFO
    assert CLIENT_INFO.startswith("openai-agents/")


async def test_sdk_mcp_server_pointed_at_bastion(gateway: tuple[str, Gateway], dev_key: Any) -> None:
    base, gw = gateway
    sub = unique("oai-mcp")
    server = mcp_server(base, "demo", api_token(dev_key, base, sub))
    async with server:
        names = {t.name for t in await server.list_tools(RunContextWrapper(context=None))}
        ok = await server.call_tool("echo", {"text": "via mcp"})
        denied = await server.call_tool("transfer", {"amount": 5000, "to": "x"})
    assert {"echo", "transfer"} <= names and "delete_note" not in names
    assert not ok.is_error and ok.content[0].text == "via mcp"  # type: ignore[union-attr]
    assert denied.is_error and "transfer-limit" in denied.content[0].text  # type: ignore[union-attr]
    rows = await records(gw, sub)
    calls = [r for r in rows if r.action == "call_tool"]
    assert sorted(r.effect or "" for r in calls) == ["allow", "deny"]
    assert {r.protocol for r in calls} == {"mcp"} and {r.client for r in calls} == {CLIENT_INFO}
