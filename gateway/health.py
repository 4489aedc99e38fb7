"""The operational endpoints: liveness, readiness, metrics and the API description, and who may
read them.

Readiness: can this replica govern a call right now? Ready means: a policy set is loaded, the
audit store answers, and the state database (budgets, keys) answers. Audit sinks, circuits and
policy reloads are reported beside the checks and never make a replica unready. Each check reports "ok" or
what is wrong, so `/readyz` tells an operator where to look. A check that hangs counts as failed
after `CHECK_TIMEOUT_S`.

Exposure: `/readyz`, `/metrics` and `/openapi.json` name upstreams, tools and the policy version,
so `OpsGuard` stands before them. First the `Host` must name this gateway (421 otherwise): a page
of another site whose name the attacker re-points at 127.0.0.1 (DNS rebinding) reaches a loopback
Bastion with that site's name as `Host`. Then, with `ops.auth: admin`, the caller must be an admin
(401/403, exactly as the admin API). `ops.listen` moves them to a listener of their own (see
`gateway.app.serve`). `/healthz` tells nothing and stays open to every liveness probe.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from audit.store import AuditStoreError
from gateway import metrics
from gateway.config import Config
from gateway.fronts.admin_api import AdminAPI
from gateway.fronts.http_api import openapi_json

if TYPE_CHECKING:
    from gateway.app import Gateway

CHECK_TIMEOUT_S = 2.0


async def _probe(check: Awaitable[None]) -> str:
    try:
        await asyncio.wait_for(check, CHECK_TIMEOUT_S)
    except TimeoutError:
        return f"unavailable: no answer within {CHECK_TIMEOUT_S:g} s"
    except AuditStoreError as exc:
        return f"unavailable: {exc}"
    except (SQLAlchemyError, OSError) as exc:
        return f"unavailable: {type(exc).__name__}"
    return "ok"


async def _ping_state(gw: Gateway) -> None:
    assert gw.state is not None
    async with gw.state.connect() as conn:
        await conn.execute(text("SELECT 1"))


async def readiness(gw: Gateway) -> tuple[bool, dict[str, str]]:
    """(ready, checks): every check's "ok" or the reason it failed."""
    checks: dict[str, str] = {"policy": gw.policy.version if gw.policy else "not loaded"}
    if gw.store is None:
        checks["audit"] = "unavailable: not opened"
    else:
        checks["audit"] = await _probe(gw.store.ping())
    if gw.state is not None:
        checks["state"] = await _probe(_ping_state(gw))
    ok = gw.policy is not None and all(v == "ok" for k, v in checks.items() if k != "policy")
    return ok, checks


def circuits(gw: Gateway) -> dict[str, str]:
    """Each upstream's circuit breaker: closed, open, half-open, or none (no breaker configured).

    Informational: an open circuit does not make the replica unready (every replica would see
    the same upstream down, and pulling them all would turn one failing tool into an outage)."""
    if gw.pipeline is None:
        return {}
    return {name: guard.state or "none" for name, guard in sorted(gw.pipeline.guards.items())}


def accepted_hosts(cfg: Config) -> frozenset[str]:
    """The `Host` names of this gateway: public_url's, the bind addresses, `localhost`, and
    `listen.allowed_hosts` (an entry `.example.com` stands for example.com and its subdomains)."""
    names = {"localhost", cfg.listen.host, *cfg.listen.allowed_hosts}
    names.add(urlsplit(cfg.listen.base_url).hostname or "")
    if cfg.ops.listen is not None:
        names.add(cfg.ops.listen.host)
    return frozenset(n.lower().rstrip(".") for n in names if n)


def host_name(header: str | None) -> str | None:
    """The name in a `Host` header (lowercase, no port), or None when it is absent or malformed."""
    if not header:
        return None
    if header.startswith("["):
        name, bracket, port = header[1:].partition("]")
        if not bracket or (port and not (port[0] == ":" and port[1:].isdigit())):
            return None
        return name.lower()
    name, colon, port = header.partition(":")
    if not name or (colon and not port.isdigit()):
        return None
    return name.lower().rstrip(".")


def host_allowed(header: str | None, names: frozenset[str]) -> bool:
    """Whether `Host` names this gateway. An IP address always does: DNS rebinding needs a name
    (the attacker's), and a page addressed by IP is of that address's own origin."""
    name = host_name(header)
    if name is None:
        return False
    if name in names or any(n.startswith(".") and (name == n[1:] or name.endswith(n)) for n in names):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class OpsGuard:
    """Stands before `/readyz`, `/metrics` and `/openapi.json`: the `Host` check, then `ops.auth`."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.hosts = accepted_hosts(gw.cfg)
        self._admin: AdminAPI | None = None

    async def refused(self, request: Request) -> Response | None:
        """None when the request may be answered; otherwise the answer (421, 401 or 403)."""
        host = request.headers.get("host") or ""
        if not host_allowed(host, self.hosts):
            why = f"Host {host[:100]!r} is not this gateway's (listen.public_url, listen.allowed_hosts)"
            return JSONResponse({"error": "misdirected_request", "message": why}, 421)
        if self.gw.cfg.ops.auth == "admin":
            if self._admin is None:
                gw = self.gw
                self._admin = AdminAPI(gw.cfg, gw.auth, gw.state, gw.base_url)
            found = await self._admin.admin_principal(request)
            if isinstance(found, Response):
                return found
        return None


async def healthz(request: Request) -> Response:
    """Liveness: answers while the process serves HTTP. It tells nothing, so nothing guards it."""
    return JSONResponse({"status": "ok"})


def ops_routes(gw: Gateway) -> list[Route]:
    """`/readyz`, `/metrics` and `/openapi.json`, each behind the guard."""
    guard = OpsGuard(gw)
    spec = openapi_json(gw.base_url)

    def guarded(answer: Callable[[], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            return await guard.refused(request) or await answer()

        return endpoint

    async def readyz() -> Response:
        ok, checks = await readiness(gw)
        if gw.writer is not None:
            metrics.AUDIT_BACKLOG.set(gw.writer.pending)
        body: dict[str, Any] = {"status": "ready" if ok else "not ready", "checks": checks}
        body["circuits"] = circuits(gw)
        if gw.policy_watcher is not None:
            # A refused reload leaves a complete, validated set serving: readiness stays 200 (pulling
            # every replica that saw the same bad file would turn a typo into an outage).
            body["policy_reload"] = gw.policy_watcher.status().to_json()
        if gw.shadow_watcher is not None:
            # The shadow set enforces nothing: a refused shadow reload never makes the replica unready.
            body["shadow_reload"] = gw.shadow_watcher.status().to_json()
        if gw.sinks is not None:
            # A sink that is down loses nothing (records wait in the store) and every replica would
            # see it down alike: reported, never a reason to be unready.
            body["sinks"] = gw.sinks.status()
        return JSONResponse(body, 200 if ok else 503)

    async def prometheus() -> Response:
        if gw.writer is not None:
            metrics.AUDIT_BACKLOG.set(gw.writer.pending)
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def openapi() -> Response:
        return Response(spec, media_type="application/json")

    return [
        Route("/readyz", guarded(readyz)),
        Route("/metrics", guarded(prometheus)),
        Route("/openapi.json", guarded(openapi)),
    ]
