"""Config is checked once at start-up; every error names the dotted key and what was wrong."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway import config
from gateway.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_example_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTES_UPSTREAM_TOKEN", "s3cret")
    cfg = config.load(REPO / "config.example.yaml")
    assert cfg.listen.base_url == "http://127.0.0.1:8080"
    assert cfg.upstreams["notes"].headers["Authorization"] == "Bearer s3cret"
    assert cfg.upstreams["notes"].tools["delete_note"].risk == "write"
    assert cfg.policy.dir == REPO / "policies", "relative paths resolve against the config file"
    assert cfg.identity.issuers[0].algorithms == ["RS256", "ES256"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"listen": {"prot": 1}}, "listen.prot: unknown key"),
        ({"listen": {"port": "eighty"}}, "listen.port: Input should be a valid integer"),
        (
            {"upstreams": {"a": {"transport": "streamable-http"}}},
            "upstreams.a: Value error, transport streamable-http needs url",
        ),
        ({"upstreams": {"a b": {"url": "http://x"}}}, "upstreams.a b.[key]"),
        ({"identity": {"issuers": [{"issuer": "x"}]}}, "identity.issuers.0: Value error, set exactly one of"),
        (
            {"identity": {"issuers": [{"issuer": "x", "jwks_file": "k", "algorithms": ["HS256"]}]}},
            "algorithms.0",
        ),
        ({"budgets": [{"name": "b", "limit": 1, "window": "1w"}]}, "budgets.0.window: Value error, window"),
        ({"budgets": [{"name": "b", "limit": 1, "window": "1d", "cost": "amount"}]}, "budgets.0.cost"),
        ({"budgets": [{"name": "b", "limit": 1, "window": "1d"}] * 2}, "budget names must be unique: b"),
        ({"upstreams": {"a": {"transport": "http"}}}, "upstreams.a: Value error, transport http needs url"),
        ({"upstreams": {"a": {"transport": "stdio"}}}, "upstreams.a: Value error, transport stdio needs"),
    ],
)
def test_bad_config_names_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(data, Path("."))
    assert message in info.value.message


def test_env_interpolation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BASTION_TEST_UNSET", raising=False)
    cfg = config.parse({"listen": {"public_url": "${BASTION_TEST_UNSET:-http://gw.example}"}}, Path("."))
    assert cfg.listen.base_url == "http://gw.example"
    with pytest.raises(
        ConfigError, match=r"upstreams.a.url: environment variable BASTION_TEST_UNSET is not set"
    ):
        config.parse({"upstreams": {"a": {"url": "${BASTION_TEST_UNSET}"}}}, Path("."))


def test_bad_policy_stops_start_up_with_file_and_line(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "schema.cedarschema").write_text((REPO / "policies" / "schema.cedarschema").read_text())
    (policies / "bad.cedar").write_text(
        '@id("ok")\npermit(principal, action, resource);\n\n'
        '@id("bad")\npermit(principal, action, resource) when { context.nope };\n'
    )
    cfg = tmp_path / "bastion.yaml"
    cfg.write_text(
        f"listen: {{port: 0}}\npolicy: {{dir: policies}}\ndata_dir: {tmp_path / 'data'}\naudit: {{url: 'sqlite+aiosqlite:///{tmp_path}/a.db'}}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert f"{policies / 'bad.cedar'}:5:" in proc.stderr
    assert "Traceback" not in proc.stderr
