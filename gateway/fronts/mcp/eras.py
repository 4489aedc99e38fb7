"""The two MCP eras on the wire, and the translation between them.

Legacy (2025-03-26 ... 2025-11-25): an `initialize` handshake, then requests in an
`Mcp-Session-Id` session. 2026-07-28: stateless, every request carrying its protocol version and
client capabilities in `_meta` and repeating its method (and tool name) in headers. The MCP front
reads the client's era off each request and the upstream's era once (`Upstream.detect`); what is
here turns a message of one era into what the other expects.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mcp.shared.inbound import decode_header_value

from gateway.errors import ProtocolError
from gateway.fronts import jsonrpc
from gateway.upstreams.base import Upstream
from gateway.upstreams.streamable_http import MODERN_VERSION

if TYPE_CHECKING:
    from gateway.fronts.mcp.exchange import Exchange

PLACEHOLDER_CLIENT_VERSION = "0.0.0-unknown"
HANDSHAKE_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
MODERN_VERSIONS = (MODERN_VERSION,)
_CACHEABLE = frozenset(
    {"tools/list", "prompts/list", "resources/list", "resources/templates/list", "resources/read"}
)


def initialize_body(x: Exchange) -> bytes:
    """The client's `initialize`, with a placeholder `clientInfo.version` if it sent none.

    Some clients omit it; servers on the mcp 2.3 SDK refuse such an `initialize` (-32602).
    """
    info = x.params.get("clientInfo")
    if isinstance(info, dict) and isinstance(info.get("version"), str):
        return x.body
    info = {"name": "unknown", **info} if isinstance(info, dict) else {"name": "unknown"}
    info["version"] = PLACEHOLDER_CLIENT_VERSION
    return jsonrpc.dumps({**x.msg, "params": {**x.params, "clientInfo": info}})


def check_modern_headers(headers: Any, msg: dict[str, Any]) -> None:
    """2026-07-28 requests repeat the method (and tool/prompt/resource name) in headers."""
    method = msg.get("method")
    if method is None:
        return
    if headers.get("mcp-method") != method:
        raise ProtocolError(
            f"Mcp-Method header does not match the body's method {method!r}", jsonrpc.HEADER_MISMATCH
        )
    params = msg.get("params") or {}
    key = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}.get(method)
    if key is not None and decode_header_value(headers.get("mcp-name")) != params.get(key):
        raise ProtocolError(f"Mcp-Name header does not match the body's {key}", jsonrpc.HEADER_MISMATCH)


def modernize(msg: dict[str, Any], method: str) -> None:
    """Give a legacy upstream's result the fields a 2026-07-28 client requires."""
    result = msg.get("result")
    if not isinstance(result, dict):
        return
    result.setdefault("resultType", "complete")
    if method in _CACHEABLE:
        result.setdefault("ttlMs", 0)
        result.setdefault("cacheScope", "private")


def discover_result(up: Upstream) -> dict[str, Any]:
    result: dict[str, Any] = {
        "supportedVersions": [MODERN_VERSION],
        "capabilities": up.capabilities,
        "resultType": "complete",
        "ttlMs": 0,
        "cacheScope": "private",
        "_meta": {"io.modelcontextprotocol/serverInfo": up.server_info},
    }
    if up.instructions:
        result["instructions"] = up.instructions
    return result
