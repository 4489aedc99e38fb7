"""The A2A settings: names that would collide, and policies that read a message's data offline."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from gateway import config as config_mod
from gateway.cli import main
from gateway.errors import ConfigError
from tests.conftest import POLICIES

READS_AMOUNT = """
@id("small")
@reason("small amounts only")
forbid(principal, action == Action::"send_message", resource == Agent::"payments")
when { context.args has data && context.args.data has amount && context.args.data.amount >= 100 };
"""


def test_an_agent_may_not_share_a_name_with_an_upstream(tmp_path: Path) -> None:
    data = {
        "upstreams": {"notes": {"url": "http://127.0.0.1:1/mcp"}},
        "agents": {"notes": {"url": "http://127.0.0.1:2/", "subject": "notes-bot"}},
    }
    with pytest.raises((ConfigError, ValueError), match=r"agents\.notes: an upstream"):
        config_mod.parse(data, tmp_path)


@pytest.mark.parametrize("url", ["ftp://x/", "http://a b/", ""])
def test_an_agent_url_must_be_http(tmp_path: Path, url: str) -> None:
    with pytest.raises((ConfigError, ValueError), match=r"agents\.x\.url"):
        config_mod.parse({"agents": {"x": {"url": url, "subject": "x-bot"}}}, tmp_path)


def test_policy_validate_types_a_message_by_the_agents_data_schema(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    shutil.copy(POLICIES / "schema.cedarschema", policies / "schema.cedarschema")
    (policies / "p.cedar").write_text(READS_AMOUNT)
    agent = {"url": "http://127.0.0.1:2/", "subject": "pay-bot"}
    untyped = {"policy": {"dir": str(policies)}, "agents": {"payments": agent}}
    (tmp_path / "untyped.yaml").write_text(yaml.safe_dump(untyped))
    # without a data_schema the forbid could never apply: said, as for a misspelt tool argument
    assert main(["policy", "validate", "--config", str(tmp_path / "untyped.yaml")]) == 0
    assert "no known tool takes an argument" in capsys.readouterr().err
    typed = {**agent, "data_schema": {"type": "object", "properties": {"amount": {"type": "integer"}}}}
    (tmp_path / "typed.yaml").write_text(yaml.safe_dump({**untyped, "agents": {"payments": typed}}))
    assert main(["policy", "validate", "--config", str(tmp_path / "typed.yaml")]) == 0
    captured = capsys.readouterr()
    assert "ok: policy set" in captured.out and "warning" not in captured.err
