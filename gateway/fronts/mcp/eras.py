"""The two MCP eras on the wire, and the translation between them.

Legacy (2025-03-26 ... 2025-11-25): an `initialize` handshake, then requests in an
`Mcp-Session-Id` session. 2026-07-28: stateless, every request carrying its protocol version and
client capabilities in `_meta` and repeating its method (and tool name) in headers. The MCP front
reads the client's era off each request and the upstream's era once (`Upstream.detect`); what is
here turns a message of one era into what the other expects.
"""

from __future__ import annotations

import itertools
import json
from typing import TYPE_CHECKING, Any

from gateway.errors import ProtocolError
from gateway.fronts import jsonrpc
from gateway.upstreams.base import Upstream
from gateway.upstreams.streamable_http import MODERN_META, MODERN_VERSION, Reply

if TYPE_CHECKING:
    from gateway.fronts.mcp.endpoint import Exchange

PLACEHOLDER_CLIENT_VERSION = "0.0.0-unknown"
HANDSHAKE_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
MODERN_VERSIONS = (MODERN_VERSION,)
_CACHEABLE = frozenset(
    {"tools/list", "prompts/list", "resources/list", "resources/templates/list", "resources/read"}
)
_ids = itertools.count(1)


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
    if key is not None and headers.get("mcp-name") != params.get(key):
        raise ProtocolError(f"Mcp-Name header does not match the body's {key}", jsonrpc.HEADER_MISMATCH)


def mcp_headers_of(x: Exchange) -> dict[str, str]:
    hdrs = {"mcp-protocol-version": MODERN_VERSION, "mcp-method": x.method}
    name = x.params.get("uri") if x.method == "resources/read" else x.params.get("name")
    if isinstance(name, str) and x.method in ("tools/call", "prompts/get", "resources/read"):
        hdrs["mcp-name"] = name
    return hdrs


def response_to(data: str, request_id: Any) -> dict[str, Any] | None:
    """The parsed message if this SSE payload is the response to `request_id`, else None."""
    if not data or '"id"' not in data:
        return None
    try:
        msg = json.loads(data)
    except ValueError:
        return None
    if isinstance(msg, dict) and msg.get("id") == request_id and ("result" in msg or "error" in msg):
        return msg
    return None


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


async def send_in_era(x: Exchange, trace: dict[str, str]) -> tuple[Reply, tuple[Any] | None]:
    up = x.upstream
    era = await up.detect()
    method = x.method
    long_lived = method == "subscriptions/listen"
    if era == "modern":
        if x.modern:
            return await up.send("POST", x.body, mcp_headers_of(x) | trace, long_lived=long_lived), None
        msg = dict(x.msg)
        if "method" in msg:
            params = dict(x.params)
            params["_meta"] = {**(params.get("_meta") or {}), **MODERN_META}
            msg["params"] = params
        name = x.params.get("name") if method in ("tools/call", "prompts/get") else x.params.get("uri")
        hdrs = up.modern_headers(method, name if isinstance(name, str) else None) | trace
        return await up.send("POST", jsonrpc.dumps(msg), hdrs, long_lived=long_lived), None
    if x.session is not None:
        hdrs = {"mcp-protocol-version": x.session.version, **trace}
        if x.session.upstream_session:
            hdrs["mcp-session-id"] = x.session.upstream_session
        return await up.send("POST", x.body, hdrs, long_lived=long_lived), None
    # A stateless client on a legacy upstream: the shared session, with a private request id.
    msg = dict(x.msg)
    restore: tuple[Any] | None = None
    if "id" in msg and "method" in msg:
        msg["id"] = f"bastion-{next(_ids)}"
        restore = (msg["id"],)
    if "method" in msg:
        params = dict(x.params)
        meta = {
            k: v
            for k, v in (params.get("_meta") or {}).items()
            if not k.startswith("io.modelcontextprotocol/")
        }
        params.pop("_meta", None)
        if meta:
            params["_meta"] = meta
        msg["params"] = params
    body = jsonrpc.dumps(msg)
    for attempt in range(2):
        shared = up.shared.id
        hdrs = {"mcp-protocol-version": up.shared.version, **trace}
        if shared:
            hdrs["mcp-session-id"] = shared
        reply = await up.send("POST", body, hdrs, long_lived=long_lived)
        if reply.status != 404 or attempt == 1:
            return reply, restore
        await reply.aclose()
        await up.reopen_shared(shared)
    raise AssertionError("unreachable")
