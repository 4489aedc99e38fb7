"""The Anthropic Messages API (`POST /v1/messages`): `tool_use` blocks in, `tool_result` blocks out.

A refused `tool_use` block becomes a text block at the same index, and `stop_reason: tool_use`
becomes `end_turn` when no tool call is left. In a stream, text passes as it arrives; a
`tool_use` block's events are held from its `content_block_start` to its `content_block_stop`,
then either released as one start, one `input_json_delta` holding the decided input, and a stop,
or replaced by a text block's three events. Blocks that run on the provider's side
(`server_tool_use`, `mcp_tool_use`, thinking) pass unchanged: they never reach the agent as a call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from gateway.errors import UpstreamError
from gateway.fronts.llm.dialect import SSE, frame, parse_event, text_slots
from gateway.fronts.llm.judge import Asked, Judge, Slot, ToolResult, Verdict, parse_arguments

_CLIENT_TOOLS = ("bash_", "text_editor_", "computer_", "memory_")
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
}


class Messages:
    """The Messages API dialect."""

    def error(self, status: int, message: str) -> dict[str, Any]:
        return {"type": "error", "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message}}

    def prepare(self, body: dict[str, Any]) -> bool:
        return False

    def tool_name(self, tool: Any) -> str | None:
        """Custom tools, and the Anthropic-defined ones the client runs (bash, text editor,
        computer, memory); server tools (web search, code execution) run at the provider."""
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            return None
        kind = tool.get("type")
        if kind in (None, "custom") or (isinstance(kind, str) and kind.startswith(_CLIENT_TOOLS)):
            return str(tool["name"])
        return None

    def stream_error(self, message: str) -> bytes:
        return frame(self.error(502, message), "error")

    def results(self, body: dict[str, Any]) -> list[ToolResult]:
        messages = body.get("messages")
        if not isinstance(messages, list):
            return []
        names: dict[str, str] = {}
        last_answer = max((i for i, m in enumerate(messages) if _role(m) == "assistant"), default=-1)
        found: list[ToolResult] = []
        for i, message in enumerate(messages):
            for block in _blocks(message):
                kind = block.get("type")
                if kind == "tool_use" and isinstance(block.get("id"), str):
                    names[block["id"]] = str(block.get("name"))
                elif kind == "tool_result":
                    call_id = block.get("tool_use_id")
                    call_id = call_id if isinstance(call_id, str) else ""
                    slots: list[Slot] = []
                    text_slots(block.get("content"), block, "content", slots, ("text",))
                    found.append(ToolResult(call_id, names.get(call_id), slots, i > last_answer))
        return found

    def texts(self, body: dict[str, Any]) -> list[Slot]:
        slots: list[Slot] = []
        text_slots(body.get("system"), body, "system", slots, ("text",))
        for message in body.get("messages") or []:
            if isinstance(message, dict):
                text_slots(message.get("content"), message, "content", slots, ("text",))
        return slots

    async def answer(self, doc: dict[str, Any], judge: Judge) -> dict[str, Any]:
        content = doc.get("content")
        if not isinstance(content, list):
            return doc
        at = [i for i, b in enumerate(content) if isinstance(b, dict) and b.get("type") == "tool_use"]
        asked = [
            Asked(content[i].get("id", ""), content[i].get("name", ""), content[i].get("input")) for i in at
        ]
        verdicts = await judge.all(asked)
        for i, verdict in zip(at, verdicts, strict=True):
            content[i] = {**content[i], "input": verdict.arguments} if verdict.released else _text(verdict)
        if doc.get("stop_reason") == "tool_use" and asked and not any(v.released for v in verdicts):
            doc["stop_reason"] = "end_turn"
        return doc

    async def relay(self, events: AsyncIterator[SSE], judge: Judge) -> AsyncIterator[bytes]:
        held: _Held | None = None
        kept = 0
        async for sse in events:
            if not sse.data:
                continue
            event = parse_event(sse.data)
            kind = event.get("type")
            if held is not None and kind not in ("ping", "error"):
                if kind == "content_block_delta" and event.get("index") == held.index:
                    delta = event.get("delta")
                    if isinstance(delta, dict) and isinstance(delta.get("partial_json"), str):
                        held.pieces.append(delta["partial_json"])
                    continue
                if kind != "content_block_stop" or event.get("index") != held.index:
                    raise UpstreamError("the provider interleaved another block with a tool_use block")
                verdict = await judge(held.asked())
                kept += verdict.released
                for out in held.release(verdict):
                    yield out
                held = None
                continue
            if kind == "content_block_start":
                block = event.get("content_block")
                if isinstance(block, dict) and block.get("type") == "tool_use":
                    held = _Held(event.get("index"), block)
                    continue
            if kind == "message_delta" and judge.asked and kept == 0:
                delta = event.get("delta")
                if isinstance(delta, dict) and delta.get("stop_reason") == "tool_use":
                    event["delta"] = {**delta, "stop_reason": "end_turn"}
                    yield frame(event, sse.event or None)
                    continue
            yield frame(sse.data, sse.event or None)
        if held is not None:
            raise UpstreamError("the provider's stream ended inside a tool_use block")


class _Held:
    """A tool_use block being streamed: its start and the pieces of its input."""

    def __init__(self, index: Any, block: dict[str, Any]) -> None:
        self.index = index
        self.block = block
        self.pieces: list[str] = []

    def asked(self) -> Asked:
        block = self.block
        if self.pieces:  # as the SDKs do: the deltas, when there are any, are the input
            arguments, malformed = parse_arguments("".join(self.pieces))
        else:
            arguments, malformed = block.get("input", {}), None
        return Asked(block.get("id", ""), block.get("name", ""), arguments, malformed)

    def release(self, verdict: Verdict) -> list[bytes]:
        index = self.index
        if verdict.released:
            start = {
                "type": "content_block_start",
                "index": index,
                "content_block": {**self.block, "input": {}},
            }
            delta = {"type": "input_json_delta", "partial_json": verdict.arguments_json}
            return [
                frame(start, "content_block_start"),
                frame({"type": "content_block_delta", "index": index, "delta": delta}, "content_block_delta"),
                frame({"type": "content_block_stop", "index": index}, "content_block_stop"),
            ]
        return [
            frame(
                {
                    "type": "content_block_start",
                    "index": index,
                    "content_block": {"type": "text", "text": ""},
                },
                "content_block_start",
            ),
            frame(
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "text_delta", "text": verdict.text},
                },
                "content_block_delta",
            ),
            frame({"type": "content_block_stop", "index": index}, "content_block_stop"),
        ]


def _text(verdict: Verdict) -> dict[str, Any]:
    return {"type": "text", "text": verdict.text}


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, dict) else None


def _blocks(message: Any) -> list[dict[str, Any]]:
    content = message.get("content") if isinstance(message, dict) else None
    return [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []
