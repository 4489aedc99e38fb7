"""The MCP front: Streamable HTTP at `/mcp/{upstream}`, both eras, to and from either era.

Every request is authenticated first. Then the era of the *client* is read off the request:
`initialize` or an `Mcp-Session-Id` is legacy (2025-03-26 ... 2025-11-25); a 2026-07-28
`MCP-Protocol-Version` header or `_meta` is modern (stateless). The era of the *upstream* is
learned once (`Upstream.detect`); `gateway.upstreams.forward` speaks it. Methods one era lacks
are answered here (`ping` and notifications for a legacy client of a modern upstream,
`server/discover` for a modern client of a legacy one).

Then each message is classified (`methods.py`) and handled by its kind: a governed action goes
through `Pipeline.run` (decided, forwarded, audited), a listing is filtered to what the caller
could be allowed, a correlated message must be about the sender's own requests, session
housekeeping is relayed, and anything else is refused and audited. This module only translates:
wire to values (`Exchange`, `ToolCall`, `Outgoing`) and an `Answer` back to the wire (`relay.py`);
errors become JSON-RPC answers in one place, `_error`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway import metrics
from gateway.call import Action, Decision, Principal, ToolCall
from gateway.errors import (
    AuthError,
    BastionError,
    CircuitOpen,
    ForbiddenError,
    InsufficientScope,
    ProtocolError,
    SessionError,
    TooManyRefusals,
)
from gateway.fronts import jsonrpc
from gateway.fronts.client_info import client_name
from gateway.fronts.mcp import methods
from gateway.fronts.mcp.eras import (
    HANDSHAKE_VERSIONS,
    MODERN_VERSIONS,
    check_modern_headers,
    discover_result,
    initialize_body,
)
from gateway.fronts.mcp.exchange import Exchange, call_id_of, stable_call_id
from gateway.fronts.mcp.inline import InlineApprovals, elicitation_modes, modern_elicitation
from gateway.fronts.mcp.relay import Relay
from gateway.fronts.mcp.results import denied_result, refused_error, repeat_answer
from gateway.fronts.mcp.sessions import Session, SessionSigner
from gateway.fronts.wire import MAX_BODY, RefusalLimiter, read_body, source_of, trace_id_of
from gateway.identity.authenticator import Authenticator, require_scopes
from gateway.pipeline import Answer, Pipeline
from gateway.upstreams import forward
from gateway.upstreams.base import Upstream
from gateway.upstreams.streamable_http import LEGACY_VERSION, first_message

log = logging.getLogger("bastion.mcp")


class MCPFront:
    def __init__(
        self,
        upstreams: dict[str, Upstream],
        auth: Authenticator,
        pipeline: Pipeline,
        signer: SessionSigner,
        base_url: str,
        allowed_origins: list[str],
        recheck: Callable[[str], Awaitable[bool]] | None = None,
        allow_methods: frozenset[str] = frozenset(),
    ) -> None:
        self.upstreams = upstreams
        self.auth = auth
        self.pipeline = pipeline
        self.signer = signer
        self.base_url = base_url
        base = urlsplit(base_url)
        self.origins = {f"{base.scheme}://{base.netloc}", *(o.rstrip("/") for o in allowed_origins)}
        self.allow_methods = allow_methods
        """`mcp.allow_methods`: methods outside the table relayed anyway (no decision, no record)."""
        self.max_body = MAX_BODY
        self.max_depth = jsonrpc.MAX_DEPTH
        self.body_timeout_s = 10.0
        """listen.max_body_bytes, max_json_depth and body_timeout_s, for every front (set at start-up)."""
        self.refusals = RefusalLimiter(5.0, 50)
        """Refused credentials recorded per source address (listen.refusals_per_s, refusal_burst)."""
        self.relay = Relay(pipeline, recheck)
        self.inline = InlineApprovals(self)
        """Held calls approved inside the MCP exchange, for clients that support elicitation."""

    # -- entry point --------------------------------------------------------------------------

    async def __call__(self, request: Request) -> Response:
        msg_id: Any = None
        upstream_name = request.path_params["upstream"]
        try:
            upstream = self.upstreams.get(upstream_name)
            if upstream is None:
                return JSONResponse({"error": "not_found", "message": "no such upstream"}, 404)
            self.check_origin(request)
            if request.method == "POST":
                body = await read_body(request, self.max_body, self.body_timeout_s)
                principal = await self._authenticate(request, upstream, body)
                try:
                    msg = jsonrpc.parse(body, self.max_depth)
                except ProtocolError as err:
                    await self._refuse_unparsed(request, upstream, principal, body, err)
                    raise
                msg_id = msg.get("id")
                response = await self._post(request, upstream, principal, msg, body)
            elif request.method == "GET":
                principal = await self._authenticate(request, upstream, None)
                response = await self.relay.server_stream(
                    request, upstream, self._session_of(request, upstream, principal)
                )
            else:
                principal = await self._authenticate(request, upstream, None)
                response = await self._delete(request, upstream, principal)
        except BaseException as exc:
            response = self.error(request, exc, msg_id, f"/mcp/{upstream_name}")
        metrics.labelled(metrics.REQUESTS, request.method, str(response.status_code)).inc()
        return response

    def check_origin(self, request: Request) -> None:
        origin = request.headers.get("origin")
        if origin is not None and origin.rstrip("/") not in self.origins:
            raise ForbiddenError(f"origin {origin[:100]!r} is not allowed")

    def error(self, request: Request, exc: BaseException, msg_id: Any, resource: str) -> Response:
        """The one place an error becomes an MCP answer: a JSON-RPC error with the error's HTTP
        status; a refused credential also gets its RFC 6750 challenge. Anything that is not a
        Bastion error is a bug: logged, and answered as an internal error (the pipeline has
        already recorded a governed call that it cut short)."""
        if not isinstance(exc, BastionError):
            if not isinstance(exc, Exception):
                raise exc  # cancellation and interpreter exits are not answers
            log.error("MCP request failed inside the gateway", exc_info=exc)
            exc = BastionError(f"internal error ({type(exc).__name__}); the call was recorded")
        body = jsonrpc.error(msg_id, exc.jsonrpc_code, exc.message)
        response = Response(body, exc.http_status, media_type="application/json")
        if isinstance(exc, CircuitOpen | TooManyRefusals):
            response.headers["retry-after"] = str(max(1, round(exc.retry_after_s)))
        if isinstance(exc, AuthError):
            metrics.AUTH_FAILURES.inc()
            meta = f"{self.base_url}/.well-known/oauth-protected-resource" + (
                "" if resource == "/mcp" else resource
            )
            # RFC 6750 §3.1: a request that carried no credential gets the challenge without an error code
            shown = exc if "authorization" in request.headers else None
            response.headers["www-authenticate"] = self.auth.www_authenticate(meta, shown)
        return response

    async def _authenticate(self, request: Request, upstream: Upstream, body: bytes | None) -> Principal:
        t0 = time.perf_counter()
        try:
            principal = await self.auth.authenticate(request.headers.get("authorization"), upstream.name)
            metrics.labelled(metrics.STAGE_SECONDS, "identity").observe(time.perf_counter() - t0)
        except AuthError as err:
            if body is not None:
                self.refusals.check(source_of(request))
                await self.audit_refused_credential(request, upstream, body, err.message)
            raise
        try:
            require_scopes(principal, upstream.cfg.required_scopes)
        except InsufficientScope as err:
            if body is not None:
                await self.audit_refused_credential(request, upstream, body, err.message, principal, err.code)
            raise
        return principal

    async def audit_refused_credential(
        self,
        request: Request,
        upstream: Upstream,
        body: bytes,
        why: str,
        principal: Principal | None = None,
        policy: str = "unauthenticated",
    ) -> None:
        """A governed message refused for its credential still leaves an audit record."""
        try:
            msg = jsonrpc.parse(body, self.max_depth)
        except ProtocolError:
            return
        method = msg.get("method")
        if not isinstance(method, str) or methods.classify(method) != "governed":
            return
        params = msg.get("params") or {}
        found = methods.governed_target(method, params)
        action, name, args = found if found is not None else ("call_tool", "", {})
        call = ToolCall(
            upstream.name,
            str(name)[:200] if isinstance(name, str) else "",
            args if isinstance(args, dict) else {},
            action=action,
            principal=principal,
            call_id=call_id_of(msg),
        )
        call.trace_id = trace_id_of(request) or call.trace_id
        await self.pipeline.refuse(call, "identity", policy, why)

    async def _refuse_unparsed(
        self, request: Request, upstream: Upstream, principal: Principal, body: bytes, err: ProtocolError
    ) -> None:
        """A body that is not one well-formed JSON-RPC message is recorded as a refused message."""
        call = ToolCall(upstream.name, "(unparsed)", {}, action="message", principal=principal)
        call.trace_id = trace_id_of(request) or call.trace_id
        await self.pipeline.refuse(call, "protocol", "malformed-message", err.message)

    # -- POST ---------------------------------------------------------------------------------

    def exchange(
        self, request: Request, upstream: Upstream, principal: Principal, msg: dict[str, Any], body: bytes
    ) -> Exchange:
        """Read the client's era and session off the request."""
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
        elicitation = (
            modern_elicitation(params) if modern else session.elicitation if session else frozenset()
        )
        return Exchange(
            upstream,
            principal,
            msg,
            body,
            session,
            session_id if session else None,
            modern,
            trace_id_of(request),
            client_name(headers),
            elicitation,
            request,
        )

    async def _post(
        self, request: Request, upstream: Upstream, principal: Principal, msg: dict[str, Any], body: bytes
    ) -> Response:
        x = self.exchange(request, upstream, principal, msg, body)
        method = msg.get("method")
        if method is None:
            return await self._client_response(x)
        if method == "initialize":
            return await self._initialize(x)
        # Methods one era lacks are answered here; only they need the upstream's era before the
        # message is classified (a governed call learns it inside the fault guard).
        lacking = method == "ping" or method.startswith("notifications/")
        if not x.modern and lacking and await upstream.detect() == "modern":
            if method == "notifications/cancelled":
                return await self.cancel(x)
            if method == "ping":
                return Response(jsonrpc.result(msg.get("id"), {}), media_type="application/json")
            return Response(status_code=202)  # no session upstream to notify
        if x.modern and method == "server/discover" and await upstream.detect() == "legacy":
            return Response(
                jsonrpc.result(msg.get("id"), discover_result(upstream)), media_type="application/json"
            )
        kind = methods.classify(method, self.allow_methods)
        if kind == "governed":
            with metrics.INFLIGHT.track_inprogress():
                return await self.govern(x)
        if kind == "listing":
            return await self._list(x, methods.LISTINGS[method])
        if kind in ("session", "allowed"):
            return await self.relay.passthrough(x)
        if kind == "cancel":
            return await self.cancel(x)
        if kind == "task":
            return await self._task(x)
        why = f"method {method[:100]!r} is not allowed through Bastion (see mcp.allow_methods)"
        return await self.refuse_message(x, "method-not-allowed", why, jsonrpc.METHOD_NOT_FOUND)

    async def refuse_message(self, x: Exchange, policy: str, why: str, code: int) -> Response:
        """Refuse a message that is no governed action, and record it (`action: message`)."""
        call = ToolCall(
            x.upstream.name,
            x.method[:200] or "(response)",
            {},
            action="message",
            principal=x.principal,
            call_id=call_id_of(x.msg),
            client=x.client,
            session=x.session_id,
        )
        if x.trace_id:
            call.trace_id = x.trace_id
        await self.pipeline.refuse(call, "protocol", policy, why)
        if "id" not in x.msg or "method" not in x.msg:
            return Response(
                jsonrpc.error(None, code, why, {"audit_id": call.audit_id}),
                400,
                media_type="application/json",
            )
        error = jsonrpc.error(x.msg.get("id"), code, why, {"audit_id": call.audit_id})
        return Response(error, media_type="application/json", headers=_echo(x))

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

    # -- governed actions -----------------------------------------------------------------------

    def call_of(self, x: Exchange) -> tuple[ToolCall, str | None, bool]:
        """The governed call an exchange makes, its idempotency key, and whether its params are valid."""
        found = methods.governed_target(x.method, x.params)
        action: Action = (
            found[0] if found else ("get_prompt" if x.method == methods.COMPLETION else "call_tool")
        )
        raw_name = found[1] if found else None
        name = methods.valid_target(raw_name)
        args = found[2] if found else None
        calls = self.pipeline.calls
        key = (
            stable_call_id(x, calls is not None and calls.cfg.mcp_sessions) if action == "call_tool" else None
        )
        call = ToolCall(
            x.upstream.name,
            name or (raw_name[:200].translate(_NO_CONTROL) if isinstance(raw_name, str) else ""),
            args if isinstance(args, dict) else {},
            action=action,
            principal=x.principal,
            call_id=key or call_id_of(x.msg),
            client=x.client,
            session=x.session_id,
        )
        if x.trace_id:
            call.trace_id = x.trace_id
        x.trace_id = call.trace_id  # started here when the client sent none; passed upstream
        return call, key, name is not None and isinstance(args, dict)

    async def govern(self, x: Exchange) -> Response:
        call, key, valid = self.call_of(x)
        if not valid:
            what = methods.GOVERNED.get(x.method)
            need = f"a {what.target} naming" if what else "a ref naming"
            why = (
                f"{x.method} needs {need} its target (1 to {methods.MAX_TARGET} characters, no control "
                "characters) and object arguments"
            )
            await self.pipeline.refuse(call, "protocol", "invalid-params", why)
            error = jsonrpc.error(x.msg.get("id"), jsonrpc.INVALID_PARAMS, why, {"audit_id": call.audit_id})
            return Response(error, media_type="application/json", headers=_echo(x))
        resumed = False
        if x.method == "tools/call" and x.modern and self.inline.is_resumption(x):
            # The retry of an inline approval round: requestState checked, then governed as any call.
            refused = await self.inline.resume(x, call)
            if refused is not None:
                return refused
            resumed = True
        answer = await self.pipeline.run(call, x.outgoing(), key)
        if answer.refused and x.method == "tools/call":
            mode = None if resumed else self.inline.mode_for(x, call, answer.decision)
            if mode is not None and x.modern:
                return self.inline.input_required(x, call, answer.decision, mode)
            if mode is not None:
                return self.inline.ask_in_stream(x, call, answer.decision, mode)
        return self.render(x, answer)

    def render(self, x: Exchange, answer: Answer) -> Response:
        """An `Answer` on the wire of this exchange."""
        msg_id = x.msg.get("id")
        if answer.refused:
            return Response(
                self.refused_body(x, answer.call, answer.decision),
                media_type="application/json",
                headers=_echo(x),
            )
        if answer.previous is not None:
            return Response(
                repeat_answer(answer.previous, msg_id, x.modern),
                media_type="application/json",
                headers=_echo(x),
            )
        return self.relay.answer(x, answer)

    def refused_body(self, x: Exchange, call: ToolCall, decision: Decision) -> bytes:
        """A refused (denied or held) governed message: a tool result the model can read for
        `tools/call`, a JSON-RPC error carrying the decision for everything else."""
        approval = self.pipeline.approval_of(call, decision)
        if x.method != "tools/call":
            return refused_error(x.msg.get("id"), decision, call.audit_id, approval)
        result = denied_result(
            decision, call.audit_id, self.relay.output_schema(x.upstream.name, call.tool), approval
        )
        if x.modern:
            result["resultType"] = "complete"
        return jsonrpc.result(x.msg.get("id"), result)

    # -- listings -------------------------------------------------------------------------------

    async def _list(self, x: Exchange, listing: methods.Listing) -> Response:
        async def shown(msg: dict[str, Any]) -> dict[str, Any]:
            result = msg.get("result")
            if not isinstance(result, dict) or not isinstance(result.get(listing.field), list):
                return msg
            items = await self.pipeline.listing(
                x.principal, x.upstream.name, listing.action, result[listing.field], listing.key, x.session_id
            )
            result[listing.field] = items
            if listing.field == "tools":
                self.relay.remember_output_schemas(x.upstream.name, items)
            if "cacheScope" in result:
                result["cacheScope"] = "private"  # the list now depends on who asked
            return msg

        return await self.relay.passthrough(x, shown)

    # -- correlated messages --------------------------------------------------------------------

    async def cancel(self, x: Exchange) -> Response:
        """A cancellation reaches the upstream only for the sender's own request in flight."""
        era = await x.upstream.detect()
        out = x.outgoing()
        if era == "modern" and not x.modern:
            return Response(status_code=202)  # nothing in flight upstream is named by a legacy id
        shared = forward.shared_session(x.upstream, out, era)
        if shared is not None:
            request_id = x.params.get("requestId")
            private = forward.private_id_of(x.upstream, x.owner, request_id)
            if private is None:
                metrics.CORRELATION_REFUSED.labels("cancel").inc()
                log.info("a cancellation for no request of its sender in flight was dropped")
                return Response(status_code=202)
            out = out.with_params(requestId=private)
        return await self.relay.passthrough(x, out=out)

    async def _client_response(self, x: Exchange) -> Response:
        """A client's answer to a server request: to Bastion's own elicitation, or relayed only to
        the upstream session that asked this very client."""
        if await self.inline.answer(x.msg, x.principal):
            return Response(status_code=202)
        era = await x.upstream.detect()
        out = x.outgoing()
        shared = forward.shared_session(x.upstream, out, era) if era == "legacy" else None
        if era == "modern" and not x.modern:
            return Response(status_code=202)  # a modern upstream sends no server requests to answer
        if shared is not None:
            asked = shared.server_requests.get(str(x.msg.get("id")))
            if asked != x.owner:
                metrics.CORRELATION_REFUSED.labels("response").inc()
                why = "this answers no server request that was sent to this client"
                return await self.refuse_message(x, "not-your-request", why, jsonrpc.INVALID_REQUEST)
            shared.server_requests.pop(str(x.msg.get("id")), None)
        return await self.relay.passthrough(x)

    async def _task(self, x: Exchange) -> Response:
        """`tasks/*`: a task belongs to the principal whose call created it; only they may list,
        poll, cancel or fetch it, and its result is redacted, scanned and recorded like the call's."""
        if x.method == "tasks/list":
            mine = await self.pipeline.tasks_of(x.principal, x.upstream.name)

            async def own(msg: dict[str, Any]) -> dict[str, Any]:
                result = msg.get("result")
                if isinstance(result, dict) and isinstance(result.get("tasks"), list):
                    result["tasks"] = [
                        t for t in result["tasks"] if isinstance(t, dict) and t.get("taskId") in mine
                    ]
                return msg

            return await self.relay.passthrough(x, own)
        task_id = x.params.get("taskId")
        task = await self.pipeline.task_of(x.principal, x.upstream.name, task_id)
        if task is None:
            shown = str(task_id)[:100].translate(_NO_CONTROL)
            why = f"unknown task {shown!r}: a task can be named only by the caller whose call created it"
            return await self.refuse_message(x, "not-your-task", why, jsonrpc.INVALID_PARAMS)
        if x.method != "tasks/result":
            return await self.relay.passthrough(x)
        call = ToolCall(
            x.upstream.name,
            task.tool,
            {},
            principal=x.principal,
            call_id=task.task_id,
            client=x.client,
            session=x.session_id,
        )
        if x.trace_id:
            call.trace_id = x.trace_id
        return self.render(x, await self.pipeline.task_result(call, task, x.outgoing()))

    # -- DELETE -------------------------------------------------------------------------------

    def _session_of(self, request: Request, upstream: Upstream, principal: Principal) -> Session | None:
        session_id = request.headers.get("mcp-session-id")
        return self.signer.open(session_id, upstream.name, principal.key) if session_id else None

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


_NO_CONTROL = {c: None for c in (*range(0x20), *range(0x7F, 0xA0))}


def _echo(x: Exchange) -> dict[str, str]:
    return {"mcp-session-id": x.session_id} if x.session_id else {}
