"""Anthropic `tool_use` blocks through a real Bastion: tool_result blocks, denials as is_error."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from adapters_support import api_token, record, records, unique

from gateway.app import Gateway

pytest.importorskip("anthropic", reason="anthropic is not installed (pip install 'bastion[anthropic]')")

from anthropic.types import Message, MessageParam, ToolParam
from pydantic import TypeAdapter

from adapters.anthropic import CLIENT_INFO, atool_results, tool_params, tool_results
from adapters.client import AsyncBastionClient, BastionClient


def response(*uses: tuple[str, str, dict[str, Any]]) -> Message:
    """A Messages API response that asks for tools, as the model would send it."""
    content: list[dict[str, Any]] = [{"type": "text", "text": "Let me do that."}]
    content += [{"type": "tool_use", "id": i, "name": n, "input": a} for i, n, a in uses]
    return Message.model_validate(
        {
            "id": "msg_test",
            "type": "message",
            "role": "assistant",
            "model": "claude-test",
            "content": content,
            "stop_reason": "tool_use",
            "stop_sequence": None,
            "usage": {"input_tokens": 1, "output_tokens": 1},
        }
    )


async def test_tool_uses_become_tool_results_and_denials_are_is_error(
    gateway: tuple[str, Gateway], dev_key: Any
) -> None:
    base, gw = gateway
    sub = unique("anthropic")
    msg = response(
        ("toolu_01", "add", {"a": 20, "b": 22}),
        ("toolu_02", "transfer", {"amount": 5000, "to": "x"}),
        ("toolu_03", "unknown_tool", {}),
    )
    async with AsyncBastionClient(base, api_token(dev_key, base, sub)) as client:
        results = await atool_results(msg, client, upstream={"add": "demo", "transfer": "demo"})
    assert [r["tool_use_id"] for r in results] == ["toolu_01", "toolu_02", "toolu_03"]
    assert results[0]["content"] == [{"type": "text", "text": "42"}] and "is_error" not in results[0]
    assert results[1]["is_error"] is True
    assert results[1]["content"] == [
        {"type": "text", "text": "denied by policy transfer-limit: transfers above 1000 need a human"}
    ]
    assert results[2]["is_error"] is True and "not available" in str(results[2]["content"])
    # the blocks are what the next request's user turn takes
    TypeAdapter(MessageParam).validate_python({"role": "user", "content": results})
    rows = {r.call_id: r for r in await records(gw, sub)}
    assert set(rows) == {"toolu_01", "toolu_02"}  # the unrouted tool never reached Bastion
    assert rows["toolu_01"].outcome["status"] == "completed" and rows["toolu_02"].effect == "deny"
    assert rows["toolu_01"].client == rows["toolu_02"].client == CLIENT_INFO
    assert CLIENT_INFO.startswith("anthropic/")


async def test_sync_helper_and_tool_definitions(gateway: tuple[str, Gateway], dev_key: Any) -> None:
    base, gw = gateway
    sub = unique("anthropic-sync")

    def run() -> tuple[list[Any], list[Any]]:
        with BastionClient(base, api_token(dev_key, base, sub)) as client:
            params = tool_params(client.list_tools("demo"))
            return params, tool_results(response(("toolu_s", "echo", {"text": "hi"})), client, "demo")

    params, results = await asyncio.to_thread(run)
    TypeAdapter(list[ToolParam]).validate_python(params)
    echo = next(p for p in params if p["name"] == "echo")
    assert echo["input_schema"]["properties"]["text"]["type"] == "string"
    assert results == [
        {"type": "tool_result", "tool_use_id": "toolu_s", "content": [{"type": "text", "text": "hi"}]}
    ]
    (row,) = await records(gw, sub)
    assert (await record(gw, row.id, sub)).client == CLIENT_INFO
