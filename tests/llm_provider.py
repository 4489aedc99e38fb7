"""A local stand-in for the model providers: Anthropic Messages, OpenAI Chat Completions and Responses.

Tests of the LLM front need a provider that answers exactly like the real one, so the official
`anthropic` and `openai` SDKs (and Bastion, which must pass their answers through) parse it
unchanged, yet lets the test script what the "model" says: text, parallel tool calls, an error,
a slow or malformed answer. `ProviderDouble` serves all three APIs on one Starlette app:

- `POST /v1/messages` (Anthropic): a `message` object, or with `"stream": true` the documented
  event flow `message_start`, per block `content_block_start` / `content_block_delta`
  (`text_delta`, `input_json_delta`) / `content_block_stop` (a `ping` after the first start),
  `message_delta` (stop reason and usage), `message_stop`; every event with its `event:` line.
- `POST /v1/chat/completions` (OpenAI): a `chat.completion`, or `chat.completion.chunk`s as bare
  `data:` lines (a tool call's first delta carries index, id, type, name and `arguments: ""`,
  later ones only index and argument fragments), a usage chunk with empty `choices` when
  `stream_options.include_usage`, then `data: [DONE]`.
- `POST /v1/responses` (OpenAI): a `response` whose output is a `message` item (if there is text)
  then one `function_call` item per tool, or the semantic events from `response.created` to
  `response.completed`, each with `event:` line and `sequence_number` (no `[DONE]`).

Text and tool arguments are streamed in several pieces so a client must accumulate them. Errors
use each provider's body shape. No credential is checked; every request's headers are recorded
(`requests`) so a test can see which credential reached the provider.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import string
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

INPUT_TOKENS = 25
"""The prompt size every answer reports (`input_tokens` / `prompt_tokens`)."""

OUTPUT_TOKENS = 12
"""The completion size every answer reports (`output_tokens` / `completion_tokens`)."""

PIECES = 3
"""Into how many deltas text and tool arguments are split when streamed."""

SSE = "text/event-stream"

MODEL_TOOL_POLICIES = """@id("developers-use-model-tools")
@reason("developers may use the model's tools")
permit (principal in Group::"developers", action == Action::"call_tool", resource in Upstream::"llm");

@id("no-file-deletion")
@reason("the model may not delete files")
forbid (principal, action == Action::"call_tool", resource == Tool::"llm/delete_file");

@id("big-refunds-need-approval")
@reason("refunds above 100 need a human")
@obligation("approval")
permit (principal in Group::"developers", action == Action::"call_tool", resource == Tool::"llm/refund")
when { context.args has amount && context.args.amount > 100 };

@id("no-email-after-injection")
@reason("no e-mail from a conversation that read a prompt injection")
forbid (principal, action == Action::"call_tool", resource == Tool::"llm/send_email")
when { context.session.tainted };
"""
"""Cedar policies for the model's tools (`Tool::"llm/<name>"`) that the tests and `bench.llm` put
beside the repo's own: developers may call any; `delete_file` is forbidden; `refund` above 100 needs
a human; `send_email` is forbidden once the conversation is tainted."""

Json = dict[str, Any]


@dataclass
class ToolUse:
    """One tool call the "model" makes."""

    name: str
    input: dict[str, Any]
    id: str | None = None
    """Default: a fresh "toolu_..." (Anthropic) or "call_..." (OpenAI) id."""


@dataclass
class Script:
    """What the "model" answers to the next request."""

    text: str = ""
    """Assistant text, before the tool calls; "" means no text block / message item."""
    tools: list[ToolUse] = field(default_factory=list)
    """Several are parallel tool calls."""
    status: int = 200
    """Not 200: answer an error in the provider's shape (before any stream starts, as real ones do)."""
    error: str = ""
    """The error message when `status` is not 200 (default: the status's reason phrase)."""
    delay_s: float = 0.0
    """Wait this long before answering anything (for timeout tests)."""
    raw: bytes | None = None
    """Send these bytes as the body instead, with `status` (for malformed answers)."""
    chunk_delay_s: float = 0.0
    """Pause between streamed events (to measure time to first token)."""


