"""The MCP front: Streamable HTTP at `/mcp/{upstream}`, both eras, to and from either era.

Every request is authenticated first. Then the era of the *client* is read off the request:
`initialize` or an `Mcp-Session-Id` is legacy (2025-03-26 ... 2025-11-25); a 2026-07-28
`MCP-Protocol-Version` header or `_meta` is modern (stateless). The era of the *upstream* is
learned once (see `upstreams.streamable_http`). Four pairings:

- modern -> modern: the body is forwarded byte for byte with the MCP headers.
- legacy -> legacy: each client session gets its own upstream session (so server-to-client
  requests reach the right client); Bastion's session id is signed and carries the upstream's.
- legacy -> modern: Bastion answers `initialize`, `ping` and `notifications/initialized` itself
  and adds the 2026 `_meta` and headers to what it forwards. No GET stream (405).
- modern -> legacy: requests ride one shared upstream session with ids rewritten, so two
  stateless clients both sending id 1 cannot collide. `server/discover` is answered by Bastion.

What differs between the eras on the wire, and the translations, are in `eras.py`; Bastion's own
answers to a refused, held or repeated call in `results.py`; inline approval in `inline.py`.

`tools/call` is governed by the pipeline; `tools/list` is filtered to what the caller may call;
everything else passes through. Upstream SSE streams are relayed event by event as they arrive;
only the final response of a governed call is held back until its audit record is durable.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from httpx_sse import ServerSentEvent
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from gateway import metrics
from gateway.call import Decision, Outcome, OutcomeStatus, Principal, ToolCall
from gateway.errors import (
    AuditUnavailable,
    AuthError,
    BastionError,
    CircuitOpen,
    DeadLetter,
    ForbiddenError,
    InsufficientScope,
    PayloadTooLarge,
    ProtocolError,
    SessionError,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.fronts import jsonrpc
from gateway.fronts.client_info import client_name
from gateway.fronts.mcp.eras import (
    HANDSHAKE_VERSIONS,
    MODERN_VERSIONS,
    check_modern_headers,
    discover_result,
    initialize_body,
    modernize,
    response_to,
    send_in_era,
)
from gateway.fronts.mcp.inline import InlineApprovals, elicitation_modes, modern_elicitation
from gateway.fronts.mcp.results import denied_result, repeat_answer
from gateway.fronts.mcp.sessions import Session, SessionSigner
from gateway.identity.authenticator import Authenticator, require_scopes
from gateway.pipeline import Pipeline, sha256_hex
from gateway.state.idempotency import CallRegistry, DuplicateCall, IdempotencyUnavailable, Previous
from gateway.state.pins import ToolPins
from gateway.upstreams.base import Upstream
from gateway.upstreams.resilience import Delivered, FaultGuard, may_have_run, surely_not_sent
from gateway.upstreams.streamable_http import (
    LEGACY_VERSION,
    MODERN_META,
    Reply,
    first_message,
)

log = logging.getLogger("bastion.mcp")

MAX_BODY = 1024 * 1024
"""Default of listen.max_body_bytes."""
MAX_OUTPUT_SCHEMAS = 10_000
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")

Final = Callable[[dict[str, Any], bytes], Awaitable[bytes]]
"""Turns the upstream's final response (parsed, raw) into the bytes sent to the client."""


@dataclass(slots=True)
class Exchange:
    """One client POST on its way through the front."""

    upstream: Upstream
    principal: Principal
    msg: dict[str, Any]
    body: bytes
    session: Session | None
    session_id: str | None
    modern: bool
    trace_id: str | None
    client: str | None = None
    elicitation: frozenset[str] = frozenset()
    """The elicitation modes the client supports (declared at `initialize`, or per request in 2026)."""
    request: Request | None = None
    """The client's HTTP request, so that an inline approval's wait notices when the client leaves."""

    @property
    def method(self) -> str:
        return str(self.msg.get("method", ""))

    @property
    def params(self) -> dict[str, Any]:
        params = self.msg.get("params")
        return params if isinstance(params, dict) else {}


