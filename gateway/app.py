"""Assembly: everything a request needs is built once here, at start-up, and shared.

Nothing on the per-call path re-reads files, parses policies, opens a DB engine, creates an HTTP
client or fetches keys: `Gateway.start()` does all of it before the first request is accepted,
and a problem (bad policy, unreadable key file) stops start-up with a message naming it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import uvicorn
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from audit.checkpoint import CheckpointSigner, SigningKeyError, load_or_create_signing_key
from audit.sqlite_thread import SQLiteThread
from audit.store import AuditStore, AuditStoreError
from audit.writer import AuditWriter
from gateway import metrics
from gateway.config import Config, PolicyConfig, ToolSettings
from gateway.errors import BastionError, ConfigError
from gateway.fronts.a2a.endpoint import A2AFront
from gateway.fronts.admin_api import AdminAPI
from gateway.fronts.approvals_api import ApprovalsAPI
from gateway.fronts.console.endpoint import ConsoleFront
from gateway.fronts.http_api import HTTPToolAPI
from gateway.fronts.llm.endpoint import LLMFront
from gateway.fronts.mcp.aggregate import AggregateFront
from gateway.fronts.mcp.endpoint import MCPFront
from gateway.fronts.mcp.sessions import SessionSigner
from gateway.fronts.wire import RefusalLimiter
from gateway.health import healthz, ops_routes
from gateway.identity.authenticator import Authenticator
from gateway.identity.delegation import Delegations
from gateway.keyfiles import load_or_create_secret
from gateway.pipeline import Pipeline, stages_in_order
from gateway.policy.engine import PolicyEngine
from gateway.policy.reload import PolicyWatcher
from gateway.sinks.delivery import Sinks
from gateway.stages.budget import BudgetStage
from gateway.stages.pinning import PinningStage
from gateway.stages.policy import SHADOW_KINDS, PolicyStage
from gateway.stages.taint import SessionTaint, TaintStage
from gateway.state.approvals import Approvals
from gateway.state.db import open_state, sqlite_writer
from gateway.state.idempotency import CallRegistry
from gateway.state.pins import ToolPins
from gateway.state.sink_cursors import SinkCursors
from gateway.state.tasks import TaskOwners
from gateway.upstreams.agents import AgentClient, message_schemas
from gateway.upstreams.base import Upstream
from gateway.upstreams.http_tools import HTTPToolsUpstream
from gateway.upstreams.llm_provider import Provider
from gateway.upstreams.stdio import StdioUpstream
from gateway.upstreams.streamable_http import StreamableHTTPUpstream

if TYPE_CHECKING:
    from gateway.stages.redact import Redactor

log = logging.getLogger("bastion")

DISCOVERY_TIMEOUT_S = 5.0
_DEFAULT_TOOL = ToolSettings()


class Gateway:
    """The shared parts of a running Bastion: identity, upstream clients, policy, audit."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.base_url = cfg.listen.base_url
        self.upstreams: dict[str, Upstream] = {
            name: StdioUpstream(name, u)
            if u.transport == "stdio"
            else HTTPToolsUpstream(name, u)
            if u.transport == "http"
            else StreamableHTTPUpstream(name, u)
            for name, u in cfg.upstreams.items()
        }
        metrics.known_upstreams(
            [*cfg.upstreams, *cfg.agents, *([cfg.llm.tools.namespace] if cfg.llm.providers else [])]
        )
        self.auth = Authenticator(
            cfg.identity,
            self.base_url,
            list(cfg.upstreams),
            state_url=cfg.state.url,
            providers=list(cfg.llm.providers),
            agents=list(cfg.agents),
        )
        self.providers: dict[str, Provider] = {}
        """Model providers behind `/llm/<name>` (built at start-up: their keys are read then)."""
        self.agents: dict[str, AgentClient] = {}
        """A2A agents behind `/a2a/<name>` (built at start-up: their credentials are read then)."""
        self.delegations: Delegations | None = None
        """Signs the delegation tokens handed to agents, and verifies them when they come back."""
        self.policy: PolicyEngine | None = None
        self.tool_schemas: dict[str, Any] = {}
        self.prompt_arguments: dict[str, list[str]] = {}
        """Upstream prompt argument names learned at start-up: `context.args` of `get_prompt`."""
        """Upstream tool input schemas learned at start-up; policy reloads type `context.args` with them."""
        self.policy_watcher: PolicyWatcher | None = None
        self.shadow: PolicyEngine | None = None
        """The shadow policy set (`policy.shadow`): decided beside `policy` on every call, never enforced."""
        self.shadow_watcher: PolicyWatcher | None = None
        self.store: AuditStore | None = None
        self.writer: AuditWriter | None = None
        self.state: AsyncEngine | None = None
        self.state_writer: SQLiteThread | None = None
        self.pins: ToolPins | None = None
        self.approvals: Approvals | None = None
        self.sinks: Sinks | None = None
        """The audit sinks' delivery workers (`audit.sinks`), reading the trail after their cursors."""
        self.discovered_tools: dict[str, list[dict[str, Any]]] = {}
        """Each upstream's tool definitions as listed at start-up (pinned once the state DB is open)."""
        self._rechecked: dict[str, tuple[float, bool]] = {}
        self._mcp: MCPFront | None = None
        self.pipeline: Pipeline | None = None

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
        redactor: Redactor | None = None
        if cfg.redaction is not None:
            from gateway.stages.redact import Redactor  # imports Presidio (~1 s): only when configured

            key_path = cfg.redaction.hmac_key_file or data_dir / "redaction-hmac.key"
            redactor = Redactor(cfg.redaction, load_or_create_secret(key_path))
        self.providers = {name: Provider(name, p) for name, p in cfg.llm.providers.items()}
        self.agents = {name: AgentClient(name, a) for name, a in cfg.agents.items()}
        if cfg.agents:
            key = load_or_create_secret(cfg.a2a.delegation_key_file or data_dir / "delegation.key")
            self.delegations = Delegations(
                key, self.base_url, cfg.a2a.delegation_ttl_s, cfg.identity.leeway_s
            )
            self.auth.delegations = self.delegations
        await self.auth.start()
        self.tool_schemas = await self._discover_tools()
        self.prompt_arguments = await self._discover_prompts()
        self.policy = self.load_policy()
        for warning in self.policy.warnings:
            log.warning("policy: %s", warning)
        metrics.POLICY_VERSION.labels(self.policy.version).set(1)
        if cfg.policy.shadow is not None:
            self.install_shadow(self.load_shadow())
            assert self.shadow is not None
            for warning in self.shadow.warnings:
                log.warning("shadow policy: %s", warning)
            for kind in SHADOW_KINDS:
                metrics.labelled(metrics.SHADOW_DISAGREEMENTS, kind)  # exported as 0 from the start
        try:
            self.store = await AuditStore.open(cfg.audit.url)
        except AuditStoreError as exc:
            raise ConfigError(f"audit.url: {exc}") from exc
        try:
            key_file = cfg.audit.signing_key_file or data_dir / "audit-signing.key"
            signing_key = load_or_create_signing_key(key_file)
        except SigningKeyError as exc:
            raise ConfigError(f"audit.signing_key_file: {exc}") from exc
        self.writer = AuditWriter(
            self.store,
            batch_max=cfg.audit.batch_max,
            window_ms=cfg.audit.batch_window_ms,
            signer=CheckpointSigner(signing_key),
            checkpoint_every=cfg.audit.checkpoint_every,
            checkpoint_interval_s=cfg.audit.checkpoint_interval_s,
        )
        await self.writer.start()
        instance = cfg.audit.instance or socket.gethostname()
        try:
            if interrupted := await self.writer.recover(instance):
                log.warning("audit: %d call(s) left pending by a previous run: interrupted", interrupted)
        except AuditStoreError as exc:
            raise ConfigError(f"audit.url: {exc}") from exc
        self.state = await open_state(cfg.state.url)
        self.auth.api_keys.use(self.state)
        self.state_writer = await sqlite_writer(self.state)
        if cfg.audit.sinks:
            self.sinks = Sinks(cfg.audit.sinks, self.store, SinkCursors(self.state, instance), instance)
            self.writer.listeners.append(self.sinks.wake)
            self.sinks.start()
        ids = self.auth.identities
        budgets = BudgetStage(cfg.budgets, self.state, self.state_writer, ids) if cfg.budgets else None
        view = budgets.view if budgets else None  # context.budget, read only when a policy uses it
        policy = PolicyStage(self._policy, self.settings_for, view, lambda: self.shadow)
        taint = SessionTaint(self.state, cfg.pinning.refresh_s)
        self.pins = ToolPins(self.state, cfg.pinning)
        if self.pins.enabled:
            for name, tools in self.discovered_tools.items():
                await self.pins.observe(name, tools)
        self.approvals = Approvals(
            self.state, cfg.approvals, self.base_url, audit=self.writer, instance=instance
        )
        pins = self.pins if self.pins.enabled else None
        self.pipeline = Pipeline(
            stages_in_order(
                pinning=PinningStage(self.pins, self.recheck_tools) if pins else None,
                taint=TaintStage(taint),
                redaction=redactor,
                policy=policy,
                budgets=budgets,
            ),
            self.writer,
            instance=instance,
            hmac_key=hmac_key,
            upstreams=self.upstreams,
            policy=policy,
            redactor=redactor,
            taint=taint,
            approvals=self.approvals,
            calls=CallRegistry(self.state, cfg.idempotency, hmac_key, self.state_writer),
            pins=pins,
            tasks=TaskOwners(self.state, self.state_writer),
            durability=cfg.audit.durability,
            arguments=cfg.audit.arguments,
        )
        signer = SessionSigner(session_key, cfg.sessions.max_age_s)
        self._mcp = MCPFront(
            self.upstreams,
            self.auth,
            self.pipeline,
            signer,
            self.base_url,
            cfg.listen.allowed_origins,
            recheck=self.recheck_tools,
            allow_methods=frozenset(cfg.mcp.allow_methods),
        )
        listen = cfg.listen
        self._mcp.max_body, self._mcp.max_depth = listen.max_body_bytes, listen.max_json_depth
        self._mcp.body_timeout_s = listen.body_timeout_s
        self._mcp.refusals = RefusalLimiter(listen.refusals_per_s, listen.refusal_burst)
        log.info("policy set %s loaded from %s", self.policy.version, cfg.policy.dir)
        if cfg.policy.watch:
            self.policy_watcher = PolicyWatcher(
                cfg.policy, self.load_policy, self.install_policy, lambda: self._policy().version
            )
            self.policy_watcher.start()
        shadow_cfg = cfg.policy.shadow_set()
        if self.shadow is not None and shadow_cfg is not None:
            log.info(
                "shadow policy set %s loaded from %s (never enforced)", self.shadow.version, shadow_cfg.dir
            )
            if cfg.policy.watch:
                self.shadow_watcher = PolicyWatcher(
                    shadow_cfg,
                    self.load_shadow,
                    self.install_shadow,
                    lambda: self.shadow.version if self.shadow else None,
                    shadow=True,
                )
                self.shadow_watcher.start()

    async def stop(self) -> None:
        if self.policy_watcher is not None:
            await self.policy_watcher.aclose()
        if self.shadow_watcher is not None:
            await self.shadow_watcher.aclose()
        if self.pipeline is not None:
            await self.pipeline.drain()
        if self.approvals is not None:
            await self.approvals.aclose()
        if self.writer is not None:
            await self.writer.close()
        if self.sinks is not None:
            await self.sinks.aclose()
        if self.store is not None:
            await self.store.close()
        await self.auth.aclose()
        if self.state_writer is not None:
            await asyncio.to_thread(self.state_writer.close)
        if self.state is not None:
            await self.state.dispose()
        await asyncio.gather(*(u.aclose() for u in self.upstreams.values()))
        await asyncio.gather(*(p.aclose() for p in self.providers.values()))
        await asyncio.gather(*(a.aclose() for a in self.agents.values()))

    def _policy(self) -> PolicyEngine:
        assert self.policy is not None
        return self.policy

    def load_policy(self, policy: PolicyConfig | None = None) -> PolicyEngine:
        """Read the policy set (default: `policy`'s) with what the upstreams told at start-up
        (a ConfigError if invalid)."""
        budgets = [b.name for b in self.cfg.budgets]
        schemas = {**self.tool_schemas, **message_schemas(self.cfg.agents)}
        return PolicyEngine.load(policy or self.cfg.policy, schemas, budgets, self.prompt_arguments)

    def load_shadow(self) -> PolicyEngine:
        """Read the shadow set exactly as the live one (a ConfigError naming `policy.shadow.dir`)."""
        shadow = self.cfg.policy.shadow_set()
        assert shadow is not None
        try:
            return self.load_policy(shadow)
        except ConfigError as exc:
            raise ConfigError(f"policy.shadow.dir {shadow.dir}: {exc.message}") from exc

    def install_shadow(self, engine: PolicyEngine) -> None:
        """Swap in a new shadow set (one assignment, as `install_policy`)."""
        old, self.shadow = self.shadow, engine
        metrics.SHADOW_VERSION.labels(engine.version).set(1)
        if old is not None and old.version != engine.version:
            metrics.SHADOW_VERSION.remove(old.version)

    def install_policy(self, engine: PolicyEngine) -> None:
        """Swap in a new policy set: one assignment, so every call sees the old set or the new one."""
        old, self.policy = self.policy, engine
        metrics.POLICY_VERSION.labels(engine.version).set(1)
        if old is not None and old.version != engine.version:
            metrics.POLICY_VERSION.remove(old.version)

    def settings_for(self, upstream: str, tool: str) -> ToolSettings:
        u = self.cfg.upstreams.get(upstream)
        return u.tools.get(tool, _DEFAULT_TOOL) if u else _DEFAULT_TOOL

    async def recheck_tools(self, upstream: str) -> bool:
        """List an upstream's tools again and pin what changed (an unknown tool was called, or the
        upstream said `notifications/tools/list_changed`). At most once per `pinning.refresh_s`.

        Returns whether the upstream could be listed (the last time it was tried).
        """
        up = self.upstreams.get(upstream)
        now = asyncio.get_running_loop().time()
        last = self._rechecked.get(upstream)
        if up is None or self.pins is None:
            return False
        if last is not None and now - last[0] < self.cfg.pinning.refresh_s:
            return last[1]
        self._rechecked[upstream] = (now, True)
        try:
            tools = await asyncio.wait_for(up.list_tools(), DISCOVERY_TIMEOUT_S)
            await self.pins.observe(upstream, tools)
        except (BastionError, TimeoutError, ValueError, KeyError, SQLAlchemyError) as exc:
            log.warning("upstream %s: could not re-check its tool pins (%s)", upstream, exc)
            self._rechecked[upstream] = (now, False)
            return False
        return True

    async def _discover_tools(self) -> dict[str, Any]:
        """Each upstream's tool input schemas, so policies can be validated against `context.args`.

        An upstream that is down at start-up contributes nothing (a warning says so); policies
        that reference only its arguments still evaluate at request time, failing closed.
        """

        async def one(up: Upstream) -> list[dict[str, Any]]:
            try:
                return await asyncio.wait_for(up.list_tools(), DISCOVERY_TIMEOUT_S)
            except (BastionError, TimeoutError, ValueError, KeyError) as exc:
                log.warning("upstream %s: could not list its tools at start-up (%s)", up.name, exc)
                return []

        ups = list(self.upstreams.values())
        found = await asyncio.gather(*(one(u) for u in ups))
        self.discovered_tools = {up.name: tools for up, tools in zip(ups, found, strict=True) if tools}
        return {
            f"{up.name}/{t['name']}": t.get("inputSchema") or {}
            for up, tools in zip(ups, found, strict=True)
            for t in tools
            if isinstance(t.get("name"), str)
        }

    async def _discover_prompts(self) -> dict[str, list[str]]:
        """Each upstream's prompt argument names, so `get_prompt` policies can read `context.args`."""

        async def one(up: Upstream) -> list[dict[str, Any]]:
            if "prompts" not in up.capabilities:
                return []
            try:
                return await asyncio.wait_for(up.list_prompts(), DISCOVERY_TIMEOUT_S)
            except (BastionError, TimeoutError, ValueError, KeyError) as exc:
                log.warning("upstream %s: could not list its prompts at start-up (%s)", up.name, exc)
                return []

        ups = list(self.upstreams.values())
        found = await asyncio.gather(*(one(u) for u in ups))
        return {
            f"{up.name}/{p['name']}": [
                a["name"]
                for a in p.get("arguments") or []
                if isinstance(a, dict) and isinstance(a.get("name"), str)
            ]
            for up, prompts in zip(ups, found, strict=True)
            for p in prompts
            if isinstance(p.get("name"), str)
        }


