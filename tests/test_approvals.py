"""Human approval of held calls, through the real gateway, a real upstream that counts executions,
real tokens and Cedar, the real CLI in a subprocess and the real state and audit databases."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
import yaml
from conftest import POLICIES, REPO, free_port, running, running_gateway
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer
from sqlalchemy import insert, update
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from audit.record import canonical_json, new_id
from gateway import config as config_mod
from gateway.app import Gateway
from gateway.call import Principal, ToolCall
from gateway.identity.devkeys import DEV_ISSUER, DevKey, ensure_dev_key
from gateway.state.approvals import approvals_table

POLICY = """
@id("finance-pay")
@reason("finance may pay")
permit (principal in Group::"finance", action in [Action::"call_tool", Action::"list_tools"],
        resource == Tool::"bank/pay");

@id("large-payments-need-approval")
@reason("payments above 100 need a human")
@obligation("approval")
permit (principal in Group::"finance", action == Action::"call_tool", resource == Tool::"bank/pay")
when { context.args has amount && context.args.amount > 100 };
"""

EXECUTED: list[dict[str, Any]] = []
HOOKED: list[tuple[str, bytes]] = []
HOOK_KEY = b"webhook-test-key"


async def hook(request: Request) -> Response:
    HOOKED.append((request.headers.get("x-bastion-signature", ""), await request.body()))
    return Response(status_code=204)


def bank_server() -> MCPServer:
    srv = MCPServer("bank")

    @srv.tool()
    def pay(amount: int, to: str) -> str:
        """Move money (the test counts every execution)."""
        EXECUTED.append({"amount": amount, "to": to})
        return f"paid {amount} to {to}"

    return srv


class Env:
    def __init__(self, base: str, gw: Gateway, key: DevKey, cfg_file: Path) -> None:
        self.base, self.gw, self.key, self.cfg_file = base, gw, key, cfg_file

    def token(self, sub: str, groups: tuple[str, ...], admin: bool = False) -> str:
        aud = self.base if admin else f"{self.base}/mcp/bank"
        return self.key.mint(sub, groups=groups, audience=aud)

    async def pay(
        self,
        http: httpx.AsyncClient,
        amount: int,
        to: str = "acme",
        sub: str = "fin",
        claims: dict[str, Any] | None = None,
    ) -> httpx.Response:
        """Pay as `sub` of finance; `claims` adds to the token (`azp`: the agent, `act`: a chain)."""
        body = {"upstream": "bank", "tool": "pay", "arguments": {"amount": amount, "to": to}}
        token = self.key.mint(sub, groups=("finance",), audience=f"{self.base}/mcp/bank", extra=claims)
        headers = {"authorization": f"Bearer {token}"}
        return await http.post(f"{self.base}/v1/tool-calls", json=body, headers=headers)

    def admin(self, sub: str = "root", groups: tuple[str, ...] = ("admins",)) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token(sub, groups, admin=True)}"}

    async def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The real CLI in a subprocess, without blocking the loop that serves its webhook."""
        proc = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "gateway.cli", "approvals", *args, "--config", str(self.cfg_file)],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=REPO,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())

    async def audit(self) -> list[dict[str, Any]]:
        assert self.gw.store is not None and self.gw.writer is not None
        return [r.to_json() async for r in self.gw.store.iter_records()]


@pytest.fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    root = tmp_path_factory.mktemp("approvals")
    policies = root / "policies"
    policies.mkdir()
    for name in ("schema.cedarschema", "demo.cedar"):
        (policies / name).write_text((POLICIES / name).read_text())
    (policies / "bank.cedar").write_text(POLICY)
    key = ensure_dev_key(root)
    app = bank_server().streamable_http_app(streamable_http_path="/mcp")
    (root / "hook.key").write_bytes(HOOK_KEY)
    receiver = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    async with running(app, lifespan="on") as url, running(receiver) as hook_url:
        port = free_port()
        data = {
            "listen": {"host": "127.0.0.1", "port": port},
            "identity": {"issuers": [{"issuer": DEV_ISSUER, "jwks_file": str(root / "dev-jwks.json")}]},
            "policy": {"dir": str(policies), "watch": False},
            "upstreams": {"bank": {"url": f"{url}/mcp", "tools": {"pay": {"risk": "external"}}}},
            "audit": {"url": f"sqlite+aiosqlite:///{root / 'audit.db'}"},
            "state": {"url": f"sqlite+aiosqlite:///{root / 'state.db'}"},
            "admin": {"groups": ["admins", "auditors"]},
            "approvals": {
                "ttl_s": 600,
                "approvers": "the payments desk",
                "webhook": {"url": f"{hook_url}/hook", "secret_file": "hook.key"},
            },
            "data_dir": str(root),
        }
        cfg_file = root / "bastion.yaml"
        cfg_file.write_text(yaml.safe_dump(data))
        async with running_gateway(config_mod.load(cfg_file)) as (base, gw):
            yield Env(base, gw, key, cfg_file)


