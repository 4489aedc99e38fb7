"""LangChain tools through a real Bastion: results, denials as error ToolMessages, audit names LangChain."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from adapters_support import api_token, record, records, unique

from gateway.app import Gateway

pytest.importorskip(
    "langchain_core", reason="langchain-core is not installed (pip install 'bastion[langchain]')"
)

from langchain_core.messages import ToolMessage
from langchain_core.tools import tool

from adapters.client import AsyncBastionClient, BastionClient
from adapters.langchain import CLIENT_INFO, aload_tools, guard, load_tools


def tool_call(name: str, args: dict[str, Any], call_id: str) -> dict[str, Any]:
    """What a chat model's `AIMessage.tool_calls` holds."""
    return {"name": name, "args": args, "id": call_id, "type": "tool_call"}


async def test_loaded_tools_call_through_bastion_and_denials_are_error_messages(
    gateway: tuple[str, Gateway], dev_key: Any
) -> None:
    base, gw = gateway
    sub = unique("lc")
    async with AsyncBastionClient(base, api_token(dev_key, base, sub)) as client:
        tools = {t.name: t for t in await aload_tools(client, "demo")}
        assert "delete_note" not in tools  # policy hides what the caller may not call
        ok = await tools["add"].ainvoke(tool_call("add", {"a": 2, "b": 40}, "lc-call-1"))
        denied = await tools["transfer"].ainvoke(
            tool_call("transfer", {"amount": 5000, "to": "x"}, "lc-call-2")
        )
    assert isinstance(ok, ToolMessage) and ok.status == "success" and ok.content == "42"
    assert ok.tool_call_id == "lc-call-1" and ok.artifact.structured == {"result": 42}
    assert isinstance(denied, ToolMessage) and denied.status == "error"
    assert denied.content == "denied by policy transfer-limit: transfers above 1000 need a human"
    allowed_row = await record(gw, ok.artifact.audit_id, sub)
    assert allowed_row.client == CLIENT_INFO and CLIENT_INFO.startswith("langchain/")
    assert allowed_row.call_id == "lc-call-1" and allowed_row.outcome["status"] == "completed"
    (denied_row,) = [r for r in await records(gw, sub) if r.call_id == "lc-call-2"]
    assert denied_row.effect == "deny" and denied_row.client == CLIENT_INFO


async def test_sync_tools_with_the_sync_client(gateway: tuple[str, Gateway], dev_key: Any) -> None:
    base, gw = gateway
    sub = unique("lc-sync")

    def run() -> tuple[Any, Any]:
        with BastionClient(base, api_token(dev_key, base, sub)) as client:
            tools = {t.name: t for t in load_tools(client, "demo")}
            return (
                tools["echo"].invoke(tool_call("echo", {"text": "hello"}, "lc-sync-1")),
                tools["echo"].invoke({"text": "plain input"}),
            )

    message, plain = await asyncio.to_thread(run)
    assert message.content == "hello" and plain == "plain input"
    assert {r.call_id for r in await records(gw, sub)} >= {"lc-sync-1"}


async def test_guarded_local_tool_runs_only_when_bastion_allows(
    gateway: tuple[str, Gateway], dev_key: Any
) -> None:
    base, gw = gateway
    sub = unique("lc-guard")
    ran: list[int] = []

    @tool
    def transfer(amount: int, to: str) -> str:
        """Move money (a local tool that Bastion governs as demo/transfer)."""
        ran.append(amount)
        return f"sent {amount} to {to}"

    async with AsyncBastionClient(base, api_token(dev_key, base, sub)) as client:
        governed = guard(transfer, client, "demo")
        small = await governed.ainvoke(tool_call("transfer", {"amount": 10, "to": "bob"}, "g-1"))
        big = await governed.ainvoke(tool_call("transfer", {"amount": 5000, "to": "bob"}, "g-2"))
    assert small.content == "sent 10 to bob" and small.status == "success"
    assert big.status == "error" and "transfer-limit" in big.content
    assert ran == [10]  # the denied call never ran
    rows = {r.call_id: r for r in await records(gw, sub)}
    assert rows["g-1"].outcome["status"] == "decided" and rows["g-2"].effect == "deny"
    assert rows["g-1"].client == CLIENT_INFO
