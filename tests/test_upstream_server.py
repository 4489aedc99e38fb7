"""The rich test upstream, talked to directly (no Bastion): each feature answers, in each era.

End-to-end tests through Bastion build on this server; these tests pin down what it does on its
own, so a failure there is Bastion's and not the upstream's.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.session import ClientRequestContext, IncomingMessage
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError
from upstream_server import EVENTS, SECRET_TEXT, LegacyWire, read_log, serving, stdio_params

MODES = ["legacy", "2026-07-28"]


@pytest.fixture(scope="module")
async def rich_url() -> AsyncIterator[str]:
    async with serving() as url:
        yield url


async def answer_yes(ctx: ClientRequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
    return types.ElicitResult(action="accept", content={"answer": "yes"})


def text(result: types.CallToolResult | types.ReadResourceResult) -> str:
    block = result.content[0] if isinstance(result, types.CallToolResult) else result.contents[0]
    assert isinstance(block, types.TextContent | types.TextResourceContents)
    return block.text


def echo_as_task() -> types.CallToolRequest:
    params = types.CallToolRequestParams(name="echo", arguments={"text": "t"}, task=types.TaskMetadata())
    return types.CallToolRequest(params=params)


@pytest.mark.parametrize("mode", MODES)
async def test_every_feature_answers(rich_url: str, mode: str) -> None:
    async with Client(rich_url, mode=mode, elicitation_callback=answer_yes) as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        assert {"echo", "delete_note", "slow", "write_note", "ask"} <= tools
        assert text(await client.call_tool("echo", {"text": "hi"})) == "hi"

        resources = {str(r.uri) for r in (await client.list_resources()).resources}
        assert resources == {"notes://welcome", "notes://secret"}
        templates = (await client.list_resource_templates()).resource_templates
        assert [t.uri_template for t in templates] == ["notes://{name}"]
        assert text(await client.read_resource("notes://welcome")).startswith("Welcome")
        assert text(await client.read_resource("notes://secret")) == SECRET_TEXT
        assert text(await client.read_resource("notes://todo")) == "write more tests"

        assert {p.name for p in (await client.list_prompts()).prompts} == {"summarize", "admin_prompt"}
        prompt = await client.get_prompt("summarize", {"topic": "cedar"})
        content = prompt.messages[0].content
        assert isinstance(content, types.TextContent) and "cedar" in content.text
        topic = types.PromptReference(type="ref/prompt", name="summarize")
        done = await client.complete(topic, {"name": "topic", "value": "b"})
        assert done.completion.values == ["bastion", "budgets"]
        note = types.ResourceTemplateReference(type="ref/resource", uri="notes://{name}")
        assert (await client.complete(note, {"name": "name", "value": "w"})).completion.values == ["welcome"]

        # legacy: a server-to-client elicitation/create; 2026-07-28: an input_required round trip
        assert text(await client.call_tool("ask", {"question": "go?"})) == "go? -> yes"

        name = f"gone-{mode}"
        await client.call_tool("delete_note", {"name": name})
        assert f"delete_note:{name}" in EVENTS


@pytest.mark.parametrize("mode", MODES)
async def test_a_cancelled_call_is_recorded(rich_url: str, mode: str) -> None:
    """legacy cancels with notifications/cancelled; 2026-07-28 by closing the request."""
    EVENTS.clear()
    async with Client(rich_url, mode=mode) as client:
        call = asyncio.create_task(client.call_tool("slow", {"seconds": 10}))
        while "slow:started" not in EVENTS:
            await asyncio.sleep(0.01)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        for _ in range(200):
            if "slow:cancelled" in EVENTS:
                break
            await asyncio.sleep(0.01)
    assert EVENTS == ["slow:started", "slow:cancelled"]


async def test_legacy_resource_subscription(rich_url: str) -> None:
    updates: list[str] = []

    async def on_message(message: IncomingMessage) -> None:
        if isinstance(message, types.ResourceUpdatedNotification):
            updates.append(str(message.params.uri))

    async with Client(rich_url, mode="legacy", message_handler=on_message) as client:
        with pytest.warns(MCPDeprecationWarning):
            await client.subscribe_resource("notes://sub-legacy")
        await client.call_tool("write_note", {"name": "sub-legacy", "text": "new"})
        for _ in range(200):
            if updates:
                break
            await asyncio.sleep(0.01)
    assert updates == ["notes://sub-legacy"]


async def test_modern_subscriptions_listen(rich_url: str) -> None:
    async with (
        Client(rich_url, mode="2026-07-28") as client,
        client.listen(resource_subscriptions=["notes://sub-modern"]) as sub,
    ):
        assert sub.honored.resource_subscriptions == ["notes://sub-modern"]
        await client.call_tool("write_note", {"name": "sub-modern", "text": "new"})

        async def first() -> Any:
            async for event in sub:
                return event

        event = await asyncio.wait_for(first(), 5)
    assert getattr(event, "uri", None) == "notes://sub-modern"


async def test_modern_requests_cannot_subscribe(rich_url: str) -> None:
    async with Client(rich_url, mode="2026-07-28") as client:
        with pytest.warns(MCPDeprecationWarning), pytest.raises(MCPError) as err:
            await client.subscribe_resource("notes://welcome")
    assert err.value.code == types.METHOD_NOT_FOUND


async def test_legacy_tasks_on_the_wire(rich_url: str) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        wire = LegacyWire(http, rich_url)
        init = await wire.open()
        assert init["result"]["capabilities"]["tasks"]["requests"] == {"tools": {"call": {}}}
        tools = (await wire.request("tools/list"))["result"]["tools"]
        assert {t["name"]: t.get("execution") for t in tools}["slow"] == {"taskSupport": "optional"}

        created = await wire.request(
            "tools/call", {"name": "slow", "arguments": {"seconds": 0.1}, "task": {"ttl": 30_000}}
        )
        task = created["result"]["task"]
        assert task["status"] == "working" and task["ttl"] == 30_000
        task_id = task["taskId"]
        got = await wire.request("tasks/get", {"taskId": task_id})
        assert got["result"]["taskId"] == task_id
        listed = await wire.request("tasks/list", {})
        assert task_id in [t["taskId"] for t in listed["result"]["tasks"]]
        result = (await wire.request("tasks/result", {"taskId": task_id}))["result"]
        assert result["structuredContent"] == {"result": "slept 0.1s"}
        assert result["_meta"]["io.modelcontextprotocol/related-task"] == {"taskId": task_id}
        assert (await wire.request("tasks/get", {"taskId": task_id}))["result"]["status"] == "completed"

        EVENTS.clear()
        long = await wire.request("tools/call", {"name": "slow", "arguments": {"seconds": 10}, "task": {}})
        long_id = long["result"]["task"]["taskId"]
        cancelled = await wire.request("tasks/cancel", {"taskId": long_id})
        assert cancelled["result"]["status"] == "cancelled"
        assert (await wire.request("tasks/result", {"taskId": long_id}))["error"]["code"] == -32602
        assert (await wire.request("tasks/get", {"taskId": "no-such-task"}))["error"]["code"] == -32602
        no_task = {"name": "delete_note", "arguments": {"name": "x"}, "task": {}}
        refused = await wire.request("tools/call", no_task)
        assert refused["error"]["code"] == types.METHOD_NOT_FOUND
        for _ in range(200):
            if "slow:cancelled" in EVENTS:
                break
            await asyncio.sleep(0.01)
        assert EVENTS == ["slow:started", "slow:cancelled"]


async def test_the_sdk_client_can_poll_but_not_create_tasks(rich_url: str) -> None:
    """The SDK's client sends tasks/* as typed requests, but rejects a `{task}` tools/call answer."""
    async with Client(rich_url, mode="legacy") as client:
        call = echo_as_task()
        with pytest.raises(ValueError, match="content"):
            await client.session.send_request(call, types.CreateTaskResult)
        listed = await client.session.send_request(types.ListTasksRequest(), types.ListTasksResult)
        task_id = listed.tasks[-1].task_id
        payload = types.GetTaskPayloadRequest(params=types.GetTaskPayloadRequestParams(task_id=task_id))
        result = await client.session.send_request(payload, types.CallToolResult)
    assert result.structured_content == {"result": "t"}


async def test_modern_requests_get_no_tasks(rich_url: str) -> None:
    """On 2026-07-28 `params.task` is ignored (the call runs inline) and tasks/* do not exist."""
    async with Client(rich_url, mode="2026-07-28") as client:
        call = echo_as_task()
        result = await client.session.send_request(call, types.CallToolResult)
        assert result.structured_content == {"result": "t"}
        get = types.GetTaskRequest(params=types.GetTaskRequestParams(task_id="any"))
        with pytest.raises(MCPError) as err:
            await client.session.send_request(get, types.GetTaskResult)
    assert err.value.code == types.METHOD_NOT_FOUND


async def test_stdio(tmp_path: Path) -> None:
    log = tmp_path / "events.log"
    async with Client(stdio_params(log), mode="2026-07-28") as client:
        assert text(await client.read_resource("notes://secret")) == SECRET_TEXT
        await client.call_tool("delete_note", {"name": "welcome"})
    assert read_log(log) == ["delete_note:welcome"]
