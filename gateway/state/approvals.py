"""Human approval of risky calls: the pending requests, shared by every replica through the state DB.

A call that policy answers `approval_required` (a permit with `@obligation("approval")`) is never
forwarded. Bastion stores a request bound to the call (`binding_of`: the principal, the agent and
delegation chain acting for it, upstream, tool, canonical arguments) and tells the caller its id.
An approver approves or denies it (CLI, admin API, or the page at `/approvals/{id}`). When the same
principal, through the same agent and chain, then repeats the same call with the same arguments,
it runs exactly once: consumption is a conditional UPDATE (`status = 'approved'` and not
expired), so two replicas racing for it cannot both win. Any other argument gives another binding,
hence a new request.

Lifecycle: pending -> approved -> consumed, or pending -> denied, or pending/approved -> expired.
Denied, expired and consumed are final. A pending request expires `approvals.ttl_s` after it was
made; an approval must be used within `ttl_s` of being given; a denial refuses the identical call
for `ttl_s` (the agent cannot wear the approver down by asking again).

The raw arguments are never stored: only what the audit record holds (redacted, or their shape)
and the audit's keyed HMAC of them.

A call approved inline (the MCP front asked the client's user through elicitation) waits for the
decision with `await_decision`: it reads the state DB, so the decision may be made on any replica;
a decision made in this process wakes it at once.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import random
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import httpx
from sqlalchemy import BigInteger, Column, Index, String, Table, Text, case, insert, not_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.record import SCHEMA_VERSION, AuditRecord, canonical_json, new_id, shape_of
from audit.store import AuditStoreError
from audit.writer import AuditWriter
from gateway import metrics
from gateway.call import Identities, Principal, ToolCall
from gateway.config import ApprovalsConfig
from gateway.errors import ApprovalError, ConfigError
from gateway.state.db import metadata

__all__ = ["Approval", "Approvals", "binding_of"]

log = logging.getLogger("bastion.approvals")

RETRY_BASE_S = 1.0
RETRY_STATUSES = frozenset({408, 429})
"""Webhook answers worth another attempt, besides every 5xx."""
CLOSE_GRACE_S = 5.0

Status = Literal["pending", "approved", "denied", "expired", "consumed"]
FINAL: frozenset[str] = frozenset({"denied", "expired", "consumed"})

approvals_table = Table(
    "bastion_approvals",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("binding", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("subject", String(512), nullable=False),
    Column("issuer", String(512), nullable=False),
    Column("agent", String(512)),
    Column("upstream", String(128), nullable=False),
    Column("tool", String(256), nullable=False),
    Column("args_shown", Text, nullable=False),
    Column("args_hmac", String(128)),
    Column("reasons", Text, nullable=False),
    Column("audit_id", String(36), nullable=False),
    Column("created_ms", BigInteger, nullable=False),
    Column("expires_ms", BigInteger, nullable=False),
    Column("decided_by", String(512)),
    Column("decided_ms", BigInteger),
    Column("note", Text),
    Column("used_by", String(36)),
    Column("used_ms", BigInteger),
    Index("ix_bastion_approvals_binding", "binding", "status"),
    Index("ix_bastion_approvals_audit_id", "audit_id"),
    Index("ix_bastion_approvals_used_by", "used_by"),
)


BINDING_PREFIX = "b2."
"""Marks bindings that name the agent and the delegation chain. A stored binding without it (64
hex digits, from before) matches no call: such a request is expired when expiries are next looked
for, never used."""


def binding_of(principal: Principal, upstream: str, tool: str, arguments: Mapping[str, Any]) -> str:
    """What an approval is for: this principal, acting through this agent and delegation chain,
    this tool, these exact (canonical) arguments. An approval given to "alice via agent A" is
    therefore not one for "alice via agent B", nor for alice herself."""
    chain = list(principal.delegation_chain)
    data = canonical_json([principal.key, principal.agent, chain, upstream, tool, dict(arguments)])
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return BINDING_PREFIX + digest


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Approval:
    """One request for a human decision, as stored."""

    id: str
    binding: str
    status: Status
    subject: str
    issuer: str
    agent: str | None
    upstream: str
    tool: str
    args_shown: Any
    args_hmac: str | None
    reasons: list[dict[str, str]]
    audit_id: str
    created_ms: int
    expires_ms: int
    decided_by: str | None
    decided_ms: int | None
    note: str | None
    used_by: str | None
    used_ms: int | None

    @property
    def effective_status(self) -> Status:
        """`expired` for an open request past its deadline, or bound without agent and chain,
        even before the row says so."""
        if self.status in ("pending", "approved") and (
            self.expires_ms <= _now_ms() or not self.binding.startswith(BINDING_PREFIX)
        ):
            return "expired"
        return self.status

    def made_by(self, principal: Principal, identities: Identities) -> bool:
        """Whether `principal` is the held call's caller: the same issuer and subject, or the same
        user through `identity.same_identity` (nobody approves their own call)."""
        if (self.issuer, self.subject) == (principal.issuer, principal.sub):
            return True
        return identities.id_of(self.issuer, self.subject) == principal.id

    @property
    def policy_reason(self) -> str:
        return "; ".join(f"{r.get('policy')}: {r.get('reason')}" for r in self.reasons) or "-"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.effective_status,
            "subject": self.subject,
            "issuer": self.issuer,
            "agent": self.agent,
            "upstream": self.upstream,
            "tool": self.tool,
            "arguments": self.args_shown,
            "reasons": self.reasons,
            "audit_id": self.audit_id,
            "created_at": _iso(self.created_ms),
            "expires_at": _iso(self.expires_ms),
            "decided_by": self.decided_by,
            "decided_at": _iso(self.decided_ms),
            "note": self.note,
            "used_by_audit_id": self.used_by,
            "used_at": _iso(self.used_ms),
        }

    @classmethod
    def of_row(cls, row: Any) -> Approval:
        try:
            shown = json.loads(row.args_shown)
            reasons = json.loads(row.reasons)
        except ValueError:
            shown, reasons = {"unreadable": "stored arguments are not JSON"}, []
        return cls(
            row.id,
            row.binding,
            row.status,
            row.subject,
            row.issuer,
            row.agent,
            row.upstream,
            row.tool,
            shown,
            row.args_hmac,
            reasons if isinstance(reasons, list) else [],
            row.audit_id,
            row.created_ms,
            row.expires_ms,
            row.decided_by,
            row.decided_ms,
            row.note,
            row.used_by,
            row.used_ms,
        )


class Approvals:
    """The approval requests in the state DB, and the audit records of their decisions.

    `audit`: where approvals' own events (approved, denied, expired) are recorded, as records with
    action `approve` for the same upstream/tool, linked to the held call through `decision.reasons`.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        cfg: ApprovalsConfig,
        base_url: str,
        *,
        audit: AuditWriter | None = None,
        instance: str | None = None,
        protocol: str = "http",
    ) -> None:
        self.engine = engine
        self.cfg = cfg
        self.base_url = base_url
        self.audit = audit
        self.instance = instance or socket.gethostname()
        self.protocol = protocol
        self._hook_key: bytes | None = None
        self._http: httpx.AsyncClient | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self._waiting: dict[str, set[asyncio.Event]] = {}
        """Inline approvals waiting in this process for a decision (one event per waiter, since
        several calls may wait on one approval), woken when one is made here."""
        if cfg.webhook is not None:
            try:
                self._hook_key = cfg.webhook.secret_file.read_bytes().strip()
            except OSError as exc:
                raise ConfigError(f"approvals.webhook.secret_file: cannot read it: {exc}") from exc
            if not self._hook_key:
                raise ConfigError("approvals.webhook.secret_file: the file is empty")
            self._http = httpx.AsyncClient(timeout=cfg.webhook.timeout_s, follow_redirects=False)

    async def aclose(self) -> None:
        """Give webhook deliveries in flight a moment to finish (retries are not waited for long),
        then close the client."""
        if self._sending:
            _, late = await asyncio.wait(self._sending, timeout=CLOSE_GRACE_S)
            for task in late:
                task.cancel()
            if late:
                await asyncio.gather(*late, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()

    def url_of(self, approval_id: str) -> str:
        return f"{self.base_url}/approvals/{approval_id}"

    def describe(self, approval_id: str) -> dict[str, str]:
        """What a held caller is told: the id, where to review it, whom to ask."""
        return {
            "approval_id": approval_id,
            "approval_url": self.url_of(approval_id),
            "approvers": self.cfg.approvers,
        }

    # -- the gateway's side ------------------------------------------------------------------

    async def current(self, binding: str) -> Approval | None:
        """The request for this binding that still matters (pending, approved or denied, in time).

        Two identical calls held at the same moment may each have stored a request. A decision
        on either counts, a denial first: denied, then approved, then the newest pending one."""
        now = _now_ms()
        t = approvals_table
        standing = case((t.c.status == "denied", 0), (t.c.status == "approved", 1), else_=2)
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(t)
                    .where(
                        t.c.binding == binding,
                        t.c.status.in_(("pending", "approved", "denied")),
                        t.c.expires_ms > now,
                    )
                    .order_by(standing, t.c.created_ms.desc(), t.c.id.desc())
                    .limit(1)
                )
            ).first()
        return None if row is None else Approval.of_row(row)

    async def request(self, call: ToolCall, reasons: list[dict[str, str]], args_hmac: str | None) -> Approval:
        """Store a pending request for a held call."""
        assert call.principal is not None
        p = call.principal
        now = _now_ms()
        shown = call.redacted_args if call.redacted_args is not None else shape_of(call.arguments)
        values = {
            "id": new_id(unguessable=True),
            "binding": binding_of(p, call.upstream, call.tool, call.arguments),
            "status": "pending",
            "subject": p.sub,
            "issuer": p.issuer,
            "agent": p.agent,
            "upstream": call.upstream,
            "tool": call.tool,
            "args_shown": json.dumps(shown, ensure_ascii=False),
            "args_hmac": args_hmac,
            "reasons": json.dumps(reasons, ensure_ascii=False),
            "audit_id": call.audit_id,
            "created_ms": now,
            "expires_ms": now + int(self.cfg.ttl_s * 1000),
        }
        async with self.engine.begin() as conn:
            await conn.execute(insert(approvals_table).values(**values))
        log.info("call %s held for approval %s (%s)", call.audit_id, values["id"], call.resource)
        made = await self.get(str(values["id"]))
        assert made is not None
        self.notify(made, "requested", None, None)
        return made

    async def consume(self, approval_id: str, audit_id: str) -> bool:
        """Use an approval for the call `audit_id`; True only for the one caller that wins it."""
        now = _now_ms()
        t = approvals_table
        async with self.engine.begin() as conn:
            done = await conn.execute(
                update(t)
                .where(t.c.id == approval_id, t.c.status == "approved", t.c.expires_ms > now)
                .values(status="consumed", used_by=audit_id, used_ms=now)
            )
        if done.rowcount != 1:
            return False
        if self._http is not None and (used := await self.get(approval_id)) is not None:
            self.notify(used, "consumed", None, None)
        return True

    # -- the approvers' side -----------------------------------------------------------------

    async def get(self, approval_id: str) -> Approval | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(select(approvals_table).where(approvals_table.c.id == approval_id))
            ).first()
        return None if row is None else Approval.of_row(row)

    async def for_audit(self, audit_id: str) -> list[Approval]:
        """The approvals a call's record names: the one it was held for, and the one it used."""
        t = approvals_table.c
        query = select(approvals_table).where((t.audit_id == audit_id) | (t.used_by == audit_id))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query.order_by(t.created_ms))).all()
        return [Approval.of_row(r) for r in rows]

    async def list(self, status: str | None = None, limit: int = 200) -> list[Approval]:
        await self.expire_due()
        t = approvals_table
        query = select(t).order_by(t.c.created_ms.desc(), t.c.id.desc()).limit(limit)
        if status:
            query = query.where(t.c.status == status)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [Approval.of_row(r) for r in rows]

    async def decide(self, approval_id: str, approve: bool, by: str, note: str | None = None) -> Approval:
        """Approve or deny a pending request; anything else is refused with the reason. `by`: the
        approver's `Principal.id` (or, from the CLI, the operator's name).

        The UPDATE is conditional on `pending` and not expired, so of two approvers deciding at
        once only one succeeds, and a decision, once made, never changes."""
        now = _now_ms()
        t = approvals_table
        status: Status = "approved" if approve else "denied"
        async with self.engine.begin() as conn:
            done = await conn.execute(
                update(t)
                .where(t.c.id == approval_id, t.c.status == "pending", t.c.expires_ms > now)
                .where(t.c.binding.startswith(BINDING_PREFIX, autoescape=True))
                .values(
                    status=status,
                    decided_by=by[:512],
                    decided_ms=now,
                    note=(note or None) and note[:2000],
                    expires_ms=now + int(self.cfg.ttl_s * 1000),
                )
            )
        found = await self.get(approval_id)
        if found is None:
            raise ApprovalError(f"no approval {approval_id[:64]!r}", 404)
        if done.rowcount != 1:
            if found.effective_status == "expired":
                await self.expire_due()
                raise ApprovalError(f"approval {found.id} has expired: the call must be asked again")
            by_whom = found.decided_by or "-"
            raise ApprovalError(f"approval {found.id} is already {found.status} (by {by_whom})")
        await self.record(found, status, by, note)
        for event in self._waiting.get(approval_id, ()):
            event.set()
        return found

    async def await_decision(
        self, approval_id: str, timeout_s: float, stop: asyncio.Future[Any] | None = None
    ) -> Approval | None:
        """The approval once it is no longer pending, or as it stands after `timeout_s` (or once
        `stop` is done, whichever comes first). None: there is no such approval.

        The state DB is read with a growing interval (50 ms to 500 ms), so a decision made on
        another replica is seen within half a second; one made in this process wakes it at once."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        event = asyncio.Event()
        waiters = self._waiting.setdefault(approval_id, set())
        waiters.add(event)
        woken: asyncio.Task[Any] | None = None
        delay = 0.05
        try:
            while True:
                found = await self.get(approval_id)
                if found is None or found.effective_status != "pending":
                    return found
                remaining = deadline - loop.time()
                if remaining <= 0 or (stop is not None and stop.done()):
                    return found
                woken = asyncio.ensure_future(event.wait())
                waits: set[asyncio.Future[Any]] = {woken} if stop is None else {woken, stop}
                await asyncio.wait(waits, timeout=min(delay, remaining), return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
                event.clear()
                delay = min(delay * 2, 0.5)
        finally:
            if woken is not None:
                woken.cancel()  # also when this wait is cancelled (the client went away)
            waiters.discard(event)
            if not waiters and self._waiting.get(approval_id) is waiters:
                del self._waiting[approval_id]

    async def expire_due(self) -> int:
        """Mark open requests past their deadline, or bound the old way (without agent and
        chain, so no call can use them), `expired` and record each; returns how many."""
        now = _now_ms()
        t = approvals_table
        due = or_(t.c.expires_ms <= now, not_(t.c.binding.startswith(BINDING_PREFIX, autoescape=True)))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(t).where(t.c.status.in_(("pending", "approved")), due))).all()
        expired = 0
        for row in rows:
            async with self.engine.begin() as conn:
                done = await conn.execute(
                    update(t).where(t.c.id == row.id, t.c.status == row.status, due).values(status="expired")
                )
            if done.rowcount == 1:
                expired += 1
                note = f"was {row.status}"
                if not row.binding.startswith(BINDING_PREFIX):
                    note += "; bound without the agent and delegation chain, so no call could use it"
                await self.record(Approval.of_row(row), "expired", None, note)
        return expired

    async def record(self, approval: Approval, event: str, by: str | None, note: str | None) -> None:
        """One audit record per decision or expiry, linked to the held call by its audit id.

        The decision itself is already durable in the state DB; a failing audit store is logged and
        counted rather than undoing it."""
        self.notify(approval, event, by, note)
        if self.audit is None:
            return
        who = by or "bastion"
        text = f"approval {approval.id} for call {approval.audit_id} {event} by {who}"
        if note:
            text += f": {note[:500]}"
        record = AuditRecord(
            id=new_id(),
            ts=datetime.now(UTC),
            schema_version=SCHEMA_VERSION,
            instance=self.instance,
            trace_id=uuid.uuid4().hex,
            call_id=approval.id,
            user=by,
            tenant=None,
            agent=None,
            delegation_chain=[],
            protocol=self.protocol,
            upstream=approval.upstream,
            tool=approval.tool,
            action="approve",
            args_redacted=approval.args_shown if isinstance(approval.args_shown, dict) else {},
            args_hmac=approval.args_hmac,
            decision={
                "effect": "allow" if event == "approved" else "deny",
                "reasons": [{"policy": "approval", "reason": text}],
                "policy_ids": ["approval"],
                "policy_version": None,
                "stage": "approval",
            },
            budget=None,
            pii={"input": {}, "output": {}},
            outcome={"status": event, "latency_ms": 0.0, "upstream_status": None, "error": None},
            result_sha256=None,
        )
        try:
            await self.audit.write(record)
        except AuditStoreError as exc:
            metrics.AUDIT_FAILURES.inc()
            log.error("audit of approval %s (%s) failed: %s", approval.id, event, exc)

    def notify(self, approval: Approval, event: str, by: str | None, note: str | None) -> None:
        """POST the event to the webhook in the background: a slow receiver never delays a call."""
        metrics.APPROVAL_EVENTS.labels(event).inc()
        if self._http is None:
            return
        body = {
            "event": event,
            "by": by,
            "note": note,
            "ts": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "approval": approval.to_json() | {"url": self.url_of(approval.id)},
        }
        task = asyncio.get_running_loop().create_task(self._send(json.dumps(body).encode()))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, body: bytes) -> None:
        """Deliver one event, retrying what may succeed later. Every attempt carries the same
        `X-Bastion-Delivery` id, so a receiver that saw an attempt whose answer was lost can
        drop the repeat."""
        assert self._http is not None and self._hook_key is not None and self.cfg.webhook is not None
        hook = self.cfg.webhook
        signature = hmac.new(self._hook_key, body, hashlib.sha256).hexdigest()
        headers = {
            "content-type": "application/json",
            "x-bastion-signature": f"sha256={signature}",
            "x-bastion-delivery": new_id(),
        }
        for attempt in range(hook.retries + 1):
            if attempt:
                metrics.WEBHOOK_DELIVERIES.labels("retried").inc()
                await asyncio.sleep(RETRY_BASE_S * 2 ** (attempt - 1) * random.uniform(0.5, 1.0))
            try:
                resp = await self._http.post(hook.url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                why = type(exc).__name__
            else:
                if resp.status_code < 300:
                    metrics.WEBHOOK_DELIVERIES.labels("delivered").inc()
                    return
                why = f"HTTP {resp.status_code}"
                if resp.status_code not in RETRY_STATUSES and resp.status_code < 500:
                    break
            log.warning("approval webhook attempt %d of %d failed: %s", attempt + 1, hook.retries + 1, why)
        metrics.WEBHOOK_DELIVERIES.labels("dropped").inc()
        log.error("approval webhook: event dropped after %d attempt(s) (last: %s)", attempt + 1, why)
