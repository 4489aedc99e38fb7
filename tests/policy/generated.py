"""Random policy sets for checking listings against Cedar: the grammar and one check per set.

Conditions mix what a listing must tell apart: argument comparisons (`>`, `==`, `<`, `like`,
booleans, `has` alone), principal tests, the tool's risk, forbids with and without argument
conditions, and `unless`. Literals come from small pools so that sets often contradict
themselves (a permit above 5 and a forbid above 3), which is where listings go wrong.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from gateway.call import Principal
from gateway.config import PolicyConfig, ToolSettings
from gateway.errors import ConfigError
from gateway.policy.engine import PolicyEngine

from .oracle import Tally, check_listing, engine_factory

ARGS_TYPE = 'type ToolArgs = { "n"?: Long, "s"?: String, "b"?: Bool };\n'
TOOL_SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer"}, "s": {"type": "string"}, "b": {"type": "boolean"}},
}
TOOLS = {
    ("u", "t1"): ToolSettings(),
    ("u", "t2"): ToolSettings(risk="write", tags=["x"]),
    ("v", "t3"): ToolSettings(),
}
PRINCIPALS = [
    Principal(sub="alice", issuer="t", groups=frozenset({"g1"}), tenant="acme"),
    Principal(sub="bob", issuer="t", groups=frozenset({"g2"})),
    Principal(sub="carol", issuer="t", tenant="globex"),
]
INTS = (0, 3, 5, 10)
STRINGS = ("a", "ab", "zz")
PATTERNS = ("a*", "*b")


def _atom(rng: random.Random) -> str:
    n, s = rng.choice(INTS), rng.choice(STRINGS)
    return rng.choice(
        [
            f"(context.args has n && context.args.n > {n})",
            f"(context.args has n && context.args.n == {n})",
            f"(context.args has n && context.args.n < {n})",
            f'(context.args has s && context.args.s == "{s}")',
            f'(context.args has s && context.args.s like "{rng.choice(PATTERNS)}")',
            "(context.args has b && context.args.b)",
            "(context.args has n)",
            'principal.groups.contains("g2")',
            '(principal has tenant && principal.tenant == "acme")',
            "(context.args has s && principal has tenant && context.args.s == principal.tenant)",
            '(resource is Tool && resource.risk == "write")',
        ]
    )


def _condition(rng: random.Random) -> str:
    atoms = [("!" if rng.random() < 0.25 else "") + _atom(rng) for _ in range(rng.choice((1, 1, 2)))]
    return f" {rng.choice(('&&', '||'))} ".join(atoms)


def policy(rng: random.Random, i: int) -> str:
    effect = rng.choice(("permit", "forbid"))
    principal = rng.choice(
        (
            "principal",
            "principal",
            'principal in Group::"g1"',
            'principal in Group::"g2"',
            'principal == User::"alice"',
        )
    )
    action = rng.choice(
        (
            'action == Action::"call_tool"',
            'action == Action::"call_tool"',
            'action in [Action::"call_tool", Action::"list_tools"]',
            'action == Action::"list_tools"',
            "action",
        )
    )
    resource = rng.choice(
        ("resource", "resource", 'resource == Tool::"u/t1"', 'resource in Upstream::"u"', "resource is Tool")
    )
    notes = f'@id("{effect}-{i}") '
    if effect == "permit" and rng.random() < 0.2:
        notes += '@obligation("approval") '
    text = f"{notes}{effect} ({principal}, {action}, {resource})"
    for _ in range(rng.choice((0, 1, 1, 2))):
        text += f" {rng.choice(('when', 'when', 'unless'))} {{ {_condition(rng)} }}"
    return text + ";\n"


def policy_set(rng: random.Random) -> str:
    return "".join(policy(rng, i) for i in range(rng.randint(1, 5)))


def check_set(root: Path, schema: str, text: str, tally: Tally) -> None:
    """Load one generated set and check every (principal, tool) listing against full decisions."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "schema.cedarschema").write_text(schema + ARGS_TYPE)
    (root / "p.cedar").write_text(text)
    tools: dict[str, Any] = {f"{u}/{t}": TOOL_SCHEMA for u, t in TOOLS}
    try:
        engine = PolicyEngine.load(PolicyConfig(dir=root), tools)
    except ConfigError as exc:
        raise AssertionError(f"generated set does not load:\n{text}\n{exc.message}") from exc
    single = engine_factory(root, schema + ARGS_TYPE, tools)
    before = len(tally.failures)
    for principal in PRINCIPALS:
        for (upstream, tool), settings in TOOLS.items():
            check_listing(engine, text, principal, upstream, tool, settings, TOOL_SCHEMA, tally, single)
    if len(tally.failures) > before:
        tally.failures.append(f"in the set:\n{text}")
