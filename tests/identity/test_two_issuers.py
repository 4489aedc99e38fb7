"""Two issuers minting the same subject, through a real Bastion: two users, unless merged on purpose.

Issuer A is the first (bare ids), B is another (`<B>#<sub>`), C is merged onto A with
`identity.same_identity`, and an API key carries an admin's subject. Budgets, Cedar, the admin
API and approvals must each tell them apart; admin endpoints take only tokens meant for the
gateway itself, never one an upstream's client obtained for that upstream.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import POLICIES, free_port, running, running_gateway

from gateway import config as config_mod
from gateway.app import Gateway
from gateway.cli.policy import explain, render
from gateway.demo import demo_server
from gateway.identity.apikeys import new_key
from gateway.identity.devkeys import SigningKey, generate_key

A, B, C = "https://idp-a.test", "https://idp-b.test", "https://idp-c.test"
KEYS = {
    A: generate_key("ES256", kid="a-1"),
    B: generate_key("ES256", kid="b-1"),
    C: generate_key("ES256", kid="c-1"),
}
ROOT_KEY, ROOT_PREFIX, ROOT_SHA = new_key()
ALICE_KEY, ALICE_PREFIX, ALICE_SHA = new_key()

POLICY = f"""
@id("first-issuers-alice-adds")
permit (principal == User::"alice", action == Action::"call_tool", resource == Tool::"demo/add");

@id("echo-to-a-human")
@reason("this echo needs a human")
@obligation("approval")
permit (principal in Group::"developers", action == Action::"call_tool", resource == Tool::"demo/echo")
when {{ context.args has text && context.args.text == "needs approval" }};

@id("root-approves")
permit (principal == User::"root", action == Action::"approve", resource);

