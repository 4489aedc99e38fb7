"""OpenAI Chat Completions and Responses through Bastion, driven by the official `openai` SDK.

A refused tool call never reaches the SDK as a tool call: Chat Completions gets its refusal as
content (and `finish_reason: stop` when no call is left), Responses a message item at the same
output index. Released calls carry exactly the decided arguments.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from tests.fronts.llm.conftest import PROVIDER_KEY, LLMEnv
from tests.llm_provider import Script, ToolUse

FUNCTIONS = [
    {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
    for n in ("get_weather", "delete_file", "send_email")
]
RESPONSE_TOOLS = [
    {"type": "function", "name": n, "parameters": {"type": "object"}} for n in ("get_weather", "delete_file")
]
MIXED = Script(
    text="On it.",
    tools=[ToolUse("delete_file", {"path": "/"}), ToolUse("get_weather", {"city": "Rome"})],
)


async def chat(env: LLMEnv, script: Script, stream: bool, **kw: Any) -> tuple[str, list[dict[str, Any]], str]:
    """(content, tool calls as dicts, finish_reason) as the SDK assembled them."""
    env.provider.queue(script)
    async with env.openai(**kw) as client:
        params: dict[str, Any] = {
            "model": "gpt-test",
            "messages": [{"role": "user", "content": "go"}],
            "tools": FUNCTIONS,
        }
        if not stream:
            done = await client.chat.completions.create(**params)
            message = done.choices[0].message
            calls = [c.model_dump() for c in message.tool_calls or []]
            return message.content or "", calls, done.choices[0].finish_reason
        content, calls, finish = "", {}, ""
        async for chunk in await client.chat.completions.create(stream=True, **params):
            for choice in chunk.choices:
                content += choice.delta.content or ""
                for part in choice.delta.tool_calls or []:
                    slot = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
                    slot["id"] += part.id or ""
                    slot["name"] += part.function.name or ""
                    slot["arguments"] += part.function.arguments or ""
                finish = choice.finish_reason or finish
        listed = [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for _, c in sorted(calls.items())
        ]
        return content, listed, finish


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_denied_call_becomes_content(env: LLMEnv, stream: bool) -> None:
    token = env.token()
    content, calls, finish = await chat(env, MIXED, stream, token=token)
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Rome"}
    assert content.startswith("On it.") and "no-file-deletion" in content
    assert finish == "tool_calls"
    sent = env.provider.last
    assert sent.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert all(token not in v for v in sent.headers.values())
    (record,) = await env.records(call_id=calls[0]["id"])
    assert record.protocol == "llm" and record.llm == {"provider": "openai", "model": "gpt-test"}


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_no_call_left_stops(env: LLMEnv, stream: bool) -> None:
    content, calls, finish = await chat(env, Script(tools=[ToolUse("delete_file", {"path": "/x"})]), stream)
    assert calls == [] and finish == "stop" and "delete_file" in content


async def test_chat_stream_renumbers_released_calls(env: LLMEnv) -> None:
    script = Script(
        tools=[
            ToolUse("delete_file", {"path": "/a"}),
            ToolUse("get_weather", {"city": "A"}),
            ToolUse("delete_file", {"path": "/b"}),
            ToolUse("get_weather", {"city": "B"}),
        ]
    )
    env.provider.queue(script)
    indexes: list[int] = []
    async with env.openai() as client:
        stream = await client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "go"}], tools=FUNCTIONS, stream=True
        )
        async for chunk in stream:
            for choice in chunk.choices:
                indexes += [p.index for p in choice.delta.tool_calls or []]
    assert indexes == [0, 1]


async def test_chat_stream_helper_assembles_the_governed_answer(env: LLMEnv) -> None:
    env.provider.queue(MIXED)
    async with (
        env.openai() as client,
        client.chat.completions.stream(model="gpt-test", messages=[{"role": "user", "content": "go"}]) as s,
    ):
        final = await s.get_final_completion()
    message = final.choices[0].message
    assert [c.function.name for c in message.tool_calls or []] == ["get_weather"]
    assert "no-file-deletion" in (message.content or "")


@pytest.mark.parametrize("stream", [False, True])
async def test_responses_denied_call_becomes_a_message(env: LLMEnv, stream: bool) -> None:
    env.provider.queue(MIXED)
    async with env.openai() as client:
        params: dict[str, Any] = {"model": "gpt-test", "input": "go", "tools": RESPONSE_TOOLS}
        if stream:
            async with client.responses.stream(**params) as s:
                response = await s.get_final_response()
        else:
            response = await client.responses.create(**params)
    kinds = [item.type for item in response.output]
    assert kinds == ["message", "message", "function_call"]
    refusal = response.output[1]
    assert refusal.type == "message" and "no-file-deletion" in refusal.content[0].text
    call = response.output[2]
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Rome"}
    records = await env.records(call_id=call.call_id)
    assert [r.effect for r in records] == ["allow"]


async def test_responses_raw_stream_is_renumbered_in_order(env: LLMEnv) -> None:
    env.provider.queue(MIXED)
    async with env.openai() as client:
        stream = await client.responses.create(
            model="gpt-test", input="go", tools=RESPONSE_TOOLS, stream=True
        )
        events = [event async for event in stream]
    numbers = [e.sequence_number for e in events]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    added = [e for e in events if e.type == "response.output_item.added"]
    assert [(e.output_index, e.item.type) for e in added] == [
        (0, "message"),
        (1, "message"),
        (2, "function_call"),
    ]
    assert events[-1].type == "response.completed"
    assert [i.type for i in events[-1].response.output] == ["message", "message", "function_call"]


async def test_responses_follow_up_answers_refused_calls(env: LLMEnv) -> None:
    """A follow-up on a stored response (`previous_response_id`) gets the refusals as outputs."""
    env.provider.queue(MIXED)
    async with env.openai() as client:
        first = await client.responses.create(model="gpt-test", input="go", tools=RESPONSE_TOOLS)
        call = next(i for i in first.output if i.type == "function_call")
        output = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
        await client.responses.create(model="gpt-test", previous_response_id=first.id, input=[output])
    sent = env.provider.last.body["input"]
    refused = [i for i in sent if i.get("type") == "function_call_output" and i["call_id"] != call.call_id]
    assert len(refused) == 1 and "no-file-deletion" in refused[0]["output"]
    assert MIXED.tools[0].id is None or refused[0]["call_id"] == MIXED.tools[0].id


async def test_provider_errors_come_back_in_openai_shape(env: LLMEnv) -> None:
    env.provider.queue(Script(status=429, error="slow down"))
    async with env.openai() as client:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(
                model="gpt-test", messages=[{"role": "user", "content": "x"}]
            )
    assert "slow down" in caught.value.message


async def test_provider_down_fails_the_call(env: LLMEnv) -> None:
    import openai as sdk

    async with sdk.AsyncOpenAI(
        base_url=f"{env.base}/llm/down/v1", api_key=env.token(), max_retries=0
    ) as client:
        with pytest.raises(sdk.APIStatusError) as caught:
            await client.chat.completions.create(
                model="gpt-test", messages=[{"role": "user", "content": "x"}]
            )
    assert caught.value.status_code == 502 and "unreachable" in caught.value.message
