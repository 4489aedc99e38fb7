"""`bastion policy replay`: traffic recorded through the real gateway, re-decided by a candidate.

The live set is the repo's demo policies. The candidate tightens one rule (transfers above 100,
not 1000, are refused), loosens another (guests may echo) and adds one that reads an argument
(`echo` of a text holding "secret" is refused). Every count and example is checked against what
Cedar says about the original call, which the test knows and the record does not.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import POLICIES, free_port, make_config, running_gateway

from gateway.call import Principal
from gateway.cli import main
from gateway.cli.replay import render_html, run
from gateway.config import ToolSettings
from gateway.identity.devkeys import DevKey

TIGHTER = "context.args.amount > 100"
LOOSER = (
    '\n@id("guests-may-echo") @reason("anyone may echo")\n'
    'permit(principal, action == Action::"call_tool", resource == Tool::"demo/echo");\n'
    '\n@id("no-secret-echo") @reason("no secrets echoed")\n'
    'forbid(principal, action == Action::"call_tool", resource == Tool::"demo/echo")\n'
    'when { context.args has text && context.args.text like "*secret*" };\n'
)
GUEST = "<img src=x onerror=alert(1)>"

CALLS: list[tuple[str, tuple[str, ...], str, dict[str, Any], str]] = [
    # (user, groups, tool, arguments, expected kind)
    ("dev", ("developers",), "echo", {"text": "hi"}, "unchanged"),
    ("dev", ("developers",), "transfer", {"amount": 500, "to": "bob"}, "newly_denied"),
    ("dev", ("developers",), "transfer", {"amount": 5000, "to": "bob"}, "unchanged"),
    ("dev", ("developers",), "delete_note", {"name": "n1"}, "unchanged"),
    ("ops", ("developers", "admins"), "delete_note", {"name": "n1"}, "unchanged"),
    (GUEST, (), "echo", {"text": "hello"}, "newly_allowed"),
    ("dev", ("developers",), "echo", {"text": "reach bob@example.com"}, "indeterminate"),
    ("dev", ("developers",), "add", {"a": 1, "b": 2}, "unchanged"),
    # `to` is kept redacted, but no policy of the candidate reads it: still decided
    ("dev", ("developers",), "transfer", {"amount": 50, "to": "bob@example.com"}, "unchanged"),
]


@pytest.fixture
async def recorded(tmp_path: Path, data_dir: Path, dev_key: DevKey, upstream_url: str) -> dict[str, Any]:
    """The live gateway's trail after CALLS, and a config file that names it."""
    live = tmp_path / "live"
    shutil.copytree(POLICIES, live, ignore=shutil.ignore_patterns("examples", "tests"))
    candidate = tmp_path / "candidate"
    shutil.copytree(live, candidate)
    demo = (candidate / "demo.cedar").read_text()
    assert "context.args.amount > 1000" in demo
    (candidate / "demo.cedar").write_text(demo.replace("context.args.amount > 1000", TIGHTER) + LOOSER)
    cfg = make_config(tmp_path / "state", {"demo": upstream_url}, free_port(), live)
    issuers = [i.model_copy(update={"jwks_file": data_dir / "dev-jwks.json"}) for i in cfg.identity.issuers]
    cfg = cfg.model_copy(update={"identity": cfg.identity.model_copy(update={"issuers": issuers})})
    async with running_gateway(cfg) as (base, _gw), httpx.AsyncClient(timeout=20) as http:
        for user, groups, tool, args, _ in CALLS:
            token = dev_key.mint(user, groups=groups, audience=base)
            body = {"upstream": "demo", "tool": tool, "arguments": args}
            resp = await http.post(
                f"{base}/v1/tool-calls", json=body, headers={"authorization": f"Bearer {token}"}
            )
            assert resp.status_code in (200, 403), resp.text
    tools = {name: {"risk": s.risk} for name, s in cfg.upstreams["demo"].tools.items()}
    data = {
        "policy": {"dir": str(live)},
        "audit": {"url": cfg.audit.url},
        "upstreams": {"demo": {"url": upstream_url, "tools": tools}},
        "data_dir": str(tmp_path / "state"),
    }
    (tmp_path / "bastion.yaml").write_text(yaml.safe_dump(data))
    return {"cfg": cfg, "config": tmp_path / "bastion.yaml", "candidate": candidate, "live": live}