class MCPFront:
    def __init__(
        self,
        upstreams: dict[str, Upstream],
        auth: Authenticator,
        pipeline: Pipeline,
        signer: SessionSigner,
        allowed_tools: Callable[[Principal, str, list[str]], set[str]],
        base_url: str,
        allowed_origins: list[str],
        pins: ToolPins | None = None,
        recheck: Callable[[str], Awaitable[bool]] | None = None,
    ) -> None:
        self.upstreams = upstreams
        self.pins = pins
        """Pinned tool definitions: `tools/list` shows only approved ones (None: pinning is off)."""
        self.recheck = recheck
        """Lists an upstream's tools again when it announces `notifications/tools/list_changed`."""
        self.auth = auth
        self.pipeline = pipeline
        self.signer = signer
        self.allowed_tools = allowed_tools
        self.base_url = base_url
        base = urlsplit(base_url)
        self.origins = {f"{base.scheme}://{base.netloc}", *(o.rstrip("/") for o in allowed_origins)}
        self._background: set[asyncio.Task[None]] = set()
        self.guards = {name: FaultGuard(name, up.cfg) for name, up in upstreams.items()}
        self.max_body = MAX_BODY
        self.max_depth = jsonrpc.MAX_DEPTH
        """listen.max_body_bytes and listen.max_json_depth, for every front (set at start-up)."""
        self.calls: CallRegistry | None = None
        """Claims of call_ids, so that a repeat never runs a non-idempotent tool twice (set at start-up)."""
        """Deadline, retries and circuit breaker per upstream, around every forwarded tools/call."""
        self._output_schemas: dict[tuple[str, str], Any] = {}
        """Declared `outputSchema`s seen in relayed `tools/list` results, keyed (upstream, tool)."""
        self.inline = InlineApprovals(self)
        """Held calls approved inside the MCP exchange, for clients that support elicitation."""

    # -- entry point --------------------------------------------------------------------------

    async def __call__(self, request: Request) -> Response:
        msg_id: Any = None
        try:
            upstream = self.upstreams.get(request.path_params["upstream"])
            if upstream is None:
                return JSONResponse({"error": "not_found", "message": "no such upstream"}, 404)
            origin = request.headers.get("origin")
            if origin is not None and origin.rstrip("/") not in self.origins:
                raise ForbiddenError(f"origin {origin[:100]!r} is not allowed")
            if request.method == "POST":
                body = await _read_body(request, self.max_body)
                principal = await self._authenticate(request, upstream, body)
                msg = jsonrpc.parse(body, self.max_depth)
                msg_id = msg.get("id")
                response = await self._post(request, upstream, principal, msg, body)
            elif request.method == "GET":
                principal = await self._authenticate(request, upstream, None)
                response = await self._get(request, upstream, principal)
            else:
                principal = await self._authenticate(request, upstream, None)
                response = await self._delete(request, upstream, principal)
        except AuthError as err:
            metrics.AUTH_FAILURES.inc()
            response = self._error(err, msg_id)
            meta = (
                f"{self.base_url}/.well-known/oauth-protected-resource/mcp/{request.path_params['upstream']}"
            )
            # RFC 6750 §3.1: a request that carried no credential gets the challenge without an error code
            shown = err if "authorization" in request.headers else None
            response.headers["www-authenticate"] = self.auth.www_authenticate(meta, shown)
        except BastionError as err:
            response = self._error(err, msg_id)
        metrics.REQUESTS.labels(request.method, str(response.status_code)).inc()
        return response

    def _error(self, err: BastionError, msg_id: Any) -> Response:
        body = jsonrpc.error(msg_id, err.jsonrpc_code, err.message)
        response = Response(body, err.http_status, media_type="application/json")
        if isinstance(err, CircuitOpen):
            response.headers["retry-after"] = str(max(1, round(err.retry_after_s)))
        return response

    def guard(self, up: Upstream) -> FaultGuard:
        if (guard := self.guards.get(up.name)) is None:
            guard = self.guards[up.name] = FaultGuard(up.name, up.cfg)
        return guard

    async def _authenticate(self, request: Request, upstream: Upstream, body: bytes | None) -> Principal:
        t0 = time.perf_counter()
        try:
            principal = await self.auth.authenticate(request.headers.get("authorization"), upstream.name)
            metrics.STAGE_SECONDS.labels("identity").observe(time.perf_counter() - t0)
        except AuthError as err:
            if body is not None:
                await self._audit_refused_call(request, upstream, body, err.message)
            raise
        try:
            require_scopes(principal, upstream.cfg.required_scopes)
        except InsufficientScope as err:
            if body is not None:
                await self._audit_refused_call(request, upstream, body, err.message, principal, err.code)
            raise
        return principal

    async def _audit_refused_call(
        self,
        request: Request,
        upstream: Upstream,
        body: bytes,
        why: str,
        principal: Principal | None = None,
        policy: str = "unauthenticated",
    ) -> None:
        """A tools/call refused for its credential still leaves an audit record."""
        try:
            msg = jsonrpc.parse(body, self.max_depth)
        except ProtocolError:
            return
        if msg.get("method") != "tools/call":
            return
        params = msg.get("params") or {}
        args = params.get("arguments")
        call = ToolCall(
            upstream.name,
            str(params.get("name", ""))[:200],
            args if isinstance(args, dict) else {},
            principal=principal,
            call_id=_call_id(msg),
        )
        call.trace_id = _trace_id(request) or call.trace_id
        await self.pipeline.refuse(call, "identity", policy, why)

    # -- POST ---------------------------------------------------------------------------------

    async def _post(
        self,
        request: Request,
        upstream: Upstream,
        principal: Principal,
        msg: dict[str, Any],
        body: bytes,
    ) -> Response:
        headers = request.headers
        method = msg.get("method")
        params = msg.get("params") if isinstance(msg.get("params"), dict) else {}
        meta = (params or {}).get("_meta")
        meta_version = meta.get("io.modelcontextprotocol/protocolVersion") if isinstance(meta, dict) else None
        session_id = headers.get("mcp-session-id")
        session: Session | None = None
        if method == "initialize":
            modern = False
        elif session_id:
            session = self.signer.open(session_id, upstream.name, principal.key)
            modern = False
        elif headers.get("mcp-protocol-version") in MODERN_VERSIONS or meta_version in MODERN_VERSIONS:
            modern = True
            check_modern_headers(headers, msg)
        else:
            raise SessionError("missing Mcp-Session-Id: send initialize first, or speak 2026-07-28", 400)
        x = Exchange(
            upstream,
            principal,
            msg,
            body,
            session,
            session_id if session else None,
            modern,
            _trace_id(request),
            client_name(headers),
            modern_elicitation(params) if modern else session.elicitation if session else frozenset(),
            request,
        )

        if method is None and await self.inline.answer(msg, principal):
            return Response(status_code=202)  # the client's answer to Bastion's own elicitation
        if method == "initialize":
            return await self._initialize(x)
        if method == "tools/call":
            with metrics.INFLIGHT.track_inprogress():
                return await self._call_tool(x)
        if method == "tools/list":
            return await self._forward(x, self._filter_tools(x))
        era = await upstream.detect()
        if era == "modern" and not modern:
            if method == "ping":
                return Response(jsonrpc.result(msg.get("id"), {}), media_type="application/json")
            if method is None or method.startswith("notifications/"):
                return Response(status_code=202)
        if era == "legacy" and modern and method == "server/discover":
            return Response(
                jsonrpc.result(msg.get("id"), discover_result(upstream)), media_type="application/json"
            )
        return await self._forward(x, None)

    async def _initialize(self, x: Exchange) -> Response:
        up = x.upstream
        if await up.detect() == "legacy":
            reply = await up.send("POST", initialize_body(x))
            upstream_session = reply.response.headers.get("mcp-session-id")
            if reply.status != 200:
                return Response(await reply.body(), reply.status, media_type="application/json")
            answer = await first_message(reply)
            result = answer.get("result")
            version = (
                str(result.get("protocolVersion", LEGACY_VERSION))
                if isinstance(result, dict)
                else LEGACY_VERSION
            )
        else:
            upstream_session = None
            asked = x.params.get("protocolVersion")
            version = asked if asked in HANDSHAKE_VERSIONS else LEGACY_VERSION
            result = {
                "protocolVersion": version,
                "capabilities": up.capabilities,
                "serverInfo": up.server_info,
            }
            if up.instructions:
                result["instructions"] = up.instructions
            answer = {"jsonrpc": "2.0", "id": x.msg.get("id"), "result": result}
        modes = elicitation_modes(x.params.get("capabilities"))
        session_id = self.signer.mint(up.name, x.principal.key, upstream_session, version, modes)
        return Response(
            jsonrpc.dumps(answer), media_type="application/json", headers={"mcp-session-id": session_id}
        )

    def _tool_call_of(self, x: Exchange) -> tuple[ToolCall, str | None]:
        """The governed call a `tools/call` exchange makes, and its idempotency key (if any)."""
        name, args = x.params.get("name"), x.params.get("arguments", {})
        call = ToolCall(
            x.upstream.name,
            name[:200] if isinstance(name, str) else "",
            args if isinstance(args, dict) else {},
            principal=x.principal,
            call_id=(key := _stable_call_id(x, self.calls is not None and self.calls.cfg.mcp_sessions))
            or _call_id(x.msg),
            client=x.client,
            session=x.session_id,
        )
        if x.trace_id:
            call.trace_id = x.trace_id
        x.trace_id = call.trace_id  # started here when the client sent none; passed upstream
        return call, key

    async def _call_tool(self, x: Exchange) -> Response:
        name, args = x.params.get("name"), x.params.get("arguments", {})
        call, key = self._tool_call_of(x)
        if not isinstance(name, str) or not name or not isinstance(args, dict):
            await self.pipeline.refuse(
                call, "protocol", "invalid-params", "tools/call needs a name and object arguments"
            )
            return Response(
                jsonrpc.error(
                    x.msg.get("id"),
                    jsonrpc.INVALID_PARAMS,
                    "tools/call needs a string name and object arguments",
                ),
                media_type="application/json",
            )
        resumed = False
        if x.modern and self.inline.is_resumption(x):
            # The retry of an inline approval round: requestState checked, then governed as any call.
            refused = await self.inline.resume(x, call)
            if refused is not None:
                return refused
            resumed = True
        decision = await self.pipeline.admit(call)
        if not decision.allowed:
            mode = None if resumed else self.inline.mode_for(x, call, decision)
            if mode is not None and x.modern:
                return self.inline.input_required(x, call, decision, mode)
            if mode is not None:
                return self.inline.ask_in_stream(x, call, decision, mode)
            return Response(self.refused_body(x, call, decision), media_type="application/json")
        return await self.run_admitted(x, call, decision, key)

    def refused_body(self, x: Exchange, call: ToolCall, decision: Decision) -> bytes:
        """The tool result for a call the pipeline did not let through (denied or held)."""
        result = denied_result(
            decision,
            call.audit_id,
            self._output_schemas.get((x.upstream.name, call.tool)),
            self.approval_of(call, decision),
        )
        if x.modern:
            result["resultType"] = "complete"
        return jsonrpc.result(x.msg.get("id"), result)

    async def run_admitted(
        self, x: Exchange, call: ToolCall, decision: Decision, key: str | None
    ) -> Response:
        """Forward a call the pipeline let through (unless it repeats a call_id already used)."""
        if (previous := await self._check_repeat(call, decision, key)) is not None:
            answer = repeat_answer(previous, x.msg.get("id"), x.modern)
            return Response(answer, media_type="application/json")
        if call.forward_args is not None:  # redacted: the client's bytes must not be forwarded
            x.msg = {**x.msg, "params": {**x.params, "arguments": call.forward_args}}
            x.body = jsonrpc.dumps(x.msg)
        return await self._forward(x, self._audited(call, decision), call=(call, decision))

    async def _check_repeat(self, call: ToolCall, decision: Decision, key: str | None) -> Previous | None:
        """A repeated call_id of a tool not marked idempotent: recorded and answered, never run."""
        if self.calls is None or key is None or call.principal is None:
            return None
        settings = self.upstreams[call.upstream].cfg.tools.get(call.tool)
        if settings is not None and settings.idempotent:
            return None
        fingerprint = self.calls.fingerprint(call.upstream, call.tool, call.arguments)
        try:
            previous = await self.calls.claim(call.principal.key, key, fingerprint, call.audit_id)
        except IdempotencyUnavailable as err:
            await self.pipeline.refund(call)
            outcome = Outcome("error", self.pipeline.elapsed_ms(call), None, err.message)
            await self.pipeline.finish(call, decision, outcome)
            raise
        if previous is not None:
            await self.pipeline.refund(call)
            outcome = Outcome("duplicate", self.pipeline.elapsed_ms(call), None, previous.message)
            await self.pipeline.finish(call, decision, outcome)
        return previous

    def approval_of(self, call: ToolCall, decision: Decision) -> dict[str, str] | None:
        """For a held call: its approval id, the approval page's URL and whom to ask."""
        approvals = self.pipeline.approvals
        if decision.effect != "approval_required" or approvals is None or call.approval_id is None:
            return None
        return approvals.describe(call.approval_id)

    async def call_once(self, call: ToolCall, decision: Decision) -> dict[str, Any]:
        """Forward an admitted call and return its whole, audited JSON-RPC response.

        For fronts that answer in one piece (the HTTP tool API): the upstream may still stream,
        but only its final response is kept. Upstream failures are recorded, then raised.
        """
        up = self.upstreams[call.upstream]
        assert call.principal is not None
        if (previous := await self._check_repeat(call, decision, call.call_id)) is not None:
            raise DuplicateCall(previous.message, previous)
        args = call.forward_args if call.forward_args is not None else call.arguments
        params = {"name": call.tool, "arguments": args, "_meta": MODERN_META}
        msg = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}
        x = Exchange(up, call.principal, msg, jsonrpc.dumps(msg), None, None, True, call.trace_id)
        try:
            call.forwarded = time.perf_counter()
            delivered = await self.guard(up).deliver(call.tool, lambda: self._send(x))
        except UpstreamError as err:
            await self._not_run(call, err)
            await self._record_failure((call, decision), err)
            raise
        reply = delivered.reply
        try:
            if reply.status >= 400:
                await delivered.aclose()
                raise UpstreamError(f"upstream answered HTTP {reply.status}")
            answer = await _whole_answer(delivered)
        except (UpstreamError, ValueError) as exc:
            malformed = UpstreamError("upstream answered malformed JSON")
            failure = exc if isinstance(exc, UpstreamError) else malformed
            await self._record_failure((call, decision), failure, reply.status)
            raise failure from exc
        answer["id"] = 1
        out = await self._audited(call, decision)(answer, jsonrpc.dumps(answer))
        parsed: dict[str, Any] = json.loads(out)
        return parsed

    def _audited(self, call: ToolCall, decision: Decision) -> Final:
        async def final(msg: dict[str, Any], raw: bytes) -> bytes:
            error = msg.get("error")
            result = msg.get("result")
            status: OutcomeStatus
            why: str | None
            if isinstance(error, dict):
                status, why = "failed", str(error.get("message", "upstream error"))[:500]
            elif isinstance(result, dict) and result.get("isError") is True:
                status, why = "failed", "the tool reported an error"
            else:
                status, why = "completed", None
            latency = self.pipeline.elapsed_ms(call)
            metrics.UPSTREAM_SECONDS.labels(call.upstream).observe(call.upstream_seconds())
            if isinstance(error, dict):
                metrics.UPSTREAM_ERRORS.labels(call.upstream, "jsonrpc").inc()
            outcome = Outcome(status, latency, 200, why, sha256_hex(raw))
            audited = decision
            if isinstance(result, dict):
                redacted, audited = await self.pipeline.redact_result(call, decision, result)
                if redacted is not None:
                    msg["result"] = redacted
                    raw = jsonrpc.dumps(msg)
            try:
                await self.pipeline.finish(call, audited, outcome)
            except AuditUnavailable as err:
                raw = jsonrpc.error(msg.get("id"), err.jsonrpc_code, err.message)
                if self.calls is not None:
                    await self.calls.complete(call.audit_id, None)
                return raw
            if self.calls is not None and self.calls.holds(call.audit_id):
                await self.calls.complete(call.audit_id, raw)
            return raw

        return final

    def _filter_tools(self, x: Exchange) -> Final:
        async def final(msg: dict[str, Any], raw: bytes) -> bytes:
            result = msg.get("result")
            if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
                return raw
            tools = [t for t in result["tools"] if isinstance(t, dict) and isinstance(t.get("name"), str)]
            if self.pins is not None:
                tools = await self.pins.keep_usable(x.upstream.name, tools)
            allowed = self.allowed_tools(x.principal, x.upstream.name, [t["name"] for t in tools])
            result["tools"] = [t for t in tools if t["name"] in allowed]
            self._remember_output_schemas(x.upstream.name, result["tools"])
            if "cacheScope" in result:
                result["cacheScope"] = "private"  # the list now depends on who asked
            return jsonrpc.dumps(msg)

        return final

    def _remember_output_schemas(self, upstream: str, tools: list[dict[str, Any]]) -> None:
        """Clients validate `structuredContent` against the schemas they were listed, even on errors."""
        for tool in tools:
            key = (upstream, tool["name"])
            schema = tool.get("outputSchema")
            if isinstance(schema, dict):
                if key in self._output_schemas or len(self._output_schemas) < MAX_OUTPUT_SCHEMAS:
                    self._output_schemas[key] = schema
            else:
                self._output_schemas.pop(key, None)

    # -- forwarding ---------------------------------------------------------------------------

    async def _forward(
        self, x: Exchange, final: Final | None, call: tuple[ToolCall, Decision] | None = None
    ) -> Response:
        """Send the client's message to the upstream in the upstream's era; relay the answer.

        A tools/call goes through the upstream's `FaultGuard` (deadline, retries, breaker),
        which hands back the reply with its body, or its first stream event, already read."""
        delivered: Delivered | None = None
        try:
            if call is not None:
                call[0].forwarded = time.perf_counter()
                delivered = await self.guard(x.upstream).deliver(call[0].tool, lambda: self._send(x))
                reply, restore_id = delivered.reply, delivered.extra
            else:
                reply, restore_id = await self._send(x)
        except UpstreamError as err:
            if call is not None:
                await self._not_run(call[0], err)
                await self._record_failure(call, err)
            raise
        if reply.status == 202:
            await reply.aclose()
            return Response(status_code=202)
        passthrough = {"mcp-session-id": x.session_id} if x.session_id else {}
        if reply.status >= 400:
            body = delivered.raw if delivered and delivered.raw is not None else await reply.body()
            if call is not None:
                await self._record_failure(
                    call, UpstreamError(f"upstream answered HTTP {reply.status}"), reply.status
                )
            return Response(
                body, reply.status, media_type=reply.response.headers.get("content-type"), headers=passthrough
            )
        request_id = x.msg.get("id")
        upstream_id = restore_id[0] if restore_id else request_id
        if not reply.is_sse:
            raw = delivered.raw if delivered and delivered.raw is not None else await reply.body()
            if final is None and restore_id is None:
                return Response(raw, reply.status, media_type="application/json", headers=passthrough)
            try:
                msg = json.loads(raw)
            except ValueError:
                malformed = UpstreamError("upstream answered with malformed JSON")
                if call is not None:
                    await self._record_failure(call, malformed, reply.status)
                raise malformed from None
            if restore_id:
                msg["id"] = request_id
                modernize(msg, x.method)
                raw = jsonrpc.dumps(msg)
            out = await final(msg, raw) if final else raw
            return Response(out, reply.status, media_type="application/json", headers=passthrough)
        return StreamingResponse(
            self._relay(
                delivered.events() if delivered else reply.events(),
                request_id,
                upstream_id,
                x.method if restore_id else None,
                final,
                call,
                x.upstream.name,
            ),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", **passthrough},
        )

    async def _send(self, x: Exchange) -> tuple[Reply, tuple[Any] | None]:
        reply, restore = await send_in_era(x, _traceparent(x.trace_id) if x.trace_id else {})
        return reply, restore

    async def _relay(
        self,
        events: AsyncIterator[ServerSentEvent],
        request_id: Any,
        upstream_id: Any,
        restore: str | None,
        final: Final | None,
        call: tuple[ToolCall, Decision] | None,
        upstream: str | None = None,
    ) -> AsyncIterator[bytes]:
        """Relay an upstream SSE stream event by event; hold back only the final response.

        `restore` (the method) is set when the request id was rewritten for a shared legacy
        session: the final response gets the client's id back and the 2026 result fields.
        """
        finished = False
        try:
            async for event in events:
                data = event.data
                if upstream is not None and _LIST_CHANGED in data:
                    self._tools_changed(upstream)
                if final is not None or restore:
                    msg = response_to(data, upstream_id)
                    if msg is not None:
                        if restore:
                            msg["id"] = request_id
                            modernize(msg, restore)
                            data = jsonrpc.dumps(msg).decode()
                        if final is not None:
                            data = (await final(msg, data.encode())).decode()
                        finished = True
                yield jsonrpc.sse(data, event.id or None, event.event or "message")
        except UpstreamError as err:
            if call is not None and not finished:
                finished = True
                await self._record_failure(call, err)
            yield jsonrpc.sse(jsonrpc.error(request_id, err.jsonrpc_code, err.message))
        finally:
            if call is not None and not finished:
                self._later(
                    self._record_failure(call, UpstreamError("the stream ended before the tool's result"))
                )

    async def _not_run(self, call: ToolCall, err: UpstreamError) -> None:
        """Give back what a call that failed before it could run took: budget, its call_id."""
        if not may_have_run(err):
            await self.pipeline.refund(call)
        if self.calls is not None and surely_not_sent(err):
            await self.calls.release(call.audit_id)

    async def _record_failure(
        self, call: tuple[ToolCall, Decision], err: UpstreamError, upstream_status: int | None = None
    ) -> None:
        tool_call, decision = call
        if self.calls is not None and self.calls.holds(tool_call.audit_id):
            await self.calls.complete(tool_call.audit_id, None)  # it may have run: never again
        status: OutcomeStatus = "timeout" if isinstance(err, UpstreamTimeout) else "failed"
        if isinstance(err, DeadLetter):
            status = "dead_letter"
            upstream_status = upstream_status or err.upstream_status
        latency = self.pipeline.elapsed_ms(tool_call)
        metrics.UPSTREAM_SECONDS.labels(tool_call.upstream).observe(tool_call.upstream_seconds())
        kind = "timeout" if status == "timeout" else "http" if upstream_status else "transport"
        if isinstance(err, CircuitOpen | DeadLetter):
            kind = err.code
        metrics.UPSTREAM_ERRORS.labels(tool_call.upstream, kind).inc()
        await self.pipeline.finish(
            tool_call, decision, Outcome(status, latency, upstream_status, err.message)
        )

    def _tools_changed(self, upstream: str) -> None:
        """The upstream announced a new tool list: re-check its pins now rather than at the next list."""
        if self.pins is not None and self.recheck is not None:
            recheck = self.recheck

            async def run() -> None:
                await recheck(upstream)

            self._later(run())

    def _later(self, coro: Awaitable[None]) -> None:
        """Finish bookkeeping after the client went away (the response task is being cancelled)."""

        async def run() -> None:
            try:
                await coro
            except BastionError as err:
                log.error("could not record an interrupted call: %s", err.message)

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- GET and DELETE -----------------------------------------------------------------------

    def _session_of(self, request: Request, upstream: Upstream, principal: Principal) -> Session | None:
        session_id = request.headers.get("mcp-session-id")
        return self.signer.open(session_id, upstream.name, principal.key) if session_id else None

    async def _get(self, request: Request, upstream: Upstream, principal: Principal) -> Response:
        session = self._session_of(request, upstream, principal)
        if session is None or session.upstream_session is None:
            why = "no server stream: GET needs a legacy session with an upstream that keeps sessions"
            return Response(
                jsonrpc.error(None, -32000, why),
                405,
                media_type="application/json",
                headers={"allow": "POST"},
            )
        hdrs = {"mcp-session-id": session.upstream_session, "mcp-protocol-version": session.version}
        if last := request.headers.get("last-event-id"):
            hdrs["last-event-id"] = last
        reply = await upstream.send("GET", None, hdrs, long_lived=True)
        if reply.status != 200 or not reply.is_sse:
            return Response(
                await reply.body(), reply.status, media_type=reply.response.headers.get("content-type")
            )

        async def raw() -> AsyncIterator[bytes]:
            try:
                async for chunk in reply.response.aiter_raw():
                    if _LIST_CHANGED_RAW in chunk:
                        self._tools_changed(upstream.name)
                    yield chunk
            except Exception as exc:
                log.debug("GET stream from %s ended: %s", upstream.name, type(exc).__name__)
            finally:
                await reply.aclose()

        return StreamingResponse(raw(), media_type="text/event-stream", headers={"cache-control": "no-store"})

    async def _delete(self, request: Request, upstream: Upstream, principal: Principal) -> Response:
        session = self._session_of(request, upstream, principal)
        if session is None:
            raise SessionError("missing Mcp-Session-Id", 400)
        if session.upstream_session is None:
            return Response(status_code=204)
        hdrs = {"mcp-session-id": session.upstream_session, "mcp-protocol-version": session.version}
        reply = await upstream.send("DELETE", None, hdrs)
        body = await reply.body()
        return Response(body, reply.status, media_type=reply.response.headers.get("content-type"))


