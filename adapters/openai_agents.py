"""OpenAI Agents SDK tools governed by Bastion (`pip install 'bastion[openai-agents]'`).

- `function_tools(client, upstream)`: the upstream's tools as `FunctionTool`s executed through
  `/v1/tool-calls`; the SDK's tool-call id becomes Bastion's `call_id`. A refusal (denied, over
  budget, approval needed, the tool server failed) is returned as the tool output, the text the
  model reads ("denied by policy ...: ..."), as the SDK does with tool errors; the tool did not
  run. A bad credential or an unreachable Bastion is raised.
- `mcp_server(base_url, upstream, token)`: the SDK's own MCP support
  (`MCPServerStreamableHttp`) pointed at Bastion's `/mcp/<upstream>`, with the token and the
  client-info header set. Denials come back as MCP results with `isError`.
"""

from __future__ import annotations

import json
from importlib.metadata import version
from typing import Any

from agents import FunctionTool
from agents.mcp import MCPServerStreamableHttp
from agents.tool_context import ToolContext

from adapters.client import (
    CLIENT_HEADER,
    AsyncBastionClient,
    ToolDenied,
    ToolSpec,
    UpstreamFailed,
)

__all__ = ["CLIENT_INFO", "function_tool", "function_tools", "mcp_server"]

CLIENT_INFO = f"openai-agents/{version('openai-agents')}"
"""What the audit record names as the client of calls made here."""


def function_tool(client: AsyncBastionClient, spec: ToolSpec, name: str | None = None) -> FunctionTool:
    """One upstream tool as a `FunctionTool` whose invocation goes through Bastion."""

    async def invoke(ctx: ToolContext[Any], input_json: str) -> str:
        try:
            arguments = json.loads(input_json) if input_json else {}
        except ValueError:
            return f"the arguments for {spec.name} are not valid JSON"
        if not isinstance(arguments, dict):
            return f"the arguments for {spec.name} must be a JSON object"
        try:
            result = await client.call_tool(
                spec.upstream, spec.name, arguments, ctx.tool_call_id or None, client_info=CLIENT_INFO
            )
        except (ToolDenied, UpstreamFailed) as exc:
            return str(exc)
        return result.text

    return FunctionTool(
        name=name or spec.name,
        description=spec.description or spec.name,
        params_json_schema=spec.input_schema or {"type": "object", "properties": {}},
        on_invoke_tool=invoke,
        strict_json_schema=False,
    )


async def function_tools(client: AsyncBastionClient, upstream: str) -> list[FunctionTool]:
    """The upstream's tools this caller may call (filtered by policy), as `FunctionTool`s."""
    return [function_tool(client, spec) for spec in await client.list_tools(upstream)]


def mcp_server(
    base_url: str, upstream: str, token: str, *, name: str | None = None, **params: Any
) -> MCPServerStreamableHttp:
    """The SDK's Streamable HTTP MCP server for Bastion's `/mcp/<upstream>`; use it as the SDK says
    (`async with server:` and `Agent(mcp_servers=[server])`). `params` go to the SDK's params."""
    headers = {"Authorization": f"Bearer {token}", CLIENT_HEADER: CLIENT_INFO} | params.pop("headers", {})
    return MCPServerStreamableHttp(
        {"url": f"{base_url.rstrip('/')}/mcp/{upstream}", "headers": headers, **params},  # type: ignore[typeddict-item]
        name=name or f"bastion:{upstream}",
    )
