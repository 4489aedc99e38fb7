"""Inline approval: a held `tools/call` is put to a human inside the MCP exchange.

Only for clients that declared elicitation; everyone else gets the held result and the retry flow
(docs/approvals.md). Two eras, one rule: nothing is forwarded until the approval is recorded in the
state DB, and then the call goes through the pipeline again, which finds the approval, runs the
later stages and consumes it exactly once, as a repeated call would.

- URL mode (preferred): the client is asked to open Bastion's approval page, where an approver
  authenticates as usual (admin token, Cedar `approve`, never their own call). The client's
  `accept` only means the link was opened: Bastion then waits, at most `approvals.inline_wait_s`,
  for the decision in the state DB.
- Form mode: a yes/no question answered in the client itself, so by the caller's side. Offered
  only when Cedar permits the caller `Action::"approve_own"` on this call (no default policy does);
  an accepted "yes" is then recorded as the caller's own approval.

Legacy sessions: `elicitation/create` goes out on the POST's SSE stream, its id sealed (approval,
mode, principal), so the client's answer, a separate POST, is understood by any replica.
2026-07-28: an `input_required` result; its `requestState` is sealed and bound to the principal
and to the exact call (the approval binding: principal, agent and chain, tool, arguments); the
retry carrying it is checked and then governed from scratch. A forged or altered state is
refused and audited.

A client that leaves while it waits gets nothing forwarded on its behalf: a legacy stream is
cancelled with its connection; a 2026-07-28 retry watches its request for the disconnect (when the
front handed it the request) and is then refused, leaving an approval given meanwhile unused.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gateway.call import Decision, Principal, ToolCall
from gateway.errors import ApprovalError, BastionError
from gateway.fronts import jsonrpc
from gateway.state.approvals import Approvals, binding_of
from gateway.state.db import STATE_ERRORS

if TYPE_CHECKING:
    from gateway.fronts.mcp.endpoint import MCPFront
    from gateway.fronts.mcp.exchange import Exchange

log = logging.getLogger("bastion.approvals")

INPUT_KEY = "bastion/approval"
"""The key of Bastion's question in a 2026-07-28 `inputRequests` map."""
ELICITATION_ID = "bastion-approval."
"""Prefix of the JSON-RPC ids of Bastion's own legacy `elicitation/create` requests."""
STATE_PREFIX = "bastion-approval."
"""Prefix of the `requestState` Bastion mints (any other state belongs to the upstream)."""
CLIENT_CAPABILITIES = "io.modelcontextprotocol/clientCapabilities"
KEEPALIVE_S = 5.0
"""An SSE comment this often while a legacy call waits, so that idle-read timeouts do not fire."""
_ELICIT_PURPOSE = "approval-elicitation"
_STATE_PURPOSE = "approval-request-state"
_URL_MODE_VERSIONS = ("2025-11-25",)
"""Handshake versions whose form elicitation carries a `mode` field."""
FORM_SCHEMA = {
    "type": "object",
    "properties": {
        "approve": {
            "type": "boolean",
            "title": "Run this call",
            "description": "Yes runs the call once; no leaves it waiting for an approver.",
        }
    },
    "required": ["approve"],
}


def elicitation_modes(capabilities: Any) -> frozenset[str]:
    """The elicitation modes declared in client capabilities; `{}` means form only (2025-06-18)."""
    found = capabilities.get("elicitation") if isinstance(capabilities, dict) else None
    if not isinstance(found, dict):
        return frozenset()
    return frozenset(m for m in ("form", "url") if isinstance(found.get(m), dict)) or frozenset({"form"})


def modern_elicitation(params: Any) -> frozenset[str]:
    """The elicitation modes a 2026-07-28 request declares in `_meta` (per request, no session)."""
    meta = params.get("_meta") if isinstance(params, dict) else None
    return elicitation_modes(meta.get(CLIENT_CAPABILITIES) if isinstance(meta, dict) else None)


