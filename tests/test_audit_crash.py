"""Write-ahead audit through a real Bastion: kill -9 under load, and a store that refuses writes.

The upstream is the demo MCP server in the test process, wrapped to note every `tools/call` it
receives; Bastion runs as its own process (`python -m gateway.cli serve`), so SIGKILL really
stops it between the write-ahead record and the outcome.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import POLICIES, free_port, make_config, running, running_gateway, wait_healthy
from sqlalchemy import text
from starlette.types import ASGIApp, Receive, Scope, Send

from audit.checkpoint import load_public_key
from audit.store import AuditStore
from audit.verify import verify
from gateway.demo import demo_server
from gateway.identity.devkeys import DEV_ISSUER, DevKey

MODERN_META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}


class Recorder:
    """Notes the JSON-RPC id of every tools/call that reaches the upstream."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.seen: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
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
        msg = json.loads(body) if body else {}
        if msg.get("method") == "tools/call":
            self.seen.append(str(msg.get("id")))
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


@pytest.fixture(scope="module")
async def recorded_upstream() -> AsyncIterator[tuple[str, Recorder]]:
    inner = demo_server().streamable_http_app(streamable_http_path="/mcp")
    recorder = Recorder(inner)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await (inner if scope["type"] == "lifespan" else recorder)(scope, receive, send)

    async with running(app, lifespan="on") as url:
        yield f"{url}/mcp", recorder


def tool_call(msg_id: str, name: str, arguments: dict[str, Any]) -> tuple[dict[str, str], bytes]:
    body = {
        "jsonrpc": "2.0",
        "id": msg_id,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments, "_meta": MODERN_META},
    }
    headers = {
        "content-type": "application/json",
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": "tools/call",
        "mcp-name": name,
    }
    return headers, json.dumps(body).encode()


@pytest.mark.parametrize("durability", ["strict", "intent"])
async def test_kill_9_under_load_leaves_every_call_on_record(
    recorded_upstream: tuple[str, Recorder], data_dir: Path, dev_key: DevKey, tmp_path: Path, durability: str
) -> None:
    """`strict`: every answered call's final record was durable before its answer. `intent`: an
    answered call may still be `pending` at the crash (its final record was not awaited), and is
    `interrupted` after the restart; in both, nothing forwarded or answered is missing."""
    upstream_url, recorder = recorded_upstream
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    db = tmp_path / "audit.db"
    signing_key = tmp_path / "signing.key"
    config = tmp_path / "bastion.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": {"host": "127.0.0.1", "port": port},
                "identity": {
                    "issuers": [{"issuer": DEV_ISSUER, "jwks_file": str(data_dir / "dev-jwks.json")}]
                },
                "policy": {"dir": str(POLICIES)},
                "upstreams": {"demo": {"url": upstream_url, "tools": {"transfer": {"risk": "external"}}}},
                "audit": {
                    "url": f"sqlite+aiosqlite:///{db}",
                    "instance": "crash-test",
                    "signing_key_file": str(signing_key),
                    "checkpoint_every": 50,
                    "durability": durability,
                },
                "state": {"url": f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"},
                "data_dir": str(tmp_path / "data"),
            }
        )
    )
    token = dev_key.mint("dev", audience=f"{base}/mcp/demo", groups=["developers"])
    auth = {"authorization": f"Bearer {token}"}
    log = (tmp_path / "bastion.log").open("wb")

    async def start() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "serve", "--config", str(config),
            stdout=log, stderr=log,
        )  # fmt: skip

    answered: dict[str, str] = {}  # call id -> what the client saw
    ids = itertools.count()
    seen_before = len(recorder.seen)

    async def worker(client: httpx.AsyncClient, w: int) -> None:
        while True:
            n = next(ids)
            msg_id = f"w{w}-{n}"
            if n % 7 == 0:
                name, args = "transfer", {"amount": 5000, "to": "x"}  # denied: one final record
            elif n % 3 == 0:
                name, args = "countdown", {"n": 3}  # ~150 ms in the upstream: often in flight
            else:
                name, args = "echo", {"text": msg_id}
            headers, body = tool_call(msg_id, name, args)
            try:
                r = await client.post(f"{base}/mcp/demo", content=body, headers={**headers, **auth})
                text_ = r.text
            except httpx.TransportError:
                return  # bastion is gone
            if r.status_code == 200 and '"result"' in text_:
                answered[msg_id] = "denied" if "denied by policy" in text_ else "completed"

    proc = await start()
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            await wait_healthy(client, base, proc)
            workers = [asyncio.create_task(worker(client, w)) for w in range(12)]
            # Kill once the load has produced enough answers to mean something (a loaded
            # machine takes longer to get there), and at most after 20 s.
            for _ in range(200):
                await asyncio.sleep(0.1)
                if len(answered) > 60:
                    break
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            await asyncio.gather(*workers)
        forwarded = set(recorder.seen[seen_before:])
        assert len(answered) > 50, f"the load was too light to mean anything ({len(answered)} answers)"

        store = await AuditStore.open(f"sqlite+aiosqlite:///{db}", create=False)
        try:
            at_crash = {r.call_id: r async for r in store.iter_records()}
        finally:
            await store.close()
        for call_id, saw in answered.items():
            assert call_id in at_crash, f"{call_id} was answered but has no record"
            allowed = {saw} if durability == "strict" or saw == "denied" else {saw, "pending"}
            assert at_crash[call_id].status in allowed, (call_id, at_crash[call_id].outcome)
        for call_id in forwarded:
            assert call_id in at_crash, f"{call_id} reached the upstream but has no record"
        left_pending = {c for c, r in at_crash.items() if r.status == "pending"}
        assert left_pending, "the kill landed while calls were in flight"
        if durability == "strict":
            assert not left_pending & answered.keys()
        assert all(at_crash[c].effect == "allow" for c in left_pending)

        proc = await start()  # the restart records what the crash left pending
        async with httpx.AsyncClient(timeout=10) as client:
            await wait_healthy(client, base, proc)
            headers, body = tool_call("after-restart", "echo", {"text": "hi"})
            r = await client.post(f"{base}/mcp/demo", content=body, headers={**headers, **auth})
            assert r.status_code == 200 and "hi" in r.text
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait() in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once shut down
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()

    store = await AuditStore.open(f"sqlite+aiosqlite:///{db}", create=False)
    try:
        after = {r.call_id: r async for r in store.iter_records()}
        result = await verify(store, load_public_key(signing_key))
    finally:
        await store.close()
    assert {c for c, r in after.items() if r.status == "interrupted"} == left_pending
    assert after["after-restart"].status == "completed"
    assert result.ok and result.pending == 0, result.lines()
    assert result.instances[0].records == len(after)
    cp = result.instances[0].newest_checkpoint
    assert cp is not None and cp.seq == len(after), "a clean stop leaves the whole chain signed"


