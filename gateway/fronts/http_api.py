"""The plain HTTP tool API, for frameworks that do not speak MCP.

    POST /v1/tool-calls   {upstream, tool, arguments, call_id?}  -> decide, forward, audit
    POST /v1/decisions    the same body                          -> decide and audit, no forwarding
    GET  /openapi.json    the OpenAPI 3.1 document of both

Both go through the same pipeline as MCP calls (identity, policy, budgets, redaction, audit);
only the wire differs. Status codes: 200 answered, 400 bad body, 401/403 credential, 403 denied,
429 over budget (with `Retry-After`), 202 held for a human's approval (docs/approvals.md), 502/504
upstream failed. `/v1/decisions` answers 200 with
the decision whatever it is: the question was answered. Its allowed calls are audited with
status `decided` (executed by the caller, outcome unknown to Bastion) and do consume budgets,
since the caller goes on to run the tool.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.call import Decision, Principal, ToolCall
from gateway.errors import (
    AuthError,
    BastionError,
    CircuitOpen,
    DuplicateCall,
    ProtocolError,
    TooManyRefusals,
    UpstreamError,
)
from gateway.fronts.client_info import client_name
from gateway.fronts.jsonrpc import parse_json
from gateway.fronts.wire import RefusalLimiter, read_body, source_of, trace_id_of, traceparent
from gateway.identity.authenticator import Authenticator, require_scopes
from gateway.pipeline import Pipeline
from gateway.state.idempotency import Previous
from gateway.upstreams.forward import Outgoing

log = logging.getLogger("bastion.http_api")

_FIELDS = {"upstream", "tool", "arguments", "call_id"}


class NotFound(BastionError):
    code = "not_found"
    http_status = 404


class HTTPToolAPI:
    def __init__(
        self,
        pipeline: Pipeline,
        auth: Authenticator,
        base_url: str,
        limits: tuple[int, int, float],
        refusals: RefusalLimiter,
    ) -> None:
        self.pipeline = pipeline
        self.auth = auth
        self.base_url = base_url
        self.max_body, self.max_depth, self.body_timeout_s = limits
        """listen.max_body_bytes, max_json_depth, body_timeout_s."""
        self.refusals = refusals

    async def tool_calls(self, request: Request) -> Response:
        return await self._handle(request, forward=True)

    async def decisions(self, request: Request) -> Response:
        return await self._handle(request, forward=False)

    async def _handle(self, request: Request, forward: bool) -> Response:
        try:
            body = await read_body(request, self.max_body, self.body_timeout_s)
            upstream, tool, arguments, call_id = _parse(body, self.max_depth)
            client = client_name(request.headers)
        except BastionError as err:
            return self._error(err, None)
        call = ToolCall(upstream, tool, arguments, protocol="http", call_id=call_id, client=client)
        call.trace_id = trace_id_of(request) or call.trace_id
        try:
            return await self._serve(request, call, forward)
        except BaseException as exc:
            return self._error(exc, call)

    async def _serve(self, request: Request, call: ToolCall, forward: bool) -> Response:
        try:
            call.principal = await self._authenticate(request, call)
        except AuthError as err:
            self.refusals.check(source_of(request))
            await self.pipeline.refuse(call, "identity", err.error, err.message)
            raise
        if call.upstream not in self.pipeline.upstreams:
            why = f"no upstream named {call.upstream[:100]!r}"
            await self.pipeline.refuse(call, "protocol", "unknown-upstream", why)
            raise NotFound(why)
        if not forward:
            return self._decided(call, await self.pipeline.decide_only(call))
        params = {"name": call.tool, "arguments": call.arguments}
        msg = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}
        out = Outgoing(msg, None, True, call.principal.key, trace=traceparent(call.trace_id))
        answer = await self.pipeline.run(call, out, call.call_id)
        if answer.refused:
            return _denied(answer.decision, call.audit_id, self.pipeline.approval_of(call, answer.decision))
        if answer.previous is not None:
            return _repeat(answer.previous, answer.decision, call.audit_id)
        if answer.status >= 400:
            raise UpstreamError(f"upstream answered HTTP {answer.status}")
        reply = await answer.whole()
        if "error" in reply:
            failed = {"decision": answer.decision.effect, "error": reply["error"], "audit_id": call.audit_id}
            return JSONResponse(failed, 502)
        return JSONResponse(
            {"decision": answer.decision.effect, "result": reply.get("result"), "audit_id": call.audit_id}
        )

    def _error(self, exc: BaseException, call: ToolCall | None) -> Response:
        """The one place an error becomes an HTTP tool API answer (a JSON body naming it)."""
        if not isinstance(exc, BastionError):
            if not isinstance(exc, Exception):
                raise exc  # cancellation and interpreter exits are not answers
            log.error("HTTP tool call failed inside the gateway", exc_info=exc)
            exc = BastionError(f"internal error ({type(exc).__name__}); the call was recorded")
        body = exc.to_json()
        headers: dict[str, str] = {}
        if isinstance(exc, UpstreamError):
            body = {"decision": "allow", "error": exc.to_json()}
        if isinstance(exc, CircuitOpen | TooManyRefusals):
            headers["retry-after"] = str(max(1, round(exc.retry_after_s)))
        if isinstance(exc, AuthError):
            meta = f"{self.base_url}/.well-known/oauth-protected-resource"
            headers["www-authenticate"] = self.auth.www_authenticate(meta, exc)
        if call is not None:
            body["audit_id"] = call.audit_id
        return JSONResponse(body, exc.http_status, headers=headers)

    async def _authenticate(self, request: Request, call: ToolCall) -> Principal:
        principal = await self.auth.authenticate(request.headers.get("authorization"), call.upstream)
        up = self.pipeline.upstreams.get(call.upstream)
        if up is not None:
            require_scopes(principal, up.cfg.required_scopes)
        return principal

    def _decided(self, call: ToolCall, decision: Decision) -> Response:
        body: dict[str, Any] = {
            "decision": decision.effect,
            "reasons": [r.to_json() for r in decision.reasons],
            "stage": decision.stage,
            "policy_version": decision.policy_version,
            "audit_id": call.audit_id,
        }
        if decision.allowed and call.forward_args is not None:
            body["arguments"] = call.forward_args  # what the caller may send: redacted
        if decision.retry_after_s is not None:
            body["retry_after_s"] = decision.retry_after_s
        return JSONResponse(body)


def _parse(body: bytes, max_depth: int) -> tuple[str, str, dict[str, Any], str | None]:
    data = parse_json(body, max_depth)
    if not isinstance(data, dict):
        raise ProtocolError("the body must be a JSON object: {upstream, tool, arguments, call_id?}")
    if unknown := sorted(set(data) - _FIELDS):
        raise ProtocolError(f"unknown field(s): {', '.join(unknown)[:200]}")
    upstream, tool = data.get("upstream"), data.get("tool")
    arguments, call_id = data.get("arguments", {}), data.get("call_id")
    if not isinstance(upstream, str) or not upstream or len(upstream) > 64:
        raise ProtocolError('"upstream" must be a non-empty string (an upstream name from the config)')
    if not isinstance(tool, str) or not tool or len(tool) > 200:
        raise ProtocolError('"tool" must be a non-empty string')
    if not isinstance(arguments, dict):
        raise ProtocolError('"arguments" must be an object')
    if call_id is not None and (not isinstance(call_id, str) or not 0 < len(call_id) <= 200):
        raise ProtocolError('"call_id" must be a string of 1 to 200 characters')
    return upstream, tool, arguments, call_id


def _repeat(first: Previous, decision: Decision, audit_id: str) -> Response:
    """A repeated call_id: the first call's result when it was kept (200), else 409 naming it."""
    if first.same_call and first.response is not None:
        try:
            kept = json.loads(first.response)
        except ValueError:
            kept = None
        if isinstance(kept, dict) and "result" in kept:
            return JSONResponse(
                {
                    "decision": decision.effect,
                    "result": kept["result"],
                    "audit_id": audit_id,
                    "duplicate_of": first.audit_id,
                }
            )
    dup = DuplicateCall(first.message, first)
    body = {**dup.to_json(), "duplicate_of": first.audit_id, "audit_id": audit_id}
    return JSONResponse(body, dup.http_status)


