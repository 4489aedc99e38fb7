"""Micro-benchmark: what a shadow policy set (`policy.shadow`) adds to the policy stage.

`PolicyStage.__call__` is timed as the pipeline awaits it, on the repo's policies (`policies/`),
for a developer's `demo/transfer` of 500 (allowed), three ways:

- `live only`: no shadow set;
- `shadow agrees`: a shadow set that is a copy of the live one (one more Cedar evaluation);
- `shadow disagrees`: the copy plus a forbid on the tool (the evaluation, the note on the call
  and the counter `bastion_policy_shadow_disagreements_total`);

and, for scale, `one Cedar decide`: `PolicyEngine.decide` of the copy alone, the evaluation a
shadow set is allowed to add (the added median should be about this much, and no more).

Rounds of the three alternate so that drift (CPU frequency, other load) hits all of them alike.
Run alone: `python -m bench.shadow` prints a table with the ratios to `live only`. The harness
calls `run()`.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from gateway.call import Principal, ToolCall
from gateway.config import PolicyConfig, ToolSettings
from gateway.policy.engine import PolicyEngine
from gateway.stages.policy import PolicyStage

__all__ = ["run", "stage_us"]

_REPO = Path(__file__).resolve().parent.parent
_TOOLS = {
    "demo/transfer": {
        "type": "object",
        "properties": {"amount": {"type": "integer"}, "to": {"type": "string"}},
    },
}
_FORBID = (
    '@id("bench-no-transfers") @reason("the candidate stops transfers") '
    'forbid(principal, action == Action::"call_tool", resource == Tool::"demo/transfer");\n'
)
_SETTINGS = ToolSettings(risk="external")
_ARGS = {"amount": 500, "to": "bob"}
_ROUND = 200


def _load(root: Path) -> PolicyEngine:
    return PolicyEngine.load(PolicyConfig(dir=root), _TOOLS)


async def _timed(stage: PolicyStage, principal: Principal, n: int) -> list[float]:
    out = []
    clock = time.perf_counter_ns
    for _ in range(n):
        call = ToolCall("demo", "transfer", dict(_ARGS), principal=principal)
        t0 = clock()
        decision = await stage(call)
        out.append((clock() - t0) / 1000)
        assert decision is not None and decision.effect == "allow", decision
    return out


def _timed_decide(engine: PolicyEngine, principal: Principal, n: int) -> list[float]:
    out = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        engine.decide(principal, "call_tool", "demo", "transfer", dict(_ARGS), _SETTINGS)
        out.append((clock() - t0) / 1000)
    return out


async def stage_us(samples: int = 4000) -> list[dict[str, Any]]:
    """Median and p99 µs of one `PolicyStage.__call__` without and with a shadow set.

    Returns one row per variant (and one for a lone `decide`): `{"payload", "median_us", "p99_us",
    "ratio", "samples"}`, `ratio` being the median over the `live only` median."""
    principal = Principal(sub="dev", issuer="bench", groups=frozenset({"developers"}))
    with tempfile.TemporaryDirectory(prefix="bastion-bench-shadow-") as tmp:
        same, tighter = Path(tmp) / "same", Path(tmp) / "tighter"
        for target in (same, tighter):
            shutil.copytree(_REPO / "policies", target, ignore=shutil.ignore_patterns("examples", "tests"))
        (tighter / "bench.cedar").write_text(_FORBID)
        live, agrees, disagrees = _load(_REPO / "policies"), _load(same), _load(tighter)
    variants: dict[str, PolicyEngine | None] = {
        "live only": None,
        "shadow agrees": agrees,
        "shadow disagrees": disagrees,
    }
    stages = {
        name: PolicyStage(lambda: live, lambda u, t: _SETTINGS, None, lambda s=shadow: s)
        for name, shadow in variants.items()
    }
    timings: dict[str, list[float]] = {name: [] for name in [*stages, "one Cedar decide"]}
    for stage in stages.values():
        await _timed(stage, principal, _ROUND)  # warm the caches
    _timed_decide(agrees, principal, _ROUND)
    for _ in range(max(samples // _ROUND, 1)):
        for name, stage in stages.items():
            timings[name] += await _timed(stage, principal, _ROUND)
        timings["one Cedar decide"] += _timed_decide(agrees, principal, _ROUND)
    base = statistics.median(timings["live only"])
    rows = []
    for name, values in timings.items():
        values.sort()
        median = statistics.median(values)
        rows.append(
            {
                "payload": name,
                "median_us": round(median, 1),
                "p99_us": round(values[int(len(values) * 0.99) - 1], 1),
                "ratio": round(median / base, 2),
                "samples": len(values),
            }
        )
    return rows


def run(samples: int = 4000) -> list[dict[str, Any]]:
    return asyncio.run(stage_us(samples))


def _main() -> None:
    print("| policy stage | median µs | p99 µs | ratio to live only |")
    print("|---|---|---|---|")
    for row in run():
        print(f"| {row['payload']} | {row['median_us']} | {row['p99_us']} | {row['ratio']}x |")


if __name__ == "__main__":
    _main()