@dataclass
class Received:
    """One request as the provider saw it."""

    path: str
    headers: dict[str, str]
    """Lower-cased names."""
    body: dict[str, Any]


_BASE62 = string.ascii_letters + string.digits


def _id(prefix: str, length: int = 24) -> str:
    return prefix + "".join(secrets.choice(_BASE62) for _ in range(length))


def _pieces(text: str, n: int = PIECES) -> list[str]:
    """`text` in up to `n` non-empty consecutive pieces (none for "")."""
    size = max(1, math.ceil(len(text) / n))
    return [text[i : i + size] for i in range(0, len(text), size)]


def _sse(data: Json, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _reason(status: int, message: str) -> str:
    if message:
        return message
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "error"


# --- Anthropic Messages ------------------------------------------------------------------------

_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def _anthropic_usage(output_tokens: int) -> Json:
    return {
        "input_tokens": INPUT_TOKENS,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output_tokens,
    }


def anthropic_message(script: Script, model: str, tool_ids: list[str], message_id: str) -> Json:
    """The non-streaming Messages answer: a text block (if text), then one `tool_use` block per tool."""
    content: list[Json] = [{"type": "text", "text": script.text}] if script.text else []
    content += [
        {"type": "tool_use", "id": tid, "name": t.name, "input": t.input}
        for t, tid in zip(script.tools, tool_ids, strict=True)
    ]
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": "tool_use" if script.tools else "end_turn",
        "stop_sequence": None,
        "usage": _anthropic_usage(OUTPUT_TOKENS),
    }


def anthropic_events(script: Script, model: str, tool_ids: list[str], message_id: str) -> list[bytes]:
    """The Messages event stream for the same answer as `anthropic_message`."""
    final = anthropic_message(script, model, tool_ids, message_id)
    start = {**final, "content": [], "stop_reason": None, "usage": _anthropic_usage(1)}
    frames = [_sse({"type": "message_start", "message": start}, "message_start")]

    def block(index: int, empty: Json, deltas: list[Json]) -> None:
        frames.append(
            _sse(
                {"type": "content_block_start", "index": index, "content_block": empty}, "content_block_start"
            )
        )
        if index == 0:
            frames.append(_sse({"type": "ping"}, "ping"))
        frames.extend(
            _sse({"type": "content_block_delta", "index": index, "delta": d}, "content_block_delta")
            for d in deltas
        )
        frames.append(_sse({"type": "content_block_stop", "index": index}, "content_block_stop"))

    for index, item in enumerate(final["content"]):
        if item["type"] == "text":
            block(
                index,
                {"type": "text", "text": ""},
                [{"type": "text_delta", "text": p} for p in _pieces(item["text"])],
            )
        else:
            args = ["", *_pieces(json.dumps(item["input"]))]  # the API opens with an empty fragment
            block(
                index,
                {**item, "input": {}},
                [{"type": "input_json_delta", "partial_json": p} for p in args],
            )
    if not final["content"]:
        frames.append(_sse({"type": "ping"}, "ping"))
    delta = {"stop_reason": final["stop_reason"], "stop_sequence": None}
    frames.append(
        _sse(
            {"type": "message_delta", "delta": delta, "usage": {"output_tokens": OUTPUT_TOKENS}},
            "message_delta",
        )
    )
    frames.append(_sse({"type": "message_stop"}, "message_stop"))
    return frames


def anthropic_error(status: int, message: str) -> Json:
    kind = _ANTHROPIC_ERRORS.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": _reason(status, message)}, "request_id": None}


# --- OpenAI Chat Completions -------------------------------------------------------------------

_OPENAI_ERRORS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}


