"""Replay on hand-made records: what the record holds is used, what it does not is never guessed."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from conftest import POLICIES

from audit.record import AuditRecord
from gateway import config as config_mod
from gateway.cli.replay import load_candidate, replay_one, unknown_args
from gateway.policy.engine import UNKNOWN

CANDIDATE = """
@id("devs") @reason("developers may use demo")
permit(principal in Group::"developers", action == Action::"call_tool", resource in Upstream::"demo");

@id("save-the-budget") @reason("the last units are kept for admins")
forbid(principal, action == Action::"call_tool", resource)
when { context.budget has calls && context.budget.calls.remaining < 2 }
unless { principal in Group::"admins" };

@id("no-evil-mail") @reason("no evil mail")
forbid(principal, action == Action::"call_tool", resource == Tool::"demo/echo")
when { principal has email && principal.email like "*@evil.example" };
"""


def _record(replay: dict[str, Any] | None, **kw: Any) -> AuditRecord:
    fields: dict[str, Any] = {
        "id": "r1",
        "ts": datetime(2026, 12, 1, 12, tzinfo=UTC),
        "instance": "i",
        "trace_id": "t",
        "call_id": None,
        "user": "dev",
        "tenant": None,
        "agent": None,
        "protocol": "mcp",
        "upstream": "demo",
        "tool": "add",
        "action": "call_tool",
        "args_redacted": {"a": 1, "b": 2},
        "args_hmac": None,
        "decision": {"effect": "allow"},
        "budget": None,
        "pii": {"input": {}, "output": {}},
        "outcome": {"status": "completed"},
        "result_sha256": None,
        "replay": replay,
    }
    return AuditRecord(**(fields | kw))


def _inputs(**kw: Any) -> dict[str, Any]:
    base = {"issuer": "bastion-dev", "groups": ["developers"], "roles": [], "scopes": [], "has_email": False}
    return (
        base | {"tainted": False, "policy": {"effect": "allow", "policy_ids": ["developers-use-demo"]}} | kw
    )


def _setup(tmp_path: Path) -> tuple[Any, Any]:
    cand = tmp_path / "candidate"
    cand.mkdir()
    shutil.copy(POLICIES / "schema.cedarschema", cand / "schema.cedarschema")
    (cand / "p.cedar").write_text(CANDIDATE)
    budget = {"name": "calls", "match": {"upstreams": ["demo"]}, "limit": 10, "window": "1d"}
    cfg = config_mod.parse({"policy": {"dir": str(POLICIES)}, "budgets": [budget]}, tmp_path)
    schemas = {
        "demo/add": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}
    }
    return cfg, load_candidate(cfg, cand, schemas)


def test_the_budget_state_before_the_call_is_read_from_what_was_charged(tmp_path: Path) -> None:
    cfg, engine = _setup(tmp_path)
    charged = {"budget": "calls", "subject": "user=dev", "cost": 1, "limit": 10, "resets_at": "x"}
    plenty = {"charged": [charged | {"used": 3, "remaining": 7}], "exceeded": None}
    last = {"charged": [charged | {"used": 10, "remaining": 0}], "exceeded": None}
    assert replay_one(engine, cfg, _record(_inputs(), budget=plenty)).kind == "unchanged"
    tight = replay_one(engine, cfg, _record(_inputs(), budget=last))
    assert tight.kind == "newly_denied" and tight.policies == ("save-the-budget",)
    never = replay_one(engine, cfg, _record(_inputs(), budget=None))
    assert never.kind == "indeterminate" and "budget" in never.why


def test_an_email_address_is_unknown_only_when_the_caller_had_one(tmp_path: Path) -> None:
    cfg, engine = _setup(tmp_path)
    spent = {"charged": [], "exceeded": None}
    echo = {"tool": "echo", "args_redacted": {"text": "hi"}, "budget": spent}
    assert replay_one(engine, cfg, _record(_inputs(has_email=False), **echo)).kind == "unchanged"
    unsure = replay_one(engine, cfg, _record(_inputs(has_email=True), **echo))
    assert unsure.kind == "indeterminate" and "principal.email" in unsure.why


def test_records_the_policy_never_decided_are_not_replayed(tmp_path: Path) -> None:
    cfg, engine = _setup(tmp_path)
    assert replay_one(engine, cfg, _record(None)).kind == "not_replayable"
    refused = _inputs()
    del refused["policy"]
    assert replay_one(engine, cfg, _record(refused)).why == "the policy never ran on it"


def test_placeholders_and_shapes_are_unknown_wherever_they_sit() -> None:
    recorded = {
        "to": "<EMAIL_ADDRESS>",
        "note": "call <PHONE_NUMBER> today",
        "n": "<int>",
        "tags": ["a", "<string:12>"],
        "inner": {"h": "<US_SSN:0123456789abcdef>", "ok": "<b>bold</b>"},
        "amount": 5,
    }
    found = unknown_args(recorded)
    assert found["to"] is UNKNOWN and found["note"] is UNKNOWN and found["n"] is UNKNOWN
    assert found["tags"][1] is UNKNOWN and found["inner"]["h"] is UNKNOWN
    assert found["inner"]["ok"] == "<b>bold</b>" and found["amount"] == 5
