"""`@modelcontextprotocol/conformance` server scenarios that concern a proxy, run through Bastion.

The conformance client sends no credentials, so it talks to Bastion through a loopback shim that
adds the Bearer token and passes everything else (Host and Origin included) through unchanged,
the way an agent-side credential helper would; a Host or Origin naming the shim is rewritten to
Bastion's, foreign ones pass unchanged. Bastion still verifies the token on every request.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import running
from starlette.types import Receive, Scope, Send

from .conftest import Clients, run

pytestmark = pytest.mark.timeout(300)  # the first test may install the clients (npm ci)

SCENARIOS = [
    "server-initialize",
    "ping",
    "tools-list",
    "server-sse-multiple-streams",
    "dns-rebinding-protection",
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


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_conformance_server_scenario(
    clients: Clients, shim: str, scenario: str, tmp_path: Path
) -> None:
    result = await run(
        [
            clients.node22,
            clients.bin("conformance"),
            "server",
            "--url",
            f"{shim}/mcp/demo",
            "--scenario",
            scenario,
            "-o",
            str(tmp_path),
            "--verbose",
        ],
        clients.root,
    )
    checks = [c for f in tmp_path.rglob("checks.json") for c in json.loads(f.read_text())]
    failed = [c for c in checks if c.get("status") == "FAILURE"]
    assert checks, f"no checks recorded\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert not failed, json.dumps(failed, indent=1)[:4000]
    assert any(c.get("status") == "SUCCESS" for c in checks), checks
    assert result.rc == 0, result.stdout[-3000:] + result.stderr[-3000:]