async def test_unwritable_audit_denies_and_never_forwards(
    recorded_upstream: tuple[str, Recorder], data_dir: Path, dev_key: DevKey, tmp_path: Path
) -> None:
    upstream_url, recorder = recorded_upstream
    cfg = make_config(
        data_dir,
        {"demo": upstream_url},
        free_port(),
        audit={"url": f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"},
    )
    async with running_gateway(cfg) as (base, gw):
        assert gw.store is not None
        async with gw.store.engine.begin() as conn:
            await conn.execute(
                text(
                    "CREATE TRIGGER refuse BEFORE INSERT ON audit_records "
                    "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
                )
            )
        token = dev_key.mint("dev", audience=f"{base}/mcp/demo", groups=["developers"])
        headers, body = tool_call("unaudited-1", "echo", {"text": "must not arrive"})
        before = len(recorder.seen)
        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.post(
                f"{base}/mcp/demo", content=body, headers={**headers, "authorization": f"Bearer {token}"}
            )
        assert r.status_code == 200
        result = r.json()["result"]
        assert result["isError"] is True
        assert result["structuredContent"]["decision"] == "deny"
        assert result["structuredContent"]["reasons"] == [
            {
                "policy": "audit-unavailable",
                "reason": "the audit store is unavailable, so the call was not forwarded",
            }
        ]
        assert recorder.seen[before:] == [], "an unrecorded call is never forwarded"
        async with gw.store.engine.begin() as conn:
            await conn.execute(text("DROP TRIGGER refuse"))
        async with httpx.AsyncClient(timeout=10) as client:
            headers, body = tool_call("audited-2", "echo", {"text": "fine"})
            r = await client.post(
                f"{base}/mcp/demo", content=body, headers={**headers, "authorization": f"Bearer {token}"}
            )
        assert r.json()["result"].get("isError") is not True
        assert recorder.seen[before:] == ["audited-2"]