def _chat_usage() -> Json:
    return {
        "prompt_tokens": INPUT_TOKENS,
        "completion_tokens": OUTPUT_TOKENS,
        "total_tokens": INPUT_TOKENS + OUTPUT_TOKENS,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _chat_head(completion_id: str, model: str, obj: str) -> Json:
    return {
        "id": completion_id,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "service_tier": "default",
        "system_fingerprint": None,
    }


def _args(tool: ToolUse) -> str:
    return json.dumps(tool.input, separators=(",", ":"))


def chat_completion(script: Script, model: str, call_ids: list[str], completion_id: str) -> Json:
    """The non-streaming `chat.completion`: content (null without text) and `tool_calls`."""
    message: Json = {"role": "assistant", "content": script.text or None, "refusal": None, "annotations": []}
    if script.tools:
        message["tool_calls"] = [
            {"id": cid, "type": "function", "function": {"name": t.name, "arguments": _args(t)}}
            for t, cid in zip(script.tools, call_ids, strict=True)
        ]
    choice = {
        "index": 0,
        "message": message,
        "logprobs": None,
        "finish_reason": "tool_calls" if script.tools else "stop",
    }
    return {
        **_chat_head(completion_id, model, "chat.completion"),
        "choices": [choice],
        "usage": _chat_usage(),
    }


def chat_chunks(
    script: Script, model: str, call_ids: list[str], completion_id: str, include_usage: bool
) -> list[bytes]:
    """The `chat.completion.chunk` stream for the same answer, ending in `data: [DONE]`."""
    head = _chat_head(completion_id, model, "chat.completion.chunk")
    opening: Json = {"role": "assistant", "content": "" if script.text else None, "refusal": None}
    deltas: list[Json] = []
    if script.text:
        deltas = [opening, *({"content": p} for p in _pieces(script.text))]
    for index, (tool, cid) in enumerate(zip(script.tools, call_ids, strict=True)):
        first = {
            "index": index,
            "id": cid,
            "type": "function",
            "function": {"name": tool.name, "arguments": ""},
        }
        # without text, the first tool call's delta is also the one that names the role
        deltas.append({**opening, "tool_calls": [first]} if not deltas else {"tool_calls": [first]})
        deltas += [
            {"tool_calls": [{"index": index, "function": {"arguments": p}}]} for p in _pieces(_args(tool))
        ]
    if not deltas:
        deltas = [{**opening, "content": ""}]
    finish = "tool_calls" if script.tools else "stop"
    choices: list[tuple[Json, str | None]] = [(d, None) for d in deltas] + [({}, finish)]
    usage: Json = {"usage": None} if include_usage else {}
    frames = [
        _sse({**head, "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": f}], **usage})
        for d, f in choices
    ]
    if include_usage:
        frames.append(_sse({**head, "choices": [], "usage": _chat_usage()}))
    frames.append(b"data: [DONE]\n\n")
    return frames


def openai_error(status: int, message: str) -> Json:
    kind, code = _OPENAI_ERRORS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None)
    )
    return {"error": {"message": _reason(status, message), "type": kind, "param": None, "code": code}}


# --- OpenAI Responses --------------------------------------------------------------------------


@dataclass
class _ResponseIds:
    response: str
    message: str
    items: list[str]  # "fc_..." per tool
    calls: list[str]  # "call_..." per tool


def _output_text(text: str) -> Json:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def _response_items(script: Script, ids: _ResponseIds, status: str) -> list[Json]:
    done = status == "completed"
    items: list[Json] = []
    if script.text:
        items.append(
            {
                "id": ids.message,
                "type": "message",
                "status": status,
                "content": [_output_text(script.text)] if done else [],
                "role": "assistant",
            }
        )
    items += [
        {
            "id": item_id,
            "type": "function_call",
            "status": status,
            "arguments": _args(t) if done else "",
            "call_id": call_id,
            "name": t.name,
        }
        for t, item_id, call_id in zip(script.tools, ids.items, ids.calls, strict=True)
    ]
    return items


