"""Assembly: everything a request needs is built once here, at start-up, and shared.

Nothing on the per-call path re-reads files, parses policies, opens a DB engine, creates an HTTP
client or fetches keys: `Gateway.start()` does all of it before the first request is accepted,
and a problem (bad policy, unreadable key file) stops start-up with a message naming it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence
from typing import Any, Literal

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from audit.store import AuditStore, AuditStoreError
from audit.writer import AuditWriter
from gateway import metrics
from gateway.call import Principal
from gateway.config import Config, ToolSettings
from gateway.errors import BastionError, ConfigError
from gateway.fronts.mcp import MCPFront
from gateway.fronts.sessions import SessionSigner, load_or_create_secret
from gateway.pipeline import Pipeline, PolicyStage
from gateway.stages.identity import Authenticator
from gateway.stages.policy import PolicyEngine
from gateway.upstreams.streamable_http import StreamableHTTPUpstream

log = logging.getLogger("bastion")

DISCOVERY_TIMEOUT_S = 5.0
_DEFAULT_TOOL = ToolSettings()


class Gateway:
    """The shared parts of a running Bastion: identity, upstream clients, policy, audit."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.base_url = cfg.listen.base_url
        self.upstreams = {name: StreamableHTTPUpstream(name, u) for name, u in cfg.upstreams.items()}
        self.auth = Authenticator(cfg.identity, self.base_url, list(cfg.upstreams))
        self.policy: PolicyEngine | None = None
        self.store: AuditStore | None = None
        self.writer: AuditWriter | None = None
        self._mcp: MCPFront | None = None

    @property
    def mcp(self) -> MCPFront:
        assert self._mcp is not None, "Gateway.start() has not run"
        return self._mcp

    async def start(self) -> None:
        cfg = self.cfg
        data_dir = cfg.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        hmac_key = load_or_create_secret(cfg.audit.hmac_key_file or data_dir / "audit-hmac.key")
        session_key = load_or_create_secret(cfg.sessions.secret_file or data_dir / "session.key")
        await self.auth.start()
        schemas = await self._discover_tools()
        self.policy = PolicyEngine.load(cfg.policy, schemas)
        for warning in self.policy.warnings:
            log.warning("policy: %s", warning)
        metrics.POLICY_VERSION.labels(self.policy.version).set(1)
        try:
            self.store = await AuditStore.open(cfg.audit.url)
        except AuditStoreError as exc:
            raise ConfigError(f"audit.url: {exc}") from exc
        self.writer = AuditWriter(
            self.store, batch_max=cfg.audit.batch_max, window_ms=cfg.audit.batch_window_ms
        )
        await self.writer.start()
        stages = [PolicyStage(self._policy, self.settings_for)]
        instance = cfg.audit.instance or socket.gethostname()
        pipeline = Pipeline(stages, self.writer, instance=instance, hmac_key=hmac_key)
        signer = SessionSigner(session_key, cfg.sessions.max_age_s)
        self._mcp = MCPFront(
            self.upstreams,
            self.auth,
            pipeline,
            signer,
            self.allowed_tools,
            self.base_url,
            cfg.listen.allowed_origins,
        )
        log.info("policy set %s loaded from %s", self.policy.version, cfg.policy.dir)

    async def stop(self) -> None:
        if self.writer is not None:
            await self.writer.close()
        if self.store is not None:
            await self.store.close()
        await self.auth.aclose()
        await asyncio.gather(*(u.aclose() for u in self.upstreams.values()))

    def _policy(self) -> PolicyEngine:
        assert self.policy is not None
        return self.policy

    def settings_for(self, upstream: str, tool: str) -> ToolSettings:
        u = self.cfg.upstreams.get(upstream)
        return u.tools.get(tool, _DEFAULT_TOOL) if u else _DEFAULT_TOOL

    def allowed_tools(self, principal: Principal, upstream: str, names: list[str]) -> set[str]:
        return self._policy().allowed_tools(
            principal, upstream, names, lambda t: self.settings_for(upstream, t)
        )

    async def _discover_tools(self) -> dict[str, Any]:
        """Each upstream's tool input schemas, so policies can be validated against `context.args`.

        An upstream that is down at start-up contributes nothing (a warning says so); policies
        that reference only its arguments still evaluate at request time, failing closed.
        """

        async def one(up: StreamableHTTPUpstream) -> list[dict[str, Any]]:
            try:
                return await asyncio.wait_for(up.list_tools(), DISCOVERY_TIMEOUT_S)
            except (BastionError, TimeoutError, ValueError, KeyError) as exc:
                log.warning("upstream %s: could not list its tools at start-up (%s)", up.name, exc)
                return []

        ups = list(self.upstreams.values())
        found = await asyncio.gather(*(one(u) for u in ups))
        return {
            f"{up.name}/{t['name']}": t.get("inputSchema") or {}
            for up, tools in zip(ups, found, strict=True)
            for t in tools
            if isinstance(t.get("name"), str)
        }


def build_app(gw: Gateway) -> Starlette:
    async def mcp(request: Request) -> Response:
        return await gw.mcp(request)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        checks: dict[str, str] = {"policy": gw.policy.version if gw.policy else "not loaded"}
        ok = gw.policy is not None
        try:
            assert gw.store is not None
            await gw.store.ping()
            checks["audit"] = "ok"
        except (AssertionError, AuditStoreError) as exc:
            checks["audit"] = f"unavailable: {exc}"
            ok = False
        if gw.writer is not None:
            metrics.AUDIT_PENDING.set(gw.writer.pending)
        return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks}, 200 if ok else 503)

    async def prometheus(request: Request) -> Response:
        if gw.writer is not None:
            metrics.AUDIT_PENDING.set(gw.writer.pending)
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    async def resource_metadata(request: Request) -> Response:
        """RFC 9728 protected-resource metadata, per upstream resource URI (MCP authorization)."""
        upstream = request.path_params.get("upstream")
        if upstream is not None and upstream not in gw.upstreams:
            return JSONResponse({"error": "not_found", "message": "no such upstream"}, 404)
        resource = f"{gw.base_url}/mcp/{upstream}" if upstream else gw.base_url
        return JSONResponse(
            {
                "resource": resource,
                "authorization_servers": [i.issuer for i in gw.cfg.identity.issuers],
                "bearer_methods_supported": ["header"],
                "resource_name": f"Bastion: {upstream}" if upstream else "Bastion",
            }
        )

    routes = [
        Route("/mcp/{upstream}", mcp, methods=["GET", "POST", "DELETE"]),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", prometheus),
        Route("/.well-known/oauth-protected-resource", resource_metadata),
        Route("/.well-known/oauth-protected-resource/mcp/{upstream}", resource_metadata),
    ]
    return Starlette(routes=routes)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the server starts so port 0 can be read back."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def server_for(
    app: Any, sock: socket.socket, log_level: str = "warning", lifespan: Literal["auto", "on", "off"] = "off"
) -> uvicorn.Server:
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan=lifespan,
        access_log=False,
        log_level=log_level,
        http="httptools",
        server_header=False,
        timeout_graceful_shutdown=3,
    )
    return uvicorn.Server(config)


async def serve(cfg: Config, sockets: Sequence[socket.socket] | None = None) -> None:
    """Start the gateway, serve until stopped, then flush the audit trail and close clients."""
    gw = Gateway(cfg)
    try:
        await gw.start()
        sock = sockets[0] if sockets else bind(cfg.listen.host, cfg.listen.port)
        await server_for(build_app(gw), sock, "info").serve(sockets=[sock])
    finally:
        await gw.stop()
