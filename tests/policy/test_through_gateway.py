"""Policy through the real gateway: arguments, time, delegation, hot reload and `bastion explain`.

Each test starts its own Bastion (real uvicorn, real Cedar, real SQLite audit) in front of the
session's demo MCP server and calls it with the SDK's client and real ES256 tokens.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
import yaml
from conftest import POLICIES, free_port, make_config, running_gateway
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from gateway.app import Gateway
from gateway.cli.policy import explain
from gateway.identity.devkeys import DevKey

SCHEMA = POLICIES / "schema.cedarschema"
TOOLS = {"delete_note": {"risk": "write"}, "transfer": {"risk": "external"}}


def policy_set(root: Path, text: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(SCHEMA, root / "schema.cedarschema")
    (root / "p.cedar").write_text(text)
    return root


@asynccontextmanager
async def gateway_for(
    data_dir: Path, upstream_url: str, policies: Path, **policy: Any
) -> AsyncIterator[tuple[str, Gateway]]:
    cfg = make_config(
        data_dir, {"demo": upstream_url}, free_port(), policies, policy={"dir": str(policies), **policy}
    )
    async with running_gateway(cfg) as running:
        yield running


async def call(base: str, token: str, tool: str, args: dict[str, Any]) -> tuple[bool, dict[str, Any] | None]:
    """One tools/call through Bastion with the SDK client: (is_error, structured content)."""
    async with (
        httpx2.AsyncClient(headers={"authorization": f"Bearer {token}"}, timeout=10) as hc,
        Client(streamable_http_client(f"{base}/mcp/demo", http_client=hc), mode="2026-07-28") as client,
    ):
        result = await client.call_tool(tool, args)
    # a denial of a tool whose outputSchema it cannot fit carries the decision in _meta only
    return bool(result.is_error), result.structured_content or (result.meta or {}).get("bastion/decision")


def mint(
    dev_key: DevKey, base: str, sub: str = "dev", groups: tuple[str, ...] = ("developers",), **kw: Any
) -> str:
    return dev_key.mint(sub, groups=groups, audience=f"{base}/mcp/demo", **kw)


DEVELOPERS = (
    '@id("devs") @reason("developers may use demo") '
    'permit(principal in Group::"developers", action, resource in Upstream::"demo");\n'
)


# Decisions that depend on arguments, time and delegation -----------------------------------------


async def test_args_based_policy(tmp_path: Path, data_dir: Path, dev_key: DevKey, upstream_url: str) -> None:
    text = DEVELOPERS + (
        '@id("no-secret-notes") @reason("secret notes are off limits") '
        'forbid(principal, action == Action::"call_tool", resource == Tool::"demo/read_note") '
        'when { context.args has name && context.args.name like "secret-*" };\n'
        '@id("small-sums") @reason("add only small numbers") '
        'forbid(principal, action == Action::"call_tool", resource == Tool::"demo/add") '
        "when { context.args has a && context.args.a > 100 };\n"
    )
    async with gateway_for(data_dir, upstream_url, policy_set(tmp_path, text)) as (base, _):
        tok = mint(dev_key, base)
        assert await call(base, tok, "read_note", {"name": "welcome"}) == (False, {"result": welcome_note()})
        err, sc = await call(base, tok, "read_note", {"name": "secret-plans"})
        assert err and sc is not None and sc["reasons"][0]["policy"] == "no-secret-notes"
        assert (await call(base, tok, "add", {"a": 100, "b": 1}))[1] == {"result": 101}
        err, sc = await call(base, tok, "add", {"a": 101, "b": 1})
        assert (
            err
            and sc is not None
            and sc["reasons"] == [{"policy": "small-sums", "reason": "add only small numbers"}]
        )


def welcome_note() -> str:
    return "Bastion governs every tool call that crosses it."


def _zone_where_hour_is(target: int) -> str:
    """A fixed-offset zone in which it is now `target` o'clock (or the hour after, near a boundary)."""
    utc_hour = datetime.now(UTC).hour
    for offset in range(-12, 15):
        if (utc_hour + offset) % 24 == target:
            # Etc/GMT-N is UTC+N (POSIX sign convention).
            return "UTC" if offset == 0 else f"Etc/GMT{'-' if offset > 0 else '+'}{abs(offset)}"
    raise AssertionError("unreachable: offsets -12..+14 cover every hour")


async def test_time_based_policy(tmp_path: Path, data_dir: Path, dev_key: DevKey, upstream_url: str) -> None:
    # Local hour 12 (or 13, if the hour turns during the test) is inside 9-17; 2 (or 3) is outside.
    text = DEVELOPERS + (
        '@id("office-hours") @reason("echo only in office hours") '
        'forbid(principal, action == Action::"call_tool", resource == Tool::"demo/echo") '
        "when { context.time.hour < 9 || context.time.hour >= 17 };\n"
    )
    root = policy_set(tmp_path, text)
    async with gateway_for(data_dir, upstream_url, root, timezone=_zone_where_hour_is(12)) as (base, _):
        assert await call(base, mint(dev_key, base), "echo", {"text": "noon"}) == (False, {"result": "noon"})
    async with gateway_for(data_dir, upstream_url, root, timezone=_zone_where_hour_is(2)) as (base, _):
        err, sc = await call(base, mint(dev_key, base), "echo", {"text": "night"})
        assert err and sc is not None and sc["reasons"][0]["policy"] == "office-hours"
        assert sc["decision"] == "deny"


async def test_delegation_based_policy(
    tmp_path: Path, data_dir: Path, dev_key: DevKey, upstream_url: str
) -> None:
    text = DEVELOPERS + (
        '@id("depth-2") @reason("at most two agents") forbid(principal, action, resource) '
        "when { context.agent.depth > 2 };\n"
        '@id("not-via-scraper") @reason("the scraper may not act") forbid(principal, action, resource) '
        'when { context.agent.chain.contains("scraper") };\n'
    )
    async with gateway_for(data_dir, upstream_url, policy_set(tmp_path, text)) as (base, gw):
        two = {"act": {"sub": "researcher", "act": {"sub": "planner"}}}
        three = {"act": {"sub": "a", "act": {"sub": "b", "act": {"sub": "c"}}}}
        via = {"act": {"sub": "scraper"}}
        assert (await call(base, mint(dev_key, base, extra=two), "echo", {"text": "x"}))[0] is False
        err, sc = await call(base, mint(dev_key, base, extra=three), "echo", {"text": "x"})
        assert err and sc is not None and sc["reasons"][0]["policy"] == "depth-2"
        err, sc = await call(base, mint(dev_key, base, extra=via), "echo", {"text": "x"})
        assert err and sc is not None and sc["reasons"][0]["policy"] == "not-via-scraper"
        assert gw.store is not None
        rows = [r.to_json() async for r in gw.store.iter_records()]
        row = next(r for r in rows if r["id"] == sc["audit_id"])
        assert row["delegation_chain"] == ["scraper"]
        assert row["decision"]["policy_version"] == gw.policy.version if gw.policy else False


async def test_entities_file_group_hierarchy(
    tmp_path: Path, data_dir: Path, dev_key: DevKey, upstream_url: str
) -> None:
    root = policy_set(tmp_path, DEVELOPERS)
    async with gateway_for(data_dir, upstream_url, root) as (base, _):
        err, sc = await call(base, mint(dev_key, base, groups=("admins",)), "echo", {"text": "x"})
        assert err and sc is not None and sc["reasons"][0]["policy"] == "default-deny"
    (root / "entities.json").write_text(
        json.dumps(
            [{"uid": {"type": "Group", "id": "admins"}, "parents": [{"type": "Group", "id": "developers"}]}]
        )
    )
    async with gateway_for(data_dir, upstream_url, root) as (base, _):
        assert await call(base, mint(dev_key, base, groups=("admins",)), "echo", {"text": "x"}) == (
            False,
            {"result": "x"},
        )


# Hot reload -------------------------------------------------------------------------------------


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


async def test_reload_good_change_applies_and_bad_change_keeps_the_old_set(
    tmp_path: Path, data_dir: Path, dev_key: DevKey, upstream_url: str
) -> None:
    root = policy_set(tmp_path, DEVELOPERS)
    async with (
        gateway_for(data_dir, upstream_url, root, watch=True, watch_interval_s=0.05) as (base, gw),
        httpx.AsyncClient(timeout=10) as http,
    ):
        tok = mint(dev_key, base)
        v1 = gw.policy.version if gw.policy else ""
        assert (await call(base, tok, "echo", {"text": "a"}))[0] is False
        before = metric((await http.get(f"{base}/metrics")).text, "bastion_policy_reload_failures_total")

        # A good change: the next call is decided by the new set, no restart.
        forbid = (
            '@id("no-echo") @reason("echo is switched off") '
            'forbid(principal, action, resource == Tool::"demo/echo");\n'
        )
        (root / "p.cedar").write_text(DEVELOPERS + forbid)
        await wait_for(lambda: gw.policy is not None and gw.policy.version != v1)
        v2 = gw.policy.version if gw.policy else ""
        err, sc = await call(base, tok, "echo", {"text": "b"})
        assert err and sc is not None and sc["reasons"][0]["policy"] == "no-echo"
        rows = [r.to_json() async for r in gw.store.iter_records()] if gw.store else []
        assert next(r for r in rows if r["id"] == sc["audit_id"])["decision"]["policy_version"] == v2

        # A bad change (unknown attribute): refused, reported, and the v2 set keeps deciding.
        (root / "p.cedar").write_text(
            DEVELOPERS + forbid + 'permit(principal, action, resource) when { principal.grups == "x" };\n'
        )
        watcher = gw.policy_watcher
        assert watcher is not None
        await wait_for(lambda: watcher.error is not None)
        assert gw.policy is not None and gw.policy.version == v2
        err, sc = await call(base, tok, "echo", {"text": "c"})
        assert err and sc is not None and sc["reasons"][0]["policy"] == "no-echo"
        ready = await http.get(f"{base}/readyz")
        assert ready.status_code == 200
        body = ready.json()
        assert body["policy_reload"]["status"] == "refused"
        assert body["policy_reload"]["active_version"] == v2
        assert "p.cedar:3:54: attribute `grups`" in body["policy_reload"]["error"]
        text = (await http.get(f"{base}/metrics")).text
        assert metric(text, "bastion_policy_reload_failures_total") == before + 1
        assert metric(text, "bastion_policy_reload_refused") == 1
        assert f'bastion_policy_info{{version="{v2}"}} 1.0' in text

        # An empty set is a misconfiguration, never "deny everything" or "allow everything".
        (root / "p.cedar").write_text("// emptied by mistake\n")
        await wait_for(lambda: watcher.failures == 2)
        assert gw.policy is not None and gw.policy.version == v2

        # Fixing the files clears the report.
        (root / "p.cedar").write_text(DEVELOPERS)
        await wait_for(lambda: watcher.error is None)
        assert (await call(base, tok, "echo", {"text": "d"}))[0] is False
        body = (await http.get(f"{base}/readyz")).json()
        assert body["policy_reload"]["status"] == "ok"
        assert f'version="{v2}"' not in (await http.get(f"{base}/metrics")).text


# bastion explain --------------------------------------------------------------------------------


