"""`/mcp`: one MCP endpoint for every upstream, tools namespaced `<upstream>__<tool>`.

Two servers exposing a tool of the same name cannot shadow each other here: every tool carries
its upstream's name (the separator is `mcp.namespace_separator`, which no upstream name may
contain, begin or end with). `tools/list` is the union of what the caller may use on each
upstream, exactly as `/mcp/<upstream>` would list it (token audience and required scopes of that
upstream, pinning, a tool listed iff calling it can be allowed); `tools/call` is routed to its
upstream under the tool's own name and governed by the same pipeline, so audit records and
policies see `Tool::"<upstream>/<tool>"`.

A name reads one way or not at all: `tools/list` leaves out a tool whose own name begins with a
separator character (`notes___x`) or whose namespaced name two tools share, and `tools/call`
refuses, and records, any name that does not split into exactly one configured upstream and
such a tool.

Bastion is the MCP server here: it answers `initialize` (legacy clients, with a signed session
id of its own), `server/discover` (2026-07-28 clients), `ping` and notifications itself. Only
tools are served: resources, prompts, completions and server streams need `/mcp/<upstream>`,
and any other method is refused and recorded. A cancellation goes to the upstream where the
sender's own request is in flight, and nowhere else.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from gateway import metrics
from gateway.call import Principal, ToolCall
from gateway.errors import AuthError, BastionError, ProtocolError, SessionError
from gateway.fronts import jsonrpc
from gateway.fronts.mcp.endpoint import MCPFront
from gateway.fronts.mcp.eras import HANDSHAKE_VERSIONS, MODERN_VERSIONS, check_modern_headers
from gateway.fronts.mcp.exchange import Exchange, call_id_of
from gateway.fronts.mcp.inline import elicitation_modes, modern_elicitation
from gateway.fronts.wire import read_body, trace_id_of
from gateway.identity.authenticator import require_scopes
from gateway.upstreams import forward
from gateway.upstreams.base import Upstream
from gateway.upstreams.streamable_http import LEGACY_VERSION, MODERN_VERSION

log = logging.getLogger("bastion.mcp")

AGGREGATE = "*"
"""The session ids of `/mcp` name this instead of an upstream (no upstream name can be `*`)."""
LIST_TIMEOUT_S = 10.0
MAX_WARNED = 1000
"""Omitted tool names logged once each, up to this many per process (a metric counts them all)."""
CAPABILITIES: dict[str, Any] = {"tools": {"listChanged": False}}
SERVER_INFO = {"name": "bastion", "version": "1"}


class AggregateFront:
    def __init__(self, front: MCPFront, separator: str) -> None:
        self.front = front
        self.sep = separator
        self._warned: set[str] = set()

    async def __call__(self, request: Request) -> Response:
        front = self.front
        msg_id: Any = None
        try:
            front.check_origin(request)
            if request.method == "GET":
                why = "no server stream on /mcp: use /mcp/<upstream> for notifications"
                return Response(jsonrpc.error(None, -32000, why), 405, headers={"allow": "POST, DELETE"})
            principal = await front.auth.authenticate(request.headers.get("authorization"), None)
            if request.method == "DELETE":
                return await self._delete(request, principal)
            body = await read_body(request, front.max_body, front.body_timeout_s)
            try:
                msg = jsonrpc.parse(body, front.max_depth)
            except ProtocolError as err:
                await self._refuse(request, principal, "(unparsed)", None, "malformed-message", err.message)
                raise
            msg_id = msg.get("id")
            response = await self._post(request, principal, msg, body)
        except BaseException as exc:
            response = front.error(request, exc, msg_id, "/mcp")
        metrics.REQUESTS.labels(request.method, str(response.status_code)).inc()
        return response

    async def _refuse(
        self,
        request: Request,
        principal: Principal,
        what: str,
        msg: dict[str, Any] | None,
        policy: str,
        why: str,
    ) -> str:
        """Record a refused message on `/mcp`; returns its audit id."""
        call = ToolCall(
            AGGREGATE,
            what[:200],
            {},
            action="message",
            principal=principal,
            call_id=call_id_of(msg) if msg else None,
        )
        call.trace_id = trace_id_of(request) or call.trace_id
        await self.front.pipeline.refuse(call, "protocol", policy, why)
        return call.audit_id

    async def _delete(self, request: Request, principal: Principal) -> Response:
        session_id = request.headers.get("mcp-session-id")
        if not session_id:
            raise SessionError("missing Mcp-Session-Id", 400)
        self.front.signer.open(session_id, AGGREGATE, principal.key)
        return Response(status_code=204)  # nothing is kept behind an aggregated session

    async def _post(
        self, request: Request, principal: Principal, msg: dict[str, Any], body: bytes
    ) -> Response:
        headers = request.headers
        method = msg.get("method")
        params = msg.get("params") if isinstance(msg.get("params"), dict) else {}
        meta = (params or {}).get("_meta")
        meta_version = meta.get("io.modelcontextprotocol/protocolVersion") if isinstance(meta, dict) else None
        session_id = headers.get("mcp-session-id")
        if method == "initialize":
            return self._initialize(msg, principal)
        if session_id:
            elicitation = self.front.signer.open(session_id, AGGREGATE, principal.key).elicitation
            modern = False
        elif headers.get("mcp-protocol-version") in MODERN_VERSIONS or meta_version in MODERN_VERSIONS:
            modern = True
            check_modern_headers(headers, msg)
            elicitation = modern_elicitation(params)
        else:
            raise SessionError("missing Mcp-Session-Id: send initialize first, or speak 2026-07-28", 400)
        echo = {"mcp-session-id": session_id} if session_id else {}
        if method is None:
            if await self.front.inline.answer(msg, principal):  # Bastion's own elicitation
                return Response(status_code=202)
            why = "this answers no server request: /mcp relays none"
            audit_id = await self._refuse(request, principal, "(response)", msg, "not-your-request", why)
            error = jsonrpc.error(None, jsonrpc.INVALID_REQUEST, why, {"audit_id": audit_id})
            return Response(error, 400, media_type="application/json", headers=echo)
        if method == "notifications/cancelled":
            return await self._cancel(request, principal, msg, body, modern, session_id)
        if method in ("notifications/initialized", "notifications/roots/list_changed"):
            return Response(status_code=202)
        if method == "ping":
            return _answer(msg, {}, echo)
        if method == "server/discover":
            return _answer(msg, _discover(), echo)
        if method == "tools/list":
            tools = await self._union(request, principal)
            result: dict[str, Any] = {"tools": tools}
            if modern:
                result |= {"resultType": "complete", "ttlMs": 0, "cacheScope": "private"}
            return _answer(msg, result, echo)
        if method == "tools/call":
            with metrics.INFLIGHT.track_inprogress():
                return await self._call(request, principal, msg, modern, session_id, elicitation)
        why = f"method {method[:100]!r} is not served on /mcp (tools only): use /mcp/<upstream>"
        audit_id = await self._refuse(request, principal, method, msg, "method-not-allowed", why)
        error = jsonrpc.error(msg.get("id"), jsonrpc.METHOD_NOT_FOUND, why, {"audit_id": audit_id})
        if "id" not in msg:
            return Response(error, 400, media_type="application/json", headers=echo)
        return Response(error, media_type="application/json", headers=echo)

    async def _cancel(
        self,
        request: Request,
        principal: Principal,
        msg: dict[str, Any],
        body: bytes,
        modern: bool,
        session_id: str | None,
    ) -> Response:
        """Route a cancellation to the upstream where the sender's own request is in flight."""
        for up in self.front.upstreams.values():
            x = Exchange(up, principal, msg, body, None, session_id, modern, trace_id_of(request))
            if forward.private_id_of(up, x.owner, x.params.get("requestId")) is not None:
                return await self.front.cancel(x)
        metrics.CORRELATION_REFUSED.labels("cancel").inc()
        return Response(status_code=202)

    def _initialize(self, msg: dict[str, Any], principal: Principal) -> Response:
        params = msg.get("params") if isinstance(msg.get("params"), dict) else {}
        asked = (params or {}).get("protocolVersion")
        version = asked if asked in HANDSHAKE_VERSIONS else LEGACY_VERSION
        result = {"protocolVersion": version, "capabilities": CAPABILITIES, "serverInfo": SERVER_INFO}
        modes = elicitation_modes((params or {}).get("capabilities"))
        session_id = self.front.signer.mint(AGGREGATE, principal.key, None, version, modes)
        return _answer(msg, result, {"mcp-session-id": session_id})

    async def _admitted(self, request: Request, up: Upstream) -> Principal | None:
        """The principal as `/mcp/<upstream>` would see it, or None if that endpoint would refuse it."""
        try:
            principal = await self.front.auth.authenticate(request.headers.get("authorization"), up.name)
            require_scopes(principal, up.cfg.required_scopes)
        except AuthError:
            return None
        return principal

    async def _union(self, request: Request, principal: Principal) -> list[dict[str, Any]]:
        front = self.front

        async def one(up: Upstream) -> list[dict[str, Any]]:
            if await self._admitted(request, up) is None:
                return []
            try:
                tools = await asyncio.wait_for(up.list_tools(), LIST_TIMEOUT_S)
            except (BastionError, TimeoutError, ValueError, KeyError) as exc:
                log.warning("/mcp: upstream %s left out of tools/list (%s)", up.name, exc)
                return []
            return await front.pipeline.listing(principal, up.name, "call_tool", tools, "name")

        names = sorted(front.upstreams)
        lists = await asyncio.gather(*(one(front.upstreams[name]) for name in names))
        listed = [(name, t) for name, tools in zip(names, lists, strict=True) for t in tools]
        seen = Counter(f"{name}{self.sep}{t.get('name')}" for name, t in listed)
        union = []
        for upstream, t in listed:
            tool = t.get("name")
            namespaced = f"{upstream}{self.sep}{tool}"
            if not isinstance(tool, str) or not tool or tool[0] in self.sep:
                self._omit(upstream, namespaced, "ambiguous-name")
            elif seen[namespaced] > 1:
                self._omit(upstream, namespaced, "duplicate-name")
            else:
                union.append({**t, "name": namespaced})
        return union

    def _omit(self, upstream: str, namespaced: str, reason: str) -> None:
        """A tool `/mcp` cannot name one way only: counted, logged once, and served only on
        `/mcp/<upstream>` under its own name."""
        metrics.TOOLS_OMITTED.labels(upstream, reason).inc()
        if namespaced not in self._warned and len(self._warned) < MAX_WARNED:
            self._warned.add(namespaced)
            log.warning(
                "/mcp: %r left out of tools/list (%s): call it on /mcp/%s", namespaced[:200], reason, upstream
            )

    def _route(self, name: object) -> tuple[Upstream, str] | tuple[None, str]:
        """The one (upstream, tool) that a namespaced name reads as; otherwise None and why.

        Every configured upstream whose `<name><sep>` begins the name is a candidate: exactly
        one may match, and the tool's own name may not begin with a separator character (such
        tools are never listed here), so no name is ever resolved two ways."""
        if not isinstance(name, str):
            return None, "unknown-tool"
        found = [
            (up, name[len(prefix) + len(self.sep) :])
            for prefix, up in self.front.upstreams.items()
            if name.startswith(prefix + self.sep) and len(name) > len(prefix) + len(self.sep)
        ]
        if not found:
            return None, "unknown-tool"
        if len(found) > 1 or found[0][1][0] in self.sep:
            return None, "ambiguous-tool"
        return found[0]

    async def _call(
        self,
        request: Request,
        principal: Principal,
        msg: dict[str, Any],
        modern: bool,
        session_id: str | None,
        elicitation: frozenset[str],
    ) -> Response:
        front = self.front
        params = msg.get("params") if isinstance(msg.get("params"), dict) else {}
        name = (params or {}).get("name")
        up, tool = self._route(name)
        if up is None:
            policy = tool
            why = f"unknown tool {str(name)[:200]!r}: names on /mcp are <upstream>{self.sep}<tool>"
            if policy == "ambiguous-tool":
                why = (
                    f"tool name {str(name)[:200]!r} does not read as one upstream and tool on /mcp "
                    "(a tool whose name begins with a separator character is served only on "
                    "/mcp/<upstream>)"
                )
            audit_id = await self._refuse(request, principal, str(name)[:200], msg, policy, why)
            error = jsonrpc.error(msg.get("id"), jsonrpc.INVALID_PARAMS, why, {"audit_id": audit_id})
            return Response(error, media_type="application/json")
        routed = {**msg, "params": {**(params or {}), "name": tool}}
        body = jsonrpc.dumps(routed)
        try:
            admitted = await front.auth.authenticate(request.headers.get("authorization"), up.name)
            require_scopes(admitted, up.cfg.required_scopes)
        except AuthError as err:
            await front.audit_refused_credential(request, up, body, err.message, principal, err.code)
            raise
        x = Exchange(
            up,
            admitted,
            routed,
            body,
            None,
            session_id,
            modern,
            trace_id_of(request),
            elicitation=elicitation,
            request=request,
        )
        return await front.govern(x)


def _answer(msg: dict[str, Any], result: dict[str, Any], headers: dict[str, str]) -> Response:
    return Response(jsonrpc.result(msg.get("id"), result), media_type="application/json", headers=headers)


def _discover() -> dict[str, Any]:
    return {
        "supportedVersions": [MODERN_VERSION],
        "capabilities": CAPABILITIES,
        "resultType": "complete",
        "ttlMs": 0,
        "cacheScope": "private",
        "_meta": {"io.modelcontextprotocol/serverInfo": SERVER_INFO},
    }
