"""The OpenAI Responses API (`POST /v1/responses`): call items out, `*_output` items in.

Output items the agent executes are governed: `function_call` (its `arguments`), `custom_tool_call`
(`{"input": ...}`), and the built-in client-side tools `computer_call`, `local_shell_call`,
`shell_call` and `apply_patch_call` (tool `computer`, `local_shell`, ...; arguments their
`action` / `operation`). A refused item is replaced, at the same `output_index`, by an assistant
`message` item carrying the refusal. Items the provider runs itself (web or file search, code
interpreter, MCP calls made by the provider) pass unchanged.

In a stream, every event of a governed item is held from `response.output_item.added` to
`response.output_item.done`, then released as an added event, one arguments delta, and the done
events, or replaced by a message item's events. Events are renumbered (`sequence_number`) as they
are emitted, and the final `response.completed` carries the same items the events did.

A response stored by the provider (`previous_response_id`) still holds the refused calls, and the
provider refuses a follow-up that does not answer them: Bastion remembers, per response id, the
calls it refused (`REMEMBERED` responses, in this process) and adds their refusals as outputs to
the follow-up's input.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from gateway.errors import UpstreamError
from gateway.fronts.llm.dialect import SSE, frame, parse_event, text_slots
from gateway.fronts.llm.judge import Asked, Judge, Slot, ToolResult, Verdict, parse_arguments
from gateway.fronts.llm.openai_chat import openai_error

CLIENT_SIDE = {
    "function_call": "arguments",
    "custom_tool_call": "input",
    "computer_call": "action",
    "local_shell_call": "action",
    "shell_call": "action",
    "apply_patch_call": "operation",
}
"""Output item types the agent executes, and the field holding what the tool is asked to do."""
_BUILT_IN = {
    "computer_use_preview": "computer",
    "computer": "computer",
    "local_shell": "local_shell",
    "shell": "shell",
    "apply_patch": "apply_patch",
}
"""Client-side built-in tools as declared, and the tool name their calls are governed under."""
OUTPUTS = ("function_call_output", "custom_tool_call_output")
ANSWERS = ("message", "reasoning", *CLIENT_SIDE)
REMEMBERED = 10_000
_ENDS = ("response.completed", "response.incomplete", "response.failed")


class Responses:
    """The Responses API dialect."""

    def __init__(self) -> None:
        self._refused: OrderedDict[str, list[tuple[str, str]]] = OrderedDict()

    def error(self, status: int, message: str) -> dict[str, Any]:
        return openai_error(status, message)

    def stream_error(self, message: str) -> bytes:
        error = openai_error(502, message)["error"]
        return frame(
            {"type": "error", "code": "bastion_error", "message": message, "param": None, "error": error},
            "error",
        )

    def prepare(self, body: dict[str, Any]) -> bool:
        """Answer the refused calls of a stored response this request follows (module docstring)."""
        previous = body.get("previous_response_id")
        refused = self._refused.get(previous) if isinstance(previous, str) else None
        if not refused:
            return False
        items = body.get("input")
        if isinstance(items, str):
            items = [{"role": "user", "content": items}]
        if not isinstance(items, list):
            return False
        answered = {i.get("call_id") for i in items if isinstance(i, dict) and i.get("type") in OUTPUTS}
        answers = [
            {"type": "function_call_output", "call_id": call_id, "output": text}
            for call_id, text in refused
            if call_id not in answered
        ]
        body["input"] = answers + items
        return bool(answers)

    def tool_name(self, tool: Any) -> str | None:
        if not isinstance(tool, dict):
            return None
        kind = tool.get("type")
        if kind in ("function", "custom"):
            return tool["name"] if isinstance(tool.get("name"), str) else None
        return _BUILT_IN.get(kind) if isinstance(kind, str) else None

    def results(self, body: dict[str, Any]) -> list[ToolResult]:
        items = body.get("input")
        if not isinstance(items, list):
            return []
        names: dict[str, str] = {}
        last_answer = max((i for i, item in enumerate(items) if _answer(item)), default=-1)
        found: list[ToolResult] = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                continue
            if item.get("type") in CLIENT_SIDE and isinstance(item.get("call_id"), str):
                names[item["call_id"]] = str(item.get("name") or _tool_name(item))
            elif item.get("type") in OUTPUTS:
                call_id = item["call_id"] if isinstance(item.get("call_id"), str) else ""
                slots: list[Slot] = []
                text_slots(item.get("output"), item, "output", slots, ("input_text", "output_text"))
                found.append(ToolResult(call_id, names.get(call_id), slots, i > last_answer))
        return found

    def texts(self, body: dict[str, Any]) -> list[Slot]:
        slots: list[Slot] = []
        text_slots(body.get("instructions"), body, "instructions", slots, ())
        items = body.get("input")
        if isinstance(items, str):
            slots.append(Slot(body, "input"))
        elif isinstance(items, list):
            for item in items:
                if isinstance(item, dict) and item.get("type", "message") == "message":
                    text_slots(item.get("content"), item, "content", slots, ("input_text", "output_text"))
        return slots

    async def answer(self, doc: dict[str, Any], judge: Judge) -> dict[str, Any]:
        output = doc.get("output")
        if not isinstance(output, list):
            return doc
        refused: list[tuple[str, str]] = []
        at = [
            i for i, item in enumerate(output) if isinstance(item, dict) and item.get("type") in CLIENT_SIDE
        ]
        verdicts = await judge.all([_asked(output[i]) for i in at])
        for i, verdict in zip(at, verdicts, strict=True):
            item = output[i]
            output[i] = _released(item, verdict) if verdict.released else _message(verdict.text)
            if not verdict.released and isinstance(item.get("call_id"), str):
                refused.append((item["call_id"], verdict.text))
        self._remember(doc.get("id"), refused)
        return doc

    async def relay(self, events: AsyncIterator[SSE], judge: Judge) -> AsyncIterator[bytes]:
        seq = -1
        held: list[dict[str, Any]] = []
        held_index: Any = None
        final: dict[Any, dict[str, Any]] = {}
        refused: list[tuple[str, str]] = []

        def emit(event: dict[str, Any]) -> bytes:
            nonlocal seq
            if seq < 0:
                first = event.get("sequence_number")
                seq = first if isinstance(first, int) and first >= 0 else 0
            event["sequence_number"] = seq
            seq += 1
            return frame(event, str(event.get("type", "")) or None)

        async for sse in events:
            if not sse.data:
                continue
            event = parse_event(sse.data)
            kind = event.get("type")
            index = event.get("output_index")
            if held:
                if index != held_index:
                    raise UpstreamError("the provider interleaved another output item with a tool call")
                held.append(event)
                if kind != "response.output_item.done":
                    continue
                item = event.get("item")
                if not isinstance(item, dict):
                    raise UpstreamError("the provider streamed a tool call without its item")
                verdict = await judge(_asked(item))
                if not verdict.released and isinstance(item.get("call_id"), str):
                    refused.append((item["call_id"], verdict.text))
                replaced = _released(item, verdict) if verdict.released else _message(verdict.text)
                final[held_index] = replaced
                for out in _item_events(held[0], replaced):
                    yield emit(out)
                held = []
                continue
            if kind == "response.output_item.added":
                item = event.get("item")
                if isinstance(item, dict) and item.get("type") in CLIENT_SIDE:
                    held, held_index = [event], index
                    continue
            if kind in _ENDS and isinstance(event.get("response"), dict):
                response = event["response"]
                output = response.get("output")
                if isinstance(output, list):
                    for i, item in enumerate(output):
                        if i not in final and isinstance(item, dict) and item.get("type") in CLIENT_SIDE:
                            # never streamed as an item: refused (and recorded), not released unseen
                            asked = _asked(item)
                            asked.malformed = "the call came only in the final response, never streamed"
                            final[i] = _message((await judge(asked)).text)
                    response["output"] = [final.get(i, item) for i, item in enumerate(output)]
                self._remember(response.get("id"), refused)
            yield emit(event)
        if held:
            raise UpstreamError("the provider's stream ended inside a tool call")

    def _remember(self, response_id: Any, refused: list[tuple[str, str]]) -> None:
        if refused and isinstance(response_id, str):
            self._refused[response_id] = refused
            if len(self._refused) > REMEMBERED:
                self._refused.popitem(last=False)


def _answer(item: Any) -> bool:
    """An item the model produced (as opposed to the caller's input)."""
    if not isinstance(item, dict):
        return False
    if item.get("type", "message") == "message":
        return item.get("role") == "assistant"
    return item.get("type") in ANSWERS


def _tool_name(item: dict[str, Any]) -> str:
    kind = str(item.get("type"))
    return kind.removesuffix("_call")


def _asked(item: dict[str, Any]) -> Asked:
    kind = item.get("type")
    call_id = item.get("call_id") if isinstance(item.get("call_id"), str) else item.get("id", "")
    if kind == "function_call":
        arguments, malformed = parse_arguments(item.get("arguments"))
        return Asked(call_id, item.get("name", ""), arguments, malformed)
    if kind == "custom_tool_call":
        raw = item.get("input")
        return Asked(
            call_id, item.get("name", ""), {"input": raw}, None if isinstance(raw, str) else "no input text"
        )
    field = CLIENT_SIDE[str(kind)]
    return Asked(call_id, _tool_name(item), {field: item.get(field)})


def _released(item: dict[str, Any], verdict: Verdict) -> dict[str, Any]:
    kind = item.get("type")
    if kind == "function_call":
        return {**item, "arguments": verdict.arguments_json}
    if kind == "custom_tool_call":
        return {**item, "input": str(verdict.arguments.get("input", ""))}
    field = CLIENT_SIDE[str(kind)]
    return {**item, field: verdict.arguments.get(field)}


def _message(text: str) -> dict[str, Any]:
    return {
        "id": f"msg_bastion_{secrets.token_hex(12)}",
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def _item_events(added: dict[str, Any], item: dict[str, Any]) -> list[dict[str, Any]]:
    """The events of one output item as released: a governed call, or the message replacing it."""
    index = added.get("output_index")
    kind = item.get("type")
    if kind == "message":
        text = item["content"][0]["text"]
        part = {"type": "output_text", "text": "", "annotations": []}
        ids = {"item_id": item["id"], "output_index": index, "content_index": 0}
        return [
            {
                "type": "response.output_item.added",
                "output_index": index,
                "item": {**item, "status": "in_progress", "content": []},
            },
            {"type": "response.content_part.added", **ids, "part": part},
            {"type": "response.output_text.delta", **ids, "delta": text, "logprobs": []},
            {"type": "response.output_text.done", **ids, "text": text, "logprobs": []},
            {"type": "response.content_part.done", **ids, "part": {**part, "text": text}},
            {"type": "response.output_item.done", "output_index": index, "item": item},
        ]
    events: list[dict[str, Any]] = []
    ids = {"item_id": item.get("id"), "output_index": index}
    if kind == "function_call":
        start = {**item, "arguments": "", "status": "in_progress"}
        events = [
            {"type": "response.output_item.added", "output_index": index, "item": start},
            {"type": "response.function_call_arguments.delta", **ids, "delta": item["arguments"]},
            {"type": "response.function_call_arguments.done", **ids, "arguments": item["arguments"]},
        ]
    elif kind == "custom_tool_call":
        start = {**item, "input": "", "status": "in_progress"}
        events = [
            {"type": "response.output_item.added", "output_index": index, "item": start},
            {"type": "response.custom_tool_call_input.delta", **ids, "delta": item["input"]},
            {"type": "response.custom_tool_call_input.done", **ids, "input": item["input"]},
        ]
    else:
        events = [{"type": "response.output_item.added", "output_index": index, "item": item}]
    return [*events, {"type": "response.output_item.done", "output_index": index, "item": item}]
