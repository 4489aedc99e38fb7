"""The Cedar policy stage and argument sanitising, with real cedarpy and real policy files."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cedarpy
import pytest

from gateway.call import Principal
from gateway.config import PolicyConfig, ToolSettings
from gateway.errors import ConfigError
from gateway.policy.context import (
    MAX_DEPTH,
    MAX_LEAVES,
    ArgumentError,
    arg_types_from_input_schema,
    args_type_from_input_schemas,
    sanitize_args,
)
from gateway.policy.engine import PolicyEngine, budget_context_type

REPO_POLICIES = Path(__file__).resolve().parents[2] / "policies"
REPO_SCHEMA = (REPO_POLICIES / "schema.cedarschema").read_text()


def obj(**props: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props}


INT, STR = {"type": "integer"}, {"type": "string"}
DEMO_TOOLS: dict[str, dict[str, Any]] = {
    "demo/echo": obj(text=STR),
    "demo/add": obj(a=INT, b=INT),
    "demo/read_note": obj(name=STR),
    "demo/delete_note": obj(name=STR),
    "demo/transfer": obj(amount=INT, to=STR),
    "demo/countdown": obj(n=INT),
}
READ = ToolSettings()
WRITE = ToolSettings(risk="write")
EXTERNAL = ToolSettings(risk="external")
DEMO_SETTINGS = {"delete_note": WRITE, "transfer": EXTERNAL}  # as the demo config sets them
DEV = Principal(sub="dev", issuer="https://idp.test", groups=frozenset({"developers"}))
ADMIN = Principal(sub="root", issuer="https://idp.test", groups=frozenset({"developers", "admins"}))
OUTSIDER = Principal(sub="eve", issuer="https://idp.test", groups=frozenset({"guests"}))


@pytest.fixture(scope="module")
def demo() -> PolicyEngine:
    return PolicyEngine.load(PolicyConfig(dir=REPO_POLICIES), DEMO_TOOLS)


def write_set(root: Path, files: dict[str, str], schema: str = REPO_SCHEMA) -> PolicyConfig:
    root.mkdir(parents=True, exist_ok=True)
    (root / "schema.cedarschema").write_text(schema)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return PolicyConfig(dir=root)


def load(root: Path, files: dict[str, str], tools: dict[str, Any] | None = None, **kw: Any) -> PolicyEngine:
    return PolicyEngine.load(write_set(root, files, **kw), DEMO_TOOLS if tools is None else tools)


PERMIT_DEMO = '@id("all-demo") permit(principal, action, resource in Upstream::"demo");\n'


# The demo policies ------------------------------------------------------------------------------


def test_developer_may_call_demo_tool(demo: PolicyEngine) -> None:
    d = demo.decide(DEV, "call_tool", "demo", "echo", {"text": "hi"}, READ)
    assert d.effect == "allow"
    assert d.policy_ids == ["developers-use-demo"]
    assert d.reasons[0].reason == "developers may use the demo tools"
    assert d.stage == "policy" and d.policy_version == demo.version
    assert demo.warnings == ()


def test_forbid_wins_with_its_id_and_reason(demo: PolicyEngine) -> None:
    d = demo.decide(DEV, "call_tool", "demo", "delete_note", {"name": "x"}, ToolSettings(risk="write"))
    assert d.effect == "deny"
    assert [r.to_json() for r in d.reasons] == [
        {"policy": "delete-needs-admin", "reason": "only admins may use tools that write or delete"}
    ]
    assert demo.decide(ADMIN, "call_tool", "demo", "delete_note", {"name": "x"}, WRITE).effect == "allow"


def test_default_deny(demo: PolicyEngine) -> None:
    d = demo.decide(OUTSIDER, "call_tool", "demo", "echo", {"text": "hi"}, READ)
    assert d.effect == "deny"
    assert d.policy_ids == ["default-deny"]
    assert d.reasons[0].reason == "no policy permits call_tool on demo/echo"
    assert demo.decide(DEV, "call_tool", "other", "echo", {}, READ).policy_ids == ["default-deny"]
    d = demo.decide(OUTSIDER, "get_prompt", "demo", "echo", {}, READ)
    assert d.policy_ids == ["default-deny"]
    assert d.reasons[0].reason == "no policy permits get_prompt on demo/echo"


@pytest.mark.parametrize(
    ("amount", "effect"), [(5, "allow"), (1000, "allow"), (1001, "deny"), (10**12, "deny")]
)
def test_amount_limit_on_integers(demo: PolicyEngine, amount: int, effect: str) -> None:
    d = demo.decide(DEV, "call_tool", "demo", "transfer", {"amount": amount, "to": "bob"}, EXTERNAL)
    assert d.effect == effect
    if effect == "deny":
        assert d.reasons[0].policy == "transfer-limit"
        assert d.reasons[0].reason == "transfers above 1000 need a human"


def test_integral_float_counts_as_integer(demo: PolicyEngine) -> None:
    d = demo.decide(DEV, "call_tool", "demo", "transfer", {"amount": 5000.0, "to": "bob"}, EXTERNAL)
    assert d.policy_ids == ["transfer-limit"]


def test_tools_list_filtering(demo: PolicyEngine) -> None:
    names = [t.split("/")[1] for t in DEMO_TOOLS]
    assert demo.listable(DEV, "call_tool", "demo", names, lambda t: DEMO_SETTINGS.get(t, READ)) == set(
        names
    ) - {"delete_note"}
    assert demo.listable(ADMIN, "call_tool", "demo", names, lambda t: DEMO_SETTINGS.get(t, READ)) == set(
        names
    )
    assert demo.listable(OUTSIDER, "call_tool", "demo", names, lambda t: DEMO_SETTINGS.get(t, READ)) == set()
    assert demo.listable(DEV, "call_tool", "other", names, lambda t: DEMO_SETTINGS.get(t, READ)) == set()


def test_tool_arguments_of_the_wrong_type_are_refused(demo: PolicyEngine) -> None:
    d = demo.decide(DEV, "call_tool", "demo", "transfer", {"amount": "5000", "to": "bob"}, EXTERNAL)
    assert d.effect == "deny"
    assert d.policy_ids == ["invalid-arguments"]
    assert "$.amount" in d.reasons[0].reason and "5000" not in d.reasons[0].reason


# The NOTES traps: each ends in deny -------------------------------------------------------------


def test_trap1_erroring_forbid_never_allows(tmp_path: Path) -> None:
    forbid = (
        '@id("limit") @reason("too much") forbid(principal, action, resource) '
        "when { context.args has amount && context.args.amount > 1000 };\n"
    )
    overflow = (
        '@id("overflow") forbid(principal, action, resource == Tool::"demo/add") '
        "when { context.args has a && context.args.a + 1 > 1000 };\n"
    )
    eng = load(tmp_path, {"p.cedar": PERMIT_DEMO + forbid + overflow})
    # `demo/unknown` has no input schema, so the string reaches Cedar and the forbid errors.
    raw = cedarpy.is_authorized(
        {
            "principal": 'User::"dev"',
            "action": 'Action::"call_tool"',
            "resource": 'Tool::"demo/unknown"',
            "context": {"args": {"amount": "5000"}},
        },
        PERMIT_DEMO + forbid,
        [
            {
                "uid": {"type": "Tool", "id": "demo/unknown"},
                "attrs": {},
                "parents": [{"type": "Upstream", "id": "demo"}],
            }
        ],
    )
    assert raw.decision == cedarpy.Decision.Allow and raw.diagnostics.errors  # the trap itself
    d = eng.decide(DEV, "call_tool", "demo", "unknown", {"amount": "5000"}, READ)
    assert d.effect == "deny"
    assert d.policy_ids == ["policy-error"]
    assert "limit" in d.reasons[0].reason and "5000" not in d.reasons[0].reason

    d = eng.decide(DEV, "call_tool", "demo", "add", {"a": 2**63 - 1, "b": 1}, READ)
    assert d.effect == "deny" and d.policy_ids == ["policy-error"]
    assert "overflow" in d.reasons[0].reason and str(2**63 - 1) not in d.reasons[0].reason


@pytest.mark.parametrize(
    "args",
    [
        {"amount": 2**64},
        {"amount": -(2**63) - 1},
        {"amount": 1e30},
        {"amount": 0.00001},
        {"amount": float("nan")},
        {"amount": float("inf")},
        {"to": [None]},
        {"to": {"deep": [1, None]}},
    ],
)
def test_trap2_null_float_and_huge_int_arguments_deny(demo: PolicyEngine, args: dict[str, Any]) -> None:
    d = demo.decide(DEV, "call_tool", "demo", "echo", args, READ)
    assert d.effect == "deny"
    assert d.policy_ids == ["invalid-arguments"]


def test_trap2_null_value_is_an_absent_argument(tmp_path: Path) -> None:
    eng = load(
        tmp_path,
        {
            "p.cedar": '@id("needs-amount") permit(principal, action, resource) '
            "when { context.args has amount && context.args.amount < 10 };\n"
        },
    )
    assert eng.decide(DEV, "call_tool", "demo", "transfer", {"amount": 5}, EXTERNAL).effect == "allow"
    d = eng.decide(DEV, "call_tool", "demo", "transfer", {"amount": None}, EXTERNAL)
    assert d.effect == "deny" and d.policy_ids == ["default-deny"]


def test_trap3_entity_escape_cannot_forge_an_entity(tmp_path: Path) -> None:
    schema = REPO_SCHEMA + '\ntype ToolArgs = { "owner"?: User, "amount"?: Long };\n'
    eng = load(
        tmp_path,
        {
            "p.cedar": '@id("alice-owned") permit(principal, action, resource) '
            'when { context.args has owner && context.args.owner == User::"alice" };\n'
        },
        schema=schema,
    )
    forged = {"owner": {"__entity": {"type": "User", "id": "alice"}}}
    d = eng.decide(DEV, "call_tool", "demo", "read_note", forged, READ)
    assert d.effect == "deny" and d.policy_ids == ["invalid-arguments"]
    assert "$.owner.__entity" in d.reasons[0].reason
    extn = {"amount": {"x": [{"__extn": {"fn": "decimal", "arg": "1.0"}}]}}
    assert eng.decide(DEV, "call_tool", "demo", "echo", extn, READ).policy_ids == ["invalid-arguments"]
    implicit = {"owner": {"type": "User", "id": "alice"}}
    assert eng.decide(DEV, "call_tool", "demo", "read_note", implicit, READ).policy_ids == ["default-deny"]


def test_trap4_undeclared_context_fields_still_evaluate(demo: PolicyEngine) -> None:
    extra = {"text": "hi", "undeclared": {"nested": [1, 2]}, "flag": True}
    assert demo.decide(DEV, "call_tool", "demo", "echo", extra, READ).effect == "allow"
    assert demo.decide(DEV, "call_tool", "demo", "not_in_schemas", {"x": 1}, READ).effect == "allow"
    big = {"amount": 5000, "note": "undeclared"}
    assert demo.decide(DEV, "call_tool", "demo", "transfer", big, EXTERNAL).policy_ids == ["transfer-limit"]


# Obligations, principal and context -------------------------------------------------------------


def test_obligations(tmp_path: Path) -> None:
    eng = load(
        tmp_path,
        {
            "o.cedar": """