def build_app(gw: Gateway) -> Starlette:
    async def mcp(request: Request) -> Response:
        return await gw.mcp(request)

    aggregate: list[AggregateFront] = []  # built on first use, like the HTTP tool API below

    async def mcp_all(request: Request) -> Response:
        if not aggregate:
            aggregate.append(AggregateFront(gw.mcp, gw.cfg.mcp.namespace_separator))
        return await aggregate[0](request)

    async def resource_metadata(request: Request) -> Response:
        """RFC 9728 protected-resource metadata, per upstream resource URI (MCP authorization)."""
        upstream = request.path_params.get("upstream")
        if upstream is not None and upstream not in gw.upstreams:
            return JSONResponse({"error": "not_found", "message": "no such upstream"}, 404)
        resource = f"{gw.base_url}/mcp/{upstream}" if upstream else gw.base_url
        covered = [gw.cfg.upstreams[upstream]] if upstream else list(gw.cfg.upstreams.values())
        scopes = {*gw.cfg.identity.scopes_supported, *(s for u in covered for s in u.required_scopes)}
        metadata: dict[str, Any] = {
            "resource": resource,
            "scopes_supported": sorted(scopes),
            "bearer_methods_supported": ["header"],
            "resource_name": f"Bastion: {upstream}" if upstream else "Bastion",
        }
        # RFC 9728 §2: issuer identifiers are URLs; clients (mcp-remote) crash on anything else,
        # such as the offline dev issuer, so those are left out (the member is optional).
        issuers = [i.issuer for i in gw.cfg.identity.issuers]
        servers = [i for i in issuers if urlsplit(i).scheme in ("https", "http")]
        if servers:
            metadata["authorization_servers"] = servers
        return JSONResponse(metadata)

    api: list[HTTPToolAPI] = []  # built on first use: the MCP front exists once the gateway started

    def http_api() -> HTTPToolAPI:
        if not api:
            mcp = gw.mcp
            limits = (mcp.max_body, mcp.max_depth, mcp.body_timeout_s)
            api.append(HTTPToolAPI(mcp.pipeline, gw.auth, gw.base_url, limits, mcp.refusals))
        return api[0]

    async def tool_calls(request: Request) -> Response:
        return await http_api().tool_calls(request)

    async def decisions(request: Request) -> Response:
        return await http_api().decisions(request)

    llm: list[LLMFront] = []

    async def model_api(request: Request) -> Response:
        if not llm:
            mcp = gw.mcp
            limits = (mcp.max_depth, mcp.body_timeout_s)
            llm.append(
                LLMFront(mcp.pipeline, gw.auth, gw.providers, gw.cfg.llm, gw.base_url, limits, mcp.refusals)
            )
        return await llm[0](request)

    a2a: list[A2AFront] = []

    def a2a_front() -> A2AFront:
        if not a2a:
            mcp = gw.mcp
            assert gw.delegations is not None
            limits = (mcp.max_depth, mcp.body_timeout_s, gw.cfg.identity.max_delegation_depth)
            a2a.append(
                A2AFront(
                    mcp.pipeline,
                    gw.auth,
                    gw.agents,
                    gw.delegations,
                    gw.cfg.a2a,
                    gw.base_url,
                    limits,
                    mcp.refusals,
                )
            )
        return a2a[0]

    async def agent_message(request: Request) -> Response:
        return await a2a_front()(request)

    async def agent_card(request: Request) -> Response:
        return await a2a_front().card(request)

    admin: list[AdminAPI] = []

    async def budgets(request: Request) -> Response:
        if not admin:
            admin.append(AdminAPI(gw.cfg, gw.auth, gw.state, gw.base_url))
        return await admin[0].budgets(request)

    approvals_api: list[ApprovalsAPI] = []

    async def approvals(request: Request) -> Response:
        if not approvals_api:
            admin_api = AdminAPI(gw.cfg, gw.auth, gw.state, gw.base_url)
            approvals_api.append(ApprovalsAPI(gw, admin_api))
        return await approvals_api[0](request)

    console_front: list[ConsoleFront] = []

    async def console(request: Request) -> Response:
        if not console_front:
            console_front.append(ConsoleFront(gw, AdminAPI(gw.cfg, gw.auth, gw.state, gw.base_url)))
        return await console_front[0](request)

    routes = [
        Route("/mcp/{upstream}", mcp, methods=["GET", "POST", "DELETE"]),
        Route("/console", console, methods=["GET", "POST"]),
        Route("/console/{page:path}", console, methods=["GET", "POST"]),
        Route("/v1/approvals", approvals),
        Route("/v1/approvals/{id}", approvals),
        Route("/v1/approvals/{id}/{verb:str}", approvals, methods=["POST"]),
        Route("/approvals/{id}", approvals, methods=["GET", "POST"]),
        Route("/mcp", mcp_all, methods=["GET", "POST", "DELETE"]),
        Route("/v1/budgets", budgets),
        Route("/v1/tool-calls", tool_calls, methods=["POST"]),
        Route("/v1/decisions", decisions, methods=["POST"]),
        Route("/llm/{provider}/v1/{api:path}", model_api, methods=["POST"]),
        Route("/a2a/{agent}", agent_message, methods=["POST"]),
        Route("/a2a/{agent}/", agent_message, methods=["POST"]),
        Route("/a2a/{agent}/.well-known/agent-card.json", agent_card, methods=["GET"]),
        Route("/healthz", healthz),
        Route("/.well-known/oauth-protected-resource", resource_metadata),
        Route("/.well-known/oauth-protected-resource/mcp/{upstream}", resource_metadata),
    ]
    if gw.cfg.ops.listen is None:
        routes += ops_routes(gw)
    return Starlette(routes=routes, exception_handlers={404: _not_found})


