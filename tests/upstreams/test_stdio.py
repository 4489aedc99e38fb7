"""stdio upstreams: Bastion spawns, supervises and serves them like HTTP upstreams."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, running_gateway
from mcp.shared.exceptions import MCPError
from mcp_support import MODES, audit_rows, mcp_client

from gateway import config as config_mod
from gateway.app import Gateway
from gateway.upstreams.stdio import StdioUpstream

SERVER = Path(__file__).resolve().parents[1] / "stdio_server.py"


@pytest.fixture(scope="module")
async def stdio_gateway(data_dir: Path, policy_dir: Path) -> AsyncIterator[tuple[str, Gateway]]:
    (policy_dir / "files.cedar").write_text(
        '@id("developers-use-files")\n'
        'permit (principal in Group::"developers", action in [Action::"call_tool", Action::"list_tools"], '
        'resource in Upstream::"files");\n'
    )
    upstream = {
        "transport": "stdio",
        "command": sys.executable,
        "args": [str(SERVER)],
        "idle_timeout_s": 60,
        "tools": {"delete_note": {"risk": "write"}, "transfer": {"risk": "external"}},
    }
    data = {
        "listen": {"port": free_port()},
        "identity": {"issuers": [{"issuer": "bastion-dev", "jwks_file": str(data_dir / "dev-jwks.json")}]},
        "policy": {"dir": str(policy_dir)},
        "upstreams": {"files": upstream},
        "audit": {"url": f"sqlite+aiosqlite:///{data_dir / 'audit.db'}"},
        "data_dir": str(data_dir),
    }
    async with running_gateway(config_mod.parse(data, data_dir)) as running:
        yield running


def token_for(gateway: tuple[str, Gateway], dev_key: Any, sub: str = "dev") -> str:
    return str(dev_key.mint(sub, audience=f"{gateway[0]}/mcp/files", groups=["developers"]))


@pytest.mark.parametrize("mode", MODES)
async def test_stdio_tools_work_like_http_ones(
    stdio_gateway: tuple[str, Gateway], dev_key: Any, mode: str
) -> None:
    base, _ = stdio_gateway
    async with mcp_client(f"{base}/mcp/files", token_for(stdio_gateway, dev_key), mode) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert {"echo", "add", "pid", "crash"} <= names and "delete_note" not in names
        result = await client.call_tool("add", {"a": 1, "b": 2})
        assert result.structured_content == {"result": 3}
        denied = await client.call_tool("transfer", {"amount": 5000, "to": "x"})
        assert denied.is_error


async def test_concurrent_clients_share_the_process(stdio_gateway: tuple[str, Gateway], dev_key: Any) -> None:
    base, _ = stdio_gateway

    async def one(i: int) -> Any:
        async with mcp_client(f"{base}/mcp/files", token_for(stdio_gateway, dev_key), MODES[i % 2]) as client:
            return [
                (await client.call_tool("echo", {"text": f"{i}-{j}"})).structured_content for j in range(3)
            ]

    results = await asyncio.gather(*(one(i) for i in range(8)))
    assert results == [[{"result": f"{i}-{j}"} for j in range(3)] for i in range(8)]


async def test_crash_mid_call_is_a_clean_error_and_the_next_call_restarts(
    stdio_gateway: tuple[str, Gateway], dev_key: Any
) -> None:
    base, gw = stdio_gateway
    upstream = gw.upstreams["files"]
    assert isinstance(upstream, StdioUpstream)
    async with mcp_client(f"{base}/mcp/files", token_for(stdio_gateway, dev_key), "2026-07-28") as client:
        first_pid = (await client.call_tool("pid", {})).structured_content
        with pytest.raises(MCPError, match="stdio upstream files exited"):
            await client.call_tool("crash", {})
    rows = [r for r in await audit_rows(gw) if r["tool"] == "crash"]
    assert rows[-1]["outcome"]["status"] == "failed"
    assert "exited" in (rows[-1]["outcome"]["error"] or "")
    async with mcp_client(f"{base}/mcp/files", token_for(stdio_gateway, dev_key), "2026-07-28") as client:
        for _ in range(50):
            try:
                second_pid = (await client.call_tool("pid", {})).structured_content
                break
            except Exception:
                await asyncio.sleep(0.1)
    assert second_pid != first_pid


async def test_idle_process_is_stopped_and_started_again(data_dir: Path, tmp_path: Path) -> None:
    cfg = config_mod.parse(
        {
            "upstreams": {
                "f": {
                    "transport": "stdio",
                    "command": sys.executable,
                    "args": [str(SERVER)],
                    "idle_timeout_s": 0.3,
                }
            }
        },
        tmp_path,
    )
    upstream = StdioUpstream("f", cfg.upstreams["f"])
    try:
        assert {t["name"] for t in await upstream.list_tools()} >= {"echo", "pid"}
        assert upstream.running
        for _ in range(40):
            await asyncio.sleep(0.05)
            if not upstream.running:
                break
        assert not upstream.running, "stopped after idle_timeout_s"
        reply = await upstream.send(
            "POST",
            b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","arguments":{"text":"back"}}}',
        )
        assert b'"back"' in await reply.body() and upstream.running
    finally:
        await upstream.aclose()


async def test_missing_program_fails_clearly(tmp_path: Path) -> None:
    from gateway.errors import UpstreamError

    cfg = config_mod.parse(
        {"upstreams": {"f": {"transport": "stdio", "command": str(tmp_path / "nope")}}}, tmp_path
    )
    upstream = StdioUpstream("f", cfg.upstreams["f"])
    with pytest.raises(UpstreamError, match="could not start"):
        await upstream.detect()
    with pytest.raises(UpstreamError, match="restarting"):
        await upstream.detect()
    await upstream.aclose()
