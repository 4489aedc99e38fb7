"""A real Bastion that has served real traffic, for the console's tests (HTTP and browser).

Traffic, through the HTTP tool API in front of the session's demo upstream: allowed `echo` calls
(one carrying HTML and script in its argument), a denied `transfer` (over the limit), a transfer
held for approval (`@obligation("approval")` above 100), and a call to a tool whose name is HTML.
Admins: group `admins` (Cedar lets them approve), and `root-admin` by name.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import POLICIES, REPO, free_port, running_gateway

from gateway import config as config_mod
from gateway.app import Gateway
from gateway.identity.devkeys import DEV_ISSUER, DevKey, ensure_dev_key

APPROVAL_POLICY = """
@id("transfers-need-approval")
@reason("transfers above 100 need a human")
@obligation("approval")
permit (principal in Group::"developers", action == Action::"call_tool", resource == Tool::"demo/transfer")
when { context.args has amount && context.args.amount > 100 };
"""
HOSTILE_TEXT = '<script>alert("xss")</script><img src=x onerror=alert(1)>'
HOSTILE_TOOL = '<b onmouseover=alert(1)>"x"</b>'


@dataclass
class ConsoleEnv:
    base: str
    gw: Gateway
    key: DevKey
    cfg_file: Path
    root: Path
    ids: dict[str, str] = field(default_factory=dict)
    """What the traffic produced: name -> audit id (and `approval` -> the approval id)."""

    def token(self, sub: str = "dev", groups: tuple[str, ...] = ("developers",)) -> str:
        return self.key.mint(sub, groups=list(groups), audience=self.base)

    def admin(self, sub: str = "root", groups: tuple[str, ...] = ("admins",)) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token(sub, groups)}"}

    async def call(
        self, http: httpx.AsyncClient, tool: str, arguments: dict[str, Any], sub: str = "dev"
    ) -> httpx.Response:
        body = {"upstream": "demo", "tool": tool, "arguments": arguments}
        headers = {"authorization": f"Bearer {self.token(sub)}"}
        return await http.post(f"{self.base}/v1/tool-calls", json=body, headers=headers)

    async def login_link(self, *args: str) -> str:
        """`bastion console login` run for real; its link (args default: --user root --group admins)."""
        argv = list(args) or ["--user", "root", "--group", "admins"]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "console", "login", "--config", str(self.cfg_file), *argv,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        if proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode or 1, argv, out, err)
        return out.decode().splitlines()[0]


@pytest.fixture(scope="module")
async def console_env(
    tmp_path_factory: pytest.TempPathFactory, upstream_url: str
) -> AsyncIterator[ConsoleEnv]:
    root = tmp_path_factory.mktemp("console")
    policies = root / "policies"
    policies.mkdir()
    for name in ("schema.cedarschema", "demo.cedar"):
        (policies / name).write_text((POLICIES / name).read_text())
    (policies / "approvals.cedar").write_text(APPROVAL_POLICY)
    key = ensure_dev_key(root)
    data = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "identity": {"issuers": [{"issuer": DEV_ISSUER, "jwks_file": str(root / "dev-jwks.json")}]},
        "policy": {"dir": str(policies), "watch": True},
        "upstreams": {
            "demo": {
                "url": upstream_url,
                "tools": {"delete_note": {"risk": "write"}, "transfer": {"risk": "external"}},
            }
        },
        "audit": {"url": f"sqlite+aiosqlite:///{root / 'audit.db'}", "instance": "console-test"},
        "state": {"url": f"sqlite+aiosqlite:///{root / 'state.db'}"},
        "admin": {"groups": ["admins"], "subjects": ["root-admin"]},
        "budgets": [{"name": "echo-daily", "match": {"tools": ["demo/echo"]}, "limit": 1000, "window": "1d"}],
        "data_dir": str(root),
    }
    cfg_file = root / "bastion.yaml"
    cfg_file.write_text(yaml.safe_dump(data))
    async with running_gateway(config_mod.load(cfg_file)) as (base, gw):
        env = ConsoleEnv(base, gw, key, cfg_file, root)
        async with httpx.AsyncClient(timeout=10) as http:
            for i in range(5):
                r = await env.call(http, "echo", {"text": f"hello {i}"})
                env.ids[f"echo-{i}"] = r.json()["audit_id"]
            r = await env.call(http, "echo", {"text": HOSTILE_TEXT}, sub="mallory")
            env.ids["hostile-args"] = r.json()["audit_id"]
            r = await env.call(http, "transfer", {"amount": 5000, "to": "acct-9"})
            assert r.status_code == 403, r.text
            env.ids["denied"] = r.json()["audit_id"]
            r = await env.call(http, "transfer", {"amount": 500, "to": "acct-7"}, sub="alice")
            assert r.status_code == 202, r.text
            env.ids["held"], env.ids["approval"] = r.json()["audit_id"], r.json()["approval_id"]
            r = await env.call(http, HOSTILE_TOOL, {"x": 1})
            env.ids["hostile-tool"] = r.json().get("audit_id", "")
        yield env