def held_id(resp: httpx.Response) -> str:
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert body["decision"] == "approval_required"
    assert body["approvers"] == "the payments desk"
    assert body["approval_url"].endswith(f"/approvals/{body['approval_id']}")
    return str(body["approval_id"])


async def test_small_payment_runs_without_approval(env: Env, http: httpx.AsyncClient) -> None:
    before = len(EXECUTED)
    resp = await env.pay(http, 5, "small")
    assert resp.status_code == 200, resp.text
    assert len(EXECUTED) == before + 1


async def test_held_then_approved_over_http_runs_exactly_once(env: Env, http: httpx.AsyncClient) -> None:
    before = len(EXECUTED)
    approval = held_id(await env.pay(http, 500, "http-approve"))
    assert len(EXECUTED) == before  # held: nothing forwarded
    again = await env.pay(http, 500, "http-approve")
    assert held_id(again) == approval  # the repeat waits on the same request
    assert len(EXECUTED) == before

    listed = await http.get(f"{env.base}/v1/approvals?status=pending", headers=env.admin())
    assert approval in [a["id"] for a in listed.json()["approvals"]]
    ok = await http.post(
        f"{env.base}/v1/approvals/{approval}/approve", json={"reason": "invoice 42"}, headers=env.admin()
    )
    assert ok.status_code == 200, ok.text
    assert ok.json()["status"] == "approved" and ok.json()["decided_by"] == "root"

    ran = await env.pay(http, 500, "http-approve")
    assert ran.status_code == 200, ran.text
    assert len(EXECUTED) == before + 1 and EXECUTED[-1] == {"amount": 500, "to": "http-approve"}

    replay = await env.pay(http, 500, "http-approve")  # used up: held again, as a new request
    assert held_id(replay) != approval
    assert len(EXECUTED) == before + 1

    shown = (await http.get(f"{env.base}/v1/approvals/{approval}", headers=env.admin())).json()
    assert shown["status"] == "consumed" and shown["used_by_audit_id"] == ran.json()["audit_id"]

    records = {r["id"]: r for r in await env.audit()}
    first = records[shown["audit_id"]]  # the held call's own record
    assert f"approval required: {approval}" in json.dumps(first["decision"])
    assert first["decision"]["effect"] == "approval_required" and first["outcome"]["status"] == "held"
    assert first["args_redacted"] == {"amount": 500, "to": "http-approve"}  # values, nothing to redact
    used = records[ran.json()["audit_id"]]
    assert used["decision"]["effect"] == "allow" and used["outcome"]["status"] == "completed"
    assert any(approval in r["reason"] for r in used["decision"]["reasons"])
    event = next(r for r in records.values() if r["action"] == "approve" and r["call_id"] == approval)
    assert event["user"] == "root" and event["outcome"]["status"] == "approved"
    assert first["id"] in event["decision"]["reasons"][0]["reason"]
    assert "invoice 42" in event["decision"]["reasons"][0]["reason"]


