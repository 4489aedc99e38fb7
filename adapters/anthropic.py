"""Anthropic Messages API `tool_use` blocks executed through Bastion (`pip install 'bastion[anthropic]'`).

    response = anthropic_client.messages.create(..., tools=tool_params(specs))
    results = tool_results(response, bastion, upstream="notes")
    messages += [{"role": "assistant", "content": response.content}, {"role": "user", "content": results}]

Each `tool_use` block becomes one `/v1/tool-calls` request whose `call_id` is the block's id, and
one `tool_result` block. A refusal (denied, over budget, approval needed, the tool server failed)
is a `tool_result` with `is_error: true` and the reason as its text, which the model reads and
can act on; the tool did not run. A bad credential or an unreachable Bastion is raised.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Mapping, Sequence
from importlib.metadata import version
from typing import Any

from anthropic.types import ToolParam, ToolResultBlockParam

from adapters.client import (
    AsyncBastionClient,
    BastionClient,
    ToolDenied,
    ToolResult,
    ToolSpec,
    UpstreamFailed,
)

__all__ = ["CLIENT_INFO", "atool_results", "tool_params", "tool_results"]

CLIENT_INFO = f"anthropic/{version('anthropic')}"
"""What the audit record names as the client of calls made here."""

Routing = str | Mapping[str, str]
"""One upstream for every tool, or tool name -> upstream."""


def tool_params(specs: Iterable[ToolSpec]) -> list[ToolParam]:
    """Tool definitions for `messages.create(tools=...)`, from `client.list_tools(upstream)`."""
    return [
        ToolParam(
            name=s.name,
            description=s.description,
            input_schema=s.input_schema or {"type": "object", "properties": {}},
        )
        for s in specs
    ]


def _tool_uses(message: Any) -> list[Any]:
    """The `tool_use` blocks of a Message (or of a list of content blocks), in order."""
    content = getattr(message, "content", message)
    return [b for b in content if _get(b, "type") == "tool_use"]


def _get(block: Any, key: str) -> Any:
    return block.get(key) if isinstance(block, Mapping) else getattr(block, key, None)


def _route(routing: Routing, name: str) -> str | None:
    return routing if isinstance(routing, str) else routing.get(name)


def _blocks(result: ToolResult) -> list[dict[str, Any]]:
    """MCP content as Anthropic content blocks: text and images kept, anything else as JSON text."""
    out: list[dict[str, Any]] = []
    for c in result.content:
        if c.get("type") == "text":
            out.append({"type": "text", "text": str(c.get("text", ""))})
        elif c.get("type") == "image" and c.get("data"):
            source = {"type": "base64", "media_type": c.get("mimeType", "image/png"), "data": c["data"]}
            out.append({"type": "image", "source": source})
        else:
            out.append({"type": "text", "text": json.dumps(c, ensure_ascii=False)})
    if not out and result.structured is not None:
        out.append({"type": "text", "text": json.dumps(result.structured, ensure_ascii=False)})
    return out


def _ok(tool_use_id: str, result: ToolResult) -> ToolResultBlockParam:
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": tool_use_id, "content": _blocks(result)}
    if result.is_error:
        block["is_error"] = True
    return block  # type: ignore[return-value]


def _error(tool_use_id: str, text: str) -> ToolResultBlockParam:
    return {
        "type": "tool_result",
        "tool_use_id": tool_use_id,
        "content": [{"type": "text", "text": text}],
        "is_error": True,
    }


def _unrouted(name: str) -> str:
    return f"tool {name!r} is not available: no governed upstream offers it"


def tool_results(message: Any, client: BastionClient, upstream: Routing) -> list[ToolResultBlockParam]:
    """Run every `tool_use` of `message` through Bastion, in order; one `tool_result` each."""
    out: list[ToolResultBlockParam] = []
    for block in _tool_uses(message):
        use_id, name, args = str(_get(block, "id")), str(_get(block, "name")), _get(block, "input") or {}
        target = _route(upstream, name)
        if target is None:
            out.append(_error(use_id, _unrouted(name)))
            continue
        try:
            out.append(_ok(use_id, client.call_tool(target, name, args, use_id, client_info=CLIENT_INFO)))
        except (ToolDenied, UpstreamFailed) as exc:
            out.append(_error(use_id, str(exc)))
    return out


async def atool_results(
    message: Any, client: AsyncBastionClient, upstream: Routing
) -> list[ToolResultBlockParam]:
    """`tool_results` for async code; the calls of one message run concurrently, results in order."""

    async def one(block: Any) -> ToolResultBlockParam:
        use_id, name, args = str(_get(block, "id")), str(_get(block, "name")), _get(block, "input") or {}
        target = _route(upstream, name)
        if target is None:
            return _error(use_id, _unrouted(name))
        try:
            return _ok(use_id, await client.call_tool(target, name, args, use_id, client_info=CLIENT_INFO))
        except (ToolDenied, UpstreamFailed) as exc:
            return _error(use_id, str(exc))

    uses: Sequence[Any] = _tool_uses(message)
    return list(await asyncio.gather(*(one(b) for b in uses)))
