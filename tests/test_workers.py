"""`listen.workers`: several gateway processes on one port, supervised by `bastion serve`.

Runs the real command as an operator would (`python -m gateway.cli serve`), with the demo MCP
server of the test process as the upstream.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import POLICIES, free_port
from test_audit_crash import tool_call

from audit.checkpoint import load_public_key
from audit.store import AuditStore
from audit.verify import verify
from gateway import config as config_mod
from gateway.errors import ConfigError
from gateway.identity.devkeys import DEV_ISSUER, DevKey

LIMIT = 30
CALLS = 40


def _workers_of(pid: int) -> set[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return {int(c) for c in children}


async def _until(check: Callable[[], bool], what: str, seconds: float = 30) -> None:
    for _ in range(int(seconds / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting until {what}")


def test_more_than_one_worker_needs_a_fixed_port(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"listen.*fixed port"):
        config_mod.parse({"listen": {"port": 0, "workers": 2}}, tmp_path)


async def test_workers_share_the_port_budgets_metrics_and_audit(
    upstream_url: str, data_dir: Path, dev_key: DevKey, tmp_path: Path
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    db, signing_key = tmp_path / "audit.db", tmp_path / "signing.key"
    config = tmp_path / "bastion.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": {"host": "127.0.0.1", "port": port, "workers": 2},
                "identity": {
                    "issuers": [{"issuer": DEV_ISSUER, "jwks_file": str(data_dir / "dev-jwks.json")}]
                },
                "policy": {"dir": str(POLICIES), "watch": False},
                "upstreams": {"demo": {"url": upstream_url}},
                "budgets": [{"name": "per-user", "per": ["user"], "limit": LIMIT, "window": "1d"}],
                "audit": {
                    "url": f"sqlite+aiosqlite:///{db}",
                    "instance": "wk",
                    "signing_key_file": str(signing_key),
                },
                "state": {"url": f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"},
                "data_dir": str(tmp_path / "data"),
            }
        )
    )
    token = dev_key.mint("dev", audience=f"{base}/mcp/demo", groups=["developers"])
    auth = {"authorization": f"Bearer {token}"}
    log = (tmp_path / "bastion.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), stdout=log, stderr=log
    )
    # a new connection per call, so that the kernel spreads the calls over the workers
    fresh = httpx.Limits(max_keepalive_connections=0)
    try:
        async with httpx.AsyncClient(timeout=20, limits=fresh) as client:

            async def ready() -> bool:
                try:
                    return (await client.get(f"{base}/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            for _ in range(600):
                assert proc.returncode is None, (tmp_path / "bastion.log").read_text()[-2000:]
                if await ready() and len(_workers_of(proc.pid)) == 2:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # let the second worker finish starting too

            sem = asyncio.Semaphore(8)

            async def one(n: int) -> str:
                headers, body = tool_call(str(n), "echo", {"text": f"call {n}"})
                async with sem:
                    r = await client.post(f"{base}/mcp/demo", content=body, headers={**headers, **auth})
                assert r.status_code == 200, r.text
                return "denied" if r.json()["result"]["isError"] else "allowed"

            outcomes = await asyncio.gather(*(one(n) for n in range(CALLS)))
            assert outcomes.count("allowed") == LIMIT  # one budget, exact across both workers
            assert outcomes.count("denied") == CALLS - LIMIT

            text = (await client.get(f"{base}/metrics")).text  # any worker reports them all
            allowed = re.findall(r'bastion_decisions_total\{effect="allow",[^}]*\} (\S+)', text)
            assert sum(float(v) for v in allowed) == LIMIT

            # a worker that dies is replaced, and the port keeps serving meanwhile
            victim = min(_workers_of(proc.pid))
            os.kill(victim, signal.SIGKILL)
            await _until(lambda: victim not in _workers_of(proc.pid), "the dead worker is reaped")
            await _until(lambda: len(_workers_of(proc.pid)) == 2, "a new worker is started")
            for _ in range(200):
                if await ready():
                    break
                await asyncio.sleep(0.05)
            assert (await one(CALLS)) == "denied"  # still over budget, whichever worker answers

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 40) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()

    store = await AuditStore.open(f"sqlite+aiosqlite:///{db}", create=False)
    try:
        records = [r async for r in store.iter_records()]
        result = await verify(store, load_public_key(signing_key))
    finally:
        await store.close()
    assert {r.instance for r in records} == {"wk-w0", "wk-w1"}  # both workers served calls
    assert len([r for r in records if r.action == "call_tool"]) == CALLS + 1
    assert result.ok, result.lines()


def _two_workers(
    tmp_path: Path, upstream_url: str, data_dir: Path, policies: Path, port: int
) -> dict[str, Any]:
    """A two-worker config on SQLite files in `tmp_path`."""
    return {
        "listen": {"host": "127.0.0.1", "port": port, "workers": 2},
        "identity": {"issuers": [{"issuer": DEV_ISSUER, "jwks_file": str(data_dir / "dev-jwks.json")}]},
        "policy": {"dir": str(policies), "watch": False},
        "upstreams": {"demo": {"url": upstream_url}},
        "audit": {"url": f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"},
        "state": {"url": f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"},
        "data_dir": str(tmp_path / "data"),
    }


async def _serve_exits(config: Path) -> tuple[int, bytes]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "serve", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out


async def test_a_worker_that_cannot_start_stops_the_supervisor(
    upstream_url: str, data_dir: Path, dev_key: DevKey, tmp_path: Path
) -> None:
    """A worker refused at start-up would be refused again: no restart loop, status 2. A database
    that cannot be opened is found before any worker starts."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "schema.cedarschema").write_text((POLICIES / "schema.cedarschema").read_text())
    (policies / "broken.cedar").write_text("permit (principal, action, resource) when { nonsense };\n")
    data = _two_workers(tmp_path, upstream_url, data_dir, policies, free_port())
    config = tmp_path / "bastion.yaml"
    config.write_text(yaml.safe_dump(data))
    code, out = await _serve_exits(config)
    assert code == 2, out.decode()[-2000:]
    assert b"broken.cedar" in out and b"could not start" in out

    data["audit"] = {"url": f"sqlite+aiosqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'audit.db'}"}
    config.write_text(yaml.safe_dump(data))
    code, out = await _serve_exits(config)
    assert code == 2, out.decode()[-2000:]
    assert b"audit.url" in out and b"could not start" not in out  # refused before any worker ran


async def test_a_port_taken_by_another_process_stops_the_supervisor(
    upstream_url: str, data_dir: Path, dev_key: DevKey, tmp_path: Path
) -> None:
    """Workers would fail to bind, be restarted, fail again, forever (the port answers, but not
    for Bastion): the supervisor refuses to start instead, with status 2, naming the port."""
    port = free_port()
    data = _two_workers(tmp_path, upstream_url, data_dir, POLICIES, port)
    config = tmp_path / "bastion.yaml"
    config.write_text(yaml.safe_dump(data))
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen(8)
        code, out = await _serve_exits(config)
    assert code == 2, out.decode()[-2000:]
    assert f"127.0.0.1:{port}".encode() in out and b"in use" in out
    assert b"restarting" not in out
