"""Budgets and rate limits, consumed atomically in SQL so they hold exactly across replicas.

Each matching budget is charged with one conditional UPDATE (`used + cost <= limit`), never a
read-then-write; all charges of one call share one transaction, so a call that matches several
budgets consumes all or none. Windows are fixed and aligned to the Unix epoch in UTC (`1d`
resets at UTC midnight); a rate limit is a budget with a short window.

Delegation: a budget counted `per: [agent]` charges every actor of the delegation chain, so what
a sub-agent spends also counts against the agent that delegated to it; `per: [user]` counts the
user on whose behalf the whole chain acts, by `Principal.id` (issuer and subject together: two
issuers' "alice" are two users, and so is an API key with that subject), as does `match.users`.
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from audit.sqlite_thread import SQLiteThread
from gateway import metrics
from gateway.call import Decision, Identities, Principal, Reason, ToolCall
from gateway.config import BudgetRule, CostTable
from gateway.errors import ConfigError
from gateway.state.db import STATE_ERRORS, budget_usage

CHARGED = frozenset({"call_tool", "send_message"})
"""The actions budgets count: tool calls and messages to agents (`match.upstreams` names agents too)."""


@dataclass(frozen=True, slots=True)
class Charge:
    rule: BudgetRule
    subject: str
    window_start: int
    cost: int

    @property
    def window_end(self) -> int:
        return self.window_start + self.rule.window_s

    def state(self, used: int) -> dict[str, Any]:
        return {
            "budget": self.rule.name,
            "subject": self.subject,
            "cost": self.cost,
            "used": used,
            "limit": self.rule.limit,
            "remaining": max(0, self.rule.limit - used),
            "resets_at": _iso(self.window_end),
        }


class _OverBudget(Exception):
    def __init__(self, charge: Charge) -> None:
        self.charge = charge


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _matches(rule: BudgetRule, users: frozenset[str], call: ToolCall, p: Principal) -> bool:
    """`users`: the ids `rule.match.users` names."""
    m = rule.match
    if m.tools and not any(t in ("*", call.resource, f"{call.upstream}/*") for t in m.tools):
        return False
    if m.upstreams and call.upstream not in m.upstreams:
        return False
    if users and p.id not in users:
        return False
    if m.groups and not p.groups.intersection(m.groups):
        return False
    if m.tenants and p.tenant not in m.tenants:
        return False
    return not (m.agents and not set(_actors(p)).intersection(m.agents))


def _actors(p: Principal) -> tuple[str, ...]:
    if p.delegation_chain:
        return p.delegation_chain
    return (p.agent,) if p.agent else ()


def _subjects(rule: BudgetRule, call: ToolCall, p: Principal) -> list[str]:
    """One counter key per combination of the `per` dimensions (agents expand over the chain)."""
    values: list[list[str]] = []
    for dim in rule.per:
        if dim == "user":
            values.append([f"user={p.id}"])
        elif dim == "tenant":
            values.append([f"tenant={p.tenant or '-'}"])
        elif dim == "tool":
            values.append([f"tool={call.resource}"])
        elif dim == "upstream":
            values.append([f"upstream={call.upstream}"])
        else:
            values.append([f"agent={a}" for a in _actors(p)] or ["agent=-"])
    return ["|".join(combo)[:512] for combo in itertools.product(*values)] or ["*"]


def cost_of(rule: BudgetRule, call: ToolCall) -> int:
    """The call's cost under this budget; ValueError names what is wrong with a cost argument."""
    cost = rule.cost
    if isinstance(cost, int):
        return cost
    if isinstance(cost, CostTable):
        return cost.tools.get(call.resource, cost.tools.get(call.tool, cost.default))
    value: Any = call.arguments
    for part in cost.split(".")[1:]:
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value >= 2**62:
        raise ValueError(f"budget {rule.name}: argument {cost[5:]} must be a non-negative integer")
    return value


