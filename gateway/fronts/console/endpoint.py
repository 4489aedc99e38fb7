"""`/console`: who may look (admins, by session cookie or Bearer token), and which page answers.

Routes (GET unless noted): `/console` overview, `/console/audit` search (+ `/console/audit/tail`
JSON for the live tail), `/console/calls/{id}` one call's story (POST `.../verify`),
`/console/approvals` (POST `/console/approvals/{id}` decides), `/console/tools`,
`/console/policy`, `/console/budgets`, `/console/login?token=...` (from `bastion console login`),
POST `/console/logout`, `/console/static/console.js`.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from audit.store import AuditStoreError
from gateway.call import Principal
from gateway.errors import ApprovalError
from gateway.fronts.admin_api import AdminAPI
from gateway.fronts.console import manage, overview, search, story
from gateway.fronts.console.context import ConsoleHost, Context
from gateway.fronts.console.html import HEADERS, Page, document, esc
from gateway.fronts.console.session import COOKIE, ConsoleKeys, Session
from gateway.state.console_logins import spend
from gateway.state.db import STATE_ERRORS

log = logging.getLogger(__name__)

MAX_FORM = 16_384
UNAVAILABLE: tuple[type[BaseException], ...] = (AuditStoreError, *STATE_ERRORS)
_SCRIPT = (Path(__file__).parent / "static" / "console.js").read_bytes()

Handler = Callable[[Context, Request], Awaitable[Page | Response]]


class ConsoleError(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class ConsoleFront:
    def __init__(self, gw: ConsoleHost, admin: AdminAPI) -> None:
        self.gw = gw
        self.admin = admin
        self.keys = ConsoleKeys(gw.cfg.console.key_file or gw.cfg.data_dir / "console.key")
        self.secure = urlsplit(gw.base_url).scheme == "https"
        self._get: dict[str, Handler] = {
            "/console": overview.overview_page,
            "/console/audit": search.audit_page,
            "/console/audit/tail": search.tail,
            "/console/approvals": manage.approvals_page,
            "/console/tools": manage.tools_page,
            "/console/policy": manage.policy_page,
            "/console/budgets": manage.budgets_page,
        }

    async def __call__(self, request: Request) -> Response:
        response = await self._answer(request)
        response.headers.update(HEADERS)
        return response

    async def _answer(self, request: Request) -> Response:
        path = request.url.path.rstrip("/") or "/"
        if path == "/console/static/console.js":
            return Response(_SCRIPT, media_type="text/javascript")
        if path == "/console/login":
            return await self._login(request)
        found = await self._viewer(request)
        if isinstance(found, Response):
            return found
        principal, session = found
        token = self.keys.form_token(session.sid) if session else ""
        ctx = Context(self.gw, request, principal, token)
        try:
            if request.method == "POST":
                form = await self._form(request, session)
                if path == "/console/logout":
                    return self._logout()
                result = await self._post(ctx, path, form)
            else:
                handler = self._get.get(path)
                if handler is not None:
                    result = await handler(ctx, request)
                elif path.startswith("/console/calls/"):
                    result = await story.call_page(ctx, path.removeprefix("/console/calls/"))
                else:
                    raise ConsoleError("no such console page", 404)
        except ConsoleError as err:
            result = Page("Console", f'<p class="deny">{esc(err.message)}</p>', status=err.status)
        except ApprovalError as err:
            result = Page(
                "Approvals",
                f'<p class="deny">{esc(err.message)}</p>',
                "/console/approvals",
                status=err.status,
            )
        except UNAVAILABLE as exc:
            log.warning("console: %s", exc)
            why = f"the audit store or state DB is unavailable: {type(exc).__name__}"
            result = Page("Console", f'<p class="deny">{esc(why)}</p>', status=503)
        if isinstance(result, Response):
            return result
        html = document(result.title, result.body, result.active, principal.id, token, result.script)
        return HTMLResponse(html, result.status)

    async def _post(self, ctx: Context, path: str, form: dict[str, str]) -> Page | Response:
        if path.startswith("/console/calls/") and path.endswith("/verify"):
            return await story.verify(ctx, path.removeprefix("/console/calls/").removesuffix("/verify"))
        if path.startswith("/console/approvals/"):
            return await manage.decide(ctx, path.removeprefix("/console/approvals/"), form)
        raise ConsoleError("no such console form", 404)

    async def _viewer(self, request: Request) -> tuple[Principal, Session | None] | Response:
        """The admin looking, by session cookie (browsers) or Bearer token (scripts and tests)."""
        if not self.gw.cfg.console.enabled:
            return JSONResponse(
                {"error": "not_found", "message": "the console is off (console.enabled)"}, 404
            )
        if request.headers.get("authorization"):
            found = await self.admin.admin_principal(request)
            return found if isinstance(found, Response) else (found, None)
        session = self.keys.open_session(request.cookies.get(COOKIE))
        if session is None:
            body = (
                "<p>Sign in with a link from <code>bastion console login --user YOU</code>, run where "
                "Bastion's config is (docs/console.md).</p>"
            )
            html = document("Sign in", body, "", "", "")
            return HTMLResponse(html, 401)
        principal = session.principal()
        if not self._is_admin(principal):
            return HTMLResponse(
                document(
                    "Forbidden", "<p>Not an admin (admin.groups / admin.subjects).</p>", "", principal.id, ""
                ),
                403,
            )
        return principal, session

    def _is_admin(self, principal: Principal) -> bool:
        return principal.id in self.admin.admins or bool(principal.groups & set(self.gw.cfg.admin.groups))

    async def _login(self, request: Request) -> Response:
        opened = self.keys.open_login(request.query_params.get("token") or "")
        if opened is None:
            html = document(
                "Sign in",
                "<p>This login link is not valid or has expired: ask for a new one.</p>",
                "",
                "",
                "",
            )
            return HTMLResponse(html, 401)
        grant, nonce, expires_at = opened
        if not self._is_admin(grant.principal()):
            return HTMLResponse(document("Forbidden", "<p>Not an admin.</p>", "", grant.user, ""), 403)
        assert self.gw.state is not None
        if not await spend(self.gw.state, nonce, expires_at):
            html = document(
                "Sign in", "<p>This login link was used already: ask for a new one.</p>", "", "", ""
            )
            return HTMLResponse(html, 401)
        _, cookie = self.keys.session_cookie(grant, self.gw.cfg.console.session_ttl_s)
        response = RedirectResponse("/console", 303)
        response.set_cookie(
            COOKIE, cookie, max_age=int(self.gw.cfg.console.session_ttl_s), path="/console",
            secure=self.secure, httponly=True, samesite="strict",
        )  # fmt: skip
        log.info("console: %s signed in", grant.user)
        return response

    def _logout(self) -> Response:
        response = RedirectResponse("/console", 303)
        response.delete_cookie(COOKIE, path="/console", secure=self.secure, httponly=True, samesite="strict")
        return response

    async def _form(self, request: Request, session: Session | None) -> dict[str, str]:
        """The posted form's fields, after the checks that keep other sites from posting it."""
        origin = request.headers.get("origin")
        base = urlsplit(self.gw.base_url)
        if origin is not None and origin != f"{base.scheme}://{base.netloc}":
            raise ConsoleError(f"cross-origin form posts are refused (Origin: {origin[:100]})", 403)
        site = request.headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            raise ConsoleError(f"cross-origin form posts are refused (Sec-Fetch-Site: {site[:40]})", 403)
        body = await request.body()
        if len(body) > MAX_FORM:
            raise ConsoleError("the form is too large", 413)
        fields = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), max_num_fields=20).items()}
        if session is not None and not hmac.compare_digest(
            fields.get("csrf", ""), self.keys.form_token(session.sid)
        ):
            raise ConsoleError("the form token does not match: reload the page", 403)
        return fields
