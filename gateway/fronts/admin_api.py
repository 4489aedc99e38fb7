"""The admin API: operational views for the people who run Bastion, not for agents.

    GET /v1/budgets[?user=U]   current-window budget usage (as `bastion budgets show`)

A caller must present a valid token meant for the gateway itself (audience: its public URL; a
token for an upstream's resource URI is refused with 401) of a principal in `admin.groups` or
named in `admin.subjects` (by its id, see docs/identity.md); with neither configured, the admin
API is closed.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.call import Principal
from gateway.config import Config, ToolSettings
from gateway.errors import ApprovalError, AuthError, ConfigError
from gateway.identity.authenticator import Authenticator
from gateway.policy.engine import PolicyEngine
from gateway.stages.budget import usage
from gateway.state.approvals import Approval, Approvals


class AdminAPI:
    def __init__(self, cfg: Config, auth: Authenticator, state: AsyncEngine | None, base_url: str) -> None:
        self.cfg = cfg
        self.auth = auth
        self.state = state
        self.base_url = base_url
        try:
            admins = frozenset(auth.identities.resolve(s) for s in cfg.admin.subjects)
        except ValueError as exc:
            raise ConfigError(f"admin.subjects: {exc}") from None
        self.admins = admins
        """The ids `admin.subjects` name: an API key or another issuer's user with an admin's
        subject is not that admin."""

    async def _admin(self, request: Request) -> Response | None:
        """None when the caller is an admin; otherwise the 401/403 to answer."""
        found = await self.admin_principal(request)
        return found if isinstance(found, Response) else None

    async def admin_principal(self, request: Request) -> Principal | Response:
        """The calling admin, or the 401/403 to answer."""
        try:
            principal = await self.auth.authenticate(request.headers.get("authorization"), gateway_only=True)
        except AuthError as err:
            meta = f"{self.base_url}/.well-known/oauth-protected-resource"
            headers = {"www-authenticate": self.auth.www_authenticate(meta, err)}
            return JSONResponse(err.to_json(), err.http_status, headers=headers)
        admin = self.cfg.admin
        if principal.id in self.admins or principal.groups.intersection(admin.groups):
            return principal
        why = (
            "not an admin (admin.groups / admin.subjects)"
            if admin.groups or admin.subjects
            else ("the admin API is closed: no admin.groups or admin.subjects are configured")
        )
        return JSONResponse({"error": "forbidden", "message": why}, 403)

    async def budgets(self, request: Request) -> Response:
        if (refused := await self._admin(request)) is not None:
            return refused
        if self.state is None or not self.cfg.budgets:
            return JSONResponse({"budgets": []})
        user = request.query_params.get("user")
        if user is not None:
            try:
                user = self.auth.identities.resolve(user)
            except ValueError as exc:
                return JSONResponse({"error": "invalid_request", "message": f"user: {exc}"}, 400)
        return JSONResponse({"budgets": await usage(self.state, self.cfg.budgets, user)})


async def decide_approval(
    approvals: Approvals,
    policy: PolicyEngine,
    settings: ToolSettings,
    admin: AdminAPI,
    approval: Approval,
    principal: Principal,
    approve: bool,
    reason: str | None,
) -> Approval:
    """Decide a held call as `principal`: only if Cedar permits `approve` on its tool for them and
    it is not their own call. The approvals API, its page and the console all decide through here."""
    verdict = policy.decide(principal, "approve", approval.upstream, approval.tool, {}, settings)
    if verdict.effect != "allow":
        why = "; ".join(f"{r.policy}: {r.reason}" for r in verdict.reasons) or "no policy permits it"
        raise ApprovalError(
            f"{principal.id} may not approve calls to {approval.upstream}/{approval.tool} ({why})", 403
        )
    if approval.made_by(principal, admin.auth.identities):
        raise ApprovalError("nobody may approve or deny their own call", 403)
    return await approvals.decide(approval.id, approve, principal.id, reason)