def response_object(
    script: Script, model: str, body: Json, ids: _ResponseIds, created: int, done: bool
) -> Json:
    """The `response` object: finished (with output and usage) or just created (`in_progress`)."""
    return {
        "id": ids.response,
        "object": "response",
        "created_at": created,
        "status": "completed" if done else "in_progress",
        "background": False,
        "completed_at": int(time.time()) if done else None,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": None,
        "model": model,
        "output": _response_items(script, ids, "completed") if done else [],
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools", []),
        "top_logprobs": 0,
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": {
            "input_tokens": INPUT_TOKENS,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": OUTPUT_TOKENS,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": INPUT_TOKENS + OUTPUT_TOKENS,
        }
        if done
        else None,
        "user": None,
        "metadata": body.get("metadata", {}),
    }


def response_events(script: Script, model: str, body: Json, ids: _ResponseIds, created: int) -> list[bytes]:
    """The Responses event stream for the same answer, `response.created` to `response.completed`."""
    frames: list[bytes] = []

    def emit(kind: str, **data: Any) -> None:
        frames.append(_sse({"type": kind, "sequence_number": len(frames), **data}, kind))

    pending = response_object(script, model, body, ids, created, done=False)
    emit("response.created", response=pending)
    emit("response.in_progress", response=pending)
    opened = _response_items(script, ids, "in_progress")
    finished = _response_items(script, ids, "completed")
    for index, (item, final) in enumerate(zip(opened, finished, strict=True)):
        emit("response.output_item.added", output_index=index, item=item)
        where = {"item_id": item["id"], "output_index": index}
        if item["type"] == "message":
            emit("response.content_part.added", **where, content_index=0, part=_output_text(""))
            for piece in _pieces(script.text):
                emit("response.output_text.delta", **where, content_index=0, delta=piece, logprobs=[])
            emit("response.output_text.done", **where, content_index=0, text=script.text, logprobs=[])
            emit("response.content_part.done", **where, content_index=0, part=_output_text(script.text))
        else:
            for piece in _pieces(final["arguments"]):
                emit("response.function_call_arguments.delta", **where, delta=piece)
            emit("response.function_call_arguments.done", **where, arguments=final["arguments"])
        emit("response.output_item.done", output_index=index, item=final)
    emit("response.completed", response=response_object(script, model, body, ids, created, done=True))
    return frames


# --- the server --------------------------------------------------------------------------------


