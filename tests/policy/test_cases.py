"""Policy test cases (`bastion policy test`), the shipped examples, the entities file and validate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cedarpy
import pytest

from gateway.cli import main
from gateway.config import PolicyConfig
from gateway.errors import ConfigError
from gateway.policy.cases import CaseError, discover, load_suite, run_suite
from gateway.policy.engine import PolicyEngine, budget_context_type
from gateway.policy.entities import load_entities

POLICIES = Path(__file__).resolve().parents[2] / "policies"
SCHEMA_TEXT = (POLICIES / "schema.cedarschema").read_text()
SHIPPED = discover([POLICIES])
EXAMPLES = sorted(p.name for p in (POLICIES / "examples").iterdir() if p.is_dir())


def test_every_example_ships_with_cases() -> None:
    assert len(EXAMPLES) >= 7
    for name in EXAMPLES:
        assert list((POLICIES / "examples" / name / "tests").glob("*.yaml")), f"{name} has no cases"
    assert POLICIES / "tests" / "demo.yaml" in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(POLICIES)) for p in SHIPPED])
def test_shipped_cases_pass(path: Path) -> None:
    results = run_suite(load_suite(path))
    failures = [r.describe() for r in results if not r.ok]
    assert not failures, "\n".join(failures)
    assert results


def test_example_cases_exercise_every_example_policy() -> None:
    """Each example policy decides at least one of its cases: no untested policy ships."""
    for name in EXAMPLES:
        directory = POLICIES / "examples" / name
        suites = [load_suite(p) for p in discover([directory])]
        deciding = {pid for s in suites for r in run_suite(s) if r.decision for pid in r.decision.policy_ids}
        engine = PolicyEngine.load(suites[0].policy, suites[0].tool_schemas)
        untested = {p.id for p in engine.policies} - deciding
        assert not untested, f"{name}: no case is decided by {sorted(untested)}"


def copy_set(tmp_path: Path, cases: str, cedar: str) -> Path:
    shutil.copy(POLICIES / "schema.cedarschema", tmp_path / "schema.cedarschema")
    (tmp_path / "p.cedar").write_text(cedar)
    (tmp_path / "tests").mkdir()
    case_file = tmp_path / "tests" / "cases.yaml"
    case_file.write_text(cases)
    return case_file


PERMIT = '@id("devs") permit(principal in Group::"developers", action, resource);\n'


def test_a_mismatch_fails_with_file_line_and_what_was_got(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    case_file = copy_set(
        tmp_path,
        """
cases:
  - name: right
    principal: {sub: a, groups: [developers]}
    tool: up/t
    expect: allow
    policies: [devs]
  - name: wrong effect
    principal: {sub: b}
    tool: up/t
    expect: allow
  - name: wrong policy
    principal: {sub: a, groups: [developers]}
    tool: up/t
    expect: allow
    policies: [someone-else]
""",
        PERMIT,
    )
    results = run_suite(load_suite(case_file))
    assert [r.ok for r in results] == [True, False, False]
    assert results[1].describe().startswith(f"{case_file}:8: case 'wrong effect': expected allow (got deny")
    assert "expected deciding policies ['someone-else']" in results[2].describe()

    assert main(["policy", "test", str(case_file)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL {case_file}:8: case 'wrong effect'" in out
    assert "1 passed, 2 failed" in out
    assert main(["policy", "test", str(tmp_path / "nothing-here")]) == 1


def test_passing_cases_exit_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    case_file = copy_set(
        tmp_path,
        "cases:\n  - {principal: {sub: a, groups: [developers]}, tool: up/t, expect: allow}\n",
        PERMIT,
    )
    assert main(["policy", "test", str(tmp_path)]) == 0
    assert "1 passed, 0 failed" in capsys.readouterr().out
    assert discover([tmp_path]) == [case_file]


@pytest.mark.parametrize(
    ("cases", "message"),
    [
        ("cases: []\n", r"cases\.yaml:1: `cases` must be a non-empty list"),
        ("cases:\n  - {tool: up/t, expect: allow}\n", r"cases\.yaml:2: principal must be"),
        (
            "cases:\n  - {principal: {sub: a}, tool: t, expect: allow}\n",
            r":2: tool must be written UPSTREAM/TOOL",
        ),
        ("cases:\n  - {principal: {sub: a}, tool: u/t, expect: permit}\n", r":2: expect must be one of"),
        ("cases:\n  - {principal: {sub: a}, tool: u/t, expect: allow, typo: 1}\n", r":2: unknown key 'typo'"),
        ("cases:\n  - {principal: nobody, tool: u/t, expect: allow}\n", r"principal 'nobody' is not defined"),
        ("cases:\n  - {principal: {sub: a}, tool: u/t, expect: allow, time: noon}\n", r"not ISO 8601"),
        ("cases: [\n", r"cases\.yaml:2:1: not valid YAML"),
        ("timezone: Mars/Base\ncases: []\n", r"unknown timezone"),
    ],
)
def test_bad_case_files_name_the_line(tmp_path: Path, cases: str, message: str) -> None:
    case_file = copy_set(tmp_path, cases, PERMIT)
    with pytest.raises(CaseError, match=message):
        load_suite(case_file)


def test_principals_are_named_as_the_gateway_names_them(tmp_path: Path) -> None:
    """`User::"alice"` is the first issuer's alice only; other issuers' ids are qualified."""
    case_file = copy_set(
        tmp_path,
        """
