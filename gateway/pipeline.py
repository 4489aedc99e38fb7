"""The order in which a tool call is governed, written in one place.

    front -> identity -> policy -> [budget, redaction: later stages slot in here] -> upstream
                                                                                       |
    client <- response <---------------- audit (always, allowed or not) <--------------+

- Identity runs in the front, once per HTTP request, because every MCP request (not only tool
  calls) needs a principal: `initialize`, `tools/list` and the GET stream too. A call reaches the
  pipeline with `call.principal` set; a refused credential is audited through `refuse()`.
- Policy comes first among the stages: it is the cheapest (tens of µs, in memory) and the one
  that most often says no, so nothing costly runs for a call that will be denied.
- A stage returns a `Decision` or `None` (no objection). The first denial ends the chain.
- The audit record is written for every call the pipeline saw, whatever happened; the response
  is sent only after its record is durable. If it cannot be written the caller gets an error
  rather than an unrecorded result.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from audit.record import SCHEMA_VERSION, AuditRecord, args_hmac, shape_of
from audit.store import AuditStoreError
from audit.writer import AuditWriter
from gateway import metrics
from gateway.call import Decision, Outcome, Reason, ToolCall
from gateway.config import ToolSettings
from gateway.errors import AuditUnavailable
from gateway.stages.policy import PolicyEngine

log = logging.getLogger("bastion.pipeline")


class Stage(Protocol):
    name: str

    async def __call__(self, call: ToolCall) -> Decision | None: ...


class PolicyStage:
    """Cedar: who may call which tool with which arguments."""

    name = "policy"

    def __init__(
        self, engine: Callable[[], PolicyEngine], settings: Callable[[str, str], ToolSettings]
    ) -> None:
        self._engine = engine
        self._settings = settings

    async def __call__(self, call: ToolCall) -> Decision | None:
        if call.principal is None:
            return Decision.deny("identity", "unauthenticated", "no verified principal")
        return self._engine().decide(
            call.principal,
            call.action,
            call.upstream,
            call.tool,
            call.arguments,
            self._settings(call.upstream, call.tool),
        )


class Pipeline:
    def __init__(
        self,
        stages: Sequence[Stage],
        writer: AuditWriter,
        *,
        instance: str,
        hmac_key: bytes,
    ) -> None:
        self.stages = tuple(stages)
        self._writer = writer
        self._instance = instance
        self._hmac_key = hmac_key

    async def decide(self, call: ToolCall) -> Decision:
        """Run the stages in order; the first denial (or approval demand) ends the chain."""
        decision: Decision | None = None
        for stage in self.stages:
            verdict = await stage(call)
            if verdict is None:
                continue
            decision = verdict
            if verdict.effect != "allow":
                break
        if decision is None:
            return Decision.deny("pipeline", "no-stage", "no stage allowed the call")
        if decision.effect == "transform":
            # Redaction is not part of this build: a call that policy allows only if redacted
            # cannot be honoured, so it is refused rather than forwarded unredacted.
            return Decision.deny(
                decision.stage,
                decision.reasons[0].policy if decision.reasons else "transform",
                "policy requires redaction, which this gateway does not provide yet",
                decision.policy_version,
            )
        if decision.effect == "approval_required":
            return Decision(
                "deny",
                (*decision.reasons, Reason("approval", "human approval is required and not available yet")),
                decision.stage,
                decision.policy_version,
            )
        return decision

    async def refuse(self, call: ToolCall, stage: str, policy: str, reason: str) -> Decision:
        """Record a call refused before the stages could run (bad credential, malformed call)."""
        decision = Decision.deny(stage, policy, reason)
        await self.finish(call, decision, Outcome("denied", self.elapsed_ms(call)))
        return decision

    @staticmethod
    def elapsed_ms(call: ToolCall) -> float:
        return round((time.perf_counter() - call.started) * 1000, 3)

    async def finish(self, call: ToolCall, decision: Decision, outcome: Outcome) -> None:
        """Write the call's one audit record and wait until it is durable."""
        metrics.DECISIONS.labels(decision.effect, decision.stage).inc()
        p = call.principal
        record = AuditRecord(
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
            upstream=call.upstream,
            tool=call.tool,
            action=call.action,
            args_redacted=shape_of(call.arguments),
            args_hmac=args_hmac(self._hmac_key, call.arguments),
            decision=decision.to_json(),
            budget=None,
            pii={"input": {}, "output": {}},
            outcome={
                "status": outcome.status,
                "latency_ms": outcome.latency_ms,
                "upstream_status": outcome.upstream_status,
                "error": outcome.error,
            },
            result_sha256=outcome.result_sha256,
            prev_hash=None,
            hash=None,
        )
        try:
            await self._writer.write(record)
        except AuditStoreError as exc:
            metrics.AUDIT_FAILURES.inc()
            log.error("audit write failed for %s: %s", call.audit_id, exc)
            raise AuditUnavailable("the audit store is unavailable; the call is not answered") from exc


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