def _expected(recorded: dict[str, Any]) -> dict[str, int]:
    """What Cedar says of each original call, live set against candidate (full inputs)."""
    from gateway.policy.engine import PolicyEngine

    cfg = recorded["cfg"]
    schemas = {"demo/echo": {"type": "object", "properties": {"text": {"type": "string"}}}}
    schemas["demo/transfer"] = {
        "type": "object",
        "properties": {"amount": {"type": "integer"}, "to": {"type": "string"}},
    }
    live = PolicyEngine.load(cfg.policy.model_copy(update={"dir": recorded["live"]}), schemas)
    cand = PolicyEngine.load(cfg.policy.model_copy(update={"dir": recorded["candidate"]}), schemas)
    counts: dict[str, int] = {}
    for user, groups, tool, args, kind in CALLS:
        p = Principal(sub=user, issuer="dev", groups=frozenset(groups))
        settings = cfg.upstreams["demo"].tools.get(tool, ToolSettings())
        before = live.decide(p, "call_tool", "demo", tool, args, settings).effect
        after = cand.decide(p, "call_tool", "demo", tool, args, settings).effect
        cedar = (
            "unchanged"
            if before == after
            else "newly_denied"
            if after == "deny"
            else "newly_allowed"
            if before == "deny"
            else "changed_obligation"
        )
        if kind != "indeterminate":
            assert cedar == kind, (user, tool, args, before, after)
        counts[kind] = counts.get(kind, 0) + 1
    return counts


async def test_replay_counts_match_what_cedar_says(recorded: dict[str, Any]) -> None:
    expected = _expected(recorded)
    engine, tally = await run(recorded["cfg"], recorded["candidate"], {}, None, None, progress=False)
    report = tally.to_json(str(recorded["candidate"]), engine.version, {})
    counts = {k: v for k, v in report["counts"].items() if v and k != "not_replayable"}
    assert counts == expected
    [denied] = report["examples"]["newly_denied"]
    assert denied["target"] == "demo/transfer" and denied["policies"] == ["transfer-limit"]
    [allowed] = report["examples"]["newly_allowed"]
    assert allowed["user"] == GUEST and allowed["policies"] == ["guests-may-echo"]
    [unknown] = report["examples"]["indeterminate"]
    assert unknown["target"] == "demo/echo" and "args.text" in unknown["why"]
    assert report["by_tool"]["demo/transfer"] == {"newly_denied": 1}  # the redacted `to` did not matter
    assert report["by_policy"] == {
        "transfer-limit": {"newly_denied": 1},
        "guests-may-echo": {"newly_allowed": 1},
    }
    page = render_html(report)
    assert GUEST not in page and "&lt;img src=x onerror=alert(1)&gt;" in page and "<script" not in page


async def test_replay_cli_writes_reports_reads_only_and_fails_on_request(
    recorded: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = Path(recorded["cfg"].audit.url.split("///", 1)[1])
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    args = [
        "policy",
        "replay",
        "--config",
        str(recorded["config"]),
        "--candidate",
        str(recorded["candidate"]),
    ]
    assert await asyncio.to_thread(main, [*args, "-o", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "newly denied         1" in out and "newly allowed        1" in out
    assert yaml.safe_load((tmp_path / "r.json").read_text())["counts"]["indeterminate"] == 1
    assert await asyncio.to_thread(main, [*args, "-o", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").read_text().startswith("<!doctype html>")
    assert await asyncio.to_thread(main, [*args, "--fail-on", "newly-allowed"]) == 1
    assert await asyncio.to_thread(main, [*args, "--user", "dev", "--fail-on", "newly-allowed"]) == 0
    assert await asyncio.to_thread(main, [*args, "--limit", "1", "--fail-on", "newly-denied"]) == 0
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


async def test_an_unreadable_candidate_is_refused(
    recorded: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(recorded["candidate"], bad)
    (bad / "broken.cedar").write_text("permit(principal, action, resource) when {")
    args = ["policy", "replay", "--config", str(recorded["config"]), "--candidate", str(bad)]
    assert await asyncio.to_thread(main, args) == 1
    assert "broken.cedar" in capsys.readouterr().err
