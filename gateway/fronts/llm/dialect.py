"""What every model API dialect provides to the LLM front, and the bits they share."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Protocol

from gateway.errors import UpstreamError
from gateway.fronts.jsonrpc import parse_json
from gateway.fronts.llm.judge import Judge, Slot, ToolResult

MAX_EVENT_DEPTH = 64


class SSE(Protocol):
    """A server-sent event as httpx-sse decodes it."""

    @property
    def event(self) -> str: ...
    @property
    def data(self) -> str: ...


class Dialect(Protocol):
    """One model API: where its tool calls and tool results are, how its errors look."""

    def error(self, status: int, message: str) -> dict[str, Any]:
        """An error body in this API's own shape, so the SDKs raise it with its message."""
        ...

    def prepare(self, body: dict[str, Any]) -> bool:
        """Complete a request before anything else reads it (the Responses API's stored calls);
        whether it changed."""
        ...

    def results(self, body: dict[str, Any]) -> list[ToolResult]:
        """The tool results in a request, going to the model."""
        ...

    def tool_name(self, tool: Any) -> str | None:
        """The name of a tool the caller declares in `tools`, when it is one the agent runs
        (None: a provider-side tool, or not one this dialect reads)."""
        ...

    def texts(self, body: dict[str, Any]) -> list[Slot]:
        """The conversation's text in a request (for `llm.redact_prompts`)."""
        ...

    async def answer(self, doc: dict[str, Any], judge: Judge) -> dict[str, Any]:
        """A whole answer with every tool call decided: released as decided, or replaced."""
        ...

    def relay(self, events: AsyncIterator[SSE], judge: Judge) -> AsyncIterator[bytes]:
        """A streamed answer, passed on as it arrives except each tool call, held until decided."""
        ...

    def stream_error(self, message: str) -> bytes:
        """The event that ends a stream Bastion could not finish, in the shape the SDKs raise."""
        ...


def frame(data: dict[str, Any] | str, event: str | None = None) -> bytes:
    """One SSE frame."""
    text = data if isinstance(data, str) else dumps(data)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {text}\n\n".encode()


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def parse_event(data: str) -> dict[str, Any]:
    """A streamed event's JSON, read as strictly as a request (no duplicate keys, bounded depth):
    what Bastion decides on is what every client parses."""
    try:
        value = parse_json(data.encode("utf-8", "surrogatepass"), MAX_EVENT_DEPTH)
    except Exception as exc:
        raise UpstreamError(
            f"the provider streamed an event that is not valid JSON ({str(exc)[:100]})"
        ) from None
    if not isinstance(value, dict):
        raise UpstreamError("the provider streamed an event that is not a JSON object")
    return value


def text_slots(content: Any, holder: Any, key: Any, out: list[Slot], kinds: tuple[str, ...]) -> None:
    """Slots for a message content that is a string, or a list of blocks with `text` of `kinds`."""
    if isinstance(content, str):
        out.append(Slot(holder, key))
    elif isinstance(content, list):
        for block in content:
            if isinstance(block, dict) and block.get("type") in kinds and isinstance(block.get("text"), str):
                out.append(Slot(block, "text"))
