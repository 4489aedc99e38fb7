"""What `/readyz`, `/metrics` and `/openapi.json` tell (upstream and tool names, the policy
version), and to whom: the `Host` must name the gateway (DNS rebinding), `ops.auth: admin` asks
for an admin's token, and `ops.listen` serves them on a listener of their own."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import POLICIES, free_port, make_config, running_gateway

from gateway import config as config_mod
from gateway.app import Gateway
from gateway.errors import ConfigError
from gateway.identity.devkeys import DEV_ISSUER, DevKey
from gateway.workers import supervise

OPS_PATHS = ("/readyz", "/metrics", "/openapi.json")


@pytest.mark.parametrize("path", OPS_PATHS)
async def test_a_foreign_host_is_refused(
    gateway: tuple[str, Gateway], http: httpx.AsyncClient, path: str
) -> None:
    """A page of evil.example whose name now resolves to 127.0.0.1 sends `Host: evil.example`."""
    base, _ = gateway
    port = base.rsplit(":", 1)[1]
    for foreign in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}", "", "a:b:c"):
        resp = await http.get(f"{base}{path}", headers={"host": foreign})
        assert resp.status_code == 421, (foreign, resp.text)
        assert "demo" not in resp.text  # no upstream or tool name
    for own in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST.:{port}", f"[::1]:{port}", "10.1.2.3"):
        assert (await http.get(f"{base}{path}", headers={"host": own})).status_code in (200, 503), own
    assert (await http.get(f"{base}/healthz", headers={"host": "evil.example"})).status_code == 200


async def test_allowed_hosts_names_more_hosts(
    data_dir: Path, dev_key: DevKey, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    port = free_port()
    listen = {
        "port": port,
        "public_url": "https://bastion.example.com",
        "allowed_hosts": [".svc.cluster.local"],
    }
    cfg = make_config(
        data_dir,
        {},
        port,
        listen=listen,
        audit={"url": f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"},
        state={"url": f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"},
    )
    base = f"http://127.0.0.1:{port}"
    async with running_gateway(cfg):
        for host, status in (
            ("bastion.example.com", 200),
            ("bastion.ns.svc.cluster.local:8080", 200),
            ("svc.cluster.local", 200),
            ("evilsvc.cluster.local", 421),
            ("bastion.example.com.evil.example", 421),
        ):
            assert (await http.get(f"{base}/metrics", headers={"host": host})).status_code == status, host


@pytest.fixture(scope="module")
async def admin_only(
    data_dir: Path, dev_key: DevKey, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    tmp = tmp_path_factory.mktemp("ops-admin")
    cfg = make_config(
        data_dir,
        {},
        free_port(),
        ops={"auth": "admin"},
        admin={"groups": ["admins"]},
        audit={"url": f"sqlite+aiosqlite:///{tmp / 'audit.db'}"},
        state={"url": f"sqlite+aiosqlite:///{tmp / 'state.db'}"},
    )
    async with running_gateway(cfg) as (base, _):
        yield base


@pytest.mark.parametrize("path", OPS_PATHS)
async def test_ops_auth_admin_wants_an_admins_token(
    admin_only: str, dev_key: DevKey, http: httpx.AsyncClient, path: str
) -> None:
    base = admin_only
    missing = await http.get(f"{base}{path}")
    assert missing.status_code == 401 and "resource_metadata=" in missing.headers["www-authenticate"]
    bad = await http.get(f"{base}{path}", headers={"authorization": "Bearer not-a-token"})
    assert bad.status_code == 401
    dev = dev_key.mint("dev", audience=base, groups=["developers"])
    not_admin = await http.get(f"{base}{path}", headers={"authorization": f"Bearer {dev}"})
    assert not_admin.status_code == 403 and "not an admin" in not_admin.text
    root = dev_key.mint("root", audience=base, groups=["admins"])
    served = await http.get(f"{base}{path}", headers={"authorization": f"Bearer {root}"})
    assert served.status_code == 200, served.text
    if path == "/metrics":
        assert "bastion_decisions" in served.text
    foreign = await http.get(
        f"{base}{path}", headers={"authorization": f"Bearer {root}", "host": "evil.example"}
    )
    assert foreign.status_code == 421  # an admin's token does not make a rebinding page welcome
    assert (await http.get(f"{base}/healthz")).status_code == 200  # liveness asks for nothing


def test_ops_config_is_checked_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"ops\.auth: admin needs admin\.groups or admin\.subjects"):
        config_mod.parse({"ops": {"auth": "admin"}}, tmp_path)
    with pytest.raises(ConfigError, match=r"ops\.listen\.port: it is listen\.port"):
        config_mod.parse({"listen": {"port": 8080}, "ops": {"listen": {"port": 8080}}}, tmp_path)
    with pytest.raises(ConfigError, match=r"ops\.listen\.port: workers > 1 needs a fixed port"):
        config_mod.parse({"listen": {"port": 8080, "workers": 2}, "ops": {"listen": {"port": 0}}}, tmp_path)
    with pytest.raises(ConfigError, match=r"listen\.allowed_hosts\.0"):
        config_mod.parse({"listen": {"allowed_hosts": ["evil.example:80/x"]}}, tmp_path)
    cfg = config_mod.parse({}, tmp_path)
    assert (cfg.ops.auth, cfg.ops.listen, cfg.listen.allowed_hosts) == ("none", None, [])


def test_workers_refuse_an_ops_port_in_use(tmp_path: Path) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        ops_port = holder.getsockname()[1]
        cfg = config_mod.parse(
            {"listen": {"port": free_port(), "workers": 2}, "ops": {"listen": {"port": ops_port}}}, tmp_path
        )
        with pytest.raises(
            ConfigError, match=rf"ops\.listen\.port: 127\.0\.0\.1:{ops_port} is already in use"
        ):
            supervise(cfg, tmp_path / "bastion.yaml")
    finally:
        holder.close()


async def test_the_ops_listener_serves_them_and_the_main_port_does_not(
    data_dir: Path, dev_key: DevKey, tmp_path: Path
) -> None:
    """The real `bastion serve`, as an operator runs it, with `ops.listen` set."""
    port, ops_port = free_port(), free_port()
    config = tmp_path / "bastion.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": {"host": "127.0.0.1", "port": port},
                "ops": {"listen": {"host": "127.0.0.1", "port": ops_port}},
                "identity": {
                    "issuers": [{"issuer": DEV_ISSUER, "jwks_file": str(data_dir / "dev-jwks.json")}]
                },
                "policy": {"dir": str(POLICIES), "watch": False},
                "audit": {"url": f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"},
                "state": {"url": f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"},
                "data_dir": str(tmp_path / "data"),
            }
        )
    )
    main, ops = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{ops_port}"
    log = (tmp_path / "bastion.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "serve", "--config", str(config), stdout=log, stderr=log
    )
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            for _ in range(600):
                assert proc.returncode is None, (tmp_path / "bastion.log").read_text()[-2000:]
                try:
                    if (await client.get(f"{ops}/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
            for path in OPS_PATHS:
                assert (await client.get(f"{ops}{path}")).status_code == 200, path
                gone = await client.get(f"{main}{path}")
                assert gone.status_code == 404, (path, gone.text)
                foreign = await client.get(f"{ops}{path}", headers={"host": f"evil.example:{ops_port}"})
                assert foreign.status_code == 421
            assert (await client.get(f"{main}/healthz")).status_code == 200
            assert (await client.get(f"{ops}/healthz")).status_code == 200
            token = dev_key.mint("dev", audience=main, groups=["developers"])
            agents = await client.post(f"{ops}/mcp", headers={"authorization": f"Bearer {token}"})
            assert agents.status_code == 404  # the ops listener serves nothing else
            assert (await client.get(f"{main}/.well-known/oauth-protected-resource")).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0  # both listeners stop, cleanly
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()