class BudgetStage:
    """Charges every matching budget; denies, naming the budget, when one would be exceeded."""

    name = "budget"

    def __init__(
        self,
        rules: Sequence[BudgetRule],
        engine: AsyncEngine,
        writer: SQLiteThread | None = None,
        identities: Identities | None = None,
    ) -> None:
        """`identities`: how `match.users` entries name users (`IdentityConfig.identities()`);
        by default bare subjects, as with one issuer."""
        self.rules = tuple(rules)
        ids = identities or Identities()
        try:
            self._users = {r.name: frozenset(ids.resolve(u) for u in r.match.users) for r in self.rules}
        except ValueError as exc:
            raise ConfigError(f"budgets: match.users: {exc}") from None
        self.engine = engine
        self._writer = writer
        """SQLite file: charges of concurrent calls share one transaction on this thread."""
        self._sqlite = engine.dialect.name == "sqlite"
        self._insert = sqlite.insert if self._sqlite else postgresql.insert
        self._lock = asyncio.Lock()

    def charges(self, call: ToolCall, now: float) -> list[Charge]:
        p = call.principal
        assert p is not None
        out: list[Charge] = []
        for rule in self.rules:
            if not _matches(rule, self._users[rule.name], call, p):
                continue
            cost = cost_of(rule, call)
            start = int(now) // rule.window_s * rule.window_s
            out.extend(Charge(rule, s, start, cost) for s in _subjects(rule, call, p))
        return out

    async def __call__(self, call: ToolCall) -> Decision | None:
        if call.principal is None or not self.rules or call.action not in CHARGED:
            return None  # budgets count tool calls and A2A messages (docs/budgets.md)
        now = time.time()
        try:
            charges = self.charges(call, now)
        except ValueError as exc:
            return Decision.deny(self.name, "budget-cost", str(exc))
        if not charges:
            return None
        try:
            states = await (self._peek(charges) if call.dry_run else self._consume(charges))
        except _OverBudget as over:
            c = over.charge
            used = await self._used(c)
            state = c.state(used)
            call.budget = {"charged": [], "exceeded": state}
            reason = (
                f"budget {c.rule.name} exceeded: limit {c.rule.limit} per {c.rule.window}, "
                f"{state['remaining']} left, resets at {state['resets_at']}"
            )
            retry = max(1, c.window_end - int(now))
            return Decision(
                "deny", (Reason(f"budget/{c.rule.name}", reason),), self.name, retry_after_s=retry
            )
        except STATE_ERRORS as exc:
            metrics.BUDGET_STORE_ERRORS.inc()
            return Decision.deny(
                self.name, "budget-unavailable", f"budget store unavailable: {type(exc).__name__}"
            )
        call.budget = {"charged": states, "exceeded": None}
        return None

    async def view(self, call: ToolCall) -> dict[str, Any]:
        """`context.budget` for Cedar: per matching budget, its tightest counter before this call."""
        if call.principal is None:
            return {}
        try:
            charges = self.charges(call, time.time())
        except ValueError:
            return {}
        view: dict[str, Any] = {}
        for c in charges:
            used = await self._used(c)
            state = {"remaining": max(0, c.rule.limit - used), "limit": c.rule.limit, "used": used}
            if c.rule.name not in view or state["remaining"] < view[c.rule.name]["remaining"]:
                view[c.rule.name] = state
        return view

    async def _peek(self, charges: list[Charge]) -> list[dict[str, Any]]:
        """What consuming would do, without consuming (for `bastion explain`)."""
        states = []
        for c in charges:
            used = await self._used(c)
            if used + c.cost > c.rule.limit:
                raise _OverBudget(c)
            states.append(c.state(used + c.cost) | {"dry_run": True})
        return states

    async def _consume(self, charges: list[Charge]) -> list[dict[str, Any]]:
        if self._writer is not None:
            return await self._writer.run(lambda conn: _charge_all(conn, charges))
        if self._sqlite:
            async with self._lock:
                return await self._transaction(charges)
        return await self._transaction(charges)

    async def _transaction(self, charges: list[Charge]) -> list[dict[str, Any]]:
        states = []
        async with self.engine.begin() as conn:
            for c in charges:
                used = await self._charge(conn, c)
                if used is None:
                    raise _OverBudget(c)
                states.append(c.state(used))
        return states

    async def _charge(self, conn: AsyncConnection, c: Charge) -> int | None:
        """One statement: create the window's counter, or add to it only while within the limit."""
        if c.cost > c.rule.limit:
            return None
        t = budget_usage.c
        row = {"budget": c.rule.name, "subject": c.subject, "window_start": c.window_start, "used": c.cost}
        stmt = (
            self._insert(budget_usage)
            .values(row)
            .on_conflict_do_update(
                index_elements=[t.budget, t.subject, t.window_start],
                set_={"used": t.used + c.cost},
                where=t.used + c.cost <= c.rule.limit,
            )
            .returning(t.used)
        )
        result = (await conn.execute(stmt)).first()
        return None if result is None else int(result[0])

    async def _used(self, c: Charge) -> int:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(budget_usage.c.used).where(
                        budget_usage.c.budget == c.rule.name,
                        budget_usage.c.subject == c.subject,
                        budget_usage.c.window_start == c.window_start,
                    )
                )
            ).first()
        return int(row[0]) if row else 0

    async def refund(self, call: ToolCall, upstream_failed: bool = False) -> None:
        """Give back what a call was charged. A call Bastion refused after the charge (a repeated
        call_id, the audit store down, an approval used meanwhile) never reached the upstream: every
        budget refunds it. One the upstream failed to take refunds only for budgets with
        `refund_on_upstream_failure`."""
        charged = (call.budget or {}).get("charged") or []
        refunds = [
            s
            for s in charged
            if not s.get("refunded")
            and any(
                r.name == s["budget"] and (r.refund_on_upstream_failure or not upstream_failed)
                for r in self.rules
            )
        ]
        if not refunds:
            return
        rules = {r.name: r for r in self.rules}
        async with self.engine.begin() as conn:
            for s in refunds:
                rule = rules[s["budget"]]
                window_start = int(datetime.fromisoformat(s["resets_at"].replace("Z", "+00:00")).timestamp())
                await conn.execute(
                    update(budget_usage)
                    .where(
                        budget_usage.c.budget == rule.name,
                        budget_usage.c.subject == s["subject"],
                        budget_usage.c.window_start == window_start - rule.window_s,
                        budget_usage.c.used >= s["cost"],
                    )
                    .values(used=budget_usage.c.used - s["cost"])
                )
                s["refunded"] = True


