"""`bastion explain --resource / --prompt` through the gateway's parts, and its `listed` line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import POLICIES, free_port, make_config

from gateway.cli.policy import explain, render
from gateway.identity.devkeys import DevKey


async def test_explain_a_resource_and_a_prompt(
    tmp_path: Path, data_dir: Path, dev_key: DevKey, upstream_url: str
) -> None:
    root = tmp_path / "set"
    root.mkdir()
    shutil.copy(POLICIES / "schema.cedarschema", root / "schema.cedarschema")
    (root / "p.cedar").write_text(
        '@id("notes") @reason("notes are readable") permit(principal in Group::"developers", '
        'action == Action::"read_resource", resource in Upstream::"demo") '
        'when { resource.uri like "notes://*" };\n'
        '@id("prompts") permit(principal in Group::"developers", action == Action::"get_prompt", resource);\n'
    )
    cfg = make_config(tmp_path / "state", {"demo": upstream_url}, free_port(), root)
    issuers = [i.model_copy(update={"jwks_file": data_dir / "dev-jwks.json"}) for i in cfg.identity.issuers]
    cfg = cfg.model_copy(update={"identity": cfg.identity.model_copy(update={"issuers": issuers})})
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


@pytest.fixture(autouse=True)
def _quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING")