async def test_explain_reports_the_decision_without_forwarding(
    tmp_path: Path, data_dir: Path, dev_key: DevKey, upstream_url: str
) -> None:
    text = DEVELOPERS + (
        '@id("redact-notes") @reason("notes may hold PII") @obligation("redact") '
        'permit(principal, action, resource == Tool::"demo/read_note");\n'
        '@id("approve-big") @reason("a human signs off") @obligation("approval") '
        'permit(principal, action, resource == Tool::"demo/transfer") '
        "when { context.args has amount && context.args.amount > 100 };\n"
        '@id("no-delete") @reason("nobody deletes") '
        'forbid(principal, action, resource == Tool::"demo/delete_note");\n'
    )
    root = policy_set(tmp_path / "set", text)
    cfg = make_config(tmp_path / "state", {"demo": upstream_url}, free_port(), root)
    base = cfg.listen.base_url
    tok = mint(dev_key, base)
    dev_jwks = data_dir / "dev-jwks.json"
    cfg = cfg.model_copy(
        update={
            "identity": cfg.identity.model_copy(
                update={
                    "issuers": [i.model_copy(update={"jwks_file": dev_jwks}) for i in cfg.identity.issuers]
                }
            )
        }
    )

    out = await explain(cfg, tok, "demo", "transfer", {"amount": 5000, "to": "bob"})
    assert out["forwarded"] is False
    assert out["policy"]["effect"] == "approval_required"
    assert out["policy"]["obligations"] == ["approval"]
    deciding = {p["id"]: p for p in out["policy"]["policies"]}
    assert deciding["approve-big"]["source"] == f"{root / 'p.cedar'}:3:1"
    assert deciding["approve-big"]["reason"] == "a human signs off"
    assert out["decision"]["stage"] == "policy"
    assert out["principal"]["sub"] == "dev"

    out = await explain(cfg, tok, "demo", "read_note", {"name": "x"})
    assert out["policy"]["effect"] == "transform" and out["policy"]["obligations"] == ["redact"]

    out = await explain(cfg, tok, "demo", "delete_note", {"name": "x"})
    assert out["decision"]["effect"] == "deny"
    assert out["decision"]["reasons"] == [{"policy": "no-delete", "reason": "nobody deletes"}]
    assert out["errors"] == []

    out = await explain(cfg, tok, "demo", "add", {"a": "one", "b": 2})
    assert out["decision"]["effect"] == "deny" and out["errors"][0].startswith("invalid-arguments: ")

    out = await explain(cfg, tok + "x", "demo", "echo", {})
    assert out["decision"]["stage"] == "identity" and out["decision"]["effect"] == "deny"
    assert out["principal"] is None

    # An allowed delete is explained, not forwarded: the upstream still has the note afterwards.
    dev_root = policy_set(tmp_path / "dev", DEVELOPERS)
    out = await explain(
        cfg.model_copy(update={"policy": cfg.policy.model_copy(update={"dir": dev_root})}),
        tok,
        "demo",
        "delete_note",
        {"name": "welcome"},
    )
    assert out["decision"]["effect"] == "allow" and out["forwarded"] is False
    async with gateway_for(data_dir, upstream_url, dev_root) as (b2, _):
        assert await call(b2, mint(dev_key, b2), "read_note", {"name": "welcome"}) == (
            False,
            {"result": welcome_note()},
        )


async def test_explain_cli_in_a_subprocess(
    tmp_path: Path, data_dir: Path, dev_key: DevKey, upstream_url: str
) -> None:
    root = policy_set(tmp_path / "set", DEVELOPERS)
    port = free_port()
    config = {
        "listen": {"port": port},
        "identity": {"issuers": [{"issuer": "bastion-dev", "jwks_file": str(data_dir / "dev-jwks.json")}]},
        "policy": {"dir": str(root)},
        "upstreams": {"demo": {"url": upstream_url, "tools": TOOLS}},
        "audit": {"url": f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"},
        "state": {"url": f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"},
        "data_dir": str(tmp_path / "data"),
    }
    (tmp_path / "bastion.yaml").write_text(yaml.safe_dump(config))
    tok = dev_key.mint("dev", groups=["developers"], audience=f"http://127.0.0.1:{port}/mcp/demo")
    argv = [sys.executable, "-m", "gateway.cli", "explain", "--config", str(tmp_path / "bastion.yaml")]
    argv += ["--token", tok, "--tool", "demo/echo", "--args", '{"text": "hi"}']
    proc = await asyncio.to_thread(
        subprocess.run,
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path.cwd())},
    )
    assert proc.returncode == 0, proc.stderr
    assert "decision:  ALLOW (decided by stage: policy)" in proc.stdout
    assert f"permit devs: developers may use demo  [{root / 'p.cedar'}:1:1]" in proc.stdout
    assert "not forwarded" in proc.stdout
    bad = await asyncio.to_thread(
        subprocess.run, [*argv[:-4], "--tool", "nope/echo"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "no upstream named 'nope'" in bad.stderr


@pytest.fixture(autouse=True)
def _quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING")