# -- helpers ----------------------------------------------------------------------------------


async def _read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    """The request body, refused (413) as soon as it is known to be over `limit` bytes."""
    too_large = PayloadTooLarge(f"request body over {limit} bytes (listen.max_body_bytes)")
    length = request.headers.get("content-length")
    if length is not None and not length.isdigit():
        raise ProtocolError("Content-Length is not a number")
    if length is not None and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _whole_answer(delivered: Delivered) -> dict[str, Any]:
    """The JSON-RPC response in a delivered reply: its body, or the response event of its stream."""
    if delivered.raw is not None:
        msg = json.loads(delivered.raw)
        if not isinstance(msg, dict):
            raise UpstreamError("upstream answered something other than a JSON-RPC object")
        return msg
    async for event in delivered.events():
        if event.data:
            msg = json.loads(event.data)
            if isinstance(msg, dict) and ("result" in msg or "error" in msg):
                return msg
    raise UpstreamError("upstream stream ended without a response")


_LIST_CHANGED = "notifications/tools/list_changed"
_LIST_CHANGED_RAW = _LIST_CHANGED.encode()


def _traceparent(trace_id: str) -> dict[str, str]:
    """W3C Trace Context for the upstream: the call's trace, a new span for Bastion's hop."""
    return {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}


def _trace_id(request: Request) -> str | None:
    match = _TRACEPARENT.match(request.headers.get("traceparent", ""))
    return match.group(1) if match else None


CALL_ID_META = "bastion/call_id"


def _stable_call_id(x: Exchange, from_session: bool) -> str | None:
    """A call_id that names this call and no other: the client's `_meta["bastion/call_id"]`, or
    the legacy session with the request id (ids are unique within a session). A stateless
    client's bare request id is not one: every new client counts from the same start."""
    meta = x.params.get("_meta")
    given = meta.get(CALL_ID_META) if isinstance(meta, dict) else None
    if isinstance(given, str) and 0 < len(given) <= 200:
        return given
    msg_id = x.msg.get("id")
    if not from_session or x.session_id is None or msg_id is None:
        return None
    return f"s-{hashlib.sha256(x.session_id.encode()).hexdigest()[:24]}-{str(msg_id)[:150]}"


def _call_id(msg: dict[str, Any]) -> str | None:
    msg_id = msg.get("id")
    return None if msg_id is None else str(msg_id)[:200]
