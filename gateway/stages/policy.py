"""The policy stage: Cedar decides who may call which tool with which arguments.

With a shadow set (`policy.shadow`), every call is decided a second time by it on the same
inputs; the live decision alone is enforced, and a disagreement is put on the call (`call.shadow`,
audited as `decision.shadow`) and counted (`bastion_policy_shadow_disagreements_total{kind}`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from gateway import metrics
from gateway.call import Action, Decision, Effect, Principal, ToolCall
from gateway.config import ToolSettings
from gateway.policy.engine import PolicyEngine
from gateway.state.db import STATE_ERRORS

__all__ = ["SHADOW_KINDS", "PolicyStage", "shadow_kind"]

log = logging.getLogger("bastion.policy")

SHADOW_KINDS = ("newly_denied", "newly_allowed", "changed_obligation", "error")
"""The `kind` of a shadow disagreement (`error`: the shadow set could not decide)."""


def shadow_kind(live: Effect, shadow: Effect) -> str | None:
    """How the shadow set's effect differs from the live one's; None when they agree."""
    if live == shadow:
        return None
    if shadow == "deny":
        return "newly_denied"
    if live == "deny":
        return "newly_allowed"
    return "changed_obligation"


class PolicyStage:
    """Cedar: who may call which tool with which arguments."""

    name = "policy"

    def __init__(
        self,
        engine: Callable[[], PolicyEngine],
        settings: Callable[[str, str], ToolSettings],
        budget_view: Callable[[ToolCall], Awaitable[dict[str, Any]]] | None = None,
        shadow: Callable[[], PolicyEngine | None] | None = None,
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._budget_view = budget_view
        self._shadow = shadow
        self._shadow_failed: str | None = None
        """The shadow set version whose failure was logged (once per set)."""

    async def __call__(self, call: ToolCall) -> Decision | None:
        if call.principal is None:
            return Decision.deny("identity", "unauthenticated", "no verified principal")
        engine = self._engine()
        budget = None
        if engine.uses_budget and self._budget_view is not None:
            # Read only when some policy reads `context.budget`: one query per matching budget.
            try:
                budget = await self._budget_view(call)
            except STATE_ERRORS as exc:
                return Decision.deny(
                    "policy", "budget-unavailable", f"budget state unavailable: {type(exc).__name__}"
                )
        decision = self._decide(engine, call, call.action, budget)
        shadow = self._shadow() if self._shadow is not None else None
        if shadow is not None:
            await self._compare(shadow, call, decision, budget, engine.uses_budget)
        return decision

    async def _compare(
        self,
        shadow: PolicyEngine,
        call: ToolCall,
        live: Decision,
        budget: dict[str, Any] | None,
        budget_read: bool,
    ) -> None:
        """Decide `call` with the shadow set and note a disagreement; never raises, never enforces."""
        try:
            if shadow.uses_budget and not budget_read and self._budget_view is not None:
                budget = await self._budget_view(call)  # only the shadow reads context.budget
            verdict = self._decide(shadow, call, call.action, budget)
        except Exception as exc:  # the shadow must never break a call
            if self._shadow_failed != shadow.version:
                self._shadow_failed = shadow.version
                log.warning(
                    "shadow policy set %s could not decide a call (%s); counted as kind `error`, "
                    "logged once per set",
                    shadow.version,
                    type(exc).__name__,
                    exc_info=exc,
                )
            kind = "error"
            call.shadow = {"effect": None, "policy_ids": [], "policy_version": shadow.version, "kind": kind}
        else:
            differs = shadow_kind(live.effect, verdict.effect)
            if differs is None:
                return
            kind = differs
            call.shadow = {
                "effect": verdict.effect,
                "policy_ids": verdict.policy_ids,
                "policy_version": verdict.policy_version,
                "kind": kind,
            }
        if not call.dry_run:
            metrics.labelled(metrics.SHADOW_DISAGREEMENTS, kind).inc()

    def approve_own(self, call: ToolCall) -> bool:
        """Whether Cedar lets the caller approve this call themselves (`Action::"approve_own"`)."""
        if call.principal is None:
            return False
        return self._decide(self._engine(), call, "approve_own", None).effect == "allow"

    def listable(
        self,
        principal: Principal,
        action: Action,
        upstream: str,
        names: list[str],
        tainted: bool,
        templates: bool,
    ) -> set[str]:
        """The names a listing shows: those on which `action` can be allowed for some arguments
        (`templates`: URI templates, any resource they can expand to)."""
        engine = self._engine()
        if templates:
            return engine.listable_templates(principal, upstream, names, session_tainted=tainted)
        settings = self._settings
        return engine.listable(
            principal, action, upstream, names, lambda n: settings(upstream, n), session_tainted=tainted
        )

    def _decide(
        self, engine: PolicyEngine, call: ToolCall, action: Action, budget: dict[str, Any] | None
    ) -> Decision:
        assert call.principal is not None
        return engine.decide(
            call.principal,
            action,
            call.upstream,
            call.tool,
            call.arguments,
            self._settings(call.upstream, call.tool),
            pii=call.pii_input,
            budget=budget,
            session_tainted=call.session_tainted,
            skill=call.skill,
        )
