"""The A2A front: `POST /a2a/{agent}` and `GET /a2a/{agent}/.well-known/agent-card.json`.

One message, top to bottom:

    identity    the caller's Bearer token or API key, meant for this agent; or a delegation token
                Bastion handed an agent earlier (the chain so far); refusals are recorded
    body        bounded (`a2a.max_body_bytes`), strict JSON-RPC (no duplicate keys, bounded depth)
    method      sends are governed; task methods go to the task's creator only; the rest refused
    chain       an agent already in the delegation chain is not called again (a cycle), nor one
                past `identity.max_delegation_depth`
    pipeline    `send_message` on `Agent::"<agent>"` through every stage (Cedar, budgets for every
                actor, argument redaction), forwarded with Bastion's credential and a delegation
                token for the next hop, each answer (or stream event) bound to its task's
                creator, redacted and scanned, one audit record per message
    errors      JSON-RPC errors naming the policy and reason, as the A2A SDKs raise them

Both protocol versions pass through as they are: the caller's `A2A-Version` header goes with the
message, and the agent answers in the version it was asked in.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from gateway.call import Decision, Principal, Reason, ToolCall, new_trace_id
from gateway.config import A2AConfig
from gateway.errors import (
    AuthError,
    BastionError,
    BodyTimeout,
    PayloadTooLarge,
    ProtocolError,
    TooManyRefusals,
)
from gateway.fronts import jsonrpc
from gateway.fronts.a2a import wire
from gateway.fronts.client_info import client_name
from gateway.fronts.jsonrpc import parse_json
from gateway.fronts.wire import RefusalLimiter, explained, read_body, source_of, trace_id_of
from gateway.identity.authenticator import Authenticator
from gateway.identity.delegation import HEADER as DELEGATION_HEADER
from gateway.identity.delegation import Delegations
from gateway.pipeline import Answer, Pipeline
from gateway.upstreams.agents import VERSION_HEADER, AgentClient
from gateway.upstreams.resilience import FaultGuard
from gateway.upstreams.streamable_http import Reply

log = logging.getLogger("bastion.a2a")

REFUSED = -32050
"""JSON-RPC error code of a message Bastion refused (the reasons are in its message and `data`);
outside -32001..-32009, which A2A gives its own errors (the SDKs raise them as those)."""
TASK_NOT_FOUND = -32001
"""A2A's TaskNotFoundError: also what a task of someone else's looks like."""
UNSUPPORTED = -32004
"""A2A's UnsupportedOperationError."""