def _denied(decision: Decision, audit_id: str, approval: dict[str, str] | None = None) -> Response:
    body = {
        "decision": decision.effect,
        "reasons": [r.to_json() for r in decision.reasons],
        "stage": decision.stage,
        "audit_id": audit_id,
    }
    if approval is not None:
        return JSONResponse(body | approval, 202)
    if decision.retry_after_s is not None:
        return JSONResponse(body, 429, headers={"retry-after": str(decision.retry_after_s)})
    return JSONResponse(body, 403)


_CALL_BODY = {
    "type": "object",
    "required": ["upstream", "tool"],
    "additionalProperties": False,
    "properties": {
        "upstream": {"type": "string", "description": "an upstream name from the config"},
        "tool": {"type": "string"},
        "arguments": {"type": "object", "default": {}},
        "call_id": {"type": "string", "maxLength": 200, "description": "your stable id for this call"},
    },
}
_REASONS = {
    "type": "array",
    "items": {"type": "object", "properties": {"policy": {"type": "string"}, "reason": {"type": "string"}}},
}
_DENIAL = {
    "type": "object",
    "properties": {
        "decision": {"const": "deny"},
        "reasons": _REASONS,
        "stage": {"type": "string"},
        "audit_id": {"type": "string"},
    },
}


_HELD = {
    "type": "object",
    "properties": {
        "decision": {"const": "approval_required"},
        "reasons": _REASONS,
        "stage": {"type": "string"},
        "audit_id": {"type": "string"},
        "approval_id": {"type": "string"},
        "approval_url": {"type": "string", "description": "the approval page (docs/approvals.md)"},
        "approvers": {"type": "string", "description": "whom to ask (approvals.approvers)"},
    },
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def openapi(base_url: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the HTTP tool API."""
    error = {"type": "object", "properties": {"error": {"type": "string"}, "message": {"type": "string"}}}
    common = {
        "400": _json(error, "the body is not what the API takes; `message` says what is wrong"),
        "401": _json(error, "no or bad credential; see WWW-Authenticate"),
    }
    result = {
        "type": "object",
        "properties": {
            "decision": {"enum": ["allow", "transform"]},
            "result": {"type": "object", "description": "the MCP CallToolResult"},
            "audit_id": {"type": "string"},
            "duplicate_of": {
                "type": "string",
                "description": "set when answering a repeated call_id: the first call's audit record",
            },
        },
    }
    decision = {
        "type": "object",
        "properties": {
            "decision": {"enum": ["allow", "deny", "transform", "approval_required"]},
            "reasons": _REASONS,
            "stage": {"type": "string"},
            "policy_version": {"type": "string"},
            "arguments": {
                "type": "object",
                "description": "redacted arguments, when the decision is transform",
            },
            "retry_after_s": {"type": "integer"},
            "audit_id": {"type": "string"},
        },
    }
    body = {"required": True, "content": {"application/json": {"schema": _CALL_BODY}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Bastion HTTP tool API", "version": "1"},
        "servers": [{"url": base_url}],
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": {
            "/v1/tool-calls": {
                "post": {
                    "summary": "Call a tool through Bastion: decide, forward, audit",
                    "requestBody": body,
                    "responses": {
                        "200": _json(result, "allowed and answered"),
                        "202": _json(_HELD, "held for a human: approve it, then make the same call again"),
                        **common,
                        "403": _json(_DENIAL, "denied (by policy, scope, or a refused credential scope)"),
                        "404": _json(error, "no such upstream"),
                        "429": _json(_DENIAL, "over budget; Retry-After says when it resets"),
                        "409": _json(error, "a repeated call_id; `duplicate_of` names the first record"),
                        "413": _json(error, "the body is over listen.max_body_bytes"),
                        "502": _json(error, "the upstream failed"),
                        "503": _json(error, "the upstream's circuit breaker is open; see Retry-After"),
                        "504": _json(error, "the upstream timed out"),
                    },
                }
            },
            "/v1/decisions": {
                "post": {
                    "summary": "Decide only: Bastion as a policy decision point",
                    "requestBody": body,
                    "responses": {"200": _json(decision, "the decision"), **common},
                }
            },
        },
    }


def openapi_json(base_url: str) -> bytes:
    return json.dumps(openapi(base_url)).encode()
