"""Bridges and tools people put in front of Bastion: mcp-remote (Claude Desktop), the Inspector CLI."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import Clients, assert_scenario, run

pytestmark = pytest.mark.timeout(300)  # the first test may install the clients (npm ci)

UPSTREAMS = ["demo", "legacy"]


@pytest.mark.parametrize("upstream", UPSTREAMS)
@pytest.mark.parametrize("protocol", ["legacy", "auto"])
async def test_mcp_remote_over_stdio(
    clients: Clients, mcp_url: Callable[[str], str], token: Callable[..., str], upstream: str, protocol: str
) -> None:
    run = await clients.driver("mcp_remote.mjs", mcp_url(upstream), token(upstream=upstream), protocol)
    report = run.json()
    assert_scenario(report)
    assert report["serverVersion"]["name"] == "bastion-demo", report["serverVersion"]
    bridged = "speaks MCP 2026-07-28" in report["log"]
    assert bridged is (protocol == "auto"), report["log"]


@pytest.mark.parametrize("upstream", UPSTREAMS)
@pytest.mark.parametrize("era", ["legacy", "auto", "modern"])
async def test_inspector_cli(
    clients: Clients,
    mcp_url: Callable[[str], str],
    token: Callable[..., str],
    upstream: str,
    era: str,
    tmp_path: Path,
) -> None:
    base = [
        clients.node22,
        clients.bin("inspector"),
        "--cli",
        mcp_url(upstream),
        "--transport",
        "http",
        "--header",
        f"Authorization: Bearer {token(upstream=upstream)}",
        "--protocol-era",
        era,
        "--format",
        "json",
        "--quiet",
    ]
    env = {"MCP_CATALOG_PATH": str(tmp_path / "mcp.json"), "HOME": str(tmp_path)}
    listed, allowed, denied = await asyncio.gather(
        run([*base, "--method", "tools/list"], clients.root, env),
        run(
            [*base, "--method", "tools/call", "--tool-name", "echo", "--tool-args-json", '{"text": "hi"}'],
            clients.root,
            env,
        ),
        run(
            [
                *base,
                "--method",
                "tools/call",
                "--tool-name",
                "transfer",
                "--tool-args-json",
                '{"amount": 5000, "to": "a"}',
            ],
            clients.root,
            env,
        ),
    )
    names = sorted(t["name"] for t in listed.json()["result"]["tools"])
    assert "echo" in names and "delete_note" not in names, names
    assert allowed.json()["result"]["content"][0]["text"] == "hi"
    assert denied.rc == 5, denied  # the CLI's exit code for a tool result with isError
    refused = json.loads(denied.stdout)["result"]
    assert refused["isError"] is True
    assert refused["content"][0]["text"].startswith("denied by policy transfer-limit:"), refused
