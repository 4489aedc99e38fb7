"""Listings on generated policy sets agree with full Cedar decisions, in both directions."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from .generated import check_set, policy_set
from .oracle import Tally

REPO_SCHEMA = (Path(__file__).resolve().parents[2] / "policies" / "schema.cedarschema").read_text()


def test_generated_sets_seeded(tmp_path: Path) -> None:
    tally = Tally()
    for seed in range(20):
        check_set(tmp_path / str(seed), REPO_SCHEMA, policy_set(random.Random(seed)), tally)
    assert not tally.failures, "\n".join(tally.failures)
    # Both directions were exercised: shown items some arguments refuse, hidden items that a
    # forbid or a missing permit keeps out whatever the arguments, and list_tools forbids.
    for category in (
        "listed: some arguments",
        "listed: all arguments",
        "hidden: no permit applies",
        "hidden: forbids refuse every argument set",
        "hidden: list_tools forbidden",
    ):
        assert tally.counts.get(category, 0) >= 3, tally.counts


hypothesis = pytest.importorskip("hypothesis")


@hypothesis.settings(
    max_examples=10, deadline=None, suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture]
)
@hypothesis.given(rng=hypothesis.strategies.randoms(use_true_random=False))
def test_generated_sets_hypothesis(tmp_path: Path, rng: random.Random) -> None:
    tally = Tally()
    root = tmp_path / f"h{rng.getrandbits(32)}"
    check_set(root, REPO_SCHEMA, policy_set(rng), tally)
    assert not tally.failures, "\n".join(tally.failures)