@id("plain") permit(principal, action, resource in Upstream::"demo");
@id("redact-notes") @reason("notes may hold PII") @obligation("redact")
permit(principal, action, resource == Tool::"demo/read_note");
@id("approve-transfers") @reason("a human signs off") @obligation("approval")
permit(principal, action, resource == Tool::"demo/transfer");
@id("redact-transfers") @obligation("redact")
permit(principal, action, resource == Tool::"demo/transfer");
"""
        },
    )
    assert eng.decide(DEV, "call_tool", "demo", "echo", {}, READ).effect == "allow"
    d = eng.decide(DEV, "call_tool", "demo", "read_note", {"name": "a"}, READ)
    assert d.effect == "transform" and d.reasons[0].policy == "redact-notes"
    assert set(d.policy_ids) == {"plain", "redact-notes"}
    d = eng.decide(DEV, "call_tool", "demo", "transfer", {"amount": 1}, EXTERNAL)
    assert d.effect == "approval_required"
    assert d.reasons[0].to_json() == {"policy": "approve-transfers", "reason": "a human signs off"}


def test_principal_resource_and_context_attributes(tmp_path: Path) -> None:
    eng = load(
        tmp_path,
        {
            "c.cedar": """
@id("office-hours") permit(principal, action, resource)
when { context.time.hour >= 9 && context.time.hour < 17 && context.time.weekday <= 5 };
@id("tenant") permit(principal, action, resource == Tool::"demo/add")
when { principal has tenant && principal.tenant == "acme" && principal.roles.contains("clerk") };
@id("direct-only") forbid(principal, action, resource) when { context.agent.depth > 1 };
@id("no-external") forbid(principal, action, resource)
when { resource is Tool && resource.risk == "external" && context.risk == "external"
       && !resource.tags.contains("vetted") };
