"""Where approvers act on held calls: the admin approvals API and the approval page.

    GET  /v1/approvals[?status=pending]       the requests, newest first (JSON)
    GET  /v1/approvals/{id}                   one request (JSON)
    POST /v1/approvals/{id}/approve|deny      decide; optional JSON body {"reason": "..."}
    GET  /approvals/{id}                      the page: who asks, for whom, which tool, the
                                              (redacted) arguments, the policy reason, a form
    POST /approvals/{id}                      the page's form (decision=approve|deny, reason)

Two checks, both required: the caller is an admin (`admin.groups` / `admin.subjects`, the same
bearer-token check as every admin endpoint), and Cedar permits `Action::"approve"` for that
principal on the held call's tool. Nobody approves their own call. The page has no JavaScript;
its form carries a token bound to the approval and the approver (HMAC), and a cross-origin POST
(an `Origin` other than Bastion's own, `null` included) is refused. Every answer forbids framing
(`X-Frame-Options`, CSP `frame-ancestors`), so no other site can overlay the approve button, and
its CSP allows nothing but the page's own style and a form posted back to Bastion.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from gateway.call import Principal
from gateway.config import Config, ToolSettings
from gateway.errors import ApprovalError
from gateway.fronts.admin_api import AdminAPI, decide_approval
from gateway.keyfiles import load_or_create_secret
from gateway.policy.engine import PolicyEngine
from gateway.state.approvals import Approval, Approvals
from gateway.state.db import STATE_ERRORS


class Host(Protocol):
    """What the approvals API needs of the running gateway (`gateway.app.Gateway` is one)."""

    cfg: Config
    base_url: str
    approvals: Approvals | None
    policy: PolicyEngine | None

    def settings_for(self, upstream: str, tool: str) -> ToolSettings: ...


MAX_BODY = 16_384
_STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:60em}th{text-align:left;padding-right:1em}"
    "pre{background:#f4f4f4;padding:1em}.msg{font-weight:bold}"
)
_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
HEADERS = {
    "content-security-policy": (
        f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}
"""Sent with every answer: the page shows arguments and carries a form token, so it is never
framed, cached, or allowed to load or send anything anywhere else."""


class ApprovalsAPI:
    def __init__(self, gw: Host, admin: AdminAPI) -> None:
        self.gw = gw
        self.admin = admin
        self._form_key = load_or_create_secret(
            gw.cfg.approvals.form_key_file or gw.cfg.data_dir / "approvals-form.key"
        )

    @property
    def approvals(self) -> Approvals:
        assert self.gw.approvals is not None, "Gateway.start() has not run"
        return self.gw.approvals

    async def __call__(self, request: Request) -> Response:
        response = await self._answer(request)
        response.headers.update(HEADERS)
        return response

    async def _answer(self, request: Request) -> Response:
        found = await self.admin.admin_principal(request)
        if isinstance(found, Response):
            return found
        principal = found
        approval_id = request.path_params.get("id")
        page = request.url.path.startswith("/approvals/")
        try:
            if approval_id is None:
                status = request.query_params.get("status") or None
                items = await self.approvals.list(status)
                return JSONResponse({"approvals": [a.to_json() for a in items]})
            approval = await self.approvals.get(approval_id)
            if approval is None:
                raise ApprovalError(f"no approval {approval_id[:64]!r}", 404)
            if request.method == "GET":
                if page:
                    return self._page(approval, principal)
                return JSONResponse(approval.to_json())
            if page:
                return await self._form(request, approval, principal)
            verb = request.path_params.get("verb")
            if verb not in ("approve", "deny"):
                return JSONResponse({"error": "not_found", "message": "use .../approve or .../deny"}, 404)
            reason = await _json_reason(request)
            decided = await self._decide(approval, principal, verb == "approve", reason)
            return JSONResponse(decided.to_json())
        except ApprovalError as err:
            if page:
                return HTMLResponse(_document("Approval", f"<p>{html.escape(err.message)}</p>"), err.status)
            return JSONResponse({"error": "approval", "message": err.message}, err.status)
        except STATE_ERRORS as exc:
            why = f"the approval state is unavailable: {type(exc).__name__}"
            return JSONResponse({"error": "unavailable", "message": why}, 503)

    async def _decide(
        self, approval: Approval, principal: Principal, approve: bool, reason: str | None
    ) -> Approval:
        policy = self.gw.policy
        assert policy is not None
        settings = self.gw.settings_for(approval.upstream, approval.tool)
        return await decide_approval(
            self.approvals, policy, settings, self.admin, approval, principal, approve, reason
        )

    def _form_token(self, approval: Approval, principal: Principal) -> str:
        msg = f"{approval.id}\x00{principal.key}".encode()
        return hmac.new(self._form_key, msg, hashlib.sha256).hexdigest()

    async def _form(self, request: Request, approval: Approval, principal: Principal) -> Response:
        origin = request.headers.get("origin")
        if origin is not None and not self._same_origin(origin):
            raise ApprovalError(f"cross-origin form posts are refused (Origin: {origin[:100]})", 403)
        site = request.headers.get("sec-fetch-site")
        if site is not None and site != "same-origin":
            raise ApprovalError(f"cross-origin form posts are refused (Sec-Fetch-Site: {site[:40]})", 403)
        body = await request.body()
        if len(body) > MAX_BODY:
            raise ApprovalError("the form is too large", 413)
        fields = parse_qs(body.decode("utf-8", "replace"), max_num_fields=10)
        token = (fields.get("token") or [""])[0]
        if not hmac.compare_digest(token, self._form_token(approval, principal)):
            raise ApprovalError("the form token does not match: reload the approval page", 403)
        verb = (fields.get("decision") or [""])[0]
        if verb not in ("approve", "deny"):
            raise ApprovalError("decision must be approve or deny", 400)
        reason = (fields.get("reason") or [""])[0].strip() or None
        decided = await self._decide(approval, principal, verb == "approve", reason)
        return self._page(decided, principal, f"{decided.status} by {principal.id}")

    def _same_origin(self, origin: str) -> bool:
        base = urlsplit(self.gw.base_url)
        return origin == f"{base.scheme}://{base.netloc}" or origin in self.gw.cfg.listen.allowed_origins

    def _page(self, a: Approval, principal: Principal, message: str | None = None) -> Response:
        e = html.escape
        args = json.dumps(a.args_shown, indent=2, sort_keys=True, ensure_ascii=True)
        rows = [
            ("Status", a.effective_status),
            ("Who asks (agent)", a.agent or "-"),
            ("For whom (user)", f"{a.subject} ({a.issuer})"),
            ("Tool", f"{a.upstream}/{a.tool}"),
            ("Policy reason", a.policy_reason),
            ("Held call (audit id)", a.audit_id),
            ("Requested", a.to_json()["created_at"] or "-"),
            ("Expires", a.to_json()["expires_at"] or "-"),
        ]
        if a.decided_by:
            rows.append(("Decided by", f"{a.decided_by}{': ' + a.note if a.note else ''}"))
        table = "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in rows)
        parts = []
        if message:
            parts.append(f'<p class="msg">{e(message)}</p>')
        parts.append(f"<table>{table}</table><h2>Arguments (redacted)</h2><pre>{e(args)}</pre>")
        if a.effective_status == "pending":
            token = self._form_token(a, principal)
            parts.append(
                f'<form method="post" action="/approvals/{e(a.id)}">'
                f'<input type="hidden" name="token" value="{token}">'
                '<label>Reason <input type="text" name="reason" maxlength="500"></label> '
                '<button type="submit" name="decision" value="approve">Approve</button> '
                '<button type="submit" name="decision" value="deny">Deny</button></form>'
            )
        return HTMLResponse(_document(f"Approval {a.id}", "".join(parts)))


def _document(title: str, body: str) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )


async def _json_reason(request: Request) -> str | None:
    body = await request.body()
    if not body.strip():
        return None
    if len(body) > MAX_BODY:
        raise ApprovalError("the body is too large", 413)
    try:
        data: Any = json.loads(body)
    except ValueError as exc:
        raise ApprovalError('the body must be JSON: {"reason": "..."} (or empty)', 400) from exc
    if not isinstance(data, dict) or set(data) - {"reason"}:
        raise ApprovalError('the body must be {"reason": "..."} (or empty)', 400)
    reason = data.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise ApprovalError('"reason" must be a string', 400)
    return reason.strip()[:2000] if reason else None
