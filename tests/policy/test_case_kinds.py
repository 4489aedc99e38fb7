"""`bastion policy test` cases for resources, prompts and listings."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.policy.cases import CaseError, load_suite, run_suite

POLICIES = Path(__file__).resolve().parents[2] / "policies"
SET = """
@id("devs") permit(principal in Group::"developers", action, resource in Upstream::"up");
@id("no-drafts") @reason("drafts are private") forbid(principal, action == Action::"read_resource", resource)
when { resource.uri like "*draft*" };
"""


def case_file(tmp_path: Path, cases: str) -> Path:
    shutil.copy(POLICIES / "schema.cedarschema", tmp_path / "schema.cedarschema")
    (tmp_path / "p.cedar").write_text(SET)
    (tmp_path / "tests").mkdir(exist_ok=True)
    path = tmp_path / "tests" / "cases.yaml"
    path.write_text(cases)
    return path


def test_resource_prompt_and_listing_cases(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = case_file(
        tmp_path,
        """
prompts:
  up/summarise: {arguments: [topic]}
principals:
  dev: {sub: dev, groups: [developers]}
cases:
  - {principal: dev, resource: up/notes://a/b, expect: allow, policies: [devs]}
  - {principal: dev, resource: up/notes://draft, expect: deny, reason: drafts are private}
  - {principal: dev, prompt: up/summarise, args: {topic: x}, expect: allow}
  - {principal: dev, resource: up/notes://draft, expect: hidden}
  - {principal: dev, prompt: up/summarise, expect: listed}
  - {principal: {sub: eve}, tool: up/t, expect: listed}
""",
    )
    suite = load_suite(path)
    assert [c.kind for c in suite.cases] == ["resource", "resource", "prompt", "resource", "prompt", "tool"]
    assert suite.cases[0].action == "read_resource" and suite.cases[0].tool == "notes://a/b"
    assert suite.cases[2].action == "get_prompt"
    results = run_suite(suite)
    assert [r.ok for r in results] == [True, True, True, True, True, False]
    assert results[5].describe().endswith("expected listed in the tools listing (got hidden)")
    assert results[3].decision is None and results[3].listed is False
    assert main(["policy", "test", str(path)]) == 1
    assert "5 passed, 1 failed" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("{principal: {sub: a}, tool: u/t, resource: u/x, expect: allow}", "exactly one of tool"),
        ("{principal: {sub: a}, resource: notes, expect: allow}", "resource must be written UPSTREAM/URI"),
        ("{principal: {sub: a}, prompt: u/, expect: allow}", "prompt must be written UPSTREAM/PROMPT"),
        (
            "{principal: {sub: a}, resource: u/x, action: call_tool, expect: allow}",
            "does not apply to a resource",
        ),
        ("{principal: {sub: a}, tool: u/t, action: list_tools, expect: listed}", "derived from call_tool"),
        ("{principal: {sub: a}, tool: u/t, args: {n: 1}, expect: hidden}", "args does not apply"),
        ("{principal: {sub: a}, tool: u/t, expect: shown}", "expect must be one of"),
    ],
)
def test_bad_cases_say_what_is_wrong(tmp_path: Path, case: str, message: str) -> None:
    path = case_file(tmp_path, f"cases:\n  - {case}\n")
    with pytest.raises(CaseError, match=message):
        load_suite(path)
