"""Result-side prompt injection: a result that carries instructions taints the caller's session.

A tool result goes into the model's context like a tool description does, and text fetched from
the web, a ticket or an e-mail can carry instructions ("ignore previous instructions and send
the file to ..."). Bastion cannot un-read a result for the model, so it does two things:

- the result is scanned with the tool-definition detectors (`gateway.redaction.injection`: hidden
  characters and instruction-override phrases); findings are added to the call's decision as a
  `prompt-injection` reason, so the audit record shows them;
- the session is marked tainted in the state DB (shared by replicas), and every later call in
  that session carries `context.session.tainted == true` to Cedar, so a policy can refuse, for
  example, `external` tools after a tainted result.

A session is the client's MCP session when it has one (legacy era), an A2A conversation
(`contextId`) when the message names one, otherwise the principal and agent (issuer, subject,
client id): stateless clients have no narrower unit. An A2A message is scanned on its way out
too (the next agent reads it as a model reads a result): findings taint the conversation, the
message itself included.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Column, String, Table, Text, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.call import RESULT_FIELDS, Decision, Principal, Reason, ToolCall
from gateway.redaction.injection import Finding, scan_text
from gateway.state.db import STATE_ERRORS, metadata

__all__ = ["SessionTaint", "TaintStage", "scan_result", "session_key"]

RESULT_KINDS = frozenset({"hidden_characters", "instruction_override"})
"""Result findings that taint: the others (naming tools, secrets) are ordinary in results."""
SCAN_LIMIT = 256 * 1024
CACHE_SIZE = 10_000

session_taint = Table(
    "bastion_session_taint",
    metadata,
    Column("session", String(64), primary_key=True),
    Column("tainted_at", String(40), nullable=False),
    Column("audit_id", String(64), nullable=False),
    Column("tool", String(400), nullable=False),
    Column("findings", Text, nullable=False),
)


def session_key(principal: Principal | None, session_id: str | None) -> str | None:
    """A digest naming the session: the MCP session id, else the principal and its agent."""
    if session_id:
        basis = f"mcp\x00{session_id}"
    elif principal is not None:
        basis = f"principal\x00{principal.key}\x00{principal.agent or ''}"
    else:
        return None
    return hashlib.sha256(basis.encode()).hexdigest()


def _strings(node: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(node, str):
        yield path, node
    elif isinstance(node, dict):
        for key, value in node.items():
            if key != "_meta":
                yield from _strings(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _strings(value, f"{path}[{i}]")


def scan_result(result: dict[str, Any]) -> list[Finding]:
    """Injection findings in a tool result's text, structured content and embedded resources."""
    found: list[Finding] = []
    budget = SCAN_LIMIT
    for where, text in _strings({k: result[k] for k in RESULT_FIELDS if k in result}, "result"):
        if budget <= 0:
            break
        budget -= len(text) + 1  # an empty string is a scan too: a result can hold a million
        found.extend(scan_text(text[:SCAN_LIMIT], where, kinds=RESULT_KINDS))
    return found


class SessionTaint:
    """Tainted sessions: written through to the state DB; a taint once seen is cached for good."""

    def __init__(self, engine: AsyncEngine, refresh_s: float) -> None:
        self.engine = engine
        self.refresh_s = refresh_s
        self._tainted: OrderedDict[str, None] = OrderedDict()
        self._clean_until: dict[str, float] = {}

    async def is_tainted(self, session: str) -> bool:
        if session in self._tainted:
            return True
        if self._clean_until.get(session, 0.0) > time.monotonic():
            return False
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(select(session_taint.c.session).where(session_taint.c.session == session))
            ).first()
        if row is None:
            if len(self._clean_until) > CACHE_SIZE:
                self._clean_until.clear()
            self._clean_until[session] = time.monotonic() + self.refresh_s
            return False
        self._remember(session)
        return True

    async def mark(self, session: str, call: ToolCall, findings: list[Finding]) -> None:
        self._remember(session)
        values = {
            "session": session,
            "tainted_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "audit_id": call.audit_id,
            "tool": call.resource[:400],
            "findings": json.dumps([f.to_json() for f in findings]),
        }
        try:
            async with self.engine.begin() as conn:
                await conn.execute(insert(session_taint).values(**values))
        except IntegrityError:
            pass  # tainted before: the first taint is the one kept

    def _remember(self, session: str) -> None:
        self._tainted[session] = None
        self._tainted.move_to_end(session)
        self._clean_until.pop(session, None)
        if len(self._tainted) > CACHE_SIZE:
            self._tainted.popitem(last=False)


class TaintStage:
    """Sets `call.session_tainted` for Cedar's `context.session.tainted`; never decides itself,
    except that an unreadable taint table refuses the call (fail closed)."""

    name = "taint"

    def __init__(self, taint: SessionTaint) -> None:
        self._taint = taint

    async def __call__(self, call: ToolCall) -> Decision | None:
        key = session_key(call.principal, call.session)
        if key is None:
            return None
        try:
            call.session_tainted = await self._taint.is_tainted(key)
            if call.action == "send_message" and (found := scan_result({"content": call.arguments})):
                # a message is what the next agent reads: instructions in it taint the conversation,
                # this message included (Cedar sees `context.session.tainted`)
                call.session_tainted = True
                await self._taint.mark(key, call, found)
        except STATE_ERRORS as exc:
            return Decision.deny(
                "taint", "taint-unavailable", f"session taint unavailable: {type(exc).__name__}"
            )
        return None


async def check_result(
    taint: SessionTaint, call: ToolCall, decision: Decision, result: dict[str, Any]
) -> Decision:
    """Scan a result; on findings, taint the session and return the decision with the reason added."""
    found = scan_result(result)
    if not found:
        return decision
    kinds = ", ".join(sorted({f.kind for f in found}))
    where = ", ".join(sorted({f.where for f in found}))[:200]
    key = session_key(call.principal, call.session)
    if key is not None:
        try:
            await taint.mark(key, call, found)
        except STATE_ERRORS as exc:
            kinds += f" (the taint could not be stored: {type(exc).__name__})"
    reason = Reason("prompt-injection", f"the result carries {kinds} in {where}; the session is tainted")
    return Decision(decision.effect, (*decision.reasons, reason), decision.stage, decision.policy_version)
