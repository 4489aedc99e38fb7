"""Resources and prompts in Cedar: scopes, attributes, reasons, and their listings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cedarpy
import pytest

from gateway.call import Principal
from gateway.config import PolicyConfig, ToolSettings
from gateway.errors import ConfigError
from gateway.policy.engine import PolicyEngine

SCHEMA = (Path(__file__).resolve().parents[2] / "policies" / "schema.cedarschema").read_text()
READ = ToolSettings()
DEV = Principal(sub="dev", issuer="t", groups=frozenset({"developers"}))
EVE = Principal(sub="eve", issuer="t")
PERMIT_ALL = '@id("all") permit(principal, action, resource);\n'


def engine(root: Path, text: str, **kw: Any) -> PolicyEngine:
    root.mkdir(parents=True, exist_ok=True)
    (root / "schema.cedarschema").write_text(SCHEMA)
    (root / "p.cedar").write_text(text)
    return PolicyEngine.load(PolicyConfig(dir=root), **kw)


def effect(
    eng: PolicyEngine, action: str, name: str, args: dict[str, Any] | None = None, who: Principal = DEV
) -> str:
    return eng.decide(who, action, "demo", name, args or {}, READ).effect


SCOPES = {
    "resource is Resource": {"read_resource"},
    "resource is Prompt": {"get_prompt"},
    "resource is Tool": {"call_tool"},
    'resource == Resource::"demo/notes://a"': {"read_resource"},
    'resource == Prompt::"demo/notes://a"': {"get_prompt"},
    'resource in Resource::"demo/notes://a"': {"read_resource"},
    'resource is Resource in Upstream::"demo"': {"read_resource"},
    'resource is Prompt in Prompt::"demo/notes://a"': {"get_prompt"},
    'resource in Upstream::"demo"': {"read_resource", "get_prompt", "call_tool"},
    'resource in Upstream::"other"': set(),
    'resource == Resource::"other/notes://a"': set(),
    "resource": {"read_resource", "get_prompt", "call_tool"},
}


@pytest.mark.parametrize("scope", SCOPES)
def test_scopes_by_type_id_and_upstream(tmp_path: Path, scope: str) -> None:
    """Each scope applies exactly where Cedar says, although the index drops policies by scope."""
    eng = engine(tmp_path, PERMIT_ALL + f'@id("f") @reason("no") forbid(principal, action, {scope});\n')
    # "notes://a" is both a resource URI and a prompt name here, so one name exercises every type.
    denied = {
        a for a in ("read_resource", "get_prompt", "call_tool") if effect(eng, a, "notes://a") == "deny"
    }
    assert denied == SCOPES[scope]
    whole = cedarpy.PolicySet.from_str((tmp_path / "p.cedar").read_text())
    for action, rtype in (("read_resource", "Resource"), ("get_prompt", "Prompt"), ("call_tool", "Tool")):
        attrs = {
            "Resource": {"uri": "notes://a"},
            "Prompt": {"name": "notes://a"},
            "Tool": {"risk": "read", "tags": []},
        }
        ents = [
            {"uid": {"type": "User", "id": "dev"}, "attrs": {"groups": [], "roles": []}, "parents": []},
            {
                "uid": {"type": rtype, "id": "demo/notes://a"},
                "attrs": {**attrs[rtype], **({"upstream": "demo"} if rtype != "Tool" else {})},
                "parents": [{"type": "Upstream", "id": "demo"}],
            },
        ]
        request = {
            "principal": 'User::"dev"',
            "action": f'Action::"{action}"',
            "resource": {"type": rtype, "id": "demo/notes://a"},
            "context": {},
        }
        unindexed = cedarpy.is_authorized(request, whole, json.dumps(ents)).decision == cedarpy.Decision.Deny
        assert unindexed == (action in SCOPES[scope]), action


def test_attributes_and_reasons(tmp_path: Path) -> None:
    eng = engine(
        tmp_path,
        """
@id("notes") @reason("notes are readable") permit(principal, action == Action::"read_resource", resource)
when { resource.uri like "notes://*" && resource.upstream == "demo" };
@id("summarise") permit(principal, action == Action::"get_prompt", resource is Prompt)
when { resource.name == "summarise" && resource.upstream == "demo" && context.args has topic
       && context.args.topic != "secret" };