"""
        },
    )
    monday_10 = datetime(2025, 6, 2, 10, 0, tzinfo=UTC)
    saturday = datetime(2025, 6, 7, 10, 0, tzinfo=UTC)
    assert eng.decide(DEV, "call_tool", "demo", "echo", {}, READ, now=monday_10).effect == "allow"
    assert eng.decide(DEV, "call_tool", "demo", "echo", {}, READ, now=saturday).effect == "deny"
    assert eng.decide(DEV, "call_tool", "demo", "add", {}, READ, now=saturday).effect == "deny"
    clerk = Principal(sub="c", issuer="i", roles=frozenset({"clerk"}), tenant="acme", email="c@acme.test")
    assert eng.decide(clerk, "call_tool", "demo", "add", {}, READ, now=saturday).effect == "allow"
    chained = Principal(sub="dev", issuer="i", agent="bot", delegation_chain=("bot", "sub-bot"))
    d = eng.decide(chained, "call_tool", "demo", "echo", {}, READ, now=monday_10)
    assert d.policy_ids == ["direct-only"]
    external = ToolSettings(risk="external")
    assert eng.decide(DEV, "call_tool", "demo", "echo", {}, external, now=monday_10).effect == "deny"
    vetted = ToolSettings(risk="external", tags=["vetted"])
    assert eng.decide(DEV, "call_tool", "demo", "echo", {}, vetted, now=monday_10).effect == "allow"


def test_time_uses_the_configured_timezone(tmp_path: Path) -> None:
    cfg = write_set(
        tmp_path, {"t.cedar": "permit(principal, action, resource) when { context.time.hour == 19 };"}
    )
    eng = PolicyEngine.load(cfg.model_copy(update={"timezone": "Asia/Tokyo"}))
    assert eng.decide(
        DEV, "call_tool", "demo", "echo", {}, READ, now=datetime(2025, 1, 1, 10, tzinfo=UTC)
    ).allowed
    with pytest.raises(ConfigError, match=r"policy\.timezone"):
        PolicyEngine.load(cfg.model_copy(update={"timezone": "Mars/Olympus"}))


def test_every_scope_form_is_evaluated(tmp_path: Path) -> None:
    # The engine hands Cedar only the policies whose scope can match; each form must still apply.
    scopes = [
        'resource == Tool::"demo/echo"',
        'resource in Upstream::"demo"',
        'resource in Tool::"demo/echo"',
        "resource is Tool",
        'resource is Tool in Upstream::"demo"',
        "resource",
    ]
    for i, scope in enumerate(scopes):
        text = f'@id("f") @reason("r") forbid(principal, action in [Action::"call_tool"], {scope});\n'
        eng = load(tmp_path / str(i), {"p.cedar": PERMIT_DEMO + text})
        assert eng.decide(DEV, "call_tool", "demo", "echo", {}, READ).policy_ids == ["f"], scope
        assert eng.decide(DEV, "list_tools", "demo", "echo", {}, READ).effect == "allow", scope
    eng = load(
        tmp_path / "n", {"p.cedar": PERMIT_DEMO + '@id("f") forbid(principal, action, resource is Tool);'}
    )
    assert eng.decide(DEV, "call_tool", "demo", "add", {}, READ).policy_ids == ["f"]


# Loading ---------------------------------------------------------------------------------------


def test_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    text = (
        PERMIT_DEMO
        + '\n// a comment; with a semicolon\n@id("broken")\n'
        + "permit(principal, action, resource)\n  when { context.x.nope(1) };\n"
    )
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, {"sub/bad.cedar": text})
    assert f"{tmp_path / 'sub' / 'bad.cedar'}:6:20: `nope` is not a valid method" in exc.value.message


def test_validation_error_names_file_line_and_column(tmp_path: Path) -> None:
    text = (
        PERMIT_DEMO
        + '\n@id("typo")\nforbid(principal, action, resource)\nwhen { principal.grups.contains("x") };\n'
    )
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, {"a.cedar": text})
    assert (
        f"{tmp_path / 'a.cedar'}:5:18: attribute `grups` on entity type `User` not found" in exc.value.message
    )


def test_unknown_argument_is_a_validation_error(tmp_path: Path) -> None:
    text = '@id("x") permit(principal, action, resource) when { context.args.amont > 1 };'
    with pytest.raises(ConfigError, match=r"a\.cedar:1:\d+: .*amont"):
        load(tmp_path, {"a.cedar": text})
    with pytest.raises(ConfigError, match="no tool input schemas were known"):
        load(tmp_path, {"a.cedar": text}, tools={})


def test_misspelt_argument_test_is_a_warning(tmp_path: Path) -> None:
    # Cedar's validator accepts `has` on an attribute no tool declares: it is simply always false.
    text = PERMIT_DEMO + (
        '@id("limit") forbid(principal, action, resource)\n'
        "when { context.args has amont && context.args.amont > 1000 };\n"
    )
    eng = load(tmp_path, {"a.cedar": text})
    assert len(eng.warnings) == 1
    assert eng.warnings[0].startswith(f"{tmp_path / 'a.cedar'}:3:8: no known tool takes an argument `amont`")


def test_repo_policies_load_without_tool_schemas() -> None:
    # An unreachable upstream leaves its arguments out of ToolArgs; guarded tests still work.
    eng = PolicyEngine.load(PolicyConfig(dir=REPO_POLICIES))
    assert any("`amount`" in w for w in eng.warnings)
    assert any("no tool input schemas were known" in w for w in eng.warnings)
    d = eng.decide(DEV, "call_tool", "demo", "transfer", {"amount": 5000, "to": "bob"}, EXTERNAL)
    assert d.policy_ids == ["transfer-limit"]


def test_missing_semicolon(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"b\.cedar:2:1: .*`;`"):
        load(tmp_path, {"b.cedar": PERMIT_DEMO + "permit(principal, action, resource)\n"})


def test_empty_missing_and_bad_sets_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no policies"):
        load(tmp_path / "empty", {})
    with pytest.raises(ConfigError, match="no policies"):
        load(tmp_path / "comments", {"c.cedar": "// nothing here\n"})
    with pytest.raises(ConfigError, match="not a directory"):
        PolicyEngine.load(PolicyConfig(dir=tmp_path / "nope"))
    (tmp_path / "noschema").mkdir()
    (tmp_path / "noschema" / "p.cedar").write_text(PERMIT_DEMO)
    with pytest.raises(ConfigError, match=r"policy\.schema"):
        PolicyEngine.load(PolicyConfig(dir=tmp_path / "noschema"))
    with pytest.raises(ConfigError, match="invalid policy schema"):
        load(tmp_path / "badschema", {"p.cedar": PERMIT_DEMO}, schema="entity User {")


def test_duplicate_ids_and_bad_annotations(tmp_path: Path) -> None:
    files = {"a.cedar": PERMIT_DEMO, "b/c.cedar": "\n" + PERMIT_DEMO}
    with pytest.raises(ConfigError) as exc:
        load(tmp_path / "dup", files)
    assert f"{tmp_path / 'dup' / 'b' / 'c.cedar'}:2:1: duplicate @id 'all-demo'" in exc.value.message
    assert f"first at {tmp_path / 'dup' / 'a.cedar'}:1:1" in exc.value.message
    bad = {
        "forbid-obligation": '@obligation("redact") forbid(principal, action, resource);',
        "unknown-obligation": '@obligation("notify") permit(principal, action, resource);',
        "template": "permit(principal == ?principal, action, resource);",
        "action-group": 'forbid(principal, action in Action::"writes", resource);',
        "bad-id": '@id("a`b") permit(principal, action, resource);',
    }
    for name, text in bad.items():
        with pytest.raises(ConfigError, match=r"p\.cedar:1:1: "):
            load(tmp_path / name, {"p.cedar": text})


def test_policies_without_id_are_named_by_position(tmp_path: Path) -> None:
    eng = load(tmp_path, {"x/p.cedar": "// first\n\npermit(principal, action, resource);"})
    d = eng.decide(DEV, "call_tool", "demo", "echo", {}, READ)
    assert d.policy_ids == ["x/p.cedar:3"]
    assert eng.source_of("x/p.cedar:3") == f"{tmp_path / 'x' / 'p.cedar'}:3:1"


def test_version_tracks_the_files(tmp_path: Path) -> None:
    v1 = load(tmp_path, {"p.cedar": PERMIT_DEMO}).version
    assert len(v1) == 16 and int(v1, 16) >= 0
    assert load(tmp_path, {"p.cedar": PERMIT_DEMO}).version == v1
    v2 = load(tmp_path, {"p.cedar": PERMIT_DEMO + "// changed\n"}).version
    assert v2 != v1
    (tmp_path / "p.cedar").rename(tmp_path / "q.cedar")
    assert PolicyEngine.load(PolicyConfig(dir=tmp_path), DEMO_TOOLS).version not in (v1, v2)


def test_user_defined_tool_args_is_kept(tmp_path: Path) -> None:
    schema = REPO_SCHEMA + '\n// type ToolArgs = {};\ntype ToolArgs = { "limit"?: Long };\n'
    text = (
        '@id("x") permit(principal, action, resource) '
        "when { context.args has limit && context.args.limit < 5 };"
    )
    eng = load(tmp_path, {"p.cedar": text}, schema=schema)
    assert eng.decide(DEV, "call_tool", "demo", "echo", {"limit": 1}, READ).allowed


# Arguments and the generated ToolArgs type ------------------------------------------------------


def test_sanitize_args_rules() -> None:
    out = sanitize_args(
        {"a": 1, "b": None, "c": 1.5, "d": 2.0, "e": [True, "s"], "f": {"g": None}, "h": -0.25}
    )
    assert out == {
        "a": 1,
        "c": {"__extn": {"fn": "decimal", "arg": "1.5"}},
        "d": 2,
        "e": [True, "s"],
        "f": {},
        "h": {"__extn": {"fn": "decimal", "arg": "-0.25"}},
    }
    assert sanitize_args({"x": 2**63 - 1, "y": -(2**63)}) == {"x": 2**63 - 1, "y": -(2**63)}
    nested: dict[str, Any] = {}
    cur = nested
    for _ in range(MAX_DEPTH - 1):
        cur["k"] = {}
        cur = cur["k"]
    cur["k"] = [1]
    sanitize_args(nested)
    cur["k"] = [[1]]
    with pytest.raises(ArgumentError, match="nested deeper"):
        sanitize_args(nested)
    sanitize_args({"l": list(range(MAX_LEAVES))})
    with pytest.raises(ArgumentError, match=r"\$\.l\[1000\]: more than 1000"):
        sanitize_args({"l": list(range(MAX_LEAVES + 1))})
    with pytest.raises(ArgumentError, match=r"\$\['odd key'\]\[0\]\.__extn"):
        sanitize_args({"odd key": [{"__extn": {}}]})
    with pytest.raises(ArgumentError):
        sanitize_args({"x": object()})


def test_sanitize_args_with_tool_types() -> None:
    types = arg_types_from_input_schema(
        obj(price={"type": "number"}, n=INT, tags={"type": "array", "items": {"type": "number"}})
    )
    out = sanitize_args({"price": 5, "n": 3.0, "tags": [1, 2.5]}, types)
    assert out["price"] == {"__extn": {"fn": "decimal", "arg": "5.0"}}
    assert out["n"] == 3
    assert out["tags"][0] == {"__extn": {"fn": "decimal", "arg": "1.0"}}
    for bad in ({"n": "3"}, {"n": True}, {"n": 3.5}, {"price": "1"}, {"tags": "x"}):
        with pytest.raises(ArgumentError, match="input schema"):
            sanitize_args(bad, types)


def test_tool_args_type_generation() -> None:
    nullable_int = {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None}
    schemas = {
        "a/pay": obj(amount=INT, to=STR, memo=nullable_int, price={"type": "number"}),
        "a/tag": obj(
            tags={"type": "array", "items": STR},
            opts=obj(dry={"type": "boolean"}, level={"enum": ["a", "b"]}),
            to=STR,
            ref={"$ref": "#/$defs/Ref"},
        )
        | {"$defs": {"Ref": obj(id=INT)}},
        "b/odd": obj(
            amount=STR, blob={"type": "object"}, mixed={"type": ["string", "integer"]}, rows={"type": "array"}
        ),
        "b/weird": obj(**{'we"ird\\key': INT}),
    }
    text = args_type_from_input_schemas(schemas)
    for expected in (
        '"to"?: String',
        '"memo"?: Long',
        '"price"?: decimal',
        '"tags"?: Set<String>',
        '"dry"?: Bool',
        '"level"?: String',
        '"id"?: Long',
        '"we\\"ird\\\\key"?: Long',
    ):
        assert expected in text, expected
    for left_out in ('"amount"', '"blob"', '"mixed"', '"rows"'):
        assert left_out not in text
    cedarpy.Schema.from_str(REPO_SCHEMA + text + budget_context_type(()))
    assert args_type_from_input_schemas({}) == "type ToolArgs = {};\n"
    cedarpy.Schema.from_str(REPO_SCHEMA + args_type_from_input_schemas({}) + budget_context_type(["a-b"]))
