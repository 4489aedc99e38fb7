"""The order in which a tool call is governed, written in one place.

    front -> identity -> policy -> budget -> [redaction: later stages slot in here] -> upstream
                                                                                       |
    client <- response <---------------- audit (always, allowed or not) <--------------+

- Identity runs in the front, once per HTTP request, because every MCP request (not only tool
  calls) needs a principal: `initialize`, `tools/list` and the GET stream too. A call reaches the
  pipeline with `call.principal` set; a refused credential is audited through `refuse()`.
- Policy comes first among the stages: it is the cheapest (tens of µs, in memory) and the one
  that most often says no, so nothing costly runs for a call that will be denied.
- A stage returns a `Decision` or `None` (no objection). The first denial ends the chain.
- `approval_required` (policy's `@obligation("approval")`) is looked up in the approvals store
  right where it is raised: an approved identical call continues through the later stages and
  consumes its approval only once all of them let it through; otherwise `admit` holds the call
  as a pending request (gateway/state/approvals.py) and records it with outcome `held`.
- The audit record is written for every call the pipeline saw, whatever happened. Write-ahead:
  an allowed call's decision is made durable as a `pending` record (`begin`) before it is
  forwarded, and `finish` adds the outcome, so a crash in between still leaves the attempt on
  record. If the pending record cannot be written the call is denied and never forwarded
  (`audit.on_unavailable: deny`). The response is sent only after the final record is durable;
  if that fails the caller gets an error rather than an unrecorded result.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy.exc import SQLAlchemyError

from audit.record import PENDING, SCHEMA_VERSION, AuditRecord, args_hmac, shape_of
from audit.store import AuditStoreError
from audit.writer import AuditWriter
from gateway import logs, metrics
from gateway.call import Decision, Outcome, OutcomeStatus, Reason, ToolCall
from gateway.errors import AuditUnavailable
from gateway.stages.policy import PolicyStage
from gateway.stages.taint import SessionTaint, check_result
from gateway.state.approvals import Approvals, binding_of

if TYPE_CHECKING:
    from gateway.stages.redact import Redactor

log = logging.getLogger("bastion.pipeline")


class Stage(Protocol):
    name: str

    async def __call__(self, call: ToolCall) -> Decision | None: ...


class Pipeline:
    def __init__(
        self,
        stages: Sequence[Stage],
        writer: AuditWriter,
        *,
        instance: str,
        hmac_key: bytes,
        redactor: Redactor | None = None,
        taint: SessionTaint | None = None,
        approvals: Approvals | None = None,
    ) -> None:
        self.stages = tuple(stages)
        self.redactor = redactor
        """Also one of `stages` (the argument scan, before policy); kept here for the later steps."""
        self.taint = taint
        """Results are scanned for prompt injection, which taints the session (None: not scanned)."""
        self.approvals = approvals
        """Where held calls wait for a human (None: `approval_required` is a denial)."""
        self._writer = writer
        self._instance = instance
        self._hmac_key = hmac_key

    async def decide(self, call: ToolCall) -> Decision:
        """Run the stages in order; the first denial (or approval demand) ends the chain."""
        decision: Decision | None = None
        approved: str | None = None
        for stage in self.stages:
            t0 = time.perf_counter()
            verdict = await stage(call)
            metrics.STAGE_SECONDS.labels(stage.name).observe(time.perf_counter() - t0)
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
            except SQLAlchemyError as exc:
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
        return any(isinstance(s, PolicyStage) and s.approve_own(call) for s in self.stages)

    async def redact_result(
        self, call: ToolCall, decision: Decision, result: dict[str, Any]
    ) -> tuple[dict[str, Any] | None, Decision]:
        """The tool result to return instead (None: as is) and the decision to record for the call.

        Redaction first; then the injection scan of what the client will see (findings taint the
        session and are added to the recorded decision)."""
        redacted = None
        if self.redactor is not None:
            redacted, decision = await self.redactor.redact_result(call, decision, result)
        if self.taint is not None:
            shown = result if redacted is None else redacted
            decision = await check_result(self.taint, call, decision, shown)
        return redacted, decision

    async def refund(self, call: ToolCall) -> None:
        """The upstream could not be reached: stages that charged the call may give it back."""
        for stage in self.stages:
            refund = getattr(stage, "refund", None)
            if refund is not None:
                await refund(call)

    async def refuse(self, call: ToolCall, stage: str, policy: str, reason: str) -> Decision:
        """Record a call refused before the stages could run (bad credential, malformed call)."""
        decision = Decision.deny(stage, policy, reason)
        await self.finish(call, decision, Outcome("denied", self.elapsed_ms(call)))
        return decision

    @staticmethod
    def elapsed_ms(call: ToolCall) -> float:
        return round((time.perf_counter() - call.started) * 1000, 3)

    async def admit(self, call: ToolCall) -> Decision:
        """Decide, then make the decision durable: a pending record for a call about to be
        forwarded, the final record for a refused one. Every front calls this, whatever its wire."""
        decision = await self.decide(call)
        if decision.effect == "approval_required":
            decision = await self.hold(call, decision)
        if decision.allowed:
            decision = await self.begin(call, decision)  # write-ahead, before forwarding
        if not decision.allowed:
            status: OutcomeStatus = "held" if decision.effect == "approval_required" else "denied"
            await self.finish(call, decision, Outcome(status, self.elapsed_ms(call)))
        return decision

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
        except SQLAlchemyError as exc:
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
            metrics.STAGE_SECONDS.labels("audit_pending").observe(time.perf_counter() - t0)
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
        metrics.decided(call.upstream, call.tool, decision)
        metrics.pii_found(call.pii_input, call.pii_output)
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
                changes = {"pii": _pii(call), "decision": decision.to_json()}
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
            metrics.STAGE_SECONDS.labels("audit").observe(time.perf_counter() - t0)
            logs.call_finished(call, decision, outcome)

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
            user=p.sub if p else None,
            tenant=p.tenant if p else None,
            agent=p.agent if p else None,
            delegation_chain=list(p.delegation_chain) if p else [],
            protocol=call.protocol,
            client=call.client,
            upstream=call.upstream,
            tool=call.tool,
            action=call.action,
            args_redacted=shape_of(call.arguments) if call.redacted_args is None else call.redacted_args,
            args_hmac=args_hmac(self._hmac_key, call.arguments),
            decision=decision.to_json(),
            budget=call.budget,
            pii=_pii(call),
            outcome=outcome,
            result_sha256=result_sha256,
        )


def _pii(call: ToolCall) -> dict[str, Any]:
    """Entity types and counts per direction, never values; `unscanned` bytes when over the scan limit."""
    pii: dict[str, Any] = {"input": call.pii_input, "output": call.pii_output}
    if call.pii_unscanned:
        pii["unscanned_bytes"] = call.pii_unscanned
    return pii


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
