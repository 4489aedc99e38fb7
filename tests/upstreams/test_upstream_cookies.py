"""An upstream's cookies never travel from one caller's call to another's.

Bastion's upstream clients are pooled and shared by every principal. A cookie jar on them would
hand a `Set-Cookie` the upstream sent in answer to one user's call back on the next user's call
(a session cookie, a sticky-routing cookie): state of one principal leaking into another's
request. Bastion keeps no cookies toward upstreams, as Envoy and other proxies do.
"""

from __future__ import annotations

from pathlib import Path

from conftest import free_port, make_config, running, running_gateway
from mcp_support import mcp_client
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.demo import demo_server
from gateway.identity.devkeys import ensure_dev_key


class CookieSetter:
    """Answers every request with a `Set-Cookie` naming the caller, and keeps the cookies it was sent."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.cookies_seen: list[bytes] = []
        self.requests = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.requests += 1
        self.cookies_seen += [v for k, v in scope["headers"] if k == b"cookie"]
        n = self.requests

        async def with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                cookie = f"session=caller-{n}; Path=/; HttpOnly".encode()
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
            await send(message)

        await self.app(scope, receive, with_cookie)


async def test_upstream_cookies_are_never_sent_back(tmp_path: Path, policy_dir: Path) -> None:
    inner = demo_server().streamable_http_app(streamable_http_path="/mcp")
    setter = CookieSetter(inner)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await (inner if scope["type"] == "lifespan" else setter)(scope, receive, send)

    async with running(app, lifespan="on") as base:
        key = ensure_dev_key(tmp_path)
        cfg = make_config(tmp_path, {"demo": f"{base}/mcp"}, free_port(), policy_dir)
        async with running_gateway(cfg) as (gw_base, _):

            def mint(sub: str) -> str:
                return key.mint(sub, groups=("developers",), audience=f"{gw_base}/mcp/demo")

            for sub in ("alice", "bob", "alice"):
                for mode in ("2026-07-28", "legacy"):
                    async with mcp_client(f"{gw_base}/mcp/demo", mint(sub), mode) as client:
                        result = await client.call_tool("echo", {"text": sub})
                        assert not result.is_error
    assert setter.requests >= 6  # every call reached the upstream, each answer set a cookie
    assert setter.cookies_seen == []