async def test_approved_via_cli_runs_once_and_changed_arguments_are_held(
    env: Env, http: httpx.AsyncClient
) -> None:
    before = len(EXECUTED)
    approval = held_id(await env.pay(http, 700, "cli"))
    listed = await env.cli("list", "--status", "pending", "--json")
    assert listed.returncode == 0, listed.stderr
    assert approval in listed.stdout
    done = await env.cli("approve", approval, "--reason", "checked", "--by", "cli:ops")
    assert done.returncode == 0, done.stderr
    assert "approved" in done.stdout
    again = await env.cli("deny", approval)
    assert again.returncode == 1 and "already approved" in again.stderr

    changed = await env.pay(http, 701, "cli")  # a changed argument needs its own approval
    assert held_id(changed) != approval
    other_user = await env.pay(http, 700, "cli", sub="someone-else")
    assert held_id(other_user) != approval
    assert len(EXECUTED) == before

    ran = await env.pay(http, 700, "cli")
    assert ran.status_code == 200, ran.text
    assert len(EXECUTED) == before + 1
    assert held_id(await env.pay(http, 700, "cli")) != approval
    assert len(EXECUTED) == before + 1

    shown = await env.cli("show", approval)
    assert shown.returncode == 0 and json.loads(shown.stdout)["status"] == "consumed"
    records = await env.audit()
    event = next(r for r in records if r["action"] == "approve" and r["call_id"] == approval)
    assert event["user"] == "cli:ops" and event["protocol"] == "cli"
    verify = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "gateway.cli", "audit", "verify", "--config", str(env.cfg_file)],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=REPO,
    )
    out, _ = await asyncio.wait_for(verify.communicate(), 60)
    assert verify.returncode == 0, out.decode()  # the CLI's records chain on their own


async def test_denial_is_final(env: Env, http: httpx.AsyncClient) -> None:
    before = len(EXECUTED)
    approval = held_id(await env.pay(http, 900, "deny-me"))
    no = await http.post(
        f"{env.base}/v1/approvals/{approval}/deny", json={"reason": "not this vendor"}, headers=env.admin()
    )
    assert no.status_code == 200 and no.json()["status"] == "denied"
    late = await http.post(f"{env.base}/v1/approvals/{approval}/approve", headers=env.admin())
    assert late.status_code == 409 and "already denied" in late.json()["message"]
    retry = await env.pay(http, 900, "deny-me")
    assert retry.status_code == 403, retry.text
    assert "not this vendor" in json.dumps(retry.json()["reasons"])
    assert len(EXECUTED) == before


async def test_expiry(env: Env, http: httpx.AsyncClient) -> None:
    before = len(EXECUTED)
    approval = held_id(await env.pay(http, 321, "expire"))
    ok = await http.post(f"{env.base}/v1/approvals/{approval}/approve", headers=env.admin())
    assert ok.status_code == 200
    assert env.gw.state is not None
    async with env.gw.state.begin() as conn:  # the TTL runs out
        await conn.execute(
            update(approvals_table).where(approvals_table.c.id == approval).values(expires_ms=1)
        )
    resp = await env.pay(http, 321, "expire")
    assert held_id(resp) != approval  # an expired approval is never used
    assert len(EXECUTED) == before
    shown = (await http.get(f"{env.base}/v1/approvals/{approval}", headers=env.admin())).json()
    assert shown["status"] == "expired"
    late = await http.post(f"{env.base}/v1/approvals/{held_id(resp)}/deny", headers=env.admin())
    assert late.status_code == 200
    records = await env.audit()
    assert any(
        r["action"] == "approve" and r["outcome"]["status"] == "expired" and r["call_id"] == approval
        for r in records
    )


async def test_unauthorised_approvers_are_refused(env: Env, http: httpx.AsyncClient) -> None:
    approval = held_id(await env.pay(http, 444, "unauthorised"))
    url = f"{env.base}/v1/approvals/{approval}/approve"
    not_admin = await http.post(url, headers=env.admin("fin2", ("finance",)))
    assert not_admin.status_code == 403 and "not an admin" in not_admin.text
    no_token = await http.post(url)
    assert no_token.status_code == 401
    auditor = await http.post(url, headers=env.admin("aud", ("auditors",)))  # admin, but Cedar says no
    assert auditor.status_code == 403 and "may not approve" in auditor.json()["message"]
    own = await http.post(url, headers=env.admin("fin", ("admins",)))  # the requester itself
    assert own.status_code == 403 and "their own call" in own.json()["message"]
    shown = (await http.get(f"{env.base}/v1/approvals/{approval}", headers=env.admin())).json()
    assert shown["status"] == "pending"