@id("partner-bob-approves")
permit (principal == User::"{B}#bob", action == Action::"approve", resource);
"""


@dataclass
class Env:
    base: str
    gw: Gateway
    http: httpx.AsyncClient

    def token(
        self, issuer: str, sub: str, groups: tuple[str, ...] = ("developers",), aud: str | None = None
    ) -> str:
        return KEYS[issuer].mint(sub, audience=aud or self.base, groups=groups, issuer=issuer)

    async def call(self, token: str, tool: str = "echo", **args: Any) -> httpx.Response:
        body = {"upstream": "demo", "tool": tool, "arguments": args or {"text": "hi"}}
        return await self.http.post(
            f"{self.base}/v1/tool-calls", json=body, headers={"authorization": f"Bearer {token}"}
        )

    async def admin(self, method: str, path: str, token: str) -> httpx.Response:
        headers = {"authorization": f"Bearer {token}"}
        return await self.http.request(method, f"{self.base}{path}", headers=headers)

    async def record(self, audit_id: str) -> dict[str, Any]:
        assert self.gw.store is not None
        async for r in self.gw.store.iter_records():
            if r.id == audit_id:
                return r.to_json()
        raise AssertionError(f"no audit record {audit_id}")


def jwks_file(tmp: Path, key: SigningKey) -> str:
    path = tmp / f"{key.kid}.json"
    path.write_text(json.dumps(key.jwks))
    return str(path)


@pytest.fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    tmp = tmp_path_factory.mktemp("two-issuers")
    policies = tmp / "policies"
    shutil.copytree(POLICIES, policies)
    (policies / "identities.cedar").write_text(POLICY)
    upstream = demo_server().streamable_http_app(streamable_http_path="/mcp")
    async with running(upstream, lifespan="on") as up_url:
        data: dict[str, Any] = {
            "listen": {"host": "127.0.0.1", "port": free_port()},
            "policy": {"dir": str(policies)},
            "audit": {"url": f"sqlite+aiosqlite:///{tmp / 'audit.db'}"},
            "state": {"url": f"sqlite+aiosqlite:///{tmp / 'state.db'}"},
            "data_dir": str(tmp),
            "identity": {
                "issuers": [{"issuer": i, "jwks_file": jwks_file(tmp, k)} for i, k in KEYS.items()],
                "same_identity": [[A, C]],
                "api_keys": [
                    {"prefix": ROOT_PREFIX, "sha256": ROOT_SHA, "sub": "root", "groups": ["developers"]},
                    {"prefix": ALICE_PREFIX, "sha256": ALICE_SHA, "sub": "alice"},
                ],
            },
            "admin": {"subjects": ["root", f"{B}#bob"]},
            "budgets": [
                {"name": "echo-per-user", "match": {"tools": ["demo/echo"]}, "limit": 2, "window": "1d"}
            ],
            "upstreams": {"demo": {"url": f"{up_url}/mcp"}},
        }
        cfg = config_mod.parse(data, tmp)
        async with running_gateway(cfg) as (base, gw), httpx.AsyncClient(timeout=10) as http:
            yield Env(base, gw, http)


async def statuses(e: Env, token: str, n: int) -> list[int]:
    return [(await e.call(token, text=f"call {i}")).status_code for i in range(n)]


async def usage(e: Env) -> dict[str, int]:
    r = await e.admin("GET", "/v1/budgets", e.token(A, "root"))
    assert r.status_code == 200, r.text
    return {row["subject"]: row["used"] for row in r.json()["budgets"]}


# --- budgets -----------------------------------------------------------------------------------


async def test_two_issuers_alice_have_separate_budgets(env: Env) -> None:
    assert await statuses(env, env.token(A, "alice"), 3) == [200, 200, 429]
    assert await statuses(env, env.token(B, "alice"), 3) == [200, 200, 429], "B's alice has her own"
    used = await usage(env)
    assert used["user=alice"] == 2 and used[f"user={B}#alice"] == 2


async def test_merged_issuers_share_one_budget(env: Env) -> None:
    assert await statuses(env, env.token(A, "carol"), 1) == [200]
    assert await statuses(env, env.token(C, "carol"), 2) == [200, 429], "C's carol is A's carol"
    used = await usage(env)
    assert used["user=carol"] == 2 and not any("carol" in s and s != "user=carol" for s in used)


async def test_budget_view_filters_by_a_qualified_user(env: Env) -> None:
    await statuses(env, env.token(B, "erin"), 1)
    root = env.token(A, "root")
    r = await env.admin("GET", f"/v1/budgets?user={B}%23erin", root)
    assert [row["subject"] for row in r.json()["budgets"]] == [f"user={B}#erin"]
    assert (await env.admin("GET", "/v1/budgets?user=erin", root)).json()["budgets"] == []
    bad = await env.admin("GET", "/v1/budgets?user=https://nowhere%23erin", root)
    assert bad.status_code == 400 and "not a configured issuer" in bad.json()["message"]


# --- Cedar and the audit record ----------------------------------------------------------------


async def test_a_policy_on_user_alice_is_the_first_issuers_alice_only(env: Env) -> None:
    first = await env.call(env.token(A, "alice", groups=()), "add", a=1, b=2)
    assert first.status_code == 200 and first.json()["decision"] == "allow"
    assert (await env.record(first.json()["audit_id"]))["user"] == "alice"

    other = await env.call(env.token(B, "alice", groups=()), "add", a=1, b=2)
    assert other.status_code == 403 and other.json()["reasons"][0]["policy"] == "default-deny"
    assert (await env.record(other.json()["audit_id"]))["user"] == f"{B}#alice"

    key = await env.call(ALICE_KEY, "add", a=1, b=2)
    assert key.status_code == 403, 'an API key with subject alice is not User::"alice"'
    assert (await env.record(key.json()["audit_id"]))["user"] == "bastion:api-key#alice"

    merged = await env.call(env.token(C, "alice", groups=()), "add", a=1, b=2)
    assert merged.status_code == 200, 'C is merged onto A: its alice is User::"alice"'


# --- admin rights ------------------------------------------------------------------------------


async def test_admin_rights_follow_the_id_not_the_subject(env: Env) -> None:
    assert (await env.admin("GET", "/v1/budgets", env.token(A, "root"))).status_code == 200
    assert (await env.admin("GET", "/v1/budgets", env.token(C, "root"))).status_code == 200, "merged"
    for impostor in (env.token(B, "root"), ROOT_KEY, env.token(A, "bob")):
        r = await env.admin("GET", "/v1/budgets", impostor)
        assert r.status_code == 403 and "not an admin" in r.json()["message"]
        assert (await env.admin("GET", "/v1/approvals", impostor)).status_code == 403
    assert (await env.admin("GET", "/v1/approvals", env.token(B, "bob"))).status_code == 200


@pytest.mark.parametrize(
    "path", ["/v1/budgets", "/v1/approvals", "/v1/approvals/some-id", "/approvals/some-id"]
)
async def test_admin_api_refuses_a_token_meant_for_an_upstream(env: Env, path: str) -> None:
    for_upstream = env.token(A, "root", aud=f"{env.base}/mcp/demo")
    assert (await env.call(for_upstream, "add", a=1, b=2)).status_code == 200, "good for the upstream"
    r = await env.admin("GET", path, for_upstream)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == (
        f'Bearer resource_metadata="{env.base}/.well-known/oauth-protected-resource", '
        f'error="invalid_token", error_description="audience not accepted: the admin API needs a token '
        f'meant for {env.base}"'
    )
    assert (await env.admin("GET", path, env.token(A, "root"))).status_code in (200, 404)


# --- approvals ---------------------------------------------------------------------------------


async def held(env: Env, token: str) -> str:
    r = await env.call(token, text="needs approval")
    assert r.status_code == 202, r.text
    return str(r.json()["approval_id"])


async def test_approvals_are_decided_by_id(env: Env) -> None:
    approval = await held(env, env.token(A, "dave"))
    denied = await env.admin("POST", f"/v1/approvals/{approval}/approve", env.token(B, "root"))
    assert denied.status_code == 403, "B's root is not the admin root"
    ok = await env.admin("POST", f"/v1/approvals/{approval}/approve", env.token(A, "root"))
    assert ok.status_code == 200 and ok.json()["decided_by"] == "root"

    other = await held(env, env.token(A, "frank"))
    ok = await env.admin("POST", f"/v1/approvals/{other}/approve", env.token(B, "bob"))
    assert ok.status_code == 200 and ok.json()["decided_by"] == f"{B}#bob"


async def test_a_merged_identity_cannot_approve_its_own_call(env: Env) -> None:
    caller = env.token(C, "root")
    approval = await held(env, caller)
    own = await env.admin("POST", f"/v1/approvals/{approval}/approve", env.token(A, "root"))
    assert own.status_code == 403 and "their own call" in own.json()["message"]
    ok = await env.admin("POST", f"/v1/approvals/{approval}/approve", env.token(B, "bob"))
    assert ok.status_code == 200
    ran = await env.call(caller, text="needs approval")
    assert ran.status_code == 200 and ran.json()["decision"] == "allow"


# --- bastion explain ---------------------------------------------------------------------------


async def test_explain_names_the_principal_by_its_id(env: Env, tmp_path: Path) -> None:
    cfg = env.gw.cfg.model_copy(
        update={
            "audit": env.gw.cfg.audit.model_copy(update={"url": f"sqlite+aiosqlite:///{tmp_path / 'a.db'}"}),
            "state": env.gw.cfg.state.model_copy(update={"url": f"sqlite+aiosqlite:///{tmp_path / 's.db'}"}),
        }
    )
    partner = await explain(cfg, env.token(B, "alice", groups=()), "demo", "add", {"a": 1, "b": 2})
    assert partner["principal"]["id"] == f"{B}#alice" and partner["decision"]["effect"] == "deny"
    assert f'principal: User::"{B}#alice" (sub "alice" of {B}) groups=[]' in render(partner)
    first = await explain(cfg, env.token(A, "alice", groups=()), "demo", "add", {"a": 1, "b": 2})
    assert first["principal"]["id"] == "alice" and first["decision"]["effect"] == "allow"
    assert 'principal: User::"alice" groups=[]' in render(first)
