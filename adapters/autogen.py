"""AutoGen (autogen-core) tools executed through Bastion (`pip install 'bastion[autogen]'`).

`autogen_tools(client, upstream)` gives the upstream's tools (filtered by policy) as AutoGen
`BaseTool`s; put them in an `AssistantAgent(tools=...)` or a `StaticWorkbench`. AutoGen's
`call_id` becomes Bastion's. A refusal (denied, over budget, approval needed, the tool server
failed, the tool said error) is raised as the client's typed exception, which AutoGen turns into
a tool result with `is_error=True` and the reason as its text, for the model to read.

CrewAI is not supported here: its releases pin an MCP SDK 1.x and an older pydantic, which
cannot be installed next to Bastion's.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import version
from typing import Any

from autogen_core import CancellationToken
from autogen_core.tools import BaseTool
from autogen_core.utils import schema_to_pydantic_model
from pydantic import BaseModel

from adapters.client import AsyncBastionClient, ToolSpec

__all__ = ["CLIENT_INFO", "BastionTool", "autogen_tools"]

CLIENT_INFO = f"autogen/{version('autogen-core')}"
"""What the audit record names as the client of calls made here."""


class BastionTool(BaseTool[BaseModel, Any]):
    """One upstream tool; running it is one `/v1/tool-calls` request."""

    def __init__(self, client: AsyncBastionClient, spec: ToolSpec, name: str | None = None) -> None:
        schema = spec.input_schema or {"type": "object", "properties": {}}
        args_type = schema_to_pydantic_model(schema, model_name=f"{spec.name}_args")
        super().__init__(args_type, str, name or spec.name, spec.description or spec.name)
        self._client = client
        self._spec = spec

    async def run(self, args: BaseModel, cancellation_token: CancellationToken) -> str:
        return await self._call(args.model_dump(exclude_unset=True), None)

    async def run_json(
        self, args: Mapping[str, Any], cancellation_token: CancellationToken, call_id: str | None = None
    ) -> Any:
        self._args_type.model_validate(args)  # the model's arguments, checked as AutoGen does
        return await self._call(dict(args), call_id)

    async def _call(self, arguments: dict[str, Any], call_id: str | None) -> str:
        result = await self._client.call_tool(
            self._spec.upstream, self._spec.name, arguments, call_id, client_info=CLIENT_INFO
        )
        return result.raise_for_error().text


async def autogen_tools(client: AsyncBastionClient, upstream: str) -> list[BastionTool]:
    """The upstream's tools this caller may call, as AutoGen tools."""
    return [BastionTool(client, spec) for spec in await client.list_tools(upstream)]
