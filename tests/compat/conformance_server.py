"""The tools `@modelcontextprotocol/conformance` server scenarios call, as a real MCP upstream.

The conformance package ships only its scenarios (the reference "everything" server lives in the
TypeScript SDK's examples), so this `MCPServer` offers exactly the tools the `tools-call-*`
scenarios name, answering as each scenario's description asks, for Bastion to front.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import (
    AudioContent,
    EmbeddedResource,
    EmptyResult,
    ImageContent,
    SamplingMessage,
    SetLevelRequestParams,
    TextContent,
    TextResourceContents,
)

# A 1x1 red PNG and a 44-byte silent WAV header: the scenarios check type, data and mimeType.
PNG = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de"
        "0000000c4944415408d763f8cfc000000301010018dd8db00000000049454e44ae426082"
    )
).decode()
WAV = base64.b64encode(
    b"RIFF$\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00D\xac\x00\x00\x88X\x01\x00\x02\x00\x10\x00"
    b"data\x00\x00\x00\x00"
).decode()


def conformance_server() -> MCPServer:
    srv = MCPServer("bastion-conformance-upstream")

    async def set_level(ctx: Any, params: SetLevelRequestParams) -> EmptyResult:
        return EmptyResult()

    # MCPServer has no `logging/setLevel` of its own; `tools-call-with-logging` sends one first.
    srv._lowlevel_server.add_request_handler("logging/setLevel", SetLevelRequestParams, set_level)

    @srv.tool()
    def test_simple_text() -> str:
        """Return a fixed text."""
        return "This is a simple text response for testing."

    @srv.tool()
    def test_image_content() -> list[ImageContent]:
        """Return a 1x1 PNG."""
        return [ImageContent(type="image", data=PNG, mime_type="image/png")]

    @srv.tool()
    def test_audio_content() -> list[AudioContent]:
        """Return a tiny WAV."""
        return [AudioContent(type="audio", data=WAV, mime_type="audio/wav")]

    @srv.tool()
    def test_embedded_resource() -> list[EmbeddedResource]:
        """Return an embedded text resource."""
        text = TextResourceContents(
            uri="test://embedded-resource",
            mime_type="text/plain",
            text="This is an embedded resource content.",
        )
        return [EmbeddedResource(type="resource", resource=text)]

    @srv.tool()
    def test_multiple_content_types() -> list[TextContent | ImageContent | EmbeddedResource]:
        """Return text, an image and a resource."""
        resource = TextResourceContents(
            uri="test://mixed-content-resource",
            mime_type="application/json",
            text='{"test":"data","value":123}',
        )
        return [
            TextContent(type="text", text="Multiple content types test:"),
            ImageContent(type="image", data=PNG, mime_type="image/png"),
            EmbeddedResource(type="resource", resource=resource),
        ]

    @srv.tool()
    async def test_tool_with_logging(ctx: Context) -> str:
        """Send three log notifications while running."""
        for i, message in enumerate(
            ("Tool execution started", "Tool processing data", "Tool execution completed")
        ):
            if i:
                await asyncio.sleep(0.05)
            await ctx.info(message)
        return "Logging test completed"

    @srv.tool()
    def test_error_handling() -> str:
        """Always fail."""
        raise ToolError("This tool intentionally returns an error for testing")

    @srv.tool()
    async def test_tool_with_progress(ctx: Context) -> str:
        """Report progress 0, 50, 100 of 100."""
        for i, progress in enumerate((0, 50, 100)):
            if i:
                await asyncio.sleep(0.05)
            await ctx.report_progress(progress, 100)
        return "Progress test completed"

    @srv.tool()
    async def test_sampling(prompt: str, ctx: Context) -> str:
        """Ask the client's LLM."""
        message = SamplingMessage(role="user", content=TextContent(type="text", text=prompt))
        result = await ctx.session.create_message(
            [message], max_tokens=100, related_request_id=ctx.request_id
        )
        text = result.content.text if isinstance(result.content, TextContent) else str(result.content)
        return f"LLM response: {text}"

    @srv.tool()
    async def test_elicitation(message: str, ctx: Context) -> str:
        """Ask the user for a username and an email."""
        schema = {
            "type": "object",
            "properties": {
                "username": {"type": "string", "description": "User's response"},
                "email": {"type": "string", "description": "User's email address"},
            },
            "required": ["username", "email"],
        }
        result = await ctx.session.elicit_form(message, schema, related_request_id=ctx.request_id)
        return f"User response: action={result.action}, content={result.content}"

    return srv
