"""What a hostile caller, provider or model can put on the LLM front, and what Bastion does with it:
fail closed (nothing reaches the agent as a tool call unless decided), clear errors in the
provider's shape, every refused tool call recorded."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.fronts.llm.conftest import LLMEnv
from tests.llm_provider import Script, ToolUse


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


START = {
    "type": "message_start",
    "message": {
        "id": "msg_x",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 1, "output_tokens": 1},
    },
}


def tool_start(index: int, name: str, tool_id: str) -> dict[str, Any]:
    block = {"type": "tool_use", "id": tool_id, "name": name, "input": {}}
    return {"type": "content_block_start", "index": index, "content_block": block}


def delta(index: int, partial: str) -> dict[str, Any]:
    return {
        "type": "content_block_delta",
        "index": index,
        "delta": {"type": "input_json_delta", "partial_json": partial},
    }


END = [
    {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"output_tokens": 3},
    },
    {"type": "message_stop"},
]


async def stream(env: LLMEnv, raw: bytes) -> anthropic.types.Message:
    env.provider.queue(Script(raw=raw))
    async with (
        env.anthropic() as client,
        client.messages.stream(model="m", max_tokens=10, messages=[{"role": "user", "content": "x"}]) as s,
    ):
        return await s.get_final_message()


async def post(
    env: LLMEnv, body: bytes | dict[str, Any], path: str = "anthropic/v1/messages", **headers: str
) -> httpx.Response:
    headers.setdefault("authorization", f"Bearer {env.token()}")
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with httpx.AsyncClient() as http:
        return await http.post(f"{env.base}/llm/{path}", content=content, headers=headers)


async def test_malformed_tool_input_is_refused_and_recorded(env: LLMEnv) -> None:
    raw = sse(
        START,
        tool_start(0, "get_weather", "toolu_bad_json"),
        delta(0, '{"city": "Par'),
        {"type": "content_block_stop", "index": 0},
        *END,
    )
    message = await stream(env, raw)
    assert [b.type for b in message.content] == ["text"]
    assert "not valid JSON" in message.content[0].text and message.stop_reason == "end_turn"
    (record,) = await env.records(call_id="toolu_bad_json")
    assert record.effect == "deny" and record.decision["policy_ids"] == ["malformed-tool-call"]


async def test_duplicate_keys_in_tool_input_are_refused(env: LLMEnv) -> None:
    """Two parsers may keep different duplicates: Bastion would decide one value, the agent run another."""
    raw = sse(
        START,
        tool_start(0, "get_weather", "toolu_dup"),
        delta(0, '{"city": "Rome", "city": "Oslo"}'),
        {"type": "content_block_stop", "index": 0},
        *END,
    )
    message = await stream(env, raw)
    assert message.content[0].type == "text" and "duplicate" in message.content[0].text


async def test_released_input_is_what_was_decided(env: LLMEnv) -> None:
    """A block whose start carries an input and whose deltas carry another: the deltas are the input
    (as the SDKs read it), and the agent gets exactly the decided input, re-serialised."""
    start = tool_start(0, "get_weather", "toolu_two_inputs")
    start["content_block"]["input"] = {"city": "Start"}
    raw = sse(
        START,
        start,
        delta(0, '{"city":'),
        delta(0, ' "Delta"}'),
        {"type": "content_block_stop", "index": 0},
        *END,
    )
    message = await stream(env, raw)
    assert message.content[0].type == "tool_use" and message.content[0].input == {"city": "Delta"}


async def test_stream_cut_inside_a_tool_call_releases_nothing(env: LLMEnv) -> None:
    raw = sse(START, tool_start(0, "get_weather", "toolu_cut"), delta(0, '{"city": "Rome"}'))
    with pytest.raises(anthropic.APIStatusError) as caught:
        await stream(env, raw)
    assert "inside a tool_use block" in str(caught.value)


async def test_interleaved_blocks_fail_the_stream(env: LLMEnv) -> None:
    text = {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}}
    raw = sse(START, tool_start(0, "get_weather", "toolu_inter"), text, delta(0, "{}"), *END)
    with pytest.raises(anthropic.APIStatusError):
        await stream(env, raw)


async def test_provider_answer_with_duplicate_keys_fails(env: LLMEnv) -> None:
    env.provider.queue(Script(raw=b'{"type": "message", "content": [], "content": [{"type": "tool_use"}]}'))
    answer = await post(env, {"model": "m", "max_tokens": 5, "messages": []})
    assert answer.status_code == 502 and "duplicate" in answer.json()["error"]["message"]


async def test_too_many_tool_calls_fail_the_answer(env: LLMEnv) -> None:
    env.provider.queue(Script(tools=[ToolUse("get_weather", {"n": i}) for i in range(130)]))
    answer = await post(env, {"model": "m", "max_tokens": 5, "messages": []})
    assert answer.status_code == 502 and "more than 128" in answer.json()["error"]["message"]


async def test_hostile_tool_name_is_escaped_in_the_refusal(env: LLMEnv) -> None:
    name = "get_weather\u202e\n\x1b[31m" + "x" * 500
    message = await stream(
        env,
        sse(
            START,
            tool_start(0, name, "toolu_evil_name"),
            delta(0, "{}"),
            {"type": "content_block_stop", "index": 0},
            *END,
        ),
    )
    text = message.content[0].text
    assert (
        "\n" not in text.split("tool call ")[1].split(" was")[0]
        and "\x1b" not in text
        and "\u202e" not in text
    )
    (record,) = await env.records(call_id="toolu_evil_name")
    assert len(record.tool) <= 200 and record.effect == "deny" and "tool name" in text


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b'{"model": "m", "model": "n"}', 400, "duplicate"),
        (b"[" * 200 + b"]" * 200, 400, "nested deeper"),
        (b'{"model": "m", "stream": "yes"}', 400, "stream"),
        (b"\xff\xfe", 400, "UTF-8"),
        (b'{"model": "m", "temperature": NaN}', 400, "NaN"),
    ],
)
async def test_bad_request_bodies_are_refused_in_provider_shape(
    env: LLMEnv, body: bytes, status: int, says: str
) -> None:
    answer = await post(env, body)
    assert answer.status_code == status and says in answer.json()["error"]["message"]
    assert answer.json()["type"] == "error"


async def test_token_for_another_resource_is_refused(env: LLMEnv) -> None:
    for audience in (f"{env.base}/mcp/demo", f"{env.base}/llm/openai"):
        answer = await post(env, {"model": "m"}, authorization=f"Bearer {env.token(audience=audience)}")
        assert answer.status_code == 401 and "audience" in answer.json()["error"]["message"]
    mine = await post(
        env,
        {"model": "m", "max_tokens": 1, "messages": []},
        authorization=f"Bearer {env.token(audience=f'{env.base}/llm/anthropic')}",
    )
    assert mine.status_code == 200


async def test_unknown_provider_or_api_is_404(env: LLMEnv) -> None:
    assert (await post(env, {"model": "m"}, "nope/v1/messages")).status_code == 404
    wrong_kind = await post(env, {"model": "m"}, "anthropic/v1/chat/completions")
    assert wrong_kind.status_code == 404 and "error" in wrong_kind.json()
    assert (await post(env, {"model": "m"}, "openai/v1/embeddings")).status_code == 404


async def test_provider_timeout_is_504_in_provider_shape(env: LLMEnv) -> None:
    env.provider.queue(Script(text="late", delay_s=3))
    async with anthropic.AsyncAnthropic(
        base_url=f"{env.base}/llm/slow", api_key=env.token(), max_retries=0
    ) as c:
        with pytest.raises(anthropic.APIStatusError) as caught:
            await c.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 504 and "timed out" in caught.value.message


async def test_caller_headers_do_not_reach_the_provider(env: LLMEnv) -> None:
    env.provider.queue(Script(text="ok"))
    await post(
        env,
        {"model": "m", "max_tokens": 1, "messages": []},
        cookie="session=secret",
        **{"x-forwarded-for": "1.2.3.4", "anthropic-version": "2023-06-01"},
    )
    seen = env.provider.last.headers
    assert "cookie" not in seen and "x-forwarded-for" not in seen
    assert seen["anthropic-version"] == "2023-06-01" and seen["x-api-key"] != env.token()


def openai_sse(*chunks: dict[str, Any], done: bool = True) -> bytes:
    body = b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks)
    return body + (b"data: [DONE]\n\n" if done else b"")


async def test_chat_stream_cut_inside_a_tool_call_is_an_error(env: LLMEnv) -> None:
    """Without `[DONE]` or a finish reason, a half-streamed call is neither released nor silently
    dropped: the stream ends with an error the SDK raises."""
    head = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    call = {
        "index": 0,
        "id": "call_cut",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"ci'},
    }
    raw = openai_sse(
        {**head, "choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}]},
        done=False,
    )
    env.provider.queue(Script(raw=raw))
    async with env.openai() as client:
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], stream=True
        )
        with pytest.raises(openai.APIError) as caught:
            async for _ in stream:
                pass
    assert "inside a tool call" in str(caught.value)


async def test_responses_call_only_in_the_final_response_is_refused_and_recorded(env: LLMEnv) -> None:
    """A provider that slips a call into `response.completed` without streaming it as an item."""
    sneaked = {
        "type": "function_call",
        "id": "fc_x",
        "call_id": "call_sneaked",
        "name": "get_weather",
        "arguments": "{}",
        "status": "completed",
    }
    base = {
        "id": "resp_x",
        "object": "response",
        "created_at": 1,
        "model": "m",
        "status": "in_progress",
        "output": [],
    }
    events = [
        {"type": "response.created", "sequence_number": 0, "response": base},
        {
            "type": "response.completed",
            "sequence_number": 1,
            "response": {**base, "status": "completed", "output": [sneaked]},
        },
    ]
    raw = b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)
    env.provider.queue(Script(raw=raw))
    async with env.openai() as client:
        stream = await client.responses.create(model="m", input="x", stream=True)
        last = [e async for e in stream][-1]
    assert [i.type for i in last.response.output] == ["message"]
    assert "never streamed" in last.response.output[0].content[0].text
    (record,) = await env.records(call_id="call_sneaked")
    assert record.effect == "deny" and record.decision["policy_ids"] == ["malformed-tool-call"]
