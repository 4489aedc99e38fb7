"""`bastion explain --resource / --prompt` through the gateway's parts, and its `listed` line."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import POLICIES, free_port, make_config

from gateway.cli.policy import explain, render
from gateway.config import Config
from gateway.identity.devkeys import DevKey


async def test_explain_a_resource_and_a_prompt(
    tmp_path: Path, data_dir: Path, dev_key: DevKey, upstream_url: str
) -> None:
    policies = (
        '@id("notes") @reason("notes are readable") permit(principal in Group::"developers", '
        'action == Action::"read_resource", resource in Upstream::"demo") '
        'when { resource.uri like "notes://*" };\n'
        '@id("prompts") permit(principal in Group::"developers", action == Action::"get_prompt", resource);\n'
    )
    cfg = _config(tmp_path, data_dir, policies, {"demo": upstream_url})
    tok = dev_key.mint("dev", groups=["developers"], audience=f"{cfg.listen.base_url}/mcp/demo")

    out = await explain(cfg, tok, "demo", "notes://welcome", {}, "read_resource")
    assert out["request"]["resource"] == "notes://welcome"
    assert out["policy"]["effect"] == "allow" and out["policy"]["policies"][0]["id"] == "notes"
    assert out["listed"] is True
    assert "request:   read_resource demo/notes://welcome {}" in render(out)
    out = await explain(cfg, tok, "demo", "files://x", {}, "read_resource")
    assert out["policy"]["effect"] == "deny" and out["listed"] is False
    assert out["policy"]["policies"][0]["reason"] == "no policy permits read_resource on demo/files://x"
    out = await explain(cfg, tok, "demo", "summarise", {"topic": "x"}, "get_prompt")
    assert out["request"]["prompt"] == "summarise" and out["policy"]["effect"] == "allow"
    assert "listed:    yes" in render(out)


def _config(tmp_path: Path, data_dir: Path, policies: str, upstreams: dict[str, str], **extra: Any) -> Config:
    """A config with `policies` as its set, trusting the dev key's issuer."""
    root = tmp_path / "set"
    root.mkdir()
    shutil.copy(POLICIES / "schema.cedarschema", root / "schema.cedarschema")
    (root / "p.cedar").write_text(policies)
    cfg = make_config(tmp_path / "state", upstreams, free_port(), root, **extra)
    issuers = [i.model_copy(update={"jwks_file": data_dir / "dev-jwks.json"}) for i in cfg.identity.issuers]
    return cfg.model_copy(update={"identity": cfg.identity.model_copy(update={"issuers": issuers})})


@pytest.fixture(autouse=True)
def _quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING")


async def test_explain_a_message_to_an_agent(tmp_path: Path, data_dir: Path, dev_key: DevKey) -> None:
    policies = (
        '@id("agents") @reason("developers may message agents") permit(principal in Group::"developers", '
        'action == Action::"send_message", resource is Agent);\n'
        '@id("no-wire") @reason("not that skill") forbid(principal, action == Action::"send_message", '
        'resource == Agent::"payments") when { context has skill && context.skill == "wire" };\n'
        '@id("small") @reason("small amounts only") forbid(principal, action == Action::"send_message", '
        "resource) when { context.args has data && context.args.data has amount && "
        "context.args.data.amount >= 100 };\n"
    )
    schema = {"type": "object", "properties": {"amount": {"type": "integer"}}}
    agents = {"payments": {"url": "http://127.0.0.1:1/", "subject": "pay-bot", "data_schema": schema}}
    cfg = _config(tmp_path, data_dir, policies, {}, agents=agents)
    tok = dev_key.mint("dev", groups=["developers"], audience=cfg.listen.base_url)

    message = {"text": ["pay the invoice"], "data": {"amount": 5}}
    out = await explain(cfg, tok, "payments", "message", message, "send_message")
    assert out["request"]["agent"] == "message" and out["decision"]["effect"] == "allow"
    assert out["policy"]["policies"][0]["id"] == "agents" and "listed" not in out
    assert "request:   send_message payments/message" in render(out)
    out = await explain(cfg, tok, "payments", "wire", message, "send_message", "wire")
    assert out["decision"]["effect"] == "deny" and out["decision"]["policy_ids"] == ["no-wire"]
    out = await explain(cfg, tok, "payments", "message", {"data": {"amount": 500}}, "send_message")
    assert out["decision"]["policy_ids"] == ["small"]
    with pytest.raises(Exception, match="no agent named 'nobody'"):
        await explain(cfg, tok, "nobody", "message", {}, "send_message")
