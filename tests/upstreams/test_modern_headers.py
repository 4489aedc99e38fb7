"""`StreamableHTTPUpstream.modern_headers`: the 2026-07-28 headers are built from header-safe values only."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from mcp.shared.inbound import decode_header_value

from gateway.config import UpstreamConfig
from gateway.errors import ProtocolError
from gateway.upstreams.streamable_http import StreamableHTTPUpstream
from gateway.upstreams.transport import header_value_ok


@pytest.fixture
async def upstream() -> AsyncIterator[StreamableHTTPUpstream]:
    up = StreamableHTTPUpstream("u", UpstreamConfig(url="http://127.0.0.1:9/mcp"))
    try:
        yield up
    finally:
        await up.aclose()


@pytest.mark.parametrize("method", ["tools/list\r\nX: y", "tools/list\x00", "tools/list\n", "t\u00e9"])
async def test_a_method_a_header_cannot_carry_is_refused(
    upstream: StreamableHTTPUpstream, method: str
) -> None:
    with pytest.raises(ProtocolError) as refused:
        upstream.modern_headers(method)
    assert refused.value.jsonrpc_code == -32602
    assert refused.value.message.startswith(
        "the method name holds characters that cannot be sent in a header"
    )
    assert refused.value.message.isascii() and refused.value.message.isprintable()


@pytest.mark.parametrize(
    ("method", "name"),
    [
        ("tools/call", "echo\r\nContent-Length: 0"),
        ("tools/call", "echo\x00"),
        ("tools/call", "caf\u00e9"),
        ("tools/call", " echo"),
        ("prompts/get", "p\x1b[0m"),
        ("resources/read", "file:///a\u2028b"),
        ("tools/call", "=?base64?ZWNobw==?="),
    ],
    ids=["crlf", "nul", "non-ascii", "edge-space", "escape", "line-separator", "looks-encoded"],
)
async def test_a_name_a_header_cannot_carry_travels_base64_encoded(
    upstream: StreamableHTTPUpstream, method: str, name: str
) -> None:
    """The transport's own `=?base64?...?=` form: the header stays one safe line, the upstream
    decodes the exact name, and nothing the name holds can end the header early."""
    sent = upstream.modern_headers(method, name)["mcp-name"]
    assert sent.startswith("=?base64?") and sent.endswith("?=")
    assert header_value_ok(sent)
    assert decode_header_value(sent) == name


async def test_header_safe_values_make_the_headers(upstream: StreamableHTTPUpstream) -> None:
    assert upstream.modern_headers("resources/read", "file:///notes/a b.txt") == {
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": "resources/read",
        "mcp-name": "file:///notes/a b.txt",
    }
    assert upstream.modern_headers("tools/list") == {
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": "tools/list",
    }