async def test_page_renders_and_its_form_approves(env: Env, http: httpx.AsyncClient) -> None:
    before = len(EXECUTED)
    approval = held_id(await env.pay(http, 999, "page<script>"))
    page = await http.get(f"{env.base}/approvals/{approval}", headers=env.admin())
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    text = page.text
    for expected in ("fin", "bank/pay", "payments above 100 need a human", "&quot;amount&quot;", "pending"):
        assert expected in text, expected
    assert "<script>" not in text and "page<script>" not in text  # redacted/escaped, never raw
    assert "<form" in text and "javascript" not in text.lower()
    token = text.split('name="token" value="')[1].split('"')[0]
    assert (await http.get(f"{env.base}/approvals/{approval}")).status_code == 401

    form = {"token": token, "decision": "approve", "reason": "ok by page"}
    forged = await http.post(
        f"{env.base}/approvals/{approval}",
        data=form,
        headers=env.admin() | {"origin": "https://evil.example"},
    )
    assert forged.status_code == 403
    wrong = await http.post(
        f"{env.base}/approvals/{approval}", data=form | {"token": "0" * 64}, headers=env.admin()
    )
    assert wrong.status_code == 403
    other = await http.post(f"{env.base}/approvals/{approval}", data=form, headers=env.admin("root2"))
    assert other.status_code == 403  # the form token is bound to the approver who loaded the page
    done = await http.post(f"{env.base}/approvals/{approval}", data=form, headers=env.admin())
    assert done.status_code == 200 and "approved by root" in done.text
    assert (await env.pay(http, 999, "page<script>")).status_code == 200
    assert len(EXECUTED) == before + 1


async def test_mcp_client_is_told_in_protocol(env: Env) -> None:
    before = len(EXECUTED)
    token = env.token("fin", ("finance",))
    async with (
        httpx2.AsyncClient(headers={"authorization": f"Bearer {token}"}, timeout=10) as hc,
        Client(streamable_http_client(f"{env.base}/mcp/bank", http_client=hc), mode="2026-07-28") as client,
    ):
        held = await client.call_tool("pay", {"amount": 998, "to": "mcp"})
        assert held.is_error
        text = held.content[0].text  # type: ignore[union-attr]
        structured = held.structured_content or (held.meta or {}).get("bastion/decision") or {}
        approval = structured["approval_id"]
        assert text.startswith(f"approval required: {approval}; ask the payments desk")
        assert structured["decision"] == "approval_required"
        assert structured["approval_url"] == f"{env.base}/approvals/{approval}"
        assert len(EXECUTED) == before
        done = await env.cli("approve", approval)
        assert done.returncode == 0, done.stderr
        ran = await client.call_tool("pay", {"amount": 998, "to": "mcp"})
        assert not ran.is_error
        assert len(EXECUTED) == before + 1


async def test_webhook_events_are_signed(env: Env, http: httpx.AsyncClient) -> None:
    approval = held_id(await env.pay(http, 222, "hooked"))
    ok = await http.post(f"{env.base}/v1/approvals/{approval}/approve", headers=env.admin())
    assert ok.status_code == 200
    assert (await env.pay(http, 222, "hooked")).status_code == 200
    events: dict[str, dict[str, Any]] = {}
    for _ in range(200):
        for signature, body in HOOKED:
            expected = "sha256=" + hmac.new(HOOK_KEY, body, hashlib.sha256).hexdigest()
            assert hmac.compare_digest(signature, expected), "every delivery carries a valid signature"
            event = json.loads(body)
            if event["approval"]["id"] == approval:
                events[event["event"]] = event
        if len(events) == 3:
            break
        await asyncio.sleep(0.02)
    assert set(events) == {"requested", "approved", "consumed"}
    assert events["approved"]["by"] == "root"
    assert events["requested"]["approval"]["url"] == f"{env.base}/approvals/{approval}"
    tampered = HOOKED[0][1].replace(b"requested", b"approved!")
    assert hmac.new(HOOK_KEY, tampered, hashlib.sha256).hexdigest() not in HOOKED[0][0]


async def test_a_twin_request_does_not_hide_an_approval(env: Env, http: httpx.AsyncClient) -> None:
    """Two identical calls held at the same moment may each store a request. Whichever of the
    two an approver decides, the identical call sees that decision, not the undecided twin."""
    before = len(EXECUTED)
    first = held_id(await env.pay(http, 510, "twins"))
    assert env.gw.approvals is not None
    fin = Principal(sub="fin", issuer=DEV_ISSUER)
    twin = await env.gw.approvals.request(
        ToolCall("bank", "pay", {"amount": 510, "to": "twins"}, principal=fin), [], None
    )
    assert twin.id != first and twin.status == "pending"

    ok = await http.post(f"{env.base}/v1/approvals/{first}/approve", headers=env.admin())  # the older one
    assert ok.status_code == 200, ok.text
    ran = await env.pay(http, 510, "twins")
    assert ran.status_code == 200, ran.text
    assert EXECUTED[before:] == [{"amount": 510, "to": "twins"}]

    # and a denial of either twin refuses the call, even while the other one is still pending
    first = held_id(await env.pay(http, 520, "twins"))
    twin = await env.gw.approvals.request(
        ToolCall("bank", "pay", {"amount": 520, "to": "twins"}, principal=fin), [], None
    )
    no = await http.post(f"{env.base}/v1/approvals/{first}/deny", headers=env.admin())
    assert no.status_code == 200, no.text
    refused = await env.pay(http, 520, "twins")
    assert refused.status_code == 403, refused.text
    assert EXECUTED[before:] == [{"amount": 510, "to": "twins"}]