@id("no-drafts") @reason("drafts stay private") forbid(principal, action == Action::"read_resource", resource)
when { resource.uri like "notes://draft-*" };
""",
        prompt_arguments={"demo/summarise": ["topic"]},
    )
    d = eng.decide(DEV, "read_resource", "demo", "notes://welcome", {}, READ)
    assert d.effect == "allow" and d.reasons[0].to_json() == {
        "policy": "notes",
        "reason": "notes are readable",
    }
    d = eng.decide(DEV, "read_resource", "demo", "notes://draft-1", {}, READ)
    assert d.effect == "deny" and d.reasons[0].to_json() == {
        "policy": "no-drafts",
        "reason": "drafts stay private",
    }
    d = eng.decide(DEV, "read_resource", "demo", "files://x", {}, READ)
    assert d.policy_ids == ["default-deny"]
    assert d.reasons[0].reason == "no policy permits read_resource on demo/files://x"
    assert eng.decide(DEV, "read_resource", "other", "notes://welcome", {}, READ).effect == "deny"
    assert effect(eng, "get_prompt", "summarise", {"topic": "x"}) == "allow"
    d = eng.decide(DEV, "get_prompt", "demo", "summarise", {"topic": "secret"}, READ)
    assert d.reasons[0].reason == "no policy permits get_prompt on demo/summarise"
    d = eng.decide(DEV, "get_prompt", "demo", "summarise", {"topic": ["x"]}, READ)
    assert d.policy_ids == ["invalid-arguments"] and "prompt arguments are strings" in d.reasons[0].reason
    assert eng.decide(DEV, "fly_away", "demo", "x", {}, READ).policy_ids == ["policy-error"]


def test_prompt_arguments_type_context_args(tmp_path: Path) -> None:
    text = (
        '@id("p") permit(principal, action == Action::"get_prompt", resource) '
        'when { context.args has topic && context.args.topic like "a*" };'
    )
    untyped = engine(
        tmp_path / "untyped", text, tool_schemas={"demo/echo": {"type": "object", "properties": {}}}
    )
    assert any("`topic`" in w for w in untyped.warnings)
    typed = engine(tmp_path / "typed", text, prompt_arguments={"demo/summarise": ["topic"]})
    assert typed.warnings == ()
    assert effect(typed, "get_prompt", "summarise", {"topic": "ab"}) == "allow"
    assert effect(typed, "get_prompt", "summarise", {"topic": "b"}) == "deny"


def test_tool_attributes_under_every_action_need_a_type_test(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"entity type `Resource` not found.*resource is Tool"):
        engine(
            tmp_path / "a",
            PERMIT_ALL + 'forbid(principal, action, resource) when { resource.risk == "write" };',
        )
    eng = engine(
        tmp_path / "b",
        PERMIT_ALL
        + 'forbid(principal, action, resource) when { resource is Tool && resource.risk == "write" };',
    )
    assert effect(eng, "read_resource", "notes://a") == "allow"
    assert eng.decide(DEV, "call_tool", "demo", "rm", {}, ToolSettings(risk="write")).effect == "deny"


# Listings of resources, prompts and templates ----------------------------------------------------


def test_resource_and_prompt_listings(tmp_path: Path) -> None:
    eng = engine(
        tmp_path,
        """
@id("devs-read") permit(principal in Group::"developers", action == Action::"read_resource",
                        resource in Upstream::"demo")
when { resource.uri like "notes://*" };
@id("no-drafts") forbid(principal, action == Action::"read_resource", resource)
when { resource.uri like "*draft*" };
@id("prompt-topic") permit(principal, action == Action::"get_prompt", resource == Prompt::"demo/summarise")
when { context.args has topic && context.args.topic == "welcome" };
@id("no-blank") forbid(principal, action == Action::"get_prompt", resource)
unless { context.args has topic && context.args.topic != "" };
""",
        prompt_arguments={"demo/summarise": ["topic"], "demo/translate": ["text"]},
    )
    uris = ["notes://welcome", "notes://draft-1", "files://x"]
    assert eng.listable(DEV, "read_resource", "demo", uris) == {"notes://welcome"}
    assert eng.listable(EVE, "read_resource", "demo", uris) == set()
    # A permit that depends on the prompt's arguments shows the prompt; one that never applies hides it.
    assert eng.listable(EVE, "get_prompt", "demo", ["summarise", "translate"]) == {"summarise"}
    with pytest.raises(ValueError, match="list_tools"):
        eng.listable(DEV, "list_tools", "demo", ["x"])


def test_template_listing(tmp_path: Path) -> None:
    eng = engine(
        tmp_path,
        """
@id("notes") permit(principal in Group::"developers", action == Action::"read_resource", resource)
when { resource.uri like "notes://*" };
@id("one-file") permit(principal, action == Action::"read_resource", resource == Resource::"demo/files://readme")
;
@id("no-secrets") forbid(principal, action == Action::"read_resource", resource in Upstream::"demo")
when { resource.uri like "secrets://*" };
""",
    )
    templates = ["notes://{name}", "files://{path}", "secrets://{key}", "logs://{day}"]
    assert eng.listable_templates(DEV, "demo", templates) == {"notes://{name}", "files://{path}"}
    # `files://{path}` can expand to the one resource everybody may read; nothing else is readable.
    assert eng.listable_templates(EVE, "demo", templates) == {"files://{path}"}
    assert eng.listable_templates(DEV, "other", templates) == {"notes://{name}"}


def test_listing_survives_ids_cedar_cannot_parse(tmp_path: Path) -> None:
    """Partial evaluation needs ids in Cedar syntax; where that fails, full decisions still decide."""
    eng = engine(tmp_path, '@id("devs") permit(principal in Group::"developers", action, resource);')
    odd = Principal(sub="a\x00b\u200b", issuer="t", groups=frozenset({"developers"}))
    assert eng.listable(odd, "call_tool", "demo", ["echo"]) == {"echo"}
    assert eng.listable(odd, "read_resource", "demo", ["notes://\u200bx"]) == {"notes://\u200bx"}
    assert eng.listable(EVE, "call_tool", "demo", ["echo"]) == set()


def test_listing_is_cached_per_caller_and_hour(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    eng = engine(
        tmp_path,
        "permit(principal, action, resource) when { context.time.hour >= 9 && context.time.hour < 17 };",
    )
    ten, eight = datetime(2025, 1, 6, 10, tzinfo=UTC), datetime(2025, 1, 6, 8, tzinfo=UTC)
    assert eng.listable(DEV, "call_tool", "demo", ["echo"], now=ten) == {"echo"}
    assert eng.listable(DEV, "call_tool", "demo", ["echo"], now=eight) == set()
    assert eng.listable(DEV, "call_tool", "demo", ["echo"], now=ten) == {"echo"}
