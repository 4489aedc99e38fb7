"""The governed path, written once: every governed message, from admission to its audit record.

    front -> run(call, out):
        admit:   stages in order (below) -> approvals -> write-ahead record (pending)
        repeat:  a call_id already used answers from its first call instead of running again
        forward: through the upstream's fault guard (deadline, retries, breaker)
        result:  redaction, then the injection scan of what the client will see
        record:  the outcome completes the record, in a `finally` whatever happened
    client <- Answer (the front renders it in its own wire format)

The stage order is set in `stages_in_order` and nowhere else. Why each sits where it does:

1. pinning: a tool whose definition changed (a rug pull) is refused before anything about the
   call is scanned, charged or even evaluated.
2. taint: reads whether the session is tainted, which Cedar's `context.session.tainted` needs.
3. redaction (argument scan): finds PII in the arguments, which Cedar's `context.pii` needs. The
   arguments are *transformed* only after every stage let the call through (`decide`).
4. policy: cheap (tens of µs, in memory) and the one that most often says no, so nothing costly
   runs, and nothing is charged, for a call that will be denied.
5. budgets: charged last, once nothing else can refuse the call for policy reasons; a later
   refusal (approval used meanwhile, audit store down, upstream unreachable) refunds them.

Identity runs in the front, once per HTTP request, because every MCP request (not only governed
ones) needs a principal: `initialize`, listings, the GET stream. A call reaches `run` with
`call.principal` set; a refused credential is recorded through `refuse`.

A stage returns a `Decision` or `None` (no objection); the first denial ends the chain.
`approval_required` is looked up in the approvals store right where it is raised: an approved
identical call continues through the later stages and consumes its approval once all of them
let it through; otherwise `admit` holds it as a pending request (outcome `held`).

Audit is write-ahead: an allowed call's decision is durable as a `pending` record before the
call is forwarded, and the outcome completes it, so a crash in between leaves the attempt on
record; if the pending record cannot be written the call is denied and never forwarded. The
answer is released only after the final record is durable. Any exception on the way (a bug, a
client that leaves) still completes the record, with status `error`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import orjson
from sqlalchemy.exc import SQLAlchemyError

from audit.record import PENDING, SCHEMA_VERSION, AuditRecord, args_hmac, shape_of
from audit.store import AuditStoreError
from audit.writer import AuditWriter
from gateway import logs, metrics
from gateway.call import Action, Decision, Outcome, OutcomeStatus, Principal, Reason, ToolCall
from gateway.errors import (
    AuditUnavailable,
    BastionError,
    CircuitOpen,
    DeadLetter,
    StateUnavailable,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.redaction.basic import audit_view
from gateway.stages.policy import PolicyStage
from gateway.stages.taint import SessionTaint, check_result, session_key
from gateway.state.approvals import Approvals, binding_of
from gateway.state.db import STATE_ERRORS
from gateway.state.idempotency import CallRegistry, Previous
from gateway.state.pins import ToolPins
from gateway.state.tasks import Task, TaskOwners
from gateway.upstreams import forward
from gateway.upstreams.base import Upstream
from gateway.upstreams.forward import Outgoing, Private
from gateway.upstreams.resilience import Delivered, FaultGuard, may_have_run, surely_not_sent
from gateway.upstreams.streamable_http import Reply

if TYPE_CHECKING:
    from gateway.stages.redact import Redactor

log = logging.getLogger("bastion.pipeline")

VIEW_INLINE_BYTES = 16 * 1024
"""Arguments with more text than this get their audit view made in a worker thread, off the loop."""

RESULT_OK: Mapping[Action, str] = {
    "call_tool": "CallToolResult",
    "read_resource": "ReadResourceResult",
    "get_prompt": "GetPromptResult",
}


class Stage(Protocol):
    name: str

    async def __call__(self, call: ToolCall) -> Decision | None: ...


class Peer(Protocol):
    """A destination that is not an MCP upstream (an A2A agent). The front says how to send a
    message there and how to read the answers; the pipeline decides, forwards, redacts, scans
    and records, as it does for a tool call (`exchange`)."""

    guard: FaultGuard

    async def send(self) -> tuple[Reply, Any]:
        """Send the message (once more); the reply is unread."""
        ...

    async def settle(self, call: ToolCall, result: dict[str, Any]) -> str | None:
        """Bookkeeping before an answer is passed on (a task bound to its creator); the reason
        it may not be passed on, if any."""
        ...

    def view(self, result: dict[str, Any]) -> dict[str, Any]:
        """What the client reads in `result`, as `{"content": ...}` for redaction and the scan."""
        ...

    def apply(self, result: dict[str, Any], view: dict[str, Any]) -> dict[str, Any]:
        """`result` with its readable parts replaced by those of a redacted `view`."""
        ...


def stages_in_order(
    *,
    pinning: Stage | None,
    taint: Stage | None,
    redaction: Stage | None,
    policy: PolicyStage,
    budgets: Stage | None,
) -> list[Stage]:
    """The one place the stage order is set; the module docstring says why each sits where it does."""
    return [s for s in (pinning, taint, redaction, policy, budgets) if s is not None]


@dataclass(slots=True)
class Event:
    """One event of an upstream's SSE answer. `final` is set on the call's own response: that
    message, audited and (when redaction changed it) redacted, is what the client must see."""

    data: str
    id: str | None = None
    event: str = "message"
    final: dict[str, Any] | None = None


@dataclass(slots=True)
class Answer:
    """What became of a governed message, for the front to put on its wire.

    - refused (`not decision.allowed`): denied or held; nothing was forwarded;
    - `previous`: a repeated call_id, answered from the first call, nothing forwarded;
    - `message`: the upstream's whole JSON-RPC response, audited (`raw`: its bytes, when unchanged);
    - `events`: an SSE stream relayed as it arrives, its final response audited on the way;
    - `status` >= 400 with `raw`: the upstream's HTTP error, recorded as a failure.
    `private`: the request went out under a private id (shared session); the answer carries it.
    """

    call: ToolCall
    decision: Decision
    previous: Previous | None = None
    message: dict[str, Any] | None = None
    raw: bytes | None = None
    status: int = 200
    content_type: str | None = None
    events: AsyncIterator[Event] | None = None
    private: Private | None = None

    @property
    def refused(self) -> bool:
        return not self.decision.allowed and self.previous is None and self.status == 200

    async def whole(self) -> dict[str, Any]:
        """The final response, reading a stream to its end if need be (for one-piece fronts)."""
        if self.message is not None:
            return self.message
        if self.events is not None:
            async for event in self.events:
                if event.final is not None:
                    return event.final
        raise UpstreamError("upstream stream ended without a response")


class Pipeline:
    """Decides, forwards and records governed messages; see the module docstring."""

    def __init__(
        self,
        stages: Sequence[Stage],
        writer: AuditWriter,
        *,
        instance: str,
        hmac_key: bytes,
        upstreams: Mapping[str, Upstream],
        policy: PolicyStage,
        redactor: Redactor | None = None,
        taint: SessionTaint | None = None,
        approvals: Approvals | None = None,
        calls: CallRegistry | None = None,
        pins: ToolPins | None = None,
        tasks: TaskOwners | None = None,
        durability: Literal["strict", "intent"] = "strict",
        arguments: Literal["redacted", "shape"] = "redacted",
    ) -> None:
        self.stages = tuple(stages)
        self.upstreams = upstreams
        self.policy = policy
        self.redactor = redactor
        """Also one of `stages` (the argument scan, before policy); kept here for the later steps."""
        self.taint = taint
        """Results are scanned for prompt injection, which taints the session (None: not scanned)."""
        self.approvals = approvals
        """Where held calls wait for a human (None: `approval_required` is a denial)."""
        self.calls = calls
        """Claims of call_ids, so that a repeat never runs a non-idempotent tool twice."""
        self.pins = pins
        """Pinned tool definitions: listings show only approved ones (None: pinning is off)."""
        self.tasks = tasks
        """Who created which upstream task (None: task-augmented calls are not bound to owners)."""
        self.guards = {name: FaultGuard(name, up.cfg) for name, up in upstreams.items()}
        """Deadline, retries and circuit breaker per upstream, around every forwarded call."""
        self.durability = durability
        """`strict`: the final record is durable before the answer; `intent`: only the pending one
        is (before forwarding), the final one is group-committed without holding the answer."""
        self.arguments = arguments
        """`audit.arguments`: what a record keeps of arguments the configured redaction did not scan."""
        self._writer = writer
        self._instance = instance
        self._hmac_key = hmac_key
        self._background: set[asyncio.Task[None]] = set()

    # -- the path -------------------------------------------------------------------------------

    async def run(self, call: ToolCall, out: Outgoing, key: str | None = None) -> Answer:
        """Govern one message: decide, forward what is allowed, record the outcome (always).

        `key`: the call's idempotency key (a stable call_id), None when it has none. Upstream
        failures are recorded, then raised as `UpstreamError`; anything else that goes wrong
        records the call with status `error` and is raised."""
        decision: Decision | None = None
        try:
            decision = await self.admit(call)
            if not decision.allowed:
                return Answer(call, decision)
            if (previous := await self._repeat(call, decision, key)) is not None:
                return Answer(call, decision, previous=previous)
            if call.forward_args is not None:  # redacted: the client's bytes must not be forwarded
                out = out.with_params(arguments=call.forward_args)
            return await self._forward(call, decision, out)
        except BaseException as exc:
            if not call.recorded:
                self._record_error(call, decision, exc)
            raise

    async def task_result(self, call: ToolCall, task: Task, out: Outgoing) -> Answer:
        """Fetch a task's result for its owner: no stages (the call that created the task was
        decided), but forwarded through the fault guard, redacted, scanned and recorded like it."""
        why = f"the result of task {task.task_id[:100]}, created by the call recorded as {task.audit_id}"
        decision: Decision | None = Decision("allow", (Reason("task-owner", why),), "task")
        try:
            assert decision is not None
            decision = await self.begin(call, decision)
            if not decision.allowed:
                await self.finish(call, decision, Outcome("denied", self.elapsed_ms(call)))
                return Answer(call, decision)
            return await self._forward(call, decision, out)
        except BaseException as exc:
            if not call.recorded:
                self._record_error(call, decision, exc)
            raise

    async def exchange(self, call: ToolCall, peer: Peer, decided: Decision | None = None) -> Answer:
        """Govern one message to a `Peer`: decide (or, with `decided`, take a decision made
        earlier: a task's creator reading it), forward, redact and scan each answer, record the
        outcome (always). A stream's record is completed when it ends."""
        decision: Decision | None = decided
        try:
            if decided is None:
                decision = await self.admit(call)
            else:
                decision = await self.begin(call, decided)
                if not decision.allowed:
                    await self.finish(call, decision, Outcome("denied", self.elapsed_ms(call)))
            assert decision is not None
            if not decision.allowed:
                return Answer(call, decision)
            call.forwarded = time.perf_counter()
            try:
                delivered = await peer.guard.deliver(call.tool, peer.send)
            except UpstreamError as err:
                await self._not_run(call, err)
                await self._failed(call, decision, err)
                raise
            reply = delivered.reply
            if reply.status >= 400 or reply.status == 202:
                body = delivered.raw if delivered.raw is not None else await reply.body()
                failure = UpstreamError(f"answered HTTP {reply.status}")
                await self._failed(call, decision, failure, reply.status)
                ctype = reply.response.headers.get("content-type")
                return Answer(call, decision, raw=body, status=reply.status, content_type=ctype)
            if reply.is_sse:
                return Answer(call, decision, events=self._exchanged(call, decision, delivered, peer))
            raw = delivered.raw if delivered.raw is not None else await reply.body()
            msg = _object(raw)
            if msg is None:
                malformed = UpstreamError("the answer is not a JSON-RPC object")
                await self._failed(call, decision, malformed, reply.status)
                raise malformed
            msg, audited, changed = await self._read(call, decision, msg, peer)
            status, why = _status_of(msg)
            digest = sha256_hex(raw)
            await self.finish(call, audited, Outcome(status, self.elapsed_ms(call), 200, why, digest))
            return Answer(call, audited, message=msg, raw=None if changed else raw)
        except BaseException as exc:
            if not call.recorded:
                self._record_error(call, decision, exc)
            raise

    async def _exchanged(
        self, call: ToolCall, decision: Decision, delivered: Delivered, peer: Peer
    ) -> AsyncIterator[Event]:
        """Relay a peer's stream event by event, each redacted and scanned before it is passed
        on; the record is completed when the stream ends (a failure if it breaks off)."""
        audited, failed, hasher = decision, None, hashlib.sha256()
        events = delivered.events()  # an async generator: closed below however the relay ends
        try:
            async for sse in events:
                hasher.update(sse.data.encode())
                msg = _object(sse.data.encode())
                if msg is None:
                    raise UpstreamError("a stream event is not a JSON-RPC object")
                msg, audited, changed = await self._read(call, audited, msg, peer)
                failed = failed or _status_of(msg)[1]
                data = json.dumps(msg, ensure_ascii=False) if changed else sse.data
                yield Event(data, sse.id or None, sse.event or "message", msg)
                if not audited.allowed:
                    break  # a withheld answer ends the stream
        except UpstreamError as err:
            await self._failed(call, audited, err)
            raise
        except BaseException as exc:
            if not call.recorded:
                self._record_error(call, audited, exc)
            raise
        else:
            status: OutcomeStatus = "failed" if failed or not audited.allowed else "completed"
            outcome = Outcome(status, self.elapsed_ms(call), 200, failed, hasher.hexdigest())
            await self.finish(call, audited, outcome)
        finally:
            await events.aclose()  # type: ignore[attr-defined]
            await delivered.aclose()

    async def _read(
        self, call: ToolCall, decision: Decision, msg: dict[str, Any], peer: Peer
    ) -> tuple[dict[str, Any], Decision, bool]:
        """One JSON-RPC answer from a peer as the client gets it: bound (`settle`), redacted and
        scanned; a refusal replaces it by an error. Returns it, the decision so far, whether it changed."""
        result = msg.get("result")
        if not isinstance(result, dict):
            return msg, decision, False
        refused = await peer.settle(call, result)
        if refused is not None:
            failure = Decision("deny", (*decision.reasons, Reason("pipeline", refused)), "pipeline")
            return _rpc_error(msg, refused), failure, True
        before = call.pii_output
        redacted, audited = await self.redact_result(call, decision, peer.view(result))
        if before:  # each answer of a stream adds to what the record counts
            found = call.pii_output
            call.pii_output = {t: before.get(t, 0) + found.get(t, 0) for t in sorted({*before, *found})}
        if not audited.allowed:
            return _rpc_error(msg, audited.reasons[-1].reason), audited, True
        if redacted is None:
            return msg, audited, False
        return {**msg, "result": peer.apply(result, redacted)}, audited, True

    async def task_of(self, principal: Principal, upstream: str, task_id: Any) -> Task | None:
        """The task, if `task_id` names one this principal created; None for anyone else's."""
        if self.tasks is None or not isinstance(task_id, str) or not 0 < len(task_id) <= 256:
            return None
        try:
            task = await self.tasks.get(upstream, task_id)
        except STATE_ERRORS as exc:
            raise StateUnavailable(f"task owners unavailable: {type(exc).__name__}") from exc
        return task if task is not None and task.principal == owner_id(principal) else None

    async def tasks_of(self, principal: Principal, upstream: str) -> set[str]:
        if self.tasks is None:
            return set()
        try:
            return await self.tasks.mine(upstream, owner_id(principal))
        except STATE_ERRORS as exc:
            raise StateUnavailable(f"task owners unavailable: {type(exc).__name__}") from exc

    async def decide_only(self, call: ToolCall, *, hold: bool = False) -> Decision:
        """Decide and record without forwarding (Bastion as a decision point): an allowed call's
        outcome is `decided`, since the caller runs the tool itself. With `hold`, a call that
        needs a human's approval gets a pending request (outcome `held`), as a forwarded one does."""
        decision: Decision | None = None
        try:
            decision = await self.decide(call)
            if hold and decision.effect == "approval_required" and self.approvals is not None:
                decision = await self.hold(call, decision)
            status: OutcomeStatus = "decided" if decision.allowed else "denied"
            if decision.effect == "approval_required":
                status = "held"
            await self.finish(call, decision, Outcome(status, self.elapsed_ms(call)))
            return decision
        except BaseException as exc:
            if not call.recorded:
                self._record_error(call, decision, exc)
            raise

    async def returned(
        self, call: ToolCall, result: dict[str, Any]
    ) -> tuple[dict[str, Any] | None, Decision]:
        """A tool's result that the caller ran itself, on its way back to a model: redacted and
        scanned as a forwarded call's result is (findings taint the session), and recorded.
        Returns the result to pass on instead (None: as is) and the recorded decision."""
        decision: Decision | None = Decision(
            "allow", (Reason("result", "the tool's result, on its way to the model"),), "result"
        )
        try:
            assert decision is not None
            redacted, decision = await self.redact_result(call, decision, result)
            status: OutcomeStatus = "completed" if decision.allowed else "denied"
            digest = sha256_hex(json.dumps(result, sort_keys=True).encode())
            await self.finish(call, decision, Outcome(status, self.elapsed_ms(call), None, None, digest))
            return redacted, decision
        except BaseException as exc:
            if not call.recorded:
                self._record_error(call, decision, exc)
            raise

    async def admit(self, call: ToolCall) -> Decision:
        """Decide, then make the decision durable: a pending record for a call about to be
        forwarded, the final record for a refused one."""
        decision = await self.decide(call)
        if decision.effect == "approval_required":
            decision = await self.hold(call, decision)
        if decision.allowed:
            decision = await self.begin(call, decision)  # write-ahead, before forwarding
        if not decision.allowed:
            status: OutcomeStatus = "held" if decision.effect == "approval_required" else "denied"
            await self.finish(call, decision, Outcome(status, self.elapsed_ms(call)))
        return decision

    async def decide(self, call: ToolCall) -> Decision:
        """Run the stages in order; the first denial (or approval demand) ends the chain."""
        decision: Decision | None = None
        approved: str | None = None
        if self.redactor is None and self.arguments == "redacted" and call.principal is not None:
            # the record's (and an approval's) view of the arguments, made once; a large one off the loop
            if len(orjson.dumps(call.arguments)) <= VIEW_INLINE_BYTES:
                call.redacted_args = audit_view(call.arguments)
            else:
                call.redacted_args = await asyncio.to_thread(audit_view, call.arguments)
        for stage in self.stages:
            t0 = time.perf_counter()
            verdict = await stage(call)
            took = time.perf_counter() - t0
            metrics.labelled(metrics.STAGE_SECONDS, stage.name).observe(took)
            outcome = "pass" if verdict is None else verdict.effect
            call.stages.append((stage.name, outcome, round(took * 1000, 3)))
            if stage is self.policy:
                call.policy_verdict = verdict  # what a replay compares a candidate policy set with
            if verdict is None:
                continue
            if verdict.effect == "approval_required":
                # An approved call goes on through the later stages (budgets are charged as usual);
                # its approval is consumed only once every stage has let it through.
                verdict, approved = await self._approval(call, verdict)
            if decision is None or decision.effect != "transform" or not verdict.allowed:
                decision = verdict  # a later allow never loosens a transform
            if not verdict.allowed:
                break
        if decision is None:
            return Decision.deny("pipeline", "no-stage", "no stage allowed the call")
        if decision.allowed and self.redactor is not None:
            # Arguments are transformed last, after everything that could still refuse the call.
            decision = await self.redactor.transform(call, decision)
            if not decision.allowed:
                await self.refund(call)
        elif decision.effect == "transform":
            # A call that policy allows only if redacted is refused rather than forwarded unredacted.
            return Decision.deny(
                decision.stage,
                decision.reasons[0].policy if decision.reasons else "transform",
                "policy requires redaction, but this gateway has no redaction: configured",
                decision.policy_version,
            )
        if approved is not None and decision.allowed and self.approvals is not None:
            try:
                won = await self.approvals.consume(approved, call.audit_id)
            except STATE_ERRORS as exc:
                await self.refund(call)
                return Decision.deny(
                    "approval", "approvals-unavailable", f"approval state unavailable: {type(exc).__name__}"
                )
            if not won:
                await self.refund(call)
                why = f"approval {approved} was used or expired meanwhile; ask again"
                return Decision.deny("approval", "approval-used", why)
            call.approval_id = approved
        if decision.effect == "approval_required" and self.approvals is None:
            return Decision(
                "deny",
                (*decision.reasons, Reason("approval", "human approval is required and not available here")),
                decision.stage,
                decision.policy_version,
            )
        return decision

    def may_approve_own(self, call: ToolCall) -> bool:
        """Whether policy lets the caller answer their own held call's approval (inline form mode).

        Only a clean Allow of `Action::"approve_own"` counts; no default policy grants it."""
        return self.policy.approve_own(call)

    def approval_of(self, call: ToolCall, decision: Decision) -> dict[str, str] | None:
        """For a held call: its approval id, the approval page's URL and whom to ask."""
        if decision.effect != "approval_required" or self.approvals is None or call.approval_id is None:
            return None
        return self.approvals.describe(call.approval_id)

    async def refuse(self, call: ToolCall, stage: str, policy: str, reason: str) -> Decision:
        """Record a message refused before the stages could run (bad credential, malformed or
        unlisted method, a foreign request id)."""
        decision = Decision.deny(stage, policy, reason)
        await self.finish(call, decision, Outcome("denied", self.elapsed_ms(call)))
        return decision

    @staticmethod
    def elapsed_ms(call: ToolCall) -> float:
        return round((time.perf_counter() - call.started) * 1000, 3)

    async def _approval(self, call: ToolCall, held: Decision) -> tuple[Decision, str | None]:
        """A held call's standing: approved (an allow, and the approval to consume), denied by a
        human (final), or still held (waiting on the pending request, if there is one)."""
        if self.approvals is None or call.dry_run or call.principal is None:
            return held, None
        try:
            binding = binding_of(call.principal, call.upstream, call.tool, call.arguments)
            found = await self.approvals.current(binding)
        except (SQLAlchemyError, ValueError, TypeError) as exc:
            why = f"approval state unavailable: {type(exc).__name__}"
            return Decision.deny("approval", "approvals-unavailable", why, held.policy_version), None
        if found is None:
            return held, None
        if found.status == "approved":
            given = Reason("approval", f"approval {found.id} given by {found.decided_by}")
            return Decision("allow", (*held.reasons, given), "approval", held.policy_version), found.id
        if found.status == "denied":
            text = f"a human denied this call: approval {found.id}, by {found.decided_by}"
            if found.note:
                text += f" ({found.note[:300]})"
            reasons = (*held.reasons, Reason("approval", text))
            return Decision("deny", reasons, "approval", held.policy_version), None
        call.approval_id = found.id  # pending: the repeated call waits on the same request
        return held, None

    async def hold(self, call: ToolCall, decision: Decision) -> Decision:
        """Make sure a held call has a pending request; its id goes into the reasons (and the audit)."""
        assert self.approvals is not None
        try:
            if call.approval_id is None:
                await self.approvals.expire_due()
                reasons = [r.to_json() for r in decision.reasons]
                made = await self.approvals.request(call, reasons, args_hmac(self._hmac_key, call.arguments))
                call.approval_id = made.id
        except STATE_ERRORS as exc:
            why = f"approval state unavailable, so the call cannot be held: {type(exc).__name__}"
            return Decision.deny("approval", "approvals-unavailable", why, decision.policy_version)
        held = (*decision.reasons, Reason("approval", f"approval required: {call.approval_id}"))
        return Decision("approval_required", held, decision.stage, decision.policy_version)

    async def begin(self, call: ToolCall, decision: Decision) -> Decision:
        """Make an allowed call's decision durable as a `pending` record before it is forwarded.

        Returns `decision`, or, when the record cannot be written, a denial naming the audit
        store: an unrecorded call is never forwarded.
        """
        pending = {"status": PENDING, "latency_ms": None, "upstream_status": None, "error": None}
        t0 = time.perf_counter()
        try:
            await self._writer.begin(self._record(call, decision, pending, None))
            metrics.labelled(metrics.STAGE_SECONDS, "audit_pending").observe(time.perf_counter() - t0)
        except AuditStoreError as exc:
            metrics.AUDIT_FAILURES.inc()
            log.error("audit write-ahead failed for %s, call denied: %s", call.audit_id, exc)
            await self.refund(call)
            return Decision.deny(
                "audit",
                "audit-unavailable",
                "the audit store is unavailable, so the call was not forwarded",
                decision.policy_version,
            )
        return decision

    async def finish(self, call: ToolCall, decision: Decision, outcome: Outcome) -> None:
        """Record the outcome and wait until it is durable: the pending record of a forwarded
        call is completed; any other call gets its one, final record."""
        metrics.decided(call.upstream, call.tool, decision, call.action)
        metrics.pii_found(call.pii_input, call.pii_output)
        call.recorded = True
        final = {
            "status": outcome.status,
            "latency_ms": outcome.latency_ms,
            "upstream_status": outcome.upstream_status,
            "error": outcome.error,
        }
        t0 = time.perf_counter()
        try:
            if self._writer.is_pending(call.audit_id):
                # the result may have changed what is known (PII found in it, a withheld result)
                changes = {"pii": _pii(call), "decision": _decision_json(call, decision)}
                if call.a2a is not None:
                    changes["a2a"] = dict(call.a2a)  # the task id is known only from the answer
                if self.durability == "intent":
                    # the intent is durable already: a crash before this commits leaves `interrupted`
                    self._writer.complete_later(call.audit_id, final, outcome.result_sha256, changes)
                    return
                await self._writer.complete(call.audit_id, final, outcome.result_sha256, changes)
            else:
                await self._writer.write(self._record(call, decision, final, outcome.result_sha256))
        except AuditStoreError as exc:
            metrics.AUDIT_FAILURES.inc()
            log.error("audit write failed for %s: %s", call.audit_id, exc)
            if decision.stage == "audit":
                return  # refused because the store is down: the client is told so by the denial
            raise AuditUnavailable("the audit store is unavailable; the call is not answered") from exc
        finally:
            metrics.labelled(metrics.STAGE_SECONDS, "audit").observe(time.perf_counter() - t0)
            logs.call_finished(call, decision, outcome)

    async def refund(self, call: ToolCall, upstream_failed: bool = False) -> None:
        """The call will not run: stages that charged it give it back (when the upstream could not
        be reached, only budgets that say so: `refund_on_upstream_failure`)."""
        for stage in self.stages:
            refund = getattr(stage, "refund", None)
            if refund is not None:
                await refund(call, upstream_failed)

    # -- listings ---------------------------------------------------------------------------------

    async def listing(
        self,
        principal: Principal,
        upstream: str,
        action: Action,
        items: list[Any],
        key: str,
        session: str | None = None,
    ) -> list[dict[str, Any]]:
        """The items of a list result this caller may see: those the call action could allow for
        some arguments in this session (and, for tools, whose pinned definition is approved).
        `key` names each item (`name`, `uri`, `uriTemplate`). Fails closed: an item whose
        standing cannot be read is left out."""
        shown = [i for i in items if isinstance(i, dict) and isinstance(i.get(key), str)]
        if action == "call_tool" and self.pins is not None:
            shown = await self.pins.keep_usable(upstream, shown)
        tainted = False
        if self.taint is not None and (found := session_key(principal, session)) is not None:
            try:
                tainted = await self.taint.is_tainted(found)
            except STATE_ERRORS:
                return []
        names = [i[key] for i in shown]
        allowed = self.policy.listable(principal, action, upstream, names, tainted, key == "uriTemplate")
        return [i for i in shown if i[key] in allowed]

    # -- forwarding -----------------------------------------------------------------------------

    def guard(self, upstream: str) -> FaultGuard:
        if (found := self.guards.get(upstream)) is None:
            found = self.guards[upstream] = FaultGuard(upstream, self.upstreams[upstream].cfg)
        return found

    async def relay(
        self, upstream: str, out: Outgoing, long_lived: bool = False
    ) -> tuple[Reply, Private | None]:
        """Send a message that is not a governed action (session, listing, correlated): no record."""
        return await forward.send(self.upstreams[upstream], out, long_lived=long_lived)

    async def _repeat(self, call: ToolCall, decision: Decision, key: str | None) -> Previous | None:
        """A repeated call_id of a tool not marked idempotent: recorded and answered, never run."""
        if self.calls is None or key is None or call.principal is None or call.action != "call_tool":
            return None
        settings = self.upstreams[call.upstream].cfg.tools.get(call.tool)
        if settings is not None and settings.idempotent:
            return None
        fingerprint = self.calls.fingerprint(call.upstream, call.tool, call.arguments)
        try:
            previous = await self.calls.claim(call.principal.key, key, fingerprint, call.audit_id)
        except StateUnavailable as err:
            await self.refund(call)
            await self.finish(call, decision, Outcome("error", self.elapsed_ms(call), None, err.message))
            raise
        if previous is not None:
            await self.refund(call)
            outcome = Outcome("duplicate", self.elapsed_ms(call), None, previous.message)
            await self.finish(call, decision, outcome)
        return previous

    async def _forward(self, call: ToolCall, decision: Decision, out: Outgoing) -> Answer:
        up = self.upstreams[call.upstream]
        call.forwarded = time.perf_counter()
        try:
            delivered = await self.guard(up.name).deliver(call.tool, lambda: forward.send(up, out))
        except UpstreamError as err:
            await self._not_run(call, err)
            await self._failed(call, decision, err)
            raise
        reply, private = delivered.reply, delivered.extra
        if reply.status >= 400 or reply.status == 202:
            body = delivered.raw if delivered.raw is not None else await reply.body()
            why = f"upstream answered HTTP {reply.status}" + (
                " without a response" if reply.status == 202 else ""
            )
            await self._failed(call, decision, UpstreamError(why), reply.status)
            forward.release(up, private)
            if reply.status == 202:
                raise UpstreamError(why)
            ctype = reply.response.headers.get("content-type")
            return Answer(call, decision, raw=body, status=reply.status, content_type=ctype, private=private)
        if not reply.is_sse:
            raw = delivered.raw if delivered.raw is not None else await reply.body()
            forward.release(up, private)
            try:
                msg = json.loads(raw)
                if not isinstance(msg, dict):
                    raise ValueError("not an object")
            except ValueError:
                malformed = UpstreamError("upstream answered with malformed JSON")
                await self._failed(call, decision, malformed, reply.status)
                raise malformed from None
            msg, changed = await self._complete(call, decision, msg, raw)
            return Answer(call, decision, message=msg, raw=None if changed else raw, private=private)
        upstream_id = private.id if private is not None else out.msg.get("id")
        return Answer(
            call, decision, events=self._stream(call, decision, delivered, upstream_id), private=private
        )

    async def _stream(
        self, call: ToolCall, decision: Decision, delivered: Delivered, upstream_id: Any
    ) -> AsyncIterator[Event]:
        """Relay an upstream SSE stream event by event; the call's response is audited (and
        redacted) before it is passed on. A stream that ends early records a failure."""
        finished = False
        up = self.upstreams[call.upstream]
        try:
            async for sse in delivered.events():
                final = None
                if not finished and (msg := response_to(sse.data, upstream_id)) is not None:
                    finished = True
                    forward.release(up, delivered.extra)
                    final, _ = await self._complete(call, decision, msg, sse.data.encode())
                yield Event(sse.data, sse.id or None, sse.event or "message", final)
        except UpstreamError as err:
            if not finished:
                finished = True
                await self._failed(call, decision, err)
            raise
        finally:
            if not finished:
                forward.release(up, delivered.extra)
                self.later(
                    self._failed(call, decision, UpstreamError("the stream ended before the response"))
                )

    async def _complete(
        self, call: ToolCall, decision: Decision, msg: dict[str, Any], raw: bytes
    ) -> tuple[dict[str, Any], bool]:
        """Record the upstream's response to a forwarded call; returns the message the client
        gets (redacted, or an error when the record could not be made) and whether it changed."""
        error, result = msg.get("error"), msg.get("result")
        status: OutcomeStatus
        why: str | None
        if isinstance(error, dict):
            status, why = "failed", str(error.get("message", "upstream error"))[:500]
        elif isinstance(result, dict) and result.get("isError") is True:
            status, why = "failed", "the tool reported an error"
        else:
            status, why = "completed", None
        metrics.labelled(metrics.UPSTREAM_SECONDS, call.upstream).observe(call.upstream_seconds())
        if isinstance(error, dict):
            metrics.UPSTREAM_ERRORS.labels(call.upstream, "jsonrpc").inc()
        outcome = Outcome(status, self.elapsed_ms(call), 200, why, sha256_hex(raw))
        audited, changed = decision, False
        task = result.get("task") if isinstance(result, dict) and call.action == "call_tool" else None
        if isinstance(task, dict) and (refused := await self._own_task(call, task)) is not None:
            outcome = Outcome("failed", outcome.latency_ms, 200, refused, outcome.result_sha256)
            msg = {"jsonrpc": "2.0", "id": msg.get("id"), "error": {"code": -32603, "message": refused}}
            result, changed = None, True
        if isinstance(result, dict):
            redacted, audited = await self.redact_result(call, decision, result)
            if redacted is not None:
                msg = {**msg, "result": redacted}
                changed = True
        try:
            await self.finish(call, audited, outcome)
        except AuditUnavailable as err:
            if self.calls is not None:
                await self.calls.complete(call.audit_id, None)
            failed = {"code": err.jsonrpc_code, "message": err.message}
            return {"jsonrpc": "2.0", "id": msg.get("id"), "error": failed}, True
        if self.calls is not None and self.calls.holds(call.audit_id):
            await self.calls.complete(call.audit_id, json.dumps(msg).encode() if changed else raw)
        return msg, changed

    async def _own_task(self, call: ToolCall, task: dict[str, Any]) -> str | None:
        """Bind a task the call created to the caller; the reason it cannot be handed out, if any."""
        ttl = task.get("ttl")
        ttl_s = ttl / 1000 if isinstance(ttl, int | float) and not isinstance(ttl, bool) else None
        return await self.own_task(call, call.upstream, task.get("taskId"), ttl_s)

    async def own_task(
        self, call: ToolCall, scope: str, task_id: Any, ttl_s: float | None = None, again: bool = False
    ) -> str | None:
        """Bind a task the call created (on upstream or agent `scope`) to the caller; the reason
        it cannot be handed out, if any. With `again`, a task already the caller's is fine (an
        A2A task is named in every event about it)."""
        if self.tasks is None or call.principal is None:
            return "tasks are not relayed here: call the tool without `task`"
        if not isinstance(task_id, str) or not 0 < len(task_id) <= 256:
            return "the upstream created a task without a usable id"
        owner = owner_id(call.principal)
        try:
            if await self.tasks.own(scope, task_id, owner, call.tool, call.audit_id, ttl_s):
                return None
            found = await self.tasks.get(scope, task_id) if again else None
            if found is not None and found.principal == owner:
                return None
        except STATE_ERRORS as exc:
            return f"the task's owner could not be recorded ({type(exc).__name__}), so it is not handed out"
        return "the upstream reused a task id that belongs to another call"

    async def redact_result(
        self, call: ToolCall, decision: Decision, result: dict[str, Any]
    ) -> tuple[dict[str, Any] | None, Decision]:
        """The result to return instead (None: as is) and the decision to record for the call.

        Redaction first; then the injection scan of what the client will see (findings taint the
        session and are added to the recorded decision)."""
        redacted = None
        if self.redactor is not None:
            redacted, decision = await self.redactor.redact_result(call, decision, result)
        if self.taint is not None:
            shown = result if redacted is None else redacted
            decision = await check_result(self.taint, call, decision, shown)
        return redacted, decision

    async def _not_run(self, call: ToolCall, err: UpstreamError) -> None:
        """Give back what a call that failed before it could run took: budget, its call_id."""
        if not may_have_run(err):
            await self.refund(call, upstream_failed=True)
        if self.calls is not None and surely_not_sent(err):
            await self.calls.release(call.audit_id)

    async def _failed(
        self, call: ToolCall, decision: Decision, err: UpstreamError, upstream_status: int | None = None
    ) -> None:
        if self.calls is not None and self.calls.holds(call.audit_id):
            await self.calls.complete(call.audit_id, None)  # it may have run: never again
        status: OutcomeStatus = "timeout" if isinstance(err, UpstreamTimeout) else "failed"
        if isinstance(err, DeadLetter):
            status = "dead_letter"
            upstream_status = upstream_status or err.upstream_status
        metrics.labelled(metrics.UPSTREAM_SECONDS, call.upstream).observe(call.upstream_seconds())
        kind = "timeout" if status == "timeout" else "http" if upstream_status else "transport"
        if isinstance(err, CircuitOpen | DeadLetter):
            kind = err.code
        metrics.UPSTREAM_ERRORS.labels(call.upstream, kind).inc()
        await self.finish(
            call, decision, Outcome(status, self.elapsed_ms(call), upstream_status, err.message)
        )

    def _record_error(self, call: ToolCall, decision: Decision | None, exc: BaseException) -> None:
        """Complete the record of a call that an unexpected error (or a client leaving) cut short.

        Scheduled rather than awaited: the task may be cancelled, and the record must still be made."""
        if isinstance(exc, asyncio.CancelledError):
            why = "the client went away before the call was answered"
        elif isinstance(exc, BastionError):
            why = exc.message
        else:
            why = f"internal error: {type(exc).__name__}"
            log.error("call %s failed inside the gateway", call.audit_id, exc_info=exc)
        recorded = decision or Decision.deny("pipeline", "error", why)
        call.recorded = True  # one record: a second failure on the way must not add another
        self.later(self.finish(call, recorded, Outcome("error", self.elapsed_ms(call), None, why[:500])))

    def later(self, coro: Awaitable[None]) -> None:
        """Finish bookkeeping in the background (the response task may be being cancelled)."""

        async def run() -> None:
            try:
                await coro
            except BastionError as err:
                log.error("could not record an interrupted call: %s", err.message)

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for background bookkeeping (at shutdown, before the audit writer closes)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    # -- records --------------------------------------------------------------------------------

    def _record(
        self, call: ToolCall, decision: Decision, outcome: dict[str, Any], result_sha256: str | None
    ) -> AuditRecord:
        p = call.principal
        return AuditRecord(
            id=call.audit_id,
            ts=call.ts,
            schema_version=SCHEMA_VERSION,
            instance=self._instance,
            trace_id=call.trace_id,
            call_id=call.call_id,
            user=p.id if p else None,
            tenant=p.tenant if p else None,
            agent=p.agent if p else None,
            delegation_chain=list(p.delegation_chain) if p else [],
            replay=_replay_inputs(call),
            protocol=call.protocol,
            client=call.client,
            llm=call.llm,
            a2a=call.a2a,
            upstream=call.upstream,
            tool=call.tool,
            action=call.action,
            args_redacted=_stored_args(call, self.arguments),
            args_hmac=args_hmac(self._hmac_key, call.arguments),
            decision=_decision_json(call, decision),
            budget=call.budget,
            pii=_pii(call),
            outcome=outcome,
            result_sha256=result_sha256,
        )


def _stored_args(call: ToolCall, mode: Literal["redacted", "shape"]) -> Any:
    """The arguments as the record keeps them (`audit.arguments`): the configured redaction's view
    when it scanned them, else with `redacted` their values with the built-in detectors' findings
    replaced (`gateway.redaction.basic`), else their shape. A call refused before anyone was
    identified keeps a fixed-size summary: an anonymous caller must not be able to make the trail
    store as much as it sends."""
    if call.principal is None:
        return {"unauthenticated": True, "arguments": len(call.arguments)}
    if call.redacted_args is not None:
        return call.redacted_args
    return audit_view(call.arguments) if mode == "redacted" else shape_of(call.arguments)


def _replay_inputs(call: ToolCall) -> dict[str, Any] | None:
    """What a replay of the decision needs besides the record's user, tenant, agent and chain."""
    p = call.principal
    if p is None:
        return None
    out: dict[str, Any] = {
        "issuer": p.issuer,
        "groups": sorted(p.groups),
        "roles": sorted(p.roles),
        "scopes": sorted(p.scopes),
        "has_email": p.email is not None,
        "tainted": call.session_tainted,
    }
    if call.skill is not None:
        out["skill"] = call.skill
    if (verdict := call.policy_verdict) is not None:
        out["policy"] = {"effect": verdict.effect, "policy_ids": verdict.policy_ids}
    return out


def _decision_json(call: ToolCall, decision: Decision) -> dict[str, Any]:
    """The record's `decision`, with the shadow set's disagreement (`shadow`) when there is one,
    and each stage's verdict and time (`stages`) when any ran."""
    out = decision.to_json()
    if call.shadow is not None:
        out["shadow"] = call.shadow
    if call.stages:
        out["stages"] = [{"stage": name, "verdict": verdict, "ms": ms} for name, verdict, ms in call.stages]
    return out


def _pii(call: ToolCall) -> dict[str, Any]:
    """Entity types and counts per direction, never values; `unscanned` bytes when over the scan limit."""
    pii: dict[str, Any] = {"input": call.pii_input, "output": call.pii_output}
    if call.pii_unscanned:
        pii["unscanned_bytes"] = call.pii_unscanned
    return pii


def owner_id(principal: Principal) -> str:
    """A principal as the state DB names it: a digest of its issuer and subject."""
    return hashlib.sha256(principal.key.encode()).hexdigest()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _object(raw: bytes) -> dict[str, Any] | None:
    """A peer's answer as one JSON object; None when it is not one, or repeats a key: when the
    answer passes unchanged, a client that reads the other copy of a key would see what was
    never redacted nor scanned."""
    try:
        msg = json.loads(raw, object_pairs_hook=_unique)
    except ValueError:
        return None
    return msg if isinstance(msg, dict) else None


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise ValueError("duplicate key")
    return found


def _status_of(msg: dict[str, Any]) -> tuple[OutcomeStatus, str | None]:
    """A peer's JSON-RPC error is the peer answering (`failed`, with its message), not a fault."""
    error = msg.get("error")
    if isinstance(error, dict):
        return "failed", str(error.get("message", "error"))[:500]
    return "completed", None


def _rpc_error(msg: dict[str, Any], why: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg.get("id"), "error": {"code": -32603, "message": why[:1000]}}


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