class A2AFront:
    """Serves the configured agents; see the module docstring."""

    def __init__(
        self,
        pipeline: Pipeline,
        auth: Authenticator,
        agents: Mapping[str, AgentClient],
        delegations: Delegations,
        cfg: A2AConfig,
        base_url: str,
        limits: tuple[int, float, int],
        refusals: RefusalLimiter,
    ) -> None:
        self.pipeline = pipeline
        self.auth = auth
        self.agents = agents
        self.delegations = delegations
        self.cfg = cfg
        self.base_url = base_url
        self.max_depth, self.body_timeout_s, self.max_chain = limits
        self.refusals = refusals

    # -- the card -------------------------------------------------------------------------------

    async def card(self, request: Request) -> Response:
        """The agent's card, reachable only through Bastion; for authenticated callers only."""
        name = request.path_params["agent"]
        agent = self.agents.get(name)
        if agent is None:
            return JSONResponse({"error": f"no agent {name[:64]!r} (see agents:)"}, 404)
        try:
            await self._authenticate(request, name, "agent-card")
            card = await agent.card(request.headers.get(VERSION_HEADER))
        except BastionError as err:
            return self._http_error(err)
        return JSONResponse(wire.rewrite_card(card, f"{self.base_url}/a2a/{name}/"))

    # -- messages -------------------------------------------------------------------------------

    async def __call__(self, request: Request) -> Response:
        name = request.path_params["agent"]
        agent = self.agents.get(name)
        if agent is None:
            return JSONResponse(_error(None, -32601, f"no agent {name[:64]!r} (see agents:)"), 404)
        try:
            principal = await self._authenticate(request, name, "message")
        except BastionError as err:
            return self._http_error(err)
        msg_id: Any = None
        try:
            body = await read_body(
                request, self.cfg.max_body_bytes, self.body_timeout_s, "a2a.max_body_bytes"
            )
            doc = parse_json(body, self.max_depth)
            method, msg_id, params = _request(doc)
            kind = wire.METHODS.get(method)
            base = ToolCall(
                name,
                method,
                {},
                protocol="a2a",
                action="message",
                principal=principal,
                client=client_name(request.headers),
                trace_id=trace_id_of(request) or new_trace_id(),
            )
            base.a2a = {"method": method}
            if kind is None or kind == "unrelayed" or (kind == "push" and not agent.cfg.push_notifications):
                why = wire.UNRELAYED.get(method) or (
                    f"method {method[:64]!r} is not an A2A method"
                    if kind is None
                    else "push notifications would deliver task updates around Bastion's redaction "
                    "and audit (agents.<name>.push_notifications); poll with GetTask or stream instead"
                )
                decision = await self.pipeline.refuse(base, "a2a", "method-not-relayed", why)
                code = -32601 if kind is None else UNSUPPORTED
                return _refusal(msg_id, decision, base.audit_id, code)
            version = request.headers.get(VERSION_HEADER)
            headers = agent.headers(version, stream=kind in ("stream", "subscribe"))
            if kind in ("send", "stream"):
                return await self._send(agent, principal, base, doc, body, params, headers, kind == "stream")
            return await self._task(agent, principal, base, doc, body, params, headers)
        except BastionError as err:  # a body too big or too slow keeps its HTTP status; the rest is JSON-RPC
            if isinstance(err, ProtocolError | PayloadTooLarge | BodyTimeout):  # refused before the pipeline
                refused = ToolCall(name, "message", {}, protocol="a2a", action="message", principal=principal)
                await self.pipeline.refuse(refused, "a2a", "malformed-message", err.message[:500])
            status = (
                err.http_status if isinstance(err, PayloadTooLarge | BodyTimeout | TooManyRefusals) else 200
            )
            return JSONResponse(_error(msg_id, _code(err), err.message), status)
        except Exception as exc:  # a bug: still an answer the SDKs can read (the call was recorded)
            log.error("A2A message to %s failed inside the gateway", name, exc_info=exc)
            return JSONResponse(_error(msg_id, -32603, f"internal error ({type(exc).__name__})"))

    async def _send(
        self,
        agent: AgentClient,
        principal: Principal,
        base: ToolCall,
        doc: dict[str, Any],
        body: bytes,
        params: dict[str, Any],
        headers: dict[str, str],
        stream: bool,
    ) -> Response:
        """A message for the agent: governed as `send_message`, forwarded with a delegation token."""
        msg_id = doc.get("id")
        message, sent = wire.message_of(params)
        call = ToolCall(
            agent.name,
            sent.skill or "message",
            sent.args,
            protocol="a2a",
            action="send_message",
            principal=principal,
            call_id=sent.message_id,
            client=base.client,
            trace_id=base.trace_id,
            audit_id=base.audit_id,
        )
        call.skill = sent.skill
        call.a2a = {"method": base.tool} | _ids(sent.task_id, sent.context_id)
        if sent.context_id is not None:
            call.session = f"a2a:{agent.name}:{sent.context_id}"
        scope = _scope(agent.name)
        refusal = self._chain_refusal(agent, principal)
        if refusal is None and _pushes(params) and not agent.cfg.push_notifications:
            refusal = ("a2a", "push-not-relayed", "push notification configs are not relayed to this agent")
        continued = sent.task_id is not None and refusal is None
        if continued and await self.pipeline.task_of(principal, scope, sent.task_id) is None:
            refusal = ("task", "task-owner", f"task {sent.task_id} is not one you created here")
        if refusal is not None:
            decision = await self.pipeline.refuse(call, *refusal)
            return _refusal(msg_id, decision, call.audit_id)
        headers[DELEGATION_HEADER] = self.delegations.mint(principal, agent.cfg.subject)
        exchange = _Exchange(self.pipeline, call, agent, headers, doc, message, body, scope)
        answer = await self.pipeline.exchange(call, exchange)
        return self._answer(answer, msg_id, stream)

    async def _task(
        self,
        agent: AgentClient,
        principal: Principal,
        base: ToolCall,
        doc: dict[str, Any],
        body: bytes,
        params: dict[str, Any],
        headers: dict[str, str],
    ) -> Response:
        """A task method: relayed for the task's creator only, its answers redacted and scanned."""
        msg_id = doc.get("id")
        task_id = wire.an_id(params.get("taskId", params.get("id")), "the task id")
        scope = _scope(agent.name)
        task = None if task_id is None else await self.pipeline.task_of(principal, scope, task_id)
        if task is None:
            why = f"no task {task_id!s:.200} of yours at agent {agent.name}"
            await self.pipeline.refuse(base, "task", "task-owner", why)
            return JSONResponse(_error(msg_id, TASK_NOT_FOUND, why))
        base.a2a = {"method": base.tool, "task_id": task.task_id}
        why = f"task {task.task_id[:100]}, created by the message recorded as {task.audit_id}"
        decided = Decision("allow", (Reason("task-owner", why),), "task")
        exchange = _Exchange(self.pipeline, base, agent, headers, doc, None, body, scope)
        answer = await self.pipeline.exchange(base, exchange, decided)
        return self._answer(answer, msg_id, wire.METHODS[base.tool] == "subscribe")

    def _answer(self, answer: Answer, msg_id: Any, stream: bool) -> Response:
        if answer.refused:
            approval = self.pipeline.approval_of(answer.call, answer.decision)
            return _refusal(msg_id, answer.decision, answer.call.audit_id, approval=approval)
        if answer.status >= 400:
            why = f"agent {answer.call.upstream} answered HTTP {answer.status}"
            return JSONResponse(_error(msg_id, -32603, why), 502)
        if answer.events is not None:
            return StreamingResponse(_sse(answer, msg_id), media_type="text/event-stream")
        if answer.raw is not None:
            return Response(answer.raw, media_type="application/json")
        return JSONResponse(answer.message)

    # -- identity and the chain -----------------------------------------------------------------

    async def _authenticate(self, request: Request, name: str, what: str) -> Principal:
        """The caller; a refused credential is recorded (rate-limited per address) and raised."""
        try:
            return await self.auth.authenticate(request.headers.get("authorization"), agent=name)
        except AuthError as err:
            self.refusals.check(source_of(request))
            call = ToolCall(name, what, {}, protocol="a2a", action="message")
            await self.pipeline.refuse(call, "identity", err.error, err.message)
            raise

    def _chain_refusal(self, agent: AgentClient, principal: Principal) -> tuple[str, str, str] | None:
        """Why this principal may not send to this agent whatever policy says: the agent is
        already in the chain (a cycle), or one more hop would be deeper than allowed."""
        actors = principal.delegation_chain or ((principal.agent,) if principal.agent else ())
        if agent.cfg.subject == principal.sub or agent.cfg.subject in actors:
            chain = " -> ".join([principal.sub, *reversed(actors)])
            why = f"agent {agent.name} ({agent.cfg.subject}) is already in the delegation chain {chain}"
            return "identity", "delegation-cycle", why[:500]
        if len(actors) + 1 > self.max_chain:
            why = f"one more hop would exceed identity.max_delegation_depth ({self.max_chain})"
            return "identity", "delegation-depth", why
        return None

    def _http_error(self, err: BastionError) -> Response:
        headers: dict[str, str] = {}
        if isinstance(err, TooManyRefusals):
            headers["retry-after"] = str(max(1, round(err.retry_after_s)))
        if isinstance(err, AuthError):
            meta = f"{self.base_url}/.well-known/oauth-protected-resource"
            headers["www-authenticate"] = self.auth.www_authenticate(meta, err)
        return JSONResponse(_error(None, _code(err), err.message), err.http_status, headers=headers)