def build_ops_app(gw: Gateway) -> Starlette:
    """The `ops.listen` listener: `/healthz`, `/readyz`, `/metrics`, `/openapi.json` and nothing
    else, so that what they tell can be kept off the network the agents reach."""
    routes = [Route("/healthz", healthz), *ops_routes(gw)]
    return Starlette(routes=routes, exception_handlers={404: _not_found})


async def _not_found(request: Request, exc: Exception) -> Response:
    """Unknown paths get JSON: clients probe OAuth/OIDC discovery URLs and parse the answer."""
    why = f"no such endpoint: {request.url.path[:200]}"
    return JSONResponse({"error": "not_found", "message": why}, 404)


def bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A listening socket, bound before the server starts so port 0 can be read back.

    `reuse_port`: several worker processes bind the same port and the kernel spreads new
    connections over them (`SO_REUSEPORT`)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
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
        log_config=None,
        http="httptools",
        server_header=False,
        timeout_graceful_shutdown=3,
    )
    return uvicorn.Server(config)


def hold_stop_signals() -> dict[int, Any]:
    """Keep SIGTERM/SIGINT from ending the process before `Gateway.stop()` has run.

    uvicorn shuts down gracefully on these, then re-raises the signal to the handler that was
    installed before it started: with the default one the process would die right there,
    without flushing the audit writer or signing its final checkpoint.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}


def _bind_ops(cfg: Config, reuse_port: bool) -> socket.socket:
    ops = cfg.ops.listen
    assert ops is not None
    try:
        return bind(ops.host, ops.port, reuse_port)
    except OSError as exc:
        raise ConfigError(f"ops.listen: cannot bind {ops.host}:{ops.port}: {exc.strerror or exc}") from exc


async def serve_all(listeners: Sequence[tuple[uvicorn.Server, socket.socket]]) -> None:
    """Serve every listener until one stops (a signal stops them all), then stop the others."""
    tasks = [asyncio.ensure_future(server.serve(sockets=[sock])) for server, sock in listeners]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for server, _ in listeners:
            server.should_exit = True
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome


async def serve(
    cfg: Config, sockets: Sequence[socket.socket] | None = None, *, reuse_port: bool = False
) -> None:
    """Start the gateway, serve until stopped, then flush the audit trail and close clients.

    It serves `listen`, and `ops.listen` when set (`sockets`: already bound ones, in that order);
    a stop signal, or either listener ending, stops both."""
    gw = Gateway(cfg)
    held = hold_stop_signals()
    try:
        await gw.start()
        # Everything loaded at start-up (policies, Presidio, the SDK's types: ~200,000 objects)
        # lives for good; frozen, it is no longer walked by each full collection (~110 ms each).
        gc.collect()
        gc.freeze()
        sock = sockets[0] if sockets else bind(cfg.listen.host, cfg.listen.port, reuse_port)
        listeners = [(server_for(build_app(gw), sock, "info"), sock)]
        if cfg.ops.listen is not None:
            ops_sock = sockets[1] if sockets and len(sockets) > 1 else _bind_ops(cfg, reuse_port)
            listeners.append((server_for(build_ops_app(gw), ops_sock, "info"), ops_sock))
        await serve_all(listeners)
    finally:
        await gw.stop()
        for sig, handler in held.items():
            signal.signal(sig, handler)
        metrics.process_exited()