issuers: [https://idp-a.test, https://idp-b.test]
principals:
  alice: {sub: alice}
  partner-alice: {sub: alice, issuer: https://idp-b.test}
  key-alice: {sub: alice, issuer: "bastion:api-key"}
  partner-bob: {sub: bob, issuer: https://idp-b.test}
cases:
  - {principal: alice, tool: up/t, expect: allow, policies: [alice]}
  - {principal: {sub: alice, issuer: https://idp-a.test}, tool: up/t, expect: allow}
  - {principal: partner-alice, tool: up/t, expect: deny}
  - {principal: key-alice, tool: up/t, expect: deny}
  - {principal: partner-bob, tool: up/t, expect: allow, policies: [partner-bob]}
""",
        '@id("alice") permit(principal == User::"alice", action, resource);\n'
        '@id("partner-bob") permit(principal == User::"https://idp-b.test#bob", action, resource);\n',
    )
    suite = load_suite(case_file)
    assert [c.principal.id for c in suite.cases] == [
        "alice",
        "alice",
        "https://idp-b.test#alice",
        "bastion:api-key#alice",
        "https://idp-b.test#bob",
    ]
    failures = [r.describe() for r in run_suite(suite) if not r.ok]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    ("head", "principal", "message"),
    [
        (
            "",
            "{sub: a, issuer: https://idp-b.test}",
            r"principal.issuer 'https://idp-b.test' is not .* \(none\)",
        ),
        ("issuers: [https://a.test]\n", "{sub: a, issuer: https://b.test}", r"\(https://a.test\)"),
        ("issuers: [bastion:api-key]\n", "{sub: a}", r"issuers: issuer 'bastion:api-key'"),
    ],
)
def test_a_principals_issuer_must_be_listed(tmp_path: Path, head: str, principal: str, message: str) -> None:
    case_file = copy_set(
        tmp_path, f"{head}cases:\n  - {{principal: {principal}, tool: u/t, expect: deny}}\n", PERMIT
    )
    with pytest.raises(CaseError, match=message):
        load_suite(case_file)


def test_a_set_that_does_not_load_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy_set(tmp_path, "cases:\n  - {principal: {sub: a}, tool: u/t, expect: deny}\n", "permit(principal")
    assert main(["policy", "test", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "ERROR" in out and "the policy set does not load" in out and "p.cedar:1:" in out


# The entities file ------------------------------------------------------------------------------


def test_entities_file_nests_groups_and_roles(tmp_path: Path) -> None:
    shutil.copy(POLICIES / "schema.cedarschema", tmp_path / "schema.cedarschema")
    (tmp_path / "p.cedar").write_text(
        '@id("staff") permit(principal in Group::"staff", action, resource);\n'
        '@id("approver") permit(principal in Role::"approver", action, resource == Tool::"u/approve");\n'
    )
    (tmp_path / "entities.json").write_text(
        json.dumps(
            [
                {
                    "uid": {"type": "Group", "id": "admins"},
                    "parents": [{"type": "Group", "id": "developers"}],
                },
                {"uid": {"type": "Group", "id": "developers"}, "parents": [{"type": "Group", "id": "staff"}]},
                {"uid": {"type": "Role", "id": "cfo"}, "parents": [{"type": "Role", "id": "approver"}]},
            ]
        )
    )
    cases = """
cases:
  - {name: transitive, principal: {sub: a, groups: [admins]}, tool: u/t, expect: allow, policies: [staff]}
  - {name: role, principal: {sub: b, roles: [cfo]}, tool: u/approve, expect: allow, policies: [approver]}
  - {name: none, principal: {sub: c, groups: [guests], roles: [clerk]}, tool: u/approve, expect: deny}
"""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "c.yaml").write_text(cases)
    assert all(r.ok for r in run_suite(load_suite(tmp_path / "tests" / "c.yaml")))
    v1 = PolicyEngine.load(PolicyConfig(dir=tmp_path)).version
    (tmp_path / "entities.json").write_text("[]")
    assert PolicyEngine.load(PolicyConfig(dir=tmp_path)).version != v1, "the entities are part of the version"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ('[{"uid": {"type": "User", "id": "alice"}}]', r"entity \[0\] User::\"alice\": only Group and Role"),
        (
            '[{"uid": {"type": "Group", "id": "a"}, "parents": [{"type": "Role", "id": "r"}]}]',
            r"parent Role::\"r\" must be a Group",
        ),
        ('[{"uid": {"type": "Group", "id": "a"}, "attrs": {"x": 1}}]', r"have no attributes"),
        ('{"uid": 1}', r"expected a JSON array"),
        ('[\n  {"uid": }\n]', r"entities\.json:2:11: invalid JSON"),
    ],
)
def test_bad_entities_files_are_refused(tmp_path: Path, doc: str, message: str) -> None:
    path = tmp_path / "entities.json"
    path.write_text(doc)
    with pytest.raises(ValueError, match=message):
        schema = SCHEMA_TEXT + "type ToolArgs = {};" + budget_context_type(())
        load_entities(path, cedarpy.Schema.from_str(schema))
    shutil.copy(POLICIES / "schema.cedarschema", tmp_path / "schema.cedarschema")
    (tmp_path / "p.cedar").write_text(PERMIT)
    with pytest.raises(ConfigError, match=message):
        PolicyEngine.load(PolicyConfig(dir=tmp_path))


# bastion policy validate --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("permit(principal, action, resource)\nwhen { principal.groups.contains( };", "p.cedar:1:1: "),
        (
            'permit(principal, action, resource)\n  when { principal.grups.contains("x") };',
            "p.cedar:2:20: attribute `grups` on entity type `User` not found",
        ),
        (
            "forbid(principal, action, resource)\nwhen { context.risk > 3 };",
            # Cedar's message quotes no fragment of the policy: its start is the best position.
            "p.cedar:1:1: unexpected type: expected Long but saw String",
        ),
    ],
    ids=["syntax", "unknown-attribute", "wrong-type"],
)
def test_validate_prints_file_line_col(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    shutil.copy(POLICIES / "schema.cedarschema", tmp_path / "schema.cedarschema")
    (tmp_path / "p.cedar").write_text(text)
    assert main(["policy", "validate", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'p.cedar'}:" in err and expected in err, err


def test_validate_an_example_with_its_tools_and_the_shared_schema(capsys: pytest.CaptureFixture[str]) -> None:
    example = POLICIES / "examples" / "transfer-approval"
    assert main(["policy", "validate", str(example), "--tools", str(example / "tests" / "cases.yaml")]) == 0
    captured = capsys.readouterr()
    assert "ok: policy set" in captured.out and "(4 policies)" in captured.out
    assert "warning" not in captured.err


def test_examples_and_tests_are_not_part_of_the_default_set() -> None:
    engine = PolicyEngine.load(PolicyConfig(dir=POLICIES))
    assert all("/examples/" not in p.source for p in engine.policies)
    everything = PolicyConfig(dir=POLICIES, exclude=[])
    with pytest.raises(ConfigError, match="duplicate @id 'staff-use-tools'"):
        PolicyEngine.load(everything)
