"""OpenAI Chat Completions (`POST /v1/chat/completions`): `tool_calls` out, `role: tool` messages in.

A refused tool call is removed from `message.tool_calls` and its text appended to the message's
`content`; `finish_reason: tool_calls` becomes `stop` when no call is left (and `tool_calls` is
dropped). Released calls are renumbered so their stream indexes stay 0, 1, 2... In a stream,
content passes as it arrives; a tool call's deltas are taken out of the chunks and held until the
call is complete (the next call begins, or the choice finishes), then the call is released as one
delta holding its decided arguments, or its text is sent as content.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from gateway.errors import UpstreamError
from gateway.fronts.llm.dialect import SSE, frame, parse_event, text_slots
from gateway.fronts.llm.judge import Asked, Judge, Slot, ToolResult, Verdict, parse_arguments

TEXT_ROLES = ("system", "developer", "user", "assistant")


def openai_error(status: int, message: str) -> dict[str, Any]:
    """OpenAI's error shape; the SDKs raise the exception class of the HTTP status."""
    kind = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}.get(status)
    if kind is None:
        kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


class ChatCompletions:
    """The Chat Completions dialect."""

    def error(self, status: int, message: str) -> dict[str, Any]:
        return openai_error(status, message)

    def prepare(self, body: dict[str, Any]) -> bool:
        return False

    def tool_name(self, tool: Any) -> str | None:
        if not isinstance(tool, dict) or tool.get("type") not in ("function", "custom"):
            return None
        spec = tool.get(str(tool["type"]))
        name = spec.get("name") if isinstance(spec, dict) else None
        return name if isinstance(name, str) else None

    def stream_error(self, message: str) -> bytes:
        return frame(openai_error(502, message))

    def results(self, body: dict[str, Any]) -> list[ToolResult]:
        messages = body.get("messages")
        if not isinstance(messages, list):
            return []
        names: dict[str, str] = {}
        last_answer = max(
            (i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"),
            default=-1,
        )
        found: list[ToolResult] = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                continue
            for call in message.get("tool_calls") or []:
                if isinstance(call, dict) and isinstance(call.get("id"), str):
                    names[call["id"]] = str(_tool_of(call)[0])
            if message.get("role") == "tool":
                call_id = message.get("tool_call_id")
                call_id = call_id if isinstance(call_id, str) else ""
                slots: list[Slot] = []
                text_slots(message.get("content"), message, "content", slots, ("text",))
                found.append(ToolResult(call_id, names.get(call_id), slots, i > last_answer))
        return found

    def texts(self, body: dict[str, Any]) -> list[Slot]:
        slots: list[Slot] = []
        for message in body.get("messages") or []:
            if isinstance(message, dict) and message.get("role") in TEXT_ROLES:
                text_slots(message.get("content"), message, "content", slots, ("text",))
        return slots

    async def answer(self, doc: dict[str, Any], judge: Judge) -> dict[str, Any]:
        for choice in doc.get("choices") or []:
            message = choice.get("message") if isinstance(choice, dict) else None
            if not isinstance(message, dict):
                continue
            kept: list[dict[str, Any]] = []
            refused: list[str] = []
            asked = list(message.get("tool_calls") or [])
            if isinstance(message.get("function_call"), dict):  # the deprecated single-function form
                asked.append(
                    {"id": "", "type": "function", "function": message.pop("function_call"), "legacy": True}
                )
            asked = [call for call in asked if isinstance(call, dict)]
            verdicts = await judge.all([Asked(call.get("id", ""), *_parsed(call)) for call in asked])
            for call, verdict in zip(asked, verdicts, strict=True):
                if verdict.released and call.get("legacy"):
                    message["function_call"] = _released(call, verdict)["function"]
                elif verdict.released:
                    kept.append(_released(call, verdict))
                else:
                    refused.append(verdict.text)
            if not asked:
                continue
            if kept:
                message["tool_calls"] = kept
            else:
                message.pop("tool_calls", None)
                if "function_call" not in message and choice.get("finish_reason") in (
                    "tool_calls",
                    "function_call",
                ):
                    choice["finish_reason"] = "stop"
            if refused:
                before = message.get("content") if isinstance(message.get("content"), str) else ""
                message["content"] = "\n\n".join([t for t in (before, *refused) if t])
        return doc

    async def relay(self, events: AsyncIterator[SSE], judge: Judge) -> AsyncIterator[bytes]:
        choices: dict[Any, _Choice] = {}
        template: dict[str, Any] = {}
        async for sse in events:
            if not sse.data:
                continue
            if sse.data.strip() == "[DONE]":
                for index, state in choices.items():
                    for out in await state.settle(index, template, judge):
                        yield out
                yield frame(sse.data, sse.event or None)
                continue
            chunk = parse_event(sse.data)
            if "error" in chunk or not isinstance(chunk.get("choices"), list):
                yield frame(sse.data, sse.event or None)
                continue
            template = {k: v for k, v in chunk.items() if k not in ("choices", "usage")}
            changed = False
            before: list[bytes] = []
            for choice in chunk["choices"]:
                if not isinstance(choice, dict):
                    continue
                state = choices.setdefault(choice.get("index"), _Choice())
                delta = choice.get("delta")
                if isinstance(delta, dict):
                    if isinstance(delta.get("content"), str) and delta["content"]:
                        state.spoke = True
                    for part in delta.pop("tool_calls", None) or []:
                        changed = True
                        if isinstance(part, dict):
                            before += await state.take(part, choice.get("index"), template, judge)
                    if isinstance(delta.get("function_call"), dict):  # the deprecated form
                        changed = True
                        part = {"index": -1, "function": delta.pop("function_call"), "legacy": True}
                        before += await state.take(part, choice.get("index"), template, judge)
                if choice.get("finish_reason") is not None:
                    before += await state.settle(choice.get("index"), template, judge)
                    if choice["finish_reason"] in ("tool_calls", "function_call") and not state.kept:
                        choice["finish_reason"] = "stop"
                        changed = True
            for out in before:
                yield out
            yield frame(chunk if changed else sse.data, sse.event or None)
        if any(state.open is not None for state in choices.values()):
            raise UpstreamError("the provider's stream ended inside a tool call")


@dataclass(slots=True)
class _Choice:
    """One choice of a streamed completion: its tool call being assembled, and what was released."""

    open: dict[str, Any] | None = None
    open_index: Any = None
    kept: int = 0
    spoke: bool = False

    async def take(
        self, part: dict[str, Any], index: Any, template: dict[str, Any], judge: Judge
    ) -> list[bytes]:
        """Add a tool call delta; a delta of a new call completes (and decides) the open one."""
        out: list[bytes] = []
        if self.open is not None and part.get("index") != self.open_index:
            out = await self.settle(index, template, judge)
        if self.open is None:
            self.open, self.open_index = {}, part.get("index")
        _merge(self.open, part)
        return out

    async def settle(self, index: Any, template: dict[str, Any], judge: Judge) -> list[bytes]:
        """Decide the open call: one chunk releasing it, or one carrying its refusal as content."""
        call, self.open = self.open, None
        if call is None:
            return []
        name, arguments, malformed = _parsed(call)
        verdict = await judge(Asked(call.get("id", ""), name, arguments, malformed))
        if verdict.released and call.get("legacy"):
            self.kept += 1
            delta: dict[str, Any] = {"function_call": _released(call, verdict)["function"]}
        elif verdict.released:
            released = {"index": self.kept, **_released(call, verdict)}
            self.kept += 1
            delta = {"tool_calls": [released]}
        else:
            delta = {"content": ("\n\n" if self.spoke else "") + verdict.text}
            self.spoke = True
        choice = {"index": index, "delta": delta, "finish_reason": None, "logprobs": None}
        return [frame({**template, "choices": [choice]})]


def _merge(acc: dict[str, Any], part: dict[str, Any]) -> None:
    """Accumulate a tool call delta as the SDKs do: strings are concatenated, `index`/`type` replaced."""
    for key, value in part.items():
        if key in ("index", "type") or key not in acc or acc[key] is None:
            acc[key] = dict(value) if isinstance(value, dict) else value
        elif isinstance(acc[key], str) and isinstance(value, str):
            acc[key] += value
        elif isinstance(acc[key], dict) and isinstance(value, dict):
            _merge(acc[key], value)


def _tool_of(call: dict[str, Any]) -> tuple[Any, Any, str]:
    """(name, raw input, kind) of a function or custom tool call."""
    if call.get("type") == "custom" or "custom" in call:
        custom: dict[str, Any] = call["custom"] if isinstance(call.get("custom"), dict) else {}
        return custom.get("name", ""), custom.get("input", ""), "custom"
    function: dict[str, Any] = call["function"] if isinstance(call.get("function"), dict) else {}
    return function.get("name", ""), function.get("arguments", ""), "function"


def _parsed(call: dict[str, Any]) -> tuple[Any, Any, str | None]:
    """A call's name and arguments: a function's JSON text parsed, a custom tool's text as `{input}`."""
    name, raw, kind = _tool_of(call)
    if kind == "custom":
        return (name, {"input": raw}, None) if isinstance(raw, str) else (name, None, "the input is not text")
    arguments, malformed = parse_arguments(raw)
    return name, arguments, malformed


def _released(call: dict[str, Any], verdict: Verdict) -> dict[str, Any]:
    """The call as released: its decided arguments, re-serialised."""
    name, _, kind = _tool_of(call)
    out = {k: v for k, v in call.items() if k not in ("index", "function", "custom", "legacy")}
    out.setdefault("type", kind)
    if kind == "custom":
        out["custom"] = {"name": name, "input": str(verdict.arguments.get("input", ""))}
    else:
        out["function"] = {"name": name, "arguments": verdict.arguments_json}
    return out