def _accepted(answer: Any, mode: str) -> bool:
    """Whether an ElicitResult says yes: `accept`, and for the form, `approve: true`."""
    if not isinstance(answer, dict) or answer.get("action") != "accept":
        return False
    if mode == "url":
        return True
    content = answer.get("content")
    return isinstance(content, dict) and content.get("approve") is True


class InlineApprovals:
    """Asks a held call's approval inside the MCP exchange; see the module docstring."""

    def __init__(self, front: MCPFront) -> None:
        self.front = front
        self._answers: dict[str, asyncio.Future[Any]] = {}
        """Legacy elicitations asked by this process, by request id, until the client answers."""

    @property
    def approvals(self) -> Approvals | None:
        return self.front.pipeline.approvals

    def mode_for(self, x: Exchange, call: ToolCall, decision: Decision) -> str | None:
        """How to ask for this held call inline (`url`, `form`), or None: answer it held."""
        approvals = self.approvals
        if (
            decision.effect != "approval_required"
            or approvals is None
            or not approvals.cfg.inline
            or call.approval_id is None
            or not x.elicitation
        ):
            return None
        if not x.modern and x.session_id is None:
            return None  # no session: nowhere to send the answer back to
        if "form" in x.elicitation and self.front.pipeline.may_approve_own(call):
            return "form"
        if "url" in x.elicitation:
            return "url"
        return None

    def _question(self, call: ToolCall, mode: str, legacy_id: bool) -> dict[str, Any]:
        """The `elicitation/create` params for this call's approval."""
        approvals = self.approvals
        assert approvals is not None and call.approval_id is not None
        what = f"{call.upstream}/{call.tool}"
        if mode == "url":
            params: dict[str, Any] = {
                "mode": "url",
                "message": (
                    f"A call to {what} needs approval {call.approval_id}. Open the link and have "
                    f"{approvals.cfg.approvers} approve it there; the call runs once it is approved."
                ),
                "url": approvals.url_of(call.approval_id),
            }
            if legacy_id:
                params["elicitationId"] = call.approval_id
            return params
        return {
            "mode": "form",
            "message": f"Run the call to {what} (approval {call.approval_id}) once?",
            "requestedSchema": FORM_SCHEMA,
        }

    # -- legacy: elicitation/create on the POST's stream ---------------------------------------

    def ask_in_stream(self, x: Exchange, call: ToolCall, decision: Decision, mode: str) -> Response:
        """Answer the held call with an SSE stream: the question, then (after the decision or the
        wait) the call's result, or the held result."""
        approvals = self.approvals
        assert approvals is not None and call.approval_id is not None
        approval_id = call.approval_id
        wait_s = approvals.cfg.inline_wait_s
        sealed = self.front.signer.seal(
            _ELICIT_PURPOSE,
            x.principal.key,
            wait_s + 60,
            {"a": approval_id, "m": mode, "n": secrets.token_hex(6)},
        )
        elicitation_id = ELICITATION_ID + sealed
        params = self._question(call, mode, legacy_id=True)
        if mode == "form" and x.session is not None and x.session.version not in _URL_MODE_VERSIONS:
            params.pop("mode")  # 2025-06-18 knows only the form, without a mode field
        question = {"jsonrpc": "2.0", "id": elicitation_id, "method": "elicitation/create", "params": params}
        answered: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        held = self.front.refused_body(x, call, decision)

        async def stream() -> AsyncIterator[bytes]:
            # Registered here, not before: a response never sent (the client left at once) never
            # runs this generator's `finally`, and would leave the entry behind for good.
            self._answers[elicitation_id] = answered
            try:
                yield jsonrpc.sse(jsonrpc.dumps(question))
                loop = asyncio.get_running_loop()
                deadline = loop.time() + wait_s
                status = "pending"
                while True:
                    # An answer that ends the wait may come before the first look: then one read.
                    settled = answered.done() and mode == "url" and _accepted(answered.result(), mode)
                    stop = None if settled else answered
                    remaining = max(0.0, deadline - loop.time())
                    try:
                        found = await approvals.await_decision(approval_id, min(KEEPALIVE_S, remaining), stop)
                    except STATE_ERRORS as exc:
                        why = type(exc).__name__
                        log.error("inline approval %s: state unavailable: %s", approval_id, why)
                        break
                    status = found.effective_status if found is not None else "missing"
                    if status != "pending":
                        break
                    if answered.done() and (mode == "form" or not _accepted(answered.result(), mode)):
                        break  # declined or cancelled (or a form answer that decided nothing)
                    if loop.time() >= deadline:
                        break
                    yield b": waiting for approval\n\n"
                log.info("inline approval %s (%s mode): %s", approval_id, mode, status)
                if mode == "url" and status != "pending":
                    done = {"elicitationId": approval_id}
                    note = {"jsonrpc": "2.0", "method": "notifications/elicitation/complete", "params": done}
                    yield jsonrpc.sse(jsonrpc.dumps(note))
                if status in ("approved", "denied"):
                    async for chunk in self._run_again(x):
                        yield chunk
                else:
                    yield jsonrpc.sse(held)
            finally:
                self._answers.pop(elicitation_id, None)

        headers = {"cache-control": "no-store"}
        if x.session_id:
            headers["mcp-session-id"] = x.session_id
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    async def _run_again(self, x: Exchange) -> AsyncIterator[bytes]:
        """The decided call through the pipeline once more, as the client's repeat would be; its
        answer as SSE events."""
        front = self.front
        call, key, _ = front.call_of(x)
        msg_id = x.msg.get("id")
        try:
            response = front.render(x, await front.pipeline.run(call, x.outgoing(), key))
        except BastionError as err:
            yield jsonrpc.sse(jsonrpc.error(msg_id, err.jsonrpc_code, err.message))
            return
        if isinstance(response, StreamingResponse):
            async for chunk in response.body_iterator:
                yield chunk if isinstance(chunk, bytes) else str(chunk).encode()
        elif response.status_code == 200:
            yield jsonrpc.sse(bytes(response.body))
        else:
            why = f"upstream answered HTTP {response.status_code}"
            yield jsonrpc.sse(jsonrpc.error(msg_id, -32603, why))

    async def answer(self, msg: dict[str, Any], principal: Principal) -> bool:
        """Take a client's response to Bastion's `elicitation/create`; False: not one of ours.

        A form "yes" records the caller's approval here, so whichever replica receives the answer
        decides; the waiting call sees the decision in the state DB."""
        msg_id = msg.get("id")
        if "method" in msg or not isinstance(msg_id, str) or not msg_id.startswith(ELICITATION_ID):
            return False
        body = self.front.signer.unseal(_ELICIT_PURPOSE, principal.key, msg_id[len(ELICITATION_ID) :])
        if body is None:
            log.warning("an answer to an unknown, expired or foreign approval elicitation was ignored")
            return True  # never forwarded: the upstream did not ask it
        result = msg.get("result")
        answer = result if isinstance(result, dict) else {"action": "cancel"}
        if body.get("m") == "form" and _accepted(answer, "form"):
            await self._approve_own(str(body.get("a")), principal)
        waiting = self._answers.get(msg_id)
        if waiting is not None and not waiting.done():
            waiting.set_result(answer)
        return True

    async def _approve_own(self, approval_id: str, principal: Principal) -> None:
        """Record the caller's own "yes" to the approval form Cedar let them answer."""
        approvals = self.approvals
        if approvals is None:
            return
        try:
            found = await approvals.get(approval_id)
            if found is None or (found.issuer, found.subject) != (principal.issuer, principal.sub):
                log.warning("inline approval %s: the answer is not from the held call's caller", approval_id)
                return
            note = "confirmed inline by the caller (Action::approve_own)"
            await approvals.decide(approval_id, True, principal.id, note)
        except ApprovalError as err:
            log.info("inline approval %s not recorded: %s", approval_id, err.message)
        except STATE_ERRORS as exc:
            log.error("inline approval %s not recorded: %s", approval_id, type(exc).__name__)

    # -- 2026-07-28: input_required, and the retry -------------------------------------------

    def input_required(self, x: Exchange, call: ToolCall, decision: Decision, mode: str) -> Response:
        """Answer the held call with an `input_required` result asking the question."""
        approvals = self.approvals
        assert approvals is not None and call.approval_id is not None and call.principal is not None
        state = STATE_PREFIX + self.front.signer.seal(
            _STATE_PURPOSE,
            call.principal.key,
            approvals.cfg.ttl_s,
            {
                "a": call.approval_id,
                "m": mode,
                "b": binding_of(call.principal, call.upstream, call.tool, call.arguments),
            },
        )
        shown = self.front.pipeline.approval_of(call, decision) or {}
        result = {
            "resultType": "input_required",
            "inputRequests": {
                INPUT_KEY: {"method": "elicitation/create", "params": self._question(call, mode, False)}
            },
            "requestState": state,
            "_meta": {
                "bastion/decision": {
                    "decision": decision.effect,
                    "reasons": [r.to_json() for r in decision.reasons],
                    "audit_id": call.audit_id,
                    **shown,
                }
            },
        }
        return Response(jsonrpc.result(x.msg.get("id"), result), media_type="application/json")

    @staticmethod
    def is_resumption(x: Exchange) -> bool:
        state = x.params.get("requestState")
        return isinstance(state, str) and state.startswith(STATE_PREFIX)

    async def resume(self, x: Exchange, call: ToolCall) -> Response | None:
        """Check the retry of an `input_required` round and act on the answer it carries.

        Returns a refusal for a state that was not minted by Bastion for this principal and this
        exact call; otherwise None, with Bastion's fields taken out of the request (the upstream
        never sees them) and, for an accepted question, the decision made or waited for."""
        approvals = self.approvals
        state = str(x.params.get("requestState"))
        body = None
        if approvals is not None and call.principal is not None:
            body = self.front.signer.unseal(_STATE_PURPOSE, call.principal.key, state[len(STATE_PREFIX) :])
        if approvals is None or call.principal is None or body is None:
            why = "requestState is not one Bastion issued to this caller, or it has expired"
        elif body.get("b") != binding_of(call.principal, call.upstream, call.tool, call.arguments):
            why = "requestState belongs to another call (tool or arguments differ)"
        else:
            why = None
        if why is not None:
            await self.front.pipeline.refuse(call, "approval", "invalid-request-state", why)
            error = jsonrpc.error(x.msg.get("id"), jsonrpc.INVALID_PARAMS, f"invalid requestState: {why}")
            return Response(error, media_type="application/json")
        assert approvals is not None and body is not None and call.principal is not None
        params = dict(x.params)
        params.pop("requestState", None)
        responses = params.pop("inputResponses", None)
        answer = responses.pop(INPUT_KEY, None) if isinstance(responses, dict) else None
        if isinstance(responses, dict) and responses:
            params["inputResponses"] = responses  # someone else's (the upstream's) round
        x.msg = {**x.msg, "params": params}
        x.body = jsonrpc.dumps(x.msg)
        approval_id, mode = str(body.get("a")), str(body.get("m"))
        if not _accepted(answer, mode):
            log.info("inline approval %s (%s mode): not accepted by the client", approval_id, mode)
        elif mode == "form":
            await self._approve_own(approval_id, call.principal)
        else:
            left = asyncio.ensure_future(_client_left(x.request)) if x.request is not None else None
            try:
                await approvals.await_decision(approval_id, approvals.cfg.inline_wait_s, left)
            except STATE_ERRORS as exc:
                log.error("inline approval %s: state unavailable: %s", approval_id, type(exc).__name__)
            finally:
                if left is not None and not left.done():
                    left.cancel()
            if left is not None and left.done() and not left.cancelled():
                left.exception()  # retrieved: a receive that failed means the client is gone too
                # Nobody would receive the result: an approval given meanwhile stays for a retry.
                why = "the client went away while waiting for the approval; nothing was forwarded"
                log.info("inline approval %s: %s", approval_id, why)
                refused = await self.front.pipeline.refuse(call, "approval", "client-gone", why)
                return Response(self.front.refused_body(x, call, refused), media_type="application/json")
        return None


async def _client_left(request: Request) -> bool:
    """Returns once the client has disconnected (its body is read: nothing else arrives but that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return True
