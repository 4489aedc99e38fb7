"""The provider double, driven directly by the official SDKs: if `anthropic` and `openai` parse its
answers (plain, streamed, through their accumulating stream helpers, and errors) into the same
objects a real provider's would give, tests of the LLM front can trust what it sends Bastion."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import openai
import pytest
from llm_provider import INPUT_TOKENS, OUTPUT_TOKENS, ProviderDouble, Script, ToolUse, running_provider

WEATHER = ToolUse("get_weather", {"city": "Paris", "units": "metric", "days": [1, 2, 3]})
NOTE = ToolUse("delete_note", {"name": "welcome", "force": True, "nested": {"k": 'v, with "quotes"'}})
TEXT = "Let me look that up for you, in two places at once."

ANTHROPIC_TOOLS: list[Any] = [
    {"name": t.name, "description": "test tool", "input_schema": {"type": "object"}} for t in (WEATHER, NOTE)
]


def _openai_tool(name: str) -> Any:
    return {
        "type": "function",
        "function": {
            "name": name,
            "strict": True,  # the stream helper only takes strict tools
            "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
        },
    }


CHAT_TOOLS = [_openai_tool(t.name) for t in (WEATHER, NOTE)]
RESPONSE_TOOLS: list[Any] = [
    {"type": "function", "name": t.name, "parameters": {"type": "object"}, "strict": False}
    for t in (WEATHER, NOTE)
]
USER: list[Any] = [{"role": "user", "content": "weather in Paris, and delete the welcome note"}]


@pytest.fixture
async def served() -> AsyncIterator[tuple[ProviderDouble, str]]:
    async with running_provider() as running:
        yield running


@pytest.fixture
def double(served: tuple[ProviderDouble, str]) -> ProviderDouble:
    return served[0]


@pytest.fixture
async def claude(served: tuple[ProviderDouble, str]) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=served[1], api_key="x", max_retries=0) as client:
        yield client


@pytest.fixture
async def gpt(served: tuple[ProviderDouble, str]) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=served[1] + "/v1", api_key="x", max_retries=0) as client:
        yield client


# --- Anthropic Messages ------------------------------------------------------------------------


async def test_anthropic_message_with_text_and_parallel_tool_uses(
    double: ProviderDouble, claude: anthropic.AsyncAnthropic
) -> None:
    double.queue(Script(text=TEXT, tools=[WEATHER, ToolUse(NOTE.name, NOTE.input, id="toolu_given")]))
    msg = await claude.messages.create(
        model="claude-test-1", max_tokens=100, messages=USER, tools=ANTHROPIC_TOOLS
    )
    assert msg.model == "claude-test-1" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert [b.type for b in msg.content] == ["text", "tool_use", "tool_use"]
    text, weather, note = msg.content
    assert text.type == "text" and text.text == TEXT
    assert weather.type == "tool_use" and note.type == "tool_use"
    assert (weather.name, weather.input) == (WEATHER.name, WEATHER.input)
    assert weather.id.startswith("toolu_") and len(weather.id) > len("toolu_")
    assert (note.id, note.name, note.input) == ("toolu_given", NOTE.name, NOTE.input)
    assert msg.stop_reason == "tool_use" and msg.stop_sequence is None
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (INPUT_TOKENS, OUTPUT_TOKENS)

    seen = double.last
    assert seen.path == "/v1/messages"
    # anthropic 2.x sends the API key as a bearer token, not as `x-api-key`
    assert seen.headers["authorization"] == "Bearer x" and "x-api-key" not in seen.headers
    assert "anthropic-version" in seen.headers
    assert seen.body["model"] == "claude-test-1" and seen.body["tools"][1]["name"] == NOTE.name


async def test_anthropic_text_only_ends_the_turn(
    double: ProviderDouble, claude: anthropic.AsyncAnthropic
) -> None:
    # nothing queued: the default answer
    msg = await claude.messages.create(model="m", max_tokens=10, messages=USER)
    assert [(b.type, getattr(b, "text", None)) for b in msg.content] == [("text", "ok")]
    assert msg.stop_reason == "end_turn"


async def test_anthropic_raw_stream_follows_the_documented_event_flow(
    double: ProviderDouble, claude: anthropic.AsyncAnthropic
) -> None:
    double.queue(Script(text=TEXT, tools=[WEATHER, NOTE]))
    stream = await claude.messages.create(
        model="claude-test-1", max_tokens=100, messages=USER, tools=ANTHROPIC_TOOLS, stream=True
    )
    events = [event async for event in stream]  # the SDK drops `ping`
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    start = events[0]
    assert (
        start.type == "message_start"
        and start.message.content == []
        and start.message.model == "claude-test-1"
    )
    per_block: dict[int, list[str]] = {}
    fragments: dict[int, list[str]] = {}
    for e in events:
        if e.type in ("content_block_start", "content_block_delta", "content_block_stop"):
            per_block.setdefault(e.index, []).append(e.type)
        if e.type == "content_block_delta" and e.delta.type == "input_json_delta":
            fragments.setdefault(e.index, []).append(e.delta.partial_json)
    assert sorted(per_block) == [0, 1, 2]
    for flow in per_block.values():
        assert flow[0] == "content_block_start" and flow[-1] == "content_block_stop"
        assert set(flow[1:-1]) == {"content_block_delta"} and len(flow) > 3  # several deltas
    assert json.loads("".join(fragments[1])) == WEATHER.input
    assert json.loads("".join(fragments[2])) == NOTE.input
    assert all(len(f) >= 3 and f[0] == "" for f in fragments.values())  # opens empty, then pieces
    delta = events[-2]
    assert isinstance(delta, anthropic.types.RawMessageDeltaEvent) and delta.delta.stop_reason == "tool_use"
    assert delta.usage.output_tokens == OUTPUT_TOKENS


async def test_anthropic_stream_helper_accumulates_the_same_message(
    double: ProviderDouble, claude: anthropic.AsyncAnthropic
) -> None:
    double.queue(Script(text=TEXT, tools=[WEATHER, NOTE]))
    texts: list[str] = []
    async with claude.messages.stream(
        model="claude-test-1", max_tokens=100, messages=USER, tools=ANTHROPIC_TOOLS
    ) as stream:
        async for text in stream.text_stream:
            texts.append(text)
        final = await stream.get_final_message()
    assert len(texts) > 1 and "".join(texts) == TEXT
    assert [b.type for b in final.content] == ["text", "tool_use", "tool_use"]
    inputs = [(b.name, b.input) for b in final.content if b.type == "tool_use"]
    assert inputs == [(WEATHER.name, WEATHER.input), (NOTE.name, NOTE.input)]
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == OUTPUT_TOKENS
    assert final.usage.input_tokens == INPUT_TOKENS
    assert double.last.body["stream"] is True


async def test_anthropic_error_shape(double: ProviderDouble, claude: anthropic.AsyncAnthropic) -> None:
    double.queue(Script(status=429, error="slow down, please"))
    with pytest.raises(anthropic.RateLimitError) as caught:
        await claude.messages.create(model="m", max_tokens=10, messages=USER)
    err = caught.value
    assert err.status_code == 429 and "slow down, please" in str(err)
    assert err.api_message == "slow down, please" and err.type == "rate_limit_error"
    assert isinstance(err.body, dict) and err.body["type"] == "error"
    assert err.request_id is not None and err.request_id == err.body["request_id"]

    double.queue(Script(status=529))
    with pytest.raises(anthropic.OverloadedError) as overloaded:
        await claude.messages.create(model="m", max_tokens=10, messages=USER, stream=True)
    assert overloaded.value.type == "overloaded_error"


async def test_anthropic_delay_times_the_client_out(
    double: ProviderDouble, claude: anthropic.AsyncAnthropic
) -> None:
    double.queue(Script(text="too late", delay_s=5))
    started = time.monotonic()
    with pytest.raises(anthropic.APITimeoutError):
        await claude.with_options(timeout=0.3).messages.create(model="m", max_tokens=10, messages=USER)
    assert time.monotonic() - started < 2
    # the abandoned answer does not hold up the next one (nor the server's shutdown)
    msg = await claude.messages.create(model="m", max_tokens=10, messages=USER)
    assert msg.content[0].type == "text" and msg.content[0].text == "ok"


async def test_chunk_delay_paces_the_stream(double: ProviderDouble, claude: anthropic.AsyncAnthropic) -> None:
    double.queue(Script(text=TEXT, chunk_delay_s=0.05))
    started = time.monotonic()
    first: float | None = None
    async with claude.messages.stream(model="m", max_tokens=10, messages=USER) as stream:
        async for _ in stream.text_stream:
            first = first or time.monotonic() - started
    total = time.monotonic() - started
    assert first is not None and total - first >= 0.1  # the later events came after pauses


async def test_raw_body_is_sent_as_is(double: ProviderDouble, claude: anthropic.AsyncAnthropic) -> None:
    double.queue(Script(raw=b'{"id": "msg_1", "type": "mess'))
    # the SDK lets the JSON decoder's error through, not one of its own
    with pytest.raises(json.JSONDecodeError):
        await claude.messages.create(model="m", max_tokens=10, messages=USER)


# --- OpenAI Chat Completions -------------------------------------------------------------------


async def test_chat_completion_with_parallel_tool_calls(
    double: ProviderDouble, gpt: openai.AsyncOpenAI
) -> None:
    double.queue(Script(text=TEXT, tools=[WEATHER, ToolUse(NOTE.name, NOTE.input, id="call_given")]))
    completion = await gpt.chat.completions.create(model="gpt-test", messages=USER, tools=CHAT_TOOLS)
    assert completion.object == "chat.completion" and completion.model == "gpt-test"
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == TEXT
    calls = choice.message.tool_calls or []
    assert [c.type for c in calls] == ["function", "function"]
    assert calls[0].id.startswith("call_") and calls[1].id == "call_given"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls if c.type == "function"] == [
        (WEATHER.name, WEATHER.input),
        (NOTE.name, NOTE.input),
    ]
    assert completion.usage is not None and completion.usage.total_tokens == INPUT_TOKENS + OUTPUT_TOKENS
    seen = double.last
    assert seen.path == "/v1/chat/completions" and seen.headers["authorization"] == "Bearer x"


async def test_chat_completion_without_tools_stops(double: ProviderDouble, gpt: openai.AsyncOpenAI) -> None:
    double.queue(Script(text="hello"))
    completion = await gpt.chat.completions.create(model="gpt-test", messages=USER)
    choice = completion.choices[0]
    assert (choice.finish_reason, choice.message.content, choice.message.tool_calls) == (
        "stop",
        "hello",
        None,
    )


async def test_chat_stream_accumulates_tool_calls_by_index(
    double: ProviderDouble, gpt: openai.AsyncOpenAI
) -> None:
    double.queue(Script(tools=[WEATHER, NOTE]))  # no text: content stays null
    stream = await gpt.chat.completions.create(
        model="gpt-test",
        messages=USER,
        tools=CHAT_TOOLS,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert all(c.model == "gpt-test" for c in chunks)
    *with_choices, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == OUTPUT_TOKENS
    assert all(c.usage is None for c in with_choices)

    first_delta = with_choices[0].choices[0].delta
    assert first_delta.role == "assistant" and first_delta.content is None
    calls: dict[int, dict[str, Any]] = {}
    finish: list[str | None] = []
    for chunk in with_choices:
        choice = chunk.choices[0]
        finish.append(choice.finish_reason)
        for tc in choice.delta.tool_calls or []:
            assert tc.function is not None
            if tc.index not in calls:  # the opening delta names the call
                assert tc.id and tc.type == "function" and tc.function.name and tc.function.arguments == ""
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
            else:  # later ones carry only argument fragments
                assert tc.id is None and tc.type is None and tc.function.name is None
            calls[tc.index]["arguments"] += tc.function.arguments or ""
    assert finish[-1] == "tool_calls" and set(finish[:-1]) == {None}
    assert sorted(calls) == [0, 1] and calls[0]["id"] != calls[1]["id"]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (WEATHER.name, WEATHER.input),
        (NOTE.name, NOTE.input),
    ]
    assert double.last.body["stream_options"] == {"include_usage": True}


async def test_chat_stream_text_without_usage(double: ProviderDouble, gpt: openai.AsyncOpenAI) -> None:
    double.queue(Script(text=TEXT))
    stream = await gpt.chat.completions.create(model="gpt-test", messages=USER, stream=True)
    chunks = [chunk async for chunk in stream]
    assert all(len(c.choices) == 1 and c.usage is None for c in chunks)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == TEXT
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_chat_stream_helper_final_completion(double: ProviderDouble, gpt: openai.AsyncOpenAI) -> None:
    double.queue(Script(text=TEXT, tools=[WEATHER, NOTE]))
    async with gpt.chat.completions.stream(
        model="gpt-test", messages=USER, tools=CHAT_TOOLS, stream_options={"include_usage": True}
    ) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_completion()
    assert "content.delta" in kinds and "tool_calls.function.arguments.done" in kinds
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == TEXT
    calls = choice.message.tool_calls or []
    assert [(c.function.name, c.function.parsed_arguments) for c in calls] == [
        (WEATHER.name, WEATHER.input),
        (NOTE.name, NOTE.input),
    ]
    assert final.usage is not None and final.usage.prompt_tokens == INPUT_TOKENS


async def test_openai_error_shape(double: ProviderDouble, gpt: openai.AsyncOpenAI) -> None:
    double.queue(Script(status=429, error="Rate limit reached"), Script(status=401, error="bad key"))
    with pytest.raises(openai.RateLimitError) as limited:
        await gpt.chat.completions.create(model="gpt-test", messages=USER)
    assert limited.value.code == "rate_limit_exceeded" and limited.value.type == "requests"
    assert limited.value.body == {
        "message": "Rate limit reached",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    with pytest.raises(openai.AuthenticationError) as denied:
        await gpt.responses.create(model="gpt-test", input="hi", stream=True)
    assert denied.value.code == "invalid_api_key" and "bad key" in str(denied.value)


# --- OpenAI Responses --------------------------------------------------------------------------


def _check_output(output: list[Any]) -> None:
    message, weather, note = output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert message.id.startswith("msg_")
    [part] = message.content
    assert part.type == "output_text" and part.text == TEXT and part.annotations == []
    for item, tool in ((weather, WEATHER), (note, NOTE)):
        assert item.type == "function_call" and item.status == "completed" and item.name == tool.name
        assert item.id.startswith("fc_") and item.call_id.startswith("call_")
        assert json.loads(item.arguments) == tool.input


async def test_response_with_message_and_function_calls(
    double: ProviderDouble, gpt: openai.AsyncOpenAI
) -> None:
    double.queue(Script(text=TEXT, tools=[WEATHER, NOTE]))
    response = await gpt.responses.create(model="gpt-test", input="hi", tools=RESPONSE_TOOLS)
    assert response.object == "response" and response.status == "completed" and response.model == "gpt-test"
    _check_output(response.output)
    assert response.output_text == TEXT
    assert response.usage is not None and response.usage.output_tokens == OUTPUT_TOKENS
    assert double.last.path == "/v1/responses" and double.last.headers["authorization"] == "Bearer x"


async def test_response_stream_events(double: ProviderDouble, gpt: openai.AsyncOpenAI) -> None:
    double.queue(Script(text=TEXT, tools=[WEATHER, ToolUse(NOTE.name, NOTE.input, id="call_given")]))
    stream = await gpt.responses.create(model="gpt-test", input="hi", tools=RESPONSE_TOOLS, stream=True)
    events = [event async for event in stream]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds: list[str] = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-1] == "response.completed"
    assert kinds.count("response.output_item.added") == kinds.count("response.output_item.done") == 3
    for kind in ("content_part.added", "output_text.done", "content_part.done"):
        assert kinds.count(f"response.{kind}") == 1
    assert kinds.count("response.function_call_arguments.done") == 2

    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    args: dict[int, str] = {}
    for e in events:
        if e.type == "response.function_call_arguments.delta":
            args[e.output_index] = args.get(e.output_index, "") + e.delta
    assert text == TEXT and kinds.count("response.output_text.delta") > 1
    assert {i: json.loads(a) for i, a in args.items()} == {1: WEATHER.input, 2: NOTE.input}
    added = {e.output_index: e.item for e in events if e.type == "response.output_item.added"}
    assert added[1].type == "function_call" and added[1].arguments == "" and added[1].status == "in_progress"
    assert added[2].type == "function_call" and added[2].call_id == "call_given"

    created, completed = events[0], events[-1]
    assert created.type == "response.created" and created.response.output == []
    assert created.response.status == "in_progress"
    assert completed.type == "response.completed" and completed.response.id == created.response.id
    _check_output(completed.response.output)
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [i.to_dict() for i in done] == [i.to_dict() for i in completed.response.output]


async def test_response_stream_helper_final_response(double: ProviderDouble, gpt: openai.AsyncOpenAI) -> None:
    double.queue(Script(text=TEXT, tools=[WEATHER, NOTE]))
    async with gpt.responses.stream(model="gpt-test", input="hi", tools=RESPONSE_TOOLS) as stream:
        snapshots = [e.snapshot async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert snapshots[-1] == TEXT and len(snapshots) > 1
    _check_output(final.output)
    assert final.output_text == TEXT and final.status == "completed"
    assert double.last.body["stream"] is True
