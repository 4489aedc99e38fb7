"""Shared fixtures: real MCP upstreams, a real Bastion on loopback, real signed tokens.

Everything runs for real in the test process's event loop: the SDK's `MCPServer` under uvicorn
as the upstream, Bastion under uvicorn on another port, the SDK's `Client` over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from audit.record import AuditRecord
from audit.store import AuditStore
from gateway import config as config_mod
from gateway.app import Gateway, bind, build_app, server_for
from gateway.config import Config
from gateway.demo import demo_server
from gateway.identity.devkeys import DEV_ISSUER, DevKey, ensure_dev_key

REPO = Path(__file__).resolve().parent.parent
POLICIES = REPO / "policies"


@asynccontextmanager
async def running(app: ASGIApp, lifespan: str = "off") -> AsyncIterator[str]:
    """Serve an ASGI app with uvicorn on a free loopback port; yields its base URL."""
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server: uvicorn.Server = server_for(app, sock, lifespan=lifespan)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            await task
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


class LegacyOnly:
    """Makes a dual-era MCP server behave like a 2025 one: no session, no service.

    A 2025-era server answers a session-less, non-initialize POST (such as `server/discover`)
    with 400 "Missing session ID"; that is exactly what this wrapper does before the real
    server sees the request.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.seen_methods: list[str] = []
        self.seen_headers: list[dict[bytes, bytes]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.seen_headers.append(dict(scope["headers"]))
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        headers = dict(scope["headers"])
        method = json.loads(body).get("method") if body else None
        self.seen_methods.append(str(method))
        if method != "initialize" and b"mcp-session-id" not in headers:
            payload = (
                b'{"jsonrpc":"2.0","id":"server-error",'
                b'"error":{"code":-32600,"message":"Bad Request: Missing session ID"}}'
            )
            await send(
                {
                    "type": "http.response.start",
                    "status": 400,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": payload})
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


@pytest.fixture(scope="session")
async def upstream_url() -> AsyncIterator[str]:
    """The demo MCP server, speaking both eras (as the SDK's server does)."""
    app = demo_server().streamable_http_app(streamable_http_path="/mcp")
    async with running(app, lifespan="on") as url:
        yield f"{url}/mcp"


@pytest.fixture(scope="session")
async def legacy_upstream() -> AsyncIterator[tuple[str, LegacyOnly]]:
    """The demo MCP server behind a 2025-era front: initialize and sessions only."""
    inner = demo_server().streamable_http_app(streamable_http_path="/mcp")
    wrapped = LegacyOnly(inner)

    class Lifespanned:
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            await (inner if scope["type"] == "lifespan" else wrapped)(scope, receive, send)

    async with running(Lifespanned(), lifespan="on") as url:
        yield f"{url}/mcp", wrapped


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bastion")


@pytest.fixture(scope="session")
def policy_dir(data_dir: Path) -> Path:
    """The repo's policies, plus a permit for the `legacy` test upstream (same tools as demo)."""
    target = data_dir / "policies"
    shutil.copytree(POLICIES, target)
    (target / "legacy.cedar").write_text(
        '@id("developers-use-legacy")\n'
        'permit (principal in Group::"developers", action in [Action::"call_tool", Action::"list_tools"], '
        'resource in Upstream::"legacy");\n'
    )
    return target


@pytest.fixture(scope="session")
def dev_key(data_dir: Path) -> DevKey:
    return ensure_dev_key(data_dir)


def make_config(
    data_dir: Path, upstreams: dict[str, str], port: int, policy_dir: Path = POLICIES, **extra: Any
) -> Config:
    data: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port},
        "identity": {"issuers": [{"issuer": DEV_ISSUER, "jwks_file": str(data_dir / "dev-jwks.json")}]},
        "policy": {"dir": str(policy_dir)},
        "upstreams": {
            name: {"url": url, "tools": {"delete_note": {"risk": "write"}, "transfer": {"risk": "external"}}}
            for name, url in upstreams.items()
        },
        "audit": {"url": f"sqlite+aiosqlite:///{data_dir / 'audit.db'}"},
        "state": {"url": f"sqlite+aiosqlite:///{data_dir / 'state.db'}"},  # pins: never the repo's cwd
        "data_dir": str(data_dir),
        **extra,
    }
    return config_mod.parse(data, data_dir)


@asynccontextmanager
async def running_gateway(cfg: Config) -> AsyncIterator[tuple[str, Gateway]]:
    gw = Gateway(cfg)
    await gw.start()
    sock = bind(cfg.listen.host, cfg.listen.port)
    server = server_for(build_app(gw), sock)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                await task
            await asyncio.sleep(0.01)
        yield cfg.listen.base_url, gw
    finally:
        server.should_exit = True
        await task
        await gw.stop()
        sock.close()


_DEAD: list[socket.socket] = []


def dead_url() -> str:
    """An upstream URL on a port that is bound but never listens: connections are refused, and
    no other server of the test run can take the port while the session lasts."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    _DEAD.append(sock)
    return f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"


@pytest.fixture(scope="session", autouse=True)
def _close_dead_sockets() -> Iterator[None]:
    yield
    while _DEAD:
        _DEAD.pop().close()


def free_port() -> int:
    sock = bind("127.0.0.1", 0)
    port: int = sock.getsockname()[1]
    sock.close()
    return port


@pytest.fixture(scope="session")
async def gateway(
    data_dir: Path,
    dev_key: DevKey,
    upstream_url: str,
    legacy_upstream: tuple[str, LegacyOnly],
    policy_dir: Path,
) -> AsyncIterator[tuple[str, Gateway]]:
    """Bastion in front of `demo` (dual-era upstream) and `legacy` (2025-era upstream)."""
    upstreams = {"demo": upstream_url, "legacy": legacy_upstream[0]}
    cfg = make_config(data_dir, upstreams, free_port(), policy_dir)
    async with running_gateway(cfg) as running_gw:
        yield running_gw


@pytest.fixture(scope="session")
def token(gateway: tuple[str, Gateway], dev_key: DevKey) -> Callable[..., str]:
    """Mint a dev token for the gateway's resource URI of an upstream (RFC 8707 audience)."""
    base = gateway[0]

    def mint(
        sub: str = "dev", groups: tuple[str, ...] = ("developers",), upstream: str = "demo", **kw: Any
    ) -> str:
        kw.setdefault("audience", f"{base}/mcp/{upstream}")
        return dev_key.mint(sub, groups=groups, **kw)

    return mint


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


def pytest_report_header(config: pytest.Config) -> str:
    pg = os.environ.get("BASTION_TEST_PG")
    node = shutil.which("node")
    pg_state = f"ON ({pg})" if pg else "OFF (set BASTION_TEST_PG)"
    return f"bastion: PostgreSQL tests {pg_state}; node {node or 'absent'}"


async def audit_records(url: str, **where: Any) -> list[AuditRecord]:
    """The records of the audit store at `url` whose fields equal `where` (a call's record is
    durable before its answer, so what a test just did is there)."""
    store = await AuditStore.open(url)
    try:
        found = [r async for r in store.iter_records()]
    finally:
        await store.close()
    return [r for r in found if all(getattr(r, k) == v for k, v in where.items())]


async def wait_healthy(client: httpx.AsyncClient, base: str, proc: asyncio.subprocess.Process) -> None:
    """Wait for a Bastion started as its own process to answer /healthz (it must not have exited)."""
    for _ in range(300):
        if proc.returncode is not None:
            raise AssertionError(f"bastion exited with {proc.returncode}")
        try:
            if (await client.get(f"{base}/healthz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError("bastion did not become healthy")
