"""Shadow mode (`policy.shadow`): a candidate set decides every call beside the live one, never
enforced; disagreements reach the audit record (`decision.shadow`) and a metric.

Each test starts its own Bastion (real uvicorn, real Cedar, real SQLite audit) in front of the
session's demo MCP server, as tests/policy/test_through_gateway.py does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import free_port, make_config

from gateway import metrics
from gateway.app import Gateway
from gateway.cli.policy import explain, render
from gateway.config import Config
from gateway.errors import ConfigError
from gateway.identity.devkeys import DevKey
from tests.policy.test_through_gateway import DEVELOPERS, call, gateway_for, mint, policy_set, wait_for

LIVE = DEVELOPERS + (
    '@id("no-secret-notes") @reason("secret notes are off limits") '
    'forbid(principal, action == Action::"call_tool", resource == Tool::"demo/read_note") '
    'when { context.args has name && context.args.name like "secret-*" };\n'
    '@id("small-sums") @reason("add only small numbers") '
    'forbid(principal, action == Action::"call_tool", resource == Tool::"demo/add") '
    "when { context.args has a && context.args.a > 100 };\n"
)
SHADOW = DEVELOPERS + (
    # loosened: no rule on secret notes; tightened: sums above 10; a new obligation on transfers
    '@id("tiny-sums") @reason("add only tiny numbers") '
    'forbid(principal, action == Action::"call_tool", resource == Tool::"demo/add") '
    "when { context.args has a && context.args.a > 10 };\n"
    '@id("approve-transfers") @reason("a human signs off") @obligation("approval") '
    'permit(principal, action, resource == Tool::"demo/transfer");\n'
)
KINDS = ("newly_denied", "newly_allowed", "changed_obligation", "error")


def counted(kind: str) -> float:
    return (
        metrics.REGISTRY.get_sample_value("bastion_policy_shadow_disagreements_total", {"kind": kind}) or 0.0
    )


def counts() -> dict[str, float]:
    return {k: counted(k) for k in KINDS}


async def tool_call(
    http: httpx.AsyncClient, base: str, token: str, tool: str, args: dict[str, Any]
) -> dict[str, Any]:
    r = await http.post(
        f"{base}/v1/tool-calls",
        json={"upstream": "demo", "tool": tool, "arguments": args},
        headers={"authorization": f"Bearer {token}"},
    )
    body: dict[str, Any] = r.json()
    assert "audit_id" in body, body
    return body


async def decisions(gw: Gateway, *ids: str) -> list[dict[str, Any]]:
    """The `decision` of each audit record named, in the order given."""
    assert gw.store is not None
    rows = {r.id: r.to_json() async for r in gw.store.iter_records()}
    return [rows[i]["decision"] for i in ids]


async def test_disagreements_are_audited_and_counted_while_the_live_set_enforces(
    tmp_path: Path, data_dir: Path, dev_key: DevKey, upstream_url: str
) -> None:
    live = policy_set(tmp_path / "live", LIVE)
    shadow = policy_set(tmp_path / "shadow", SHADOW)
    before = counts()
    async with (
        gateway_for(data_dir, upstream_url, live, shadow={"dir": str(shadow)}) as (base, gw),
        httpx.AsyncClient(timeout=10) as http,
    ):
        assert gw.shadow is not None and gw.policy is not None
        assert gw.shadow.version != gw.policy.version
        tok = mint(dev_key, base)

        agree_allow = await tool_call(http, base, tok, "echo", {"text": "x"})
        agree_small = await tool_call(http, base, tok, "add", {"a": 5, "b": 1})
        agree_deny = await tool_call(http, base, tok, "add", {"a": 500, "b": 1})
        tightened = await tool_call(http, base, tok, "add", {"a": 50, "b": 1})
        loosened = await tool_call(http, base, tok, "read_note", {"name": "secret-plans"})
        obliged = await tool_call(http, base, tok, "transfer", {"amount": 5, "to": "bob"})

        # Enforcement is the live set's alone.
        assert agree_allow["decision"] == "allow" and agree_small["decision"] == "allow"
        assert agree_deny["decision"] == "deny" and agree_deny["reasons"][0]["policy"] == "small-sums"
        assert tightened["decision"] == "allow"
        assert tightened["result"]["structuredContent"] == {"result": 51}
        assert loosened["decision"] == "deny" and loosened["reasons"][0]["policy"] == "no-secret-notes"
        assert obliged["decision"] == "allow"
        assert obliged["result"]["structuredContent"] == {"result": "transferred 5 to bob"}
        # ... through /mcp too.
        assert await call(base, tok, "add", {"a": 50, "b": 1}) == (False, {"result": 51})

        ids = [d["audit_id"] for d in (agree_allow, agree_small, agree_deny, tightened, loosened, obliged)]
        a1, a2, a3, t, lo, ob = await decisions(gw, *ids)
        assert "shadow" not in a1 and "shadow" not in a2 and "shadow" not in a3
        version = gw.shadow.version
        assert t["effect"] == "allow" and t["policy_version"] == gw.policy.version
        assert t["shadow"] == {
            "effect": "deny",
            "policy_ids": ["tiny-sums"],
            "policy_version": version,
            "kind": "newly_denied",
        }
        assert lo["effect"] == "deny"
        assert lo["shadow"] == {
            "effect": "allow",
            "policy_ids": ["devs"],
            "policy_version": version,
            "kind": "newly_allowed",
        }
        assert ob["effect"] == "allow"
        assert ob["shadow"] == {
            "effect": "approval_required",
            "policy_ids": ["approve-transfers", "devs"],
            "policy_version": version,
            "kind": "changed_obligation",
        }

        after = counts()
        assert after["newly_denied"] - before["newly_denied"] == 2  # /v1/tool-calls and /mcp
        assert after["newly_allowed"] - before["newly_allowed"] == 1
        assert after["changed_obligation"] - before["changed_obligation"] == 1
        assert after["error"] == before["error"]
        text = (await http.get(f"{base}/metrics")).text
        assert (
            f'bastion_policy_shadow_disagreements_total{{kind="newly_allowed"}} {after["newly_allowed"]}'
            in text
        )
        assert f'bastion_policy_shadow_info{{version="{version}"}} 1.0' in text


async def test_without_a_shadow_set_records_carry_none(
    tmp_path: Path, data_dir: Path, dev_key: DevKey, upstream_url: str
) -> None:
    before = counts()
    async with (
        gateway_for(data_dir, upstream_url, policy_set(tmp_path, LIVE)) as (base, gw),
        httpx.AsyncClient(timeout=10) as http,
    ):
        assert gw.shadow is None
        body = await tool_call(http, base, mint(dev_key, base), "add", {"a": 50, "b": 1})
        (decision,) = await decisions(gw, body["audit_id"])
        assert "shadow" not in decision
        assert "shadow_reload" not in (await http.get(f"{base}/readyz")).json()
    assert counts() == before


async def test_a_bad_shadow_set_stops_start_up(
    tmp_path: Path, data_dir: Path, dev_key: DevKey, upstream_url: str
) -> None:
    live = policy_set(tmp_path / "live", LIVE)
    bad = policy_set(tmp_path / "shadow", DEVELOPERS + "permit(principal, action, resource) when {\n")
    policy = {"dir": str(live), "shadow": {"dir": str(bad)}}
    gw = Gateway(make_config(data_dir, {"demo": upstream_url}, free_port(), live, policy=policy))
    try:
        with pytest.raises(ConfigError, match=r"^policy\.shadow\.dir ") as err:
            await gw.start()
        assert str(bad) in err.value.message and "p.cedar" in err.value.message
    finally:
        await gw.stop()


async def test_shadow_hot_reload_applies_changes_and_keeps_the_last_good_set(
    tmp_path: Path, data_dir: Path, dev_key: DevKey, upstream_url: str
) -> None:
    live = policy_set(tmp_path / "live", DEVELOPERS)
    shadow = policy_set(tmp_path / "shadow", DEVELOPERS)
    async with (
        gateway_for(
            data_dir, upstream_url, live, watch=True, watch_interval_s=0.05, shadow={"dir": str(shadow)}
        ) as (base, gw),
        httpx.AsyncClient(timeout=10) as http,
    ):
        tok = mint(dev_key, base)
        assert gw.shadow is not None and gw.shadow_watcher is not None
        watcher = gw.shadow_watcher
        v1 = gw.shadow.version
        live_version = gw.policy.version if gw.policy else None
        body = await tool_call(http, base, tok, "echo", {"text": "a"})
        assert "shadow" not in (await decisions(gw, body["audit_id"]))[0]

        # A good change to the shadow set: picked up, the live set untouched.
        forbid = (
            '@id("no-echo") @reason("echo is switched off") '
            'forbid(principal, action, resource == Tool::"demo/echo");\n'
        )
        (shadow / "p.cedar").write_text(DEVELOPERS + forbid)
        await wait_for(lambda: gw.shadow is not None and gw.shadow.version != v1)
        v2 = gw.shadow.version
        assert gw.policy is not None and gw.policy.version == live_version
        body = await tool_call(http, base, tok, "echo", {"text": "b"})
        assert body["decision"] == "allow"
        (decision,) = await decisions(gw, body["audit_id"])
        assert decision["shadow"]["kind"] == "newly_denied" and decision["shadow"]["policy_version"] == v2

        # A syntax error: refused, the last good shadow keeps deciding, the replica stays ready.
        refused_before = metrics.REGISTRY.get_sample_value("bastion_policy_shadow_reload_failures_total") or 0
        (shadow / "p.cedar").write_text(DEVELOPERS + forbid + "permit(principal, action, resource) when {\n")
        await wait_for(lambda: watcher.error is not None)
        assert gw.shadow.version == v2
        ready = await http.get(f"{base}/readyz")
        assert ready.status_code == 200
        status = ready.json()
        assert status["status"] == "ready"
        assert status["policy_reload"]["status"] == "ok"
        assert status["shadow_reload"]["status"] == "refused"
        assert status["shadow_reload"]["active_version"] == v2
        assert "policy.shadow.dir" in status["shadow_reload"]["error"]
        assert "p.cedar" in status["shadow_reload"]["error"]
        assert (
            metrics.REGISTRY.get_sample_value("bastion_policy_shadow_reload_failures_total")
            == refused_before + 1
        )
        assert metrics.REGISTRY.get_sample_value("bastion_policy_shadow_reload_refused") == 1
        assert metrics.REGISTRY.get_sample_value("bastion_policy_reload_refused") in (None, 0)
        body = await tool_call(http, base, tok, "echo", {"text": "c"})
        assert body["decision"] == "allow"
        (decision,) = await decisions(gw, body["audit_id"])
        assert decision["shadow"]["kind"] == "newly_denied" and decision["shadow"]["policy_version"] == v2

        # Fixing the files clears the report; an agreeing shadow leaves the records as they were.
        (shadow / "p.cedar").write_text(DEVELOPERS)
        await wait_for(lambda: watcher.error is None)
        status = (await http.get(f"{base}/readyz")).json()
        assert status["shadow_reload"]["status"] == "ok"
        assert metrics.REGISTRY.get_sample_value("bastion_policy_shadow_reload_refused") == 0
        body = await tool_call(http, base, tok, "echo", {"text": "d"})
        assert "shadow" not in (await decisions(gw, body["audit_id"]))[0]


def _explain_config(tmp_path: Path, data_dir: Path, upstream_url: str, **policy: Any) -> Config:
    live = policy_set(tmp_path / "live", LIVE)
    cfg = make_config(
        tmp_path / "state", {"demo": upstream_url}, free_port(), live, policy={"dir": str(live), **policy}
    )
    jwks = data_dir / "dev-jwks.json"
    issuers = [i.model_copy(update={"jwks_file": jwks}) for i in cfg.identity.issuers]
    return cfg.model_copy(update={"identity": cfg.identity.model_copy(update={"issuers": issuers})})


async def test_explain_shows_both_sets_and_counts_nothing(
    tmp_path: Path, data_dir: Path, dev_key: DevKey, upstream_url: str
) -> None:
    shadow = policy_set(tmp_path / "shadow", SHADOW)
    cfg = _explain_config(tmp_path, data_dir, upstream_url, shadow={"dir": str(shadow)})
    tok = mint(dev_key, cfg.listen.base_url)
    before = counts()

    out = await explain(cfg, tok, "demo", "add", {"a": 50, "b": 1})
    assert out["decision"]["effect"] == "allow" and out["policy"]["effect"] == "allow"
    assert out["shadow"]["effect"] == "deny" and out["shadow"]["kind"] == "newly_denied"
    assert [p["id"] for p in out["shadow"]["policies"]] == ["tiny-sums"]
    assert out["shadow"]["policies"][0]["source"] == f"{shadow / 'p.cedar'}:2:1"
    assert out["shadow"]["policy_version"] != out["policy_version"]
    text = render(out)
    assert "policy:    allow" in text
    version = out["shadow"]["policy_version"]
    assert f"shadow:    deny (shadow set {version}, never enforced, disagrees: newly_denied)" in text
    assert "  - forbid tiny-sums: add only tiny numbers" in text

    out = await explain(cfg, tok, "demo", "echo", {"text": "x"})
    assert out["shadow"]["effect"] == "allow" and out["shadow"]["kind"] is None
    assert "never enforced, agrees)" in render(out)

    out = await explain(cfg, tok, "demo", "transfer", {"amount": 5, "to": "bob"})
    assert out["policy"]["effect"] == "allow" and out["shadow"]["kind"] == "changed_obligation"

    out = await explain(cfg, tok + "x", "demo", "echo", {})
    assert out["shadow"] is None and "shadow:" not in render(out)
    assert counts() == before  # dry runs are decided by the shadow, never counted

    out = await explain(_explain_config(tmp_path, data_dir, upstream_url), tok, "demo", "echo", {"text": "x"})
    assert "shadow" not in out and "shadow:" not in render(out)


def test_shadow_paths_resolve_and_default_to_the_live_schema(tmp_path: Path) -> None:
    from gateway.config import parse

    (tmp_path / "live").mkdir()
    (tmp_path / "cand").mkdir()
    cfg = parse({"policy": {"dir": "live", "shadow": {"dir": "cand"}}}, tmp_path)
    shadow = cfg.policy.shadow_set()
    assert shadow is not None and shadow.dir == tmp_path / "cand" and shadow.shadow is None
    assert shadow.schema_path == tmp_path / "live" / "schema.cedarschema"  # the candidate has none
    (tmp_path / "cand" / "schema.cedarschema").write_text("")
    shadow = cfg.policy.shadow_set()
    assert shadow is not None and shadow.schema_path == tmp_path / "cand" / "schema.cedarschema"
    assert parse({"policy": {"dir": "live"}}, tmp_path).policy.shadow_set() is None
    with pytest.raises(ConfigError, match=r"policy\.shadow\.dri: unknown key"):
        parse({"policy": {"shadow": {"dir": "cand", "dri": "x"}}}, tmp_path)


@pytest.fixture(autouse=True)
def _quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING")


async def test_a_failing_shadow_never_breaks_the_call(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.call import Principal, ToolCall
    from gateway.config import PolicyConfig, ToolSettings
    from gateway.policy.engine import PolicyEngine
    from gateway.stages.policy import PolicyStage

    live = PolicyEngine.load(PolicyConfig(dir=policy_set(tmp_path / "live", LIVE)))
    shadow = PolicyEngine.load(PolicyConfig(dir=policy_set(tmp_path / "shadow", SHADOW)))

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(shadow, "decide", broken)
    stage = PolicyStage(lambda: live, lambda u, t: ToolSettings(), None, lambda: shadow)
    dev = Principal(sub="dev", issuer="test", groups=frozenset({"developers"}))
    before = counts()
    for _ in range(3):
        c = ToolCall("demo", "add", {"a": 50, "b": 1}, principal=dev)
        decision = await stage(c)
        assert decision.effect == "allow"
        assert c.shadow == {
            "effect": None,
            "policy_ids": [],
            "policy_version": shadow.version,
            "kind": "error",
        }
    assert counts()["error"] == before["error"] + 3
    logged = [r for r in caplog.records if "could not decide" in r.getMessage()]
    assert len(logged) == 1 and shadow.version in logged[0].getMessage()
    dry = ToolCall("demo", "add", {"a": 50, "b": 1}, principal=dev, dry_run=True)
    assert (await stage(dry)).effect == "allow" and dry.shadow is not None
    assert counts()["error"] == before["error"] + 3  # a dry run is not counted
