"""What an anonymous or slow caller can make the gateway do: store little, and wait not at all.

Through the real gateway: a refused credential is recorded with a fixed-size summary of its
arguments however large they were, a source address that keeps sending bad credentials is
answered 429 and no longer recorded, and a body that trickles in is cut off with 408.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import free_port, make_config, running_gateway
from mcp_support import modern_call, modern_headers

from gateway.app import Gateway
from gateway.identity.devkeys import DevKey


@pytest.fixture(scope="module")
async def gw(
    tmp_path_factory: pytest.TempPathFactory, upstream_url: str, policy_dir: Path, dev_key: DevKey
) -> AsyncIterator[tuple[str, Gateway]]:
    tmp = tmp_path_factory.mktemp("limits")
    (tmp / "dev-jwks.json").write_bytes(dev_key.jwks_path.read_bytes())
    port = free_port()
    listen = {
        "host": "127.0.0.1",
        "port": port,
        "refusals_per_s": 0.2,
        "refusal_burst": 3,
        "body_timeout_s": 0.5,
    }
    cfg = make_config(tmp, {"demo": upstream_url}, port, policy_dir, listen=listen)
    async with running_gateway(cfg) as running:
        yield running


async def records(gw: Gateway, **match: Any) -> list[dict[str, Any]]:
    assert gw.store is not None
    rows = [r.to_json() async for r in gw.store.iter_records()]
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


async def test_an_anonymous_refusal_stores_a_fixed_size_summary(gw: tuple[str, Gateway]) -> None:
    base, gateway = gw
    huge = {f"k{i}": "x" * 1000 for i in range(800)}  # ~0.8 MB of arguments, no token
    headers = {k: v for k, v in modern_headers("x", "tools/call", "echo").items() if k != "authorization"}
    async with httpx.AsyncClient(timeout=10, headers={"x-forwarded-for": "ignored"}) as http:
        got = await http.post(f"{base}/mcp/demo", json=modern_call("echo", huge), headers=headers)
    assert got.status_code == 401
    [record] = [
        r
        for r in await records(gateway, tool="echo", user=None)
        if r["args_redacted"].get("arguments") == 800
    ]
    assert record["args_redacted"] == {"unauthenticated": True, "arguments": 800}
    assert len(json.dumps(record)) < 4096


async def test_a_source_that_keeps_failing_is_answered_429_and_not_recorded(gw: tuple[str, Gateway]) -> None:
    base, gateway = gw
    before = len(await records(gateway, tool="flood"))
    statuses = []
    async with httpx.AsyncClient(timeout=10) as http:
        for _ in range(6):
            got = await http.post(
                f"{base}/v1/tool-calls",
                json={"upstream": "demo", "tool": "flood", "arguments": {}},
                headers={"authorization": "Bearer not-a-token"},
            )
            statuses.append(got.status_code)
            if got.status_code == 429:
                assert int(got.headers["retry-after"]) >= 1
        metrics = (await http.get(f"{base}/metrics")).text
    # the burst (3, one of them possibly spent by the previous test's refusal) is recorded, then 429
    assert statuses[-3:] == [429, 429, 429] and statuses[0] == 401
    recorded = len(await records(gateway, tool="flood")) - before
    assert recorded == statuses.count(401)
    assert "bastion_refusals_suppressed_total" in metrics


async def test_a_trickling_body_is_cut_off(gw: tuple[str, Gateway]) -> None:
    """Slowloris: headers promise 200 bytes, 10 arrive, then nothing. The gateway answers 408
    within about listen.body_timeout_s instead of holding the connection."""
    base, _ = gw
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /mcp/demo HTTP/1.1\r\nHost: " + f"{host}:{port}".encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: 200\r\n\r\n" + b'{"jsonrpc"'
    )
    await writer.drain()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
    waited = loop.time() - t0
    writer.close()
    assert head.startswith(b"HTTP/1.1 408")
    assert 0.4 < waited < 3.0
