"""Micro-benchmark: microseconds per policy decision for 10, 200 and 2,000 policies.

`PolicyEngine.decide` is measured as the gateway calls it (sanitise arguments, build the
context, Cedar with a pre-parsed `PolicySet` and a cached `Entities` handle, interpret). Two
shapes of policy set:

- `spread`: the demo's three policies plus policies scoped to other tools (a large organisation:
  most policies cannot apply to a given call, and the engine hands Cedar only those that can);
- `same_tool`: every extra policy applies to the tool being called (the worst case: Cedar must
  evaluate all of them).

Run alone: `python -m bench.cedar` prints a table. The harness calls `run()`.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from gateway.call import Principal
from gateway.config import PolicyConfig, ToolSettings
from gateway.policy.engine import PolicyEngine

__all__ = ["SIZES", "decision_us", "run"]

SIZES = (10, 200, 2000)
Shape = Literal["spread", "same_tool"]

_REPO = Path(__file__).resolve().parent.parent
_DEMO = (_REPO / "policies" / "demo.cedar").read_text()
_SCHEMA = (_REPO / "policies" / "schema.cedarschema").read_text()
_TOOLS = {
    "demo/transfer": {
        "type": "object",
        "properties": {"amount": {"type": "integer"}, "to": {"type": "string"}},
    },
    "demo/echo": {"type": "object", "properties": {"text": {"type": "string"}}},
}
_DEMO_POLICIES = sum(1 for line in _DEMO.splitlines() if line.startswith("@id("))


def _extra(n: int, shape: Shape) -> str:
    out = []
    for i in range(n):
        if shape == "spread":
            out.append(
                f'@id("p{i}") permit(principal in Group::"g{i % 37}", action == Action::"call_tool", '
                f'resource == Tool::"up{i % 50}/tool{i}") '
                f"when {{ context.args has amount && context.args.amount < {i + 10} }};"
            )
        else:
            out.append(
                f'@id("p{i}") permit(principal in Group::"g{i % 37}", action == Action::"call_tool", '
                f'resource in Upstream::"demo") '
                f"when {{ context.args has amount && context.args.amount > {i} }};"
            )
    return "\n".join(out)


def _engine(root: Path, n_policies: int, shape: Shape) -> tuple[PolicyEngine, float]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "schema.cedarschema").write_text(_SCHEMA)
    (root / "demo.cedar").write_text(_DEMO)
    (root / "extra.cedar").write_text(_extra(max(n_policies - _DEMO_POLICIES, 0), shape))
    started = time.perf_counter()
    engine = PolicyEngine.load(PolicyConfig(dir=root), _TOOLS)
    return engine, (time.perf_counter() - started) * 1000


def decision_us(n_policies: int, *, shape: Shape = "spread", samples: int = 2000) -> dict[str, Any]:
    """Median and p99 µs of one `decide` (a developer's `demo/transfer`) with `n_policies` policies.

    Returns `{"policies", "shape", "median_us", "p99_us", "load_ms", "samples"}`; `load_ms` is the
    one-time parse + validate + index cost (paid at start-up and on each hot reload).
    """
    principal = Principal(sub="dev", issuer="bench", groups=frozenset({"developers", "g1"}))
    settings = ToolSettings(risk="external")
    args = {"amount": 500, "to": "bob"}
    with tempfile.TemporaryDirectory(prefix="bastion-bench-cedar-") as tmp:
        engine, load_ms = _engine(Path(tmp), n_policies, shape)
    assert len(engine.policies) == max(n_policies, _DEMO_POLICIES)
    first = engine.decide(principal, "call_tool", "demo", "transfer", args, settings)
    assert first.effect == "allow", first
    for _ in range(min(200, samples)):
        engine.decide(principal, "call_tool", "demo", "transfer", args, settings)
    timings = []
    clock = time.perf_counter_ns
    for _ in range(samples):
        t0 = clock()
        engine.decide(principal, "call_tool", "demo", "transfer", args, settings)
        timings.append((clock() - t0) / 1000)
    timings.sort()
    return {
        "policies": len(engine.policies),
        "shape": shape,
        "median_us": round(statistics.median(timings), 1),
        "p99_us": round(timings[int(len(timings) * 0.99) - 1], 1),
        "load_ms": round(load_ms, 1),
        "samples": samples,
    }


def run(sizes: tuple[int, ...] = SIZES, samples: int = 2000) -> list[dict[str, Any]]:
    """`decision_us` for every size and both shapes; fewer samples for the slow worst case."""
    rows = []
    for n in sizes:
        for shape in ("spread", "same_tool"):
            count = samples if shape == "spread" or n <= 200 else max(samples // 10, 50)
            rows.append(decision_us(n, shape=shape, samples=count))  # type: ignore[arg-type]
    return rows


def _main() -> None:
    print("| policies | shape | median µs | p99 µs | load ms |")
    print("|---|---|---|---|---|")
    for row in run():
        cells = [row[k] for k in ("policies", "shape", "median_us", "p99_us", "load_ms")]
        print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    _main()
