"""Client for one upstream MCP server over Streamable HTTP, in whichever era it speaks.

One pooled `httpx.AsyncClient` per upstream, built once (by default on `LeanTransport` for
http:// URLs; `http_client: httpx` keeps httpx's own pool). The upstream never sees the caller's
token: only the headers configured for it. Upstream clients forward and report; they never
decide. httpx errors become `UpstreamError` / `UpstreamTimeout` here.

Era: `protocol: auto` probes `server/discover` once (2026-07-28); an upstream that does not
answer it is spoken to with the `initialize` handshake (2025-03-26 ... 2025-11-25).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from httpx_sse import ServerSentEvent
from httpx_sse._decoders import SSEDecoder, SSELineDecoder
from mcp.shared.inbound import encode_header_value

from gateway.config import UpstreamConfig
from gateway.errors import ProtocolError, UpstreamError, UpstreamTimeout
from gateway.upstreams.credentials import NoCookies, upstream_auth
from gateway.upstreams.transport import LeanTransport, header_value_ok

log = logging.getLogger("bastion.upstream")

MODERN_VERSION = "2026-07-28"
LEGACY_VERSION = "2025-11-25"
ACCEPT = "application/json, text/event-stream"
CLIENT_INFO = {"name": "bastion", "version": "0.1.0"}
MODERN_META = {
    "io.modelcontextprotocol/protocolVersion": MODERN_VERSION,
    "io.modelcontextprotocol/clientInfo": CLIENT_INFO,
    "io.modelcontextprotocol/clientCapabilities": {},
}

Era = Literal["modern", "legacy"]


DEFAULT_MAX_RESPONSE = 4 * 1_048_576


@dataclass(slots=True)
class Reply:
    """An upstream HTTP response whose body has not been read yet (it may be a long SSE stream).

    Nothing read from it grows past `limit` bytes: a JSON body, the whole of a stream that answers
    a request, or (for a `long_lived` stream, which may rightly run for hours) any one event."""

    response: httpx.Response
    limit: int = DEFAULT_MAX_RESPONSE
    long_lived: bool = False

    @property
    def status(self) -> int:
        return self.response.status_code

    @property
    def is_sse(self) -> bool:
        content_type: str = self.response.headers.get("content-type", "")
        return content_type.startswith("text/event-stream")

    async def body(self) -> bytes:
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in self.response.aiter_bytes():
                size += len(chunk)
                if size > self.limit:
                    raise UpstreamError(f"upstream answer over {self.limit} bytes (max_response_bytes)")
                chunks.append(chunk)
            return b"".join(chunks)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout("upstream timed out while sending its response") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream response broke off: {type(exc).__name__}") from exc
        finally:
            await self.response.aclose()

    async def events(self) -> AsyncGenerator[ServerSentEvent, None]:
        lines, decoder = SSELineDecoder(), SSEDecoder()
        total = pending = 0
        try:
            async for text in self.response.aiter_text():
                total += len(text)
                pending += len(text)
                if pending > self.limit or (total > self.limit and not self.long_lived):
                    raise UpstreamError(f"upstream stream over {self.limit} bytes (max_response_bytes)")
                for line in lines.decode(text):
                    event = decoder.decode(line.rstrip("\n"))
                    if event is not None:
                        pending = 0
                        yield event
            for line in lines.flush():
                event = decoder.decode(line.rstrip("\n"))
                if event is not None:
                    yield event
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout("upstream stream timed out") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream stream broke off: {type(exc).__name__}") from exc
        finally:
            await self.response.aclose()

    async def aclose(self) -> None:
        await self.response.aclose()


async def first_message(reply: Reply) -> dict[str, Any]:
    """The one JSON-RPC response in a reply, whether it came as JSON or as an SSE stream."""
    if reply.is_sse:
        async for event in reply.events():
            if event.data:
                msg = json.loads(event.data)
                if isinstance(msg, dict) and ("result" in msg or "error" in msg):
                    return msg
        raise UpstreamError("upstream stream ended without a response")
    msg = json.loads(await reply.body())
    if not isinstance(msg, dict):
        raise UpstreamError("upstream answered something other than a JSON-RPC object")
    return msg


@dataclass
class SharedSession:
    """A legacy upstream session shared by several clients (stateless ones; every client of a
    stdio or plain-HTTP upstream), and who owns what on it (see `gateway.upstreams.forward`)."""

    id: str | None = None
    version: str = LEGACY_VERSION
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    inflight: OrderedDict[tuple[str, str], str] = field(default_factory=OrderedDict)
    """(owner, client request id) -> the private id its request travels under, until answered."""
    server_requests: OrderedDict[str, str] = field(default_factory=OrderedDict)
    """Id of a server-to-client request relayed to a client -> that client (the only one that may answer)."""


class StreamableHTTPUpstream:
    """Forwards JSON-RPC messages to one upstream and hands back its raw replies."""

    def __init__(self, name: str, cfg: UpstreamConfig) -> None:
        assert cfg.url is not None
        self.name = name
        self.url = cfg.url
        self.cfg = cfg
        self.era: Era | None = {"auto": None, "legacy": "legacy", MODERN_VERSION: "modern"}[cfg.protocol]
        self.server_info: dict[str, Any] = {"name": name, "version": ""}
        self.capabilities: dict[str, Any] = {}
        self.instructions: str | None = None
        self.shared = SharedSession()
        self._era_lock = asyncio.Lock()
        self._detected = False
        headers, auth = upstream_auth(name, cfg)
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        lean = LeanTransport(limits) if cfg.http_client == "lean" else None
        timeout = httpx.Timeout(cfg.timeout_s, connect=cfg.connect_timeout_s)
        self.client = httpx.AsyncClient(
            headers=headers,
            auth=auth,
            cookies=NoCookies(),
            timeout=timeout,
            limits=limits,
            transport=lean,
        )
        # With no auth flow to run (neither `oauth` nor credentials in the URL, which httpx turns
        # into Basic auth), httpx's `AsyncClient.send` adds nothing a call needs (no cookies, no
        # redirects) but re-parses the URL and builds urllib cookie shims: ~100 µs per call. Such
        # requests go straight to the transport. (A client with its own transport never uses the
        # HTTP(S)_PROXY environment; `http_client: httpx` does.)
        self._url = httpx.URL(cfg.url)
        in_url = bool(self._url.username or self._url.password)
        self._direct = lean if auth is None and not in_url else None
        self._base_headers = dict(self.client.headers)
        self._timeouts = timeout.as_dict()

    async def aclose(self) -> None:
        await self.client.aclose()

    async def send(
        self,
        http_method: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        long_lived: bool = False,
    ) -> Reply:
        """Send one HTTP request; the reply's body stays unread so SSE can be streamed through.

        `long_lived` lifts the read timeout for streams that may stay quiet for a long time (the
        legacy GET stream, `subscriptions/listen`); the connect timeout still applies.
        """
        hdrs = {"accept": ACCEPT}
        if body is not None:
            hdrs["content-type"] = "application/json"
        if headers:
            hdrs.update(headers)
        if self._direct is not None:
            request = httpx.Request(
                http_method, self._url, headers={**self._base_headers, **hdrs}, content=body
            )
            request.extensions["timeout"] = self._timeouts
        else:
            request = self.client.build_request(http_method, self.url, content=body, headers=hdrs)
        if long_lived:
            request.extensions["timeout"] = httpx.Timeout(
                self.cfg.timeout_s, connect=self.cfg.connect_timeout_s, read=None
            ).as_dict()
        try:
            if self._direct is not None:
                response = await self._direct.handle_async_request(request)
                response.request = request
            else:
                response = await self.client.send(request, stream=True)
            return Reply(response, self.cfg.max_response_bytes, long_lived)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"upstream {self.name} timed out") from exc
        except httpx.LocalProtocolError as exc:
            # Refused before a byte was sent: the request was malformed, the upstream is not at fault.
            raise ProtocolError(f"the request cannot be sent upstream: {exc}") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream {self.name} unreachable: {type(exc).__name__}") from exc

    async def rpc(self, method: str, params: dict[str, Any], headers: Mapping[str, str]) -> dict[str, Any]:
        """A request Bastion makes on its own behalf (discovery, handshakes); returns the message."""
        body = json.dumps({"jsonrpc": "2.0", "id": 0, "method": method, "params": params}).encode()
        reply = await self.send("POST", body, headers)
        if reply.status != 200:
            await reply.aclose()
            raise UpstreamError(f"upstream {self.name} answered {method} with HTTP {reply.status}")
        msg = await first_message(reply)
        if "error" in msg:
            raise UpstreamError(f"upstream {self.name} refused {method}: {msg['error'].get('message')}")
        msg["_session"] = reply.response.headers.get("mcp-session-id")
        return msg

    def modern_headers(self, method: str, name: str | None = None) -> dict[str, str]:
        """The 2026-07-28 headers repeating the method (and target name); a ProtocolError (-32602)
        when either holds what a header cannot carry, so that nothing is sent."""
        if not header_value_ok(method):
            raise ProtocolError(
                "the method name holds characters that cannot be sent in a header (Mcp-Method)",
                -32602,
            )
        hdrs = {"mcp-protocol-version": MODERN_VERSION, "mcp-method": method}
        if name is not None:
            # The transport's own form for names a header cannot carry as they are (`=?base64?...?=`).
            encoded = encode_header_value(name)
            if not header_value_ok(encoded):
                raise ProtocolError("the target name cannot be sent in a header (Mcp-Name)", -32602)
            hdrs["mcp-name"] = encoded
        return hdrs

    async def detect(self) -> Era:
        """Learn the upstream's era and server info once; later calls return the cached answer."""
        if self._detected and self.era is not None:
            return self.era
        async with self._era_lock:
            if self._detected and self.era is not None:
                return self.era
            if self.era != "legacy" and await self._discover():
                self.era = "modern"
            elif self.era == "modern":
                raise UpstreamError(
                    f"upstream {self.name} does not answer server/discover for {MODERN_VERSION}"
                )
            else:
                self.era = "legacy"
                await self._open_shared()
            self._detected = True
            return self.era

    async def _discover(self) -> bool:
        try:
            msg = await self.rpc(
                "server/discover", {"_meta": MODERN_META}, self.modern_headers("server/discover")
            )
        except UpstreamTimeout:
            raise
        except (UpstreamError, ValueError):
            return False
        result = msg.get("result")
        if not isinstance(result, dict) or MODERN_VERSION not in result.get("supportedVersions", []):
            return False
        self.capabilities = result.get("capabilities") or {}
        self.instructions = result.get("instructions")
        info = (result.get("_meta") or {}).get("io.modelcontextprotocol/serverInfo")
        if isinstance(info, dict):
            self.server_info = info
        return True

    async def initialize(self, params: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        """Open a legacy upstream session: `initialize` then `notifications/initialized`."""
        msg = await self.rpc("initialize", params, {})
        session_id = msg["_session"]
        result = msg["result"]
        hdrs = {"mcp-protocol-version": str(result.get("protocolVersion", LEGACY_VERSION))}
        if session_id:
            hdrs["mcp-session-id"] = session_id
        note = json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode()
        reply = await self.send("POST", note, hdrs)
        await reply.aclose()
        self.capabilities = result.get("capabilities", {})
        self.instructions = result.get("instructions")
        if isinstance(result.get("serverInfo"), dict):
            self.server_info = result["serverInfo"]
        return session_id, result

    async def _open_shared(self) -> None:
        params = {"protocolVersion": LEGACY_VERSION, "capabilities": {}, "clientInfo": CLIENT_INFO}
        session_id, result = await self.initialize(params)
        self.shared.id = session_id
        self.shared.version = str(result.get("protocolVersion", LEGACY_VERSION))

    async def reopen_shared(self, stale: str | None) -> None:
        """Replace the shared legacy session after the upstream forgot it (404), once per loss."""
        async with self.shared.lock:
            if self.shared.id == stale:
                await self._open_shared()

    async def list_tools(self) -> list[dict[str, Any]]:
        """Every tool the upstream offers (all pages), for policy schema generation at start-up."""
        return await self._list_all("tools/list", "tools")

    async def list_prompts(self) -> list[dict[str, Any]]:
        """Every prompt the upstream offers (all pages): their arguments type `get_prompt` policies."""
        return await self._list_all("prompts/list", "prompts")

    async def _list_all(self, method: str, field: str) -> list[dict[str, Any]]:
        era = await self.detect()
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        for _ in range(100):
            params: dict[str, Any] = {} if cursor is None else {"cursor": cursor}
            if era == "modern":
                params["_meta"] = MODERN_META
                hdrs = self.modern_headers(method)
            else:
                hdrs = {"mcp-protocol-version": self.shared.version}
                if self.shared.id:
                    hdrs["mcp-session-id"] = self.shared.id
            result = (await self.rpc(method, params, hdrs))["result"]
            items.extend(t for t in result.get(field, []) if isinstance(t, dict))
            cursor = result.get("nextCursor")
            if not cursor:
                break
        return items
