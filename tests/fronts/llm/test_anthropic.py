"""The Anthropic Messages API through Bastion, driven by the official `anthropic` SDK.

Each `tool_use` the model emits is decided by Cedar and audited (`protocol: "llm"`, `call_id` =
the tool_use id); a refused one reaches the SDK as a text block naming the policy, never as a
tool call; the provider sees Bastion's key, never the caller's token.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest

from tests.fronts.llm.conftest import PROVIDER_KEY, LLMEnv
from tests.llm_provider import Script, ToolUse

TOOLS = [
    {"name": n, "description": n, "input_schema": {"type": "object"}}
    for n in ("get_weather", "delete_file", "refund", "send_email", "web_search")
]


async def ask(env: LLMEnv, script: Script, stream: bool = False, **kw: object) -> anthropic.types.Message:
    env.provider.queue(script)
    params = {"model": "claude-test", "max_tokens": 100, "tools": TOOLS}
    messages = [{"role": "user", "content": "help me"}]
    async with env.anthropic(**kw) as client:
        if stream:
            async with client.messages.stream(messages=messages, **params) as s:
                return await s.get_final_message()
        return await client.messages.create(messages=messages, **params)


@pytest.mark.parametrize("stream", [False, True])
async def test_allowed_and_denied_tool_use(env: LLMEnv, stream: bool) -> None:
    token = env.token()
    script = Script(
        text="Let me look.",
        tools=[ToolUse("get_weather", {"city": "Paris"}), ToolUse("delete_file", {"path": "/etc/passwd"})],
    )
    message = await ask(env, script, stream, token=token)
    kinds = [b.type for b in message.content]
    assert kinds == ["text", "tool_use", "text"]
    used = message.content[1]
    assert used.type == "tool_use" and used.name == "get_weather" and used.input == {"city": "Paris"}
    refusal = message.content[2]
    assert refusal.type == "text" and "no-file-deletion" in refusal.text and "delete_file" in refusal.text
    assert message.stop_reason == "tool_use"
    sent = env.provider.last
    assert sent.headers["x-api-key"] == PROVIDER_KEY
    assert all(token not in value for value in sent.headers.values())
    denied_id = script.tools[1].id
    records = await env.records(protocol="llm")
    (allowed,) = [r for r in records if r.call_id == used.id]
    assert allowed.tool == "get_weather" and allowed.upstream == "llm"
    assert allowed.effect == "allow" and allowed.status == "decided"
    assert allowed.llm == {"provider": "anthropic", "model": "claude-test"}
    denied = [r for r in records if r.effect == "deny" and r.tool == "delete_file"]
    assert denied and denied[-1].status == "denied"
    assert denied[-1].decision["policy_ids"] == ["no-file-deletion"]
    assert denied_id is None or denied[-1].call_id == denied_id


@pytest.mark.parametrize("stream", [False, True])
async def test_only_denied_calls_end_the_turn(env: LLMEnv, stream: bool) -> None:
    message = await ask(env, Script(tools=[ToolUse("delete_file", {"path": "/"})]), stream)
    assert [b.type for b in message.content] == ["text"]
    assert message.stop_reason == "end_turn"


async def test_stream_keeps_indexes_and_text_flowing(env: LLMEnv) -> None:
    env.provider.queue(
        Script(
            text="Checking twice.",
            tools=[ToolUse("delete_file", {"path": "/"}), ToolUse("get_weather", {"city": "Oslo"})],
        )
    )
    events = []
    async with (
        env.anthropic() as client,
        client.messages.stream(
            model="claude-test", max_tokens=50, messages=[{"role": "user", "content": "hi"}], tools=TOOLS
        ) as s,
    ):
        async for event in s:
            events.append(event)
        final = await s.get_final_message()
    starts = [e for e in events if e.type == "content_block_start"]
    assert [e.index for e in starts] == [0, 1, 2]
    assert [e.content_block.type for e in starts] == ["text", "text", "tool_use"]
    assert [b.type for b in final.content] == ["text", "text", "tool_use"]
    assert final.content[2].input == {"city": "Oslo"}
    text = "".join(
        e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta"
    )
    assert text.startswith("Checking twice.")


async def test_transform_redacts_the_released_input(env: LLMEnv) -> None:
    message = await ask(env, Script(tools=[ToolUse("send_email", {"to": "bob@example.com", "body": "hi"})]))
    (used,) = message.content
    assert used.type == "tool_use" and used.input == {"to": "<EMAIL_ADDRESS>", "body": "hi"}
    (record,) = await env.records(call_id=used.id)
    assert record.effect == "transform" and record.pii["input"] == {"EMAIL_ADDRESS": 1}
    assert "bob@example.com" not in json.dumps(record.to_json())


async def test_caller_without_token_is_refused_in_anthropic_shape(env: LLMEnv) -> None:
    with pytest.raises(anthropic.AuthenticationError) as caught:
        await ask(env, Script(text="never"), token="not-a-token")
    assert "token" in str(caught.value.message)
    async with httpx.AsyncClient() as http:
        answer = await http.post(f"{env.base}/llm/anthropic/v1/messages", json={"model": "m"})
    assert answer.status_code == 401 and answer.json()["type"] == "error"
    assert answer.json()["error"]["type"] == "authentication_error"


async def test_budget_is_charged_per_released_tool_call(env: LLMEnv) -> None:
    searches = [ToolUse("web_search", {"q": str(i)}) for i in range(3)]
    message = await ask(env, Script(tools=searches), token=env.token("budget-user"))
    assert [b.type for b in message.content] == ["tool_use", "tool_use", "text"]
    assert "over budget" in message.content[2].text and "searches" in message.content[2].text
    records = await env.records(user="budget-user")
    assert sorted(r.effect for r in records) == ["allow", "allow", "deny"]
