"""The policy stage: Cedar decides who may call which tool with which arguments."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from gateway.call import Action, Decision, Principal, ToolCall
from gateway.config import ToolSettings
from gateway.policy.engine import PolicyEngine


class PolicyStage:
    """Cedar: who may call which tool with which arguments."""

    name = "policy"

    def __init__(
        self,
        engine: Callable[[], PolicyEngine],
        settings: Callable[[str, str], ToolSettings],
        budget_view: Callable[[ToolCall], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._budget_view = budget_view

    async def __call__(self, call: ToolCall) -> Decision | None:
        if call.principal is None:
            return Decision.deny("identity", "unauthenticated", "no verified principal")
        engine = self._engine()
        budget = None
        if engine.uses_budget and self._budget_view is not None:
            # Read only when some policy reads `context.budget`: one query per matching budget.
            try:
                budget = await self._budget_view(call)
            except SQLAlchemyError as exc:
                return Decision.deny(
                    "policy", "budget-unavailable", f"budget state unavailable: {type(exc).__name__}"
                )
        return self._decide(engine, call, call.action, budget)

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