class _Exchange:
    """One message to one agent, as the pipeline's `Peer`: how to send it, how to read the answers."""

    def __init__(
        self,
        pipeline: Pipeline,
        call: ToolCall,
        agent: AgentClient,
        headers: dict[str, str],
        doc: dict[str, Any],
        message: dict[str, Any] | None,
        body: bytes,
        scope: str,
    ) -> None:
        self.pipeline = pipeline
        self.call = call
        self.agent = agent
        self.guard: FaultGuard = agent.guard
        self.headers = headers
        self.doc = doc
        self.message = message
        self.body = body
        self.scope = scope
        self.owned: set[str] = set()

    async def send(self) -> tuple[Reply, Any]:
        body = self.body
        if self.call.forward_args is not None and self.message is not None:
            # redacted: the message's parts are replaced, the caller's bytes are not sent
            params = {**self.doc["params"], "message": wire.with_args(self.message, self.call.forward_args)}
            body = json.dumps({**self.doc, "params": params}, ensure_ascii=False).encode()
        return await self.agent.post(body, self.headers), None

    async def settle(self, call: ToolCall, result: dict[str, Any]) -> str | None:
        """Bind each task the answer names to the caller (one of someone else's is withheld)."""
        for kind, obj in wire.objects(result):
            task_id = wire.task_id_of(kind, obj)
            if task_id is None or task_id in self.owned:
                continue
            refused = await self.pipeline.own_task(call, self.scope, task_id, again=True)
            if refused is not None:
                return refused
            self.owned.add(task_id)
            assert call.a2a is not None
            call.a2a |= _ids(task_id, obj.get("contextId"))
            if call.session is None and isinstance(obj.get("contextId"), str):
                call.session = f"a2a:{self.agent.name}:{obj['contextId'][:200]}"
        return None

    def view(self, result: dict[str, Any]) -> dict[str, Any]:
        return wire.view(result)

    def apply(self, result: dict[str, Any], view: dict[str, Any]) -> dict[str, Any]:
        return wire.apply(result, view)


