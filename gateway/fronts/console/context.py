"""What a console page is given: the running gateway (as far as pages need it) and the viewer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request

from audit.store import AuditStore
from gateway.call import Principal
from gateway.config import Config, ToolSettings
from gateway.policy.engine import PolicyEngine
from gateway.state.approvals import Approvals
from gateway.state.pins import ToolPins

if TYPE_CHECKING:
    from gateway.identity.authenticator import Authenticator


class ConsoleHost(Protocol):
    """The parts of `gateway.app.Gateway` the console reads."""

    cfg: Config
    base_url: str
    auth: Authenticator
    store: AuditStore | None
    state: AsyncEngine | None
    approvals: Approvals | None
    pins: ToolPins | None
    policy: PolicyEngine | None
    shadow: PolicyEngine | None
    policy_watcher: Any
    shadow_watcher: Any
    sinks: Any

    def settings_for(self, upstream: str, tool: str) -> ToolSettings: ...


@dataclass(frozen=True, slots=True)
class Context:
    gw: ConsoleHost
    request: Request
    principal: Principal
    form_token: str
    """What this viewer's forms carry ("" when the viewer came with a Bearer token: no cookie, no
    cross-site risk, no token needed)."""

    @property
    def store(self) -> AuditStore:
        assert self.gw.store is not None, "Gateway.start() has not run"
        return self.gw.store