async def test_an_approval_is_for_one_agent_and_delegation_chain(env: Env, http: httpx.AsyncClient) -> None:
    """Approved for "fin via agent-a, acting for planner": fin through another agent, another
    chain, or fin directly, is another call, held on its own request; the identical call runs."""
    before = len(EXECUTED)
    via_a = {"azp": "agent-a", "act": {"sub": "planner"}}
    approval = held_id(await env.pay(http, 730, "agents", claims=via_a))
    ok = await http.post(f"{env.base}/v1/approvals/{approval}/approve", headers=env.admin())
    assert ok.status_code == 200, ok.text
    others: list[dict[str, Any]] = [
        {"azp": "agent-b", "act": {"sub": "planner"}},  # another agent
        {"azp": "agent-a", "act": {"sub": "scheduler"}},  # another chain
        {"azp": "agent-a", "act": {"sub": "planner", "act": {"sub": "scheduler"}}},  # a longer one
        {"azp": "agent-a"},  # no chain
        {},  # fin directly
    ]
    for claims in others:
        assert held_id(await env.pay(http, 730, "agents", claims=claims)) != approval, claims
    assert len(EXECUTED) == before
    shown = (await http.get(f"{env.base}/v1/approvals/{approval}", headers=env.admin())).json()
    assert shown["status"] == "approved" and shown["agent"] == "agent-a"

    ran = await env.pay(http, 730, "agents", claims=via_a)
    assert ran.status_code == 200, ran.text
    assert EXECUTED[before:] == [{"amount": 730, "to": "agents"}]


async def test_an_approval_stored_before_agents_were_bound_is_never_used(
    env: Env, http: httpx.AsyncClient
) -> None:
    """A request stored with the binding of earlier versions (principal, tool and arguments only)
    cannot say which agent asked: it is expired, recorded, and the identical call is held anew."""
    assert env.gw.state is not None
    fin = Principal(sub="fin", issuer=DEV_ISSUER)
    now = int(time.time() * 1000)

    async def stored(status: str, amount: int) -> str:
        binding = hashlib.sha256(canonical_json([fin.key, "bank", "pay", {"amount": amount, "to": "old"}]))
        row = {
            "id": new_id(),
            "binding": binding.hexdigest(),
            "status": status,
            "subject": "fin",
            "issuer": DEV_ISSUER,
            "upstream": "bank",
            "tool": "pay",
            "args_shown": "{}",
            "reasons": "[]",
            "audit_id": new_id(),
            "created_ms": now,
            "expires_ms": now + 600_000,
        }
        assert env.gw.state is not None
        async with env.gw.state.begin() as conn:
            await conn.execute(insert(approvals_table).values(**row))
        return str(row["id"])

    before = len(EXECUTED)
    approved = await stored("approved", 740)
    pending = await stored("pending", 741)
    page = await http.get(f"{env.base}/approvals/{pending}", headers=env.admin())
    assert "<form" not in page.text and "expired" in page.text  # nothing left to decide
    late = await http.post(f"{env.base}/v1/approvals/{pending}/approve", headers=env.admin())
    assert late.status_code == 409 and "expired" in late.json()["message"]

    assert held_id(await env.pay(http, 740, "old")) != approved
    assert len(EXECUTED) == before
    for old in (approved, pending):
        shown = (await http.get(f"{env.base}/v1/approvals/{old}", headers=env.admin())).json()
        assert shown["status"] == "expired"
    records = await env.audit()
    expired = next(r for r in records if r["call_id"] == approved and r["action"] == "approve")
    assert expired["outcome"]["status"] == "expired"
    assert "without the agent and delegation chain" in expired["decision"]["reasons"][0]["reason"]
