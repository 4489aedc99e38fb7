"""`@modelcontextprotocol/conformance` server scenarios that concern a proxy, run through Bastion.

The conformance client sends no credentials, so it talks to Bastion through a loopback shim that
adds the Bearer token and passes everything else (Host and Origin included) through unchanged,
the way an agent-side credential helper would; a Host or Origin naming the shim is rewritten to
Bastion's, foreign ones pass unchanged. Bastion still verifies the token on every request.

The `tools-call-*` scenarios call tools of the conformance suite's own test server; they run
against upstream `conformance` (`conformance_server.py`, offering exactly those tools) behind a
Bastion of their own whose policy permits that upstream.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import POLICIES, free_port, make_config, running, running_gateway
from starlette.types import Receive, Scope, Send

from gateway.identity.devkeys import DevKey

from .conformance_server import conformance_server
from .conftest import Clients, run

pytestmark = pytest.mark.timeout(300)  # the first test may install the clients (npm ci)

SCENARIOS = [
    "server-initialize",
    "ping",
    "tools-list",
    "server-sse-multiple-streams",
    "dns-rebinding-protection",
]

TOOL_SCENARIOS = [
    "tools-call-simple-text",
    "tools-call-image",
    "tools-call-audio",
    "tools-call-embedded-resource",
    "tools-call-mixed-content",
    "tools-call-error",
    "tools-call-with-logging",
    "tools-call-with-progress",
    "tools-call-sampling",
    "tools-call-elicitation",
]


class AddBearer:
    """Forwards every request to `target` with an Authorization header added; streams answers back."""

    def __init__(self, target: str, token: str, client: httpx.AsyncClient) -> None:
        self.target, self.token, self.client = target, token, client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        # Host and Origin naming the shim itself are rewritten to Bastion's; foreign ones pass as they are.
        own, theirs = f"127.0.0.1:{scope['server'][1]}".encode(), self.target.split("://", 1)[1].encode()
        headers = [
            (k, v.replace(own, theirs) if k.lower() in (b"host", b"origin") else v)
            for k, v in scope["headers"]
            if k.lower() != b"authorization"
        ]
        headers.append((b"authorization", f"Bearer {self.token}".encode()))
        request = self.client.build_request(
            scope["method"], self.target + scope["path"], headers=headers, content=body
        )
        response = await self.client.send(request, stream=True)
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [
                        (k, v)
                        for k, v in response.headers.raw
                        if k.lower() not in (b"content-length", b"transfer-encoding")
                    ],
                }
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()


@pytest.fixture
async def shim(gateway: tuple[str, Any], token: Callable[..., str]) -> AsyncIterator[str]:
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(30, read=None)) as client,
        running(AddBearer(gateway[0], token(), client)) as url,
    ):
        yield url


@asynccontextmanager
async def conformance_bastion(
    data_dir: Path, dev_key: DevKey, policies: Path, protocol: str
) -> AsyncIterator[str]:
    """Bastion in front of upstream `conformance` (era `protocol`), behind a token-adding shim."""
    shutil.copytree(POLICIES, policies)
    (policies / "conformance.cedar").write_text(
        '@id("developers-use-conformance")\n'
        'permit (principal in Group::"developers", action in [Action::"call_tool", Action::"list_tools"], '
        'resource in Upstream::"conformance");\n'
    )
    app = conformance_server().streamable_http_app(streamable_http_path="/mcp")
    async with running(app, lifespan="on") as url:
        cfg = make_config(data_dir, {"conformance": f"{url}/mcp"}, free_port(), policies)
        upstream = cfg.upstreams["conformance"].model_copy(update={"protocol": protocol})
        cfg = cfg.model_copy(update={"upstreams": {"conformance": upstream}})
        async with running_gateway(cfg) as (base, _):
            token = dev_key.mint("dev", groups=("developers",), audience=f"{base}/mcp/conformance")
            async with (
                httpx.AsyncClient(timeout=httpx.Timeout(30, read=None)) as client,
                running(AddBearer(base, token, client)) as shim_url,
            ):
                yield f"{shim_url}/mcp/conformance"


@pytest.fixture(scope="module")
async def legacy_conformance(
    data_dir: Path, dev_key: DevKey, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    """The upstream pinned to the era the scenarios speak: the client's session reaches the
    upstream's, so server-to-client requests (sampling, elicitation) flow back."""
    policies = tmp_path_factory.mktemp("conformance") / "policies"
    async with conformance_bastion(data_dir, dev_key, policies, "legacy") as url:
        yield url


@pytest.fixture(scope="module")
async def bridged_conformance(
    data_dir: Path, dev_key: DevKey, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    """The upstream in `protocol: auto`: it speaks 2026-07-28, so Bastion bridges the legacy client."""
    policies = tmp_path_factory.mktemp("conformance") / "policies"
    async with conformance_bastion(data_dir, dev_key, policies, "auto") as url:
        yield url


async def conformance(clients: Clients, url: str, scenario: str, out: Path) -> None:
    """Run one server scenario at `url`; every check must pass."""
    result = await run(
        [
            clients.node22,
            clients.bin("conformance"),
            "server",
            "--url",
            url,
            "--scenario",
            scenario,
            "-o",
            str(out),
            "--verbose",
        ],
        clients.root,
    )
    checks = [c for f in out.rglob("checks.json") for c in json.loads(f.read_text())]
    failed = [c for c in checks if c.get("status") == "FAILURE"]
    assert checks, f"no checks recorded\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert not failed, json.dumps(failed, indent=1)[:4000]
    assert any(c.get("status") == "SUCCESS" for c in checks), checks
    assert result.rc == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_conformance_server_scenario(
    clients: Clients, shim: str, scenario: str, tmp_path: Path
) -> None:
    await conformance(clients, f"{shim}/mcp/demo", scenario, tmp_path)


# The sampling and logging helpers of the mcp SDK warn that 2026-07-28 deprecates them; the
# scenarios speak 2025-11-25, where they are current.
@pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")
@pytest.mark.parametrize("scenario", TOOL_SCENARIOS)
async def test_conformance_tool_scenario(
    clients: Clients, legacy_conformance: str, scenario: str, tmp_path: Path
) -> None:
    await conformance(clients, legacy_conformance, scenario, tmp_path)


# What docs/clients.md says a 2025-era client of a 2026-07-28 upstream gets: no server-to-client
# requests and no `logging/setLevel` (both gone from 2026-07-28); the tools answer as above.
BRIDGE_GAPS = {
    "tools-call-sampling": "no back-channel for server-initiated requests",
    "tools-call-elicitation": "no back-channel for server-initiated requests",
    "tools-call-with-logging": "Method not found",
}


@pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")
@pytest.mark.parametrize("scenario", ["tools-call-error", "tools-call-with-progress", *BRIDGE_GAPS])
async def test_conformance_tool_scenario_bridged_to_2026(
    clients: Clients, bridged_conformance: str, scenario: str, tmp_path: Path
) -> None:
    if scenario not in BRIDGE_GAPS:
        await conformance(clients, bridged_conformance, scenario, tmp_path)
        return
    with pytest.raises(AssertionError) as failed:
        await conformance(clients, bridged_conformance, scenario, tmp_path)
    assert BRIDGE_GAPS[scenario] in str(failed.value), failed.value