_UPSERT = (
    "INSERT INTO bastion_budget_usage (budget, subject, window_start, used) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (budget, subject, window_start) DO UPDATE SET used = used + ? WHERE used + ? <= ? "
    "RETURNING used"
)


def _charge_all(conn: sqlite3.Connection, charges: list[Charge]) -> list[dict[str, Any]]:
    """`_transaction` for the SQLite writer thread: the same upsert per charge, all or none
    (`SQLiteThread` runs this in a savepoint and rolls it back when it raises)."""
    states = []
    for c in charges:
        if c.cost > c.rule.limit:
            raise _OverBudget(c)
        row = conn.execute(
            _UPSERT, (c.rule.name, c.subject, c.window_start, c.cost, c.cost, c.cost, c.rule.limit)
        ).fetchone()
        if row is None:
            raise _OverBudget(c)
        states.append(c.state(int(row[0])))
    return states


async def usage(
    engine: AsyncEngine, rules: Sequence[BudgetRule], user: str | None = None
) -> list[dict[str, Any]]:
    """Current-window usage of every configured budget (for `bastion budgets show`); `user` is a
    user id (`Identities.resolve` turns what a person typed into one)."""
    now = int(time.time())
    rows: list[dict[str, Any]] = []
    async with engine.connect() as conn:
        for rule in rules:
            start = now // rule.window_s * rule.window_s
            query = select(budget_usage.c.subject, budget_usage.c.used).where(
                budget_usage.c.budget == rule.name, budget_usage.c.window_start == start
            )
            for subject, used in (await conn.execute(query.order_by(budget_usage.c.subject))).all():
                if user is not None and f"user={user}" not in subject.split("|"):
                    continue
                charge = Charge(rule, subject, start, 0)
                rows.append(charge.state(int(used)) | {"window": rule.window})
    return rows