class ProviderDouble:
    """Answers each request with the next queued `Script` (or `Script(text="ok")`), recording it."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self._scripts: deque[Script] = deque()
        self.app = Starlette(
            routes=[
                Route("/v1/messages", self._messages, methods=["POST"]),
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/responses", self._responses, methods=["POST"]),
            ]
        )

    def queue(self, *scripts: Script) -> None:
        """Answer the next requests with these, in order."""
        self._scripts.extend(scripts)

    def clear(self) -> None:
        """Forget scripts a previous test queued but never had answered (its call was refused)."""
        self._scripts.clear()

    @property
    def last(self) -> Received:
        """The most recent request."""
        return self.requests[-1]

    async def _take(self, request: Request) -> tuple[Json | None, Script]:
        """Record the request, wait the script's delay; the body is None when it is not a JSON object."""
        raw = await request.body()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        body = parsed if isinstance(parsed, dict) else None
        self.requests.append(Received(request.url.path, dict(request.headers), body or {}))
        if body is None:  # answered with a 400 by `_special`; the queued scripts are for model turns
            return None, Script()
        script = self._scripts.popleft() if self._scripts else Script(text="ok")
        deadline = time.monotonic() + script.delay_s
        # a client that gave up (a timeout test) ends the wait, so the server can stop promptly
        while (left := deadline - time.monotonic()) > 0 and not await request.is_disconnected():
            await asyncio.sleep(min(left, 0.05))
        return body, script

    def _special(
        self, body: Json | None, script: Script, error: Callable[[int, str], Json], headers: dict[str, str]
    ) -> Response | None:
        """The answer when it is not a model turn: raw bytes, a scripted error, or an unreadable body."""
        if script.raw is not None:
            stream = body is not None and body.get("stream") is True
            return Response(script.raw, script.status, headers, SSE if stream else "application/json")
        if body is None:
            return JSONResponse(error(400, "the request body must be a JSON object"), 400, headers)
        if script.status != 200:
            return JSONResponse(error(script.status, script.error), script.status, headers)
        return None

    def _stream(self, frames: list[bytes], script: Script, headers: dict[str, str]) -> StreamingResponse:
        async def paced() -> AsyncIterator[bytes]:
            for i, frame in enumerate(frames):
                if i and script.chunk_delay_s:
                    await asyncio.sleep(script.chunk_delay_s)
                yield frame

        return StreamingResponse(paced(), headers={**headers, "cache-control": "no-cache"}, media_type=SSE)

    async def _messages(self, request: Request) -> Response:
        body, script = await self._take(request)
        request_id = _id("req_011C", 20)
        headers = {"request-id": request_id}

        def error(status: int, message: str) -> Json:
            return {**anthropic_error(status, message), "request_id": request_id}

        if (special := self._special(body, script, error, headers)) is not None:
            return special
        assert body is not None
        model, message_id = str(body.get("model", "")), _id("msg_01", 22)
        tool_ids = [t.id or _id("toolu_01", 22) for t in script.tools]
        if body.get("stream") is True:
            return self._stream(anthropic_events(script, model, tool_ids, message_id), script, headers)
        return JSONResponse(anthropic_message(script, model, tool_ids, message_id), headers=headers)

    async def _chat(self, request: Request) -> Response:
        body, script = await self._take(request)
        headers = {"x-request-id": _id("req_", 32)}
        if (special := self._special(body, script, openai_error, headers)) is not None:
            return special
        assert body is not None
        model, completion_id = str(body.get("model", "")), _id("chatcmpl-", 29)
        call_ids = [t.id or _id("call_") for t in script.tools]
        if body.get("stream") is True:
            options = body.get("stream_options") or {}
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            return self._stream(
                chat_chunks(script, model, call_ids, completion_id, include_usage), script, headers
            )
        return JSONResponse(chat_completion(script, model, call_ids, completion_id), headers=headers)

    async def _responses(self, request: Request) -> Response:
        body, script = await self._take(request)
        headers = {"x-request-id": _id("req_", 32)}
        if (special := self._special(body, script, openai_error, headers)) is not None:
            return special
        assert body is not None
        ids = _ResponseIds(
            response="resp_" + secrets.token_hex(24),
            message="msg_" + secrets.token_hex(24),
            items=["fc_" + secrets.token_hex(24) for _ in script.tools],
            calls=[t.id or _id("call_") for t in script.tools],
        )
        model, created = str(body.get("model", "")), int(time.time())
        if body.get("stream") is True:
            return self._stream(response_events(script, model, body, ids, created), script, headers)
        return JSONResponse(response_object(script, model, body, ids, created, done=True), headers=headers)


@asynccontextmanager
async def running_provider() -> AsyncIterator[tuple[ProviderDouble, str]]:
    """Serve a fresh `ProviderDouble` with uvicorn on a free loopback port; yields it and its base URL
    (`http://127.0.0.1:PORT`: the Anthropic SDK's `base_url`; the OpenAI SDK's needs `/v1` added)."""
    # imported here: the benchmark serves the double in a process of its own (`bench.llm_provider`),
    # which then starts in a fraction of a second instead of importing all of Bastion
    from gateway.app import bind, server_for

    double = ProviderDouble()
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = server_for(double.app, sock)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                await task
            await asyncio.sleep(0.01)
        yield double, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()
