"""Listings on the shipped policy sets (demo and examples) agree with full Cedar decisions."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.policy.cases import discover, load_suite
from gateway.policy.engine import PolicyEngine

from .oracle import Tally, check_listing

POLICIES = Path(__file__).resolve().parents[2] / "policies"
SUITES = discover([POLICIES])


@pytest.mark.parametrize("path", SUITES, ids=[str(p.relative_to(POLICIES)) for p in SUITES])
def test_listing_matches_full_decisions(path: Path) -> None:
    suite = load_suite(path)
    engine = PolicyEngine.load(suite.policy, suite.tool_schemas, prompt_arguments=suite.prompt_arguments)
    text = "\n".join(p.text for p in engine.policies)
    tools = {(c.upstream, c.tool): c.settings for c in suite.cases if c.kind == "tool"}
    tally = Tally()
    seen = set()
    for case in suite.cases:
        context = (repr(case.principal), case.time, case.session_tainted)
        if context in seen:
            continue
        seen.add(context)
        for (upstream, tool), settings in tools.items():
            schema = suite.tool_schemas.get(f"{upstream}/{tool}") or {}
            check_listing(
                engine,
                text,
                case.principal,
                upstream,
                tool,
                settings,
                schema,
                tally,
                now=case.time,
                session_tainted=case.session_tainted,
            )
    assert not tally.failures, "\n".join(tally.failures)
    assert tally.counts