async def _sse(answer: Answer, msg_id: Any) -> AsyncIterator[bytes]:
    """The agent's stream as the caller gets it; a failure midway ends it with an error event."""
    assert answer.events is not None
    try:
        async for event in answer.events:
            yield f"data: {event.data}\n\n".encode()
    except BastionError as err:
        yield f"data: {json.dumps(_error(msg_id, _code(err), err.message))}\n\n".encode()


def _request(doc: Any) -> tuple[str, Any, dict[str, Any]]:
    """(method, id, params) of one JSON-RPC request; ProtocolError naming what is wrong."""
    if not isinstance(doc, dict) or doc.get("jsonrpc") != "2.0":
        raise ProtocolError('the body must be one JSON-RPC 2.0 request ("jsonrpc": "2.0")')
    method, msg_id, params = doc.get("method"), doc.get("id"), doc.get("params", {})
    if not isinstance(method, str):
        raise ProtocolError("method must be a string")
    if (problem := jsonrpc.method_problem(method)) is not None:  # it goes into the audit and logs
        raise ProtocolError(problem, jsonrpc.METHOD_NOT_FOUND)
    if msg_id is None or isinstance(msg_id, bool) or not isinstance(msg_id, str | int):
        raise ProtocolError("id must be a string or an integer (notifications are not relayed)")
    if not isinstance(params, dict):
        raise ProtocolError("params must be an object", jsonrpc.INVALID_PARAMS)
    return method, msg_id, params


def _pushes(params: dict[str, Any]) -> bool:
    config = params.get("configuration")
    if not isinstance(config, dict):
        return False
    return any(config.get(k) for k in ("pushNotificationConfig", "taskPushNotificationConfig"))


def _scope(agent: str) -> str:
    """Where an agent's tasks are bound to their creators (apart from any upstream's)."""
    return f"a2a:{agent}"


def _ids(task_id: Any, context_id: Any) -> dict[str, str]:
    out = {}
    if isinstance(task_id, str):
        out["task_id"] = task_id[:200]
    if isinstance(context_id, str):
        out["context_id"] = context_id[:200]
    return out


def _code(err: BastionError) -> int:
    """A JSON-RPC code for a Bastion error that no A2A SDK mistakes for one of A2A's own."""
    return err.jsonrpc_code if err.jsonrpc_code in (-32700, -32600, -32601, -32602) else -32603


def _error(msg_id: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "id": msg_id, "error": err}


def _refusal(
    msg_id: Any,
    decision: Decision,
    audit_id: str,
    code: int = REFUSED,
    approval: dict[str, str] | None = None,
) -> Response:
    text, data = explained(decision, audit_id, approval)
    return JSONResponse(_error(msg_id, code, text, data))
