"""LangChain tools whose execution goes through Bastion (`pip install 'bastion[langchain]'`).

Two ways in:

- `load_tools` / `aload_tools`: the tools of a governed upstream (its `tools/list` through
  Bastion, so the caller sees only what policy lets it call) as LangChain tools; each call is a
  `/v1/tool-calls` request. The LangChain tool-call id becomes Bastion's `call_id`, so the audit
  record and the `ToolMessage` share one id.
- `guard`: an existing LangChain tool that runs where it is, after Bastion allowed the call
  (`/v1/decisions`); a `transform` decision runs it with Bastion's redacted arguments.

A refusal (denied, over budget, approval needed, the tool server failed, the tool said error) is
a `ToolException`: with `handle_tool_error=True` (the default here) LangChain turns it into a
`ToolMessage` with `status="error"` whose text the model reads, e.g. "denied by policy
transfer-limit: transfers above 1000 need a human". A bad credential or an unreachable Bastion is
raised as it is: a configuration problem, not something for the model to work around.
"""

from __future__ import annotations

import asyncio
from importlib.metadata import version
from typing import Any, Literal

from langchain_core.tools import BaseTool, ToolException

from adapters.client import (
    AsyncBastionClient,
    BastionClient,
    ToolDenied,
    ToolError,
    ToolResult,
    ToolSpec,
    UpstreamFailed,
)

__all__ = ["CLIENT_INFO", "BastionTool", "aload_tools", "guard", "load_tools"]

CLIENT_INFO = f"langchain/{version('langchain-core')}"
"""What the audit record names as the client of calls made through these tools."""

Client = BastionClient | AsyncBastionClient
_REFUSALS = (ToolDenied, UpstreamFailed, ToolError)


class BastionTool(BaseTool):
    """A tool of a governed upstream; `invoke` / `ainvoke` call it through Bastion.

    Sync invocation needs a `BastionClient`; async works with either client (a sync one runs in a
    worker thread).
    """

    bastion: Any
    """The BastionClient or AsyncBastionClient that carries the calls."""
    upstream: str
    remote_name: str
    """The tool's name on the upstream (`name` may be renamed for the model)."""
    response_format: Literal["content", "content_and_artifact"] = "content_and_artifact"
    handle_tool_error: bool = True

    def _to_args_and_kwargs(
        self, tool_input: Any, tool_call_id: str | None
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        # the arguments travel as one dict next to the tool-call id, so no argument name can clash
        arguments = dict(tool_input) if isinstance(tool_input, dict) else {}
        return (tool_call_id, arguments), {}

    def _run(self, *args: Any, **_: Any) -> tuple[str, ToolResult]:
        call_id, arguments = args
        if not isinstance(self.bastion, BastionClient):
            raise TypeError(f"tool {self.name!r} was made with an AsyncBastionClient: use ainvoke")
        try:
            result = self.bastion.call_tool(
                self.upstream, self.remote_name, arguments, call_id, client_info=CLIENT_INFO
            )
        except _REFUSALS as exc:
            raise ToolException(str(exc)) from exc
        return _content(result)

    async def _arun(self, *args: Any, **_: Any) -> tuple[str, ToolResult]:
        call_id, arguments = args
        try:
            if isinstance(self.bastion, AsyncBastionClient):
                result = await self.bastion.call_tool(
                    self.upstream, self.remote_name, arguments, call_id, client_info=CLIENT_INFO
                )
            else:
                result = await asyncio.to_thread(
                    self.bastion.call_tool,
                    self.upstream,
                    self.remote_name,
                    arguments,
                    call_id,
                    client_info=CLIENT_INFO,
                )
        except _REFUSALS as exc:
            raise ToolException(str(exc)) from exc
        return _content(result)


def _content(result: ToolResult) -> tuple[str, ToolResult]:
    """The text for the model; the whole result (structured content, audit id) as the artifact."""
    if result.is_error:
        raise ToolException(result.text or "the tool reported an error")
    return result.text, result


def tool_from_spec(client: Client, spec: ToolSpec, name: str | None = None) -> BastionTool:
    """One LangChain tool for one upstream tool."""
    return BastionTool(
        name=name or spec.name,
        description=spec.description or spec.name,
        args_schema=spec.input_schema or {"type": "object", "properties": {}},
        bastion=client,
        upstream=spec.upstream,
        remote_name=spec.name,
    )


def load_tools(client: BastionClient, upstream: str) -> list[BaseTool]:
    """The upstream's tools this caller may call, as LangChain tools (sync code)."""
    return [tool_from_spec(client, spec) for spec in client.list_tools(upstream)]


async def aload_tools(client: Client, upstream: str) -> list[BaseTool]:
    """The upstream's tools this caller may call, as LangChain tools (async code)."""
    if isinstance(client, AsyncBastionClient):
        specs = await client.list_tools(upstream)
    else:
        specs = await asyncio.to_thread(client.list_tools, upstream)
    return [tool_from_spec(client, spec) for spec in specs]


class GuardedTool(BaseTool):
    """A local tool that runs only after Bastion allowed the call (Bastion as decision point)."""

    inner: BaseTool
    bastion: Any
    upstream: str
    remote_name: str
    handle_tool_error: bool = True

    def _to_args_and_kwargs(
        self, tool_input: Any, tool_call_id: str | None
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        arguments = dict(tool_input) if isinstance(tool_input, dict) else {}
        return (tool_call_id, arguments), {}

    def _run(self, *args: Any, **_: Any) -> Any:
        call_id, arguments = args
        if not isinstance(self.bastion, BastionClient):
            raise TypeError(f"tool {self.name!r} was guarded with an AsyncBastionClient: use ainvoke")
        decision = self.bastion.decide(
            self.upstream, self.remote_name, arguments, call_id, client_info=CLIENT_INFO
        )
        if not decision.allowed:
            raise ToolException(decision.reason)
        return self.inner.invoke(decision.arguments if decision.arguments is not None else arguments)

    async def _arun(self, *args: Any, **_: Any) -> Any:
        call_id, arguments = args
        if isinstance(self.bastion, AsyncBastionClient):
            decision = await self.bastion.decide(
                self.upstream, self.remote_name, arguments, call_id, client_info=CLIENT_INFO
            )
        else:
            decision = await asyncio.to_thread(
                self.bastion.decide,
                self.upstream,
                self.remote_name,
                arguments,
                call_id,
                client_info=CLIENT_INFO,
            )
        if not decision.allowed:
            raise ToolException(decision.reason)
        return await self.inner.ainvoke(decision.arguments if decision.arguments is not None else arguments)


def guard(tool: BaseTool, client: Client, upstream: str, remote_name: str | None = None) -> BaseTool:
    """`tool`, asking Bastion first: policy sees it as `Tool::"<upstream>/<remote_name or tool.name>"`.

    `upstream` must be an upstream configured in Bastion (it names the policy resource); the
    tool is not forwarded there, it runs here.
    """
    return GuardedTool(
        name=tool.name,
        description=tool.description,
        args_schema=tool.args_schema,
        inner=tool,
        bastion=client,
        upstream=upstream,
        remote_name=remote_name or tool.name,
    )
