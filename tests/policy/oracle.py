"""The listing checked against Cedar itself: full decisions over a family of argument sets.

`listable` must show an item iff some arguments let its call through (and, for tools, no forbid
on `list_tools` decides with empty arguments). The family is built here from the literals in
the policy text, independently of the engine's own witness search, so a gap in either shows up.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from gateway.call import Principal
from gateway.config import PolicyConfig, ToolSettings
from gateway.policy.engine import PolicyEngine

_ABSENT = object()
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
_INT = re.compile(r"(?<![\w.\"])-?\d+(?![\w.\"])")


def string_literals(text: str, principal: Principal) -> list[str]:
    """Every string literal (with `like` wildcards filled both ways), the principal's own values, ""."""
    out: list[str] = [""]
    for lit in _STRING.findall(text):
        for fill in ("", "x"):
            out.append(lit.replace("*", fill))
        out.append(lit + "x")
    out += [v for v in (principal.tenant, principal.email) if v]
    return list(dict.fromkeys(out))


def int_literals(text: str) -> list[int]:
    ints = {int(m) for m in _INT.findall(_STRING.sub('""', text))}
    return sorted({v for n in ints for v in (n - 1, n, n + 1)})


def family(
    text: str, principal: Principal, schema: Mapping[str, Any], limit: int = 4000
) -> list[dict[str, Any]]:
    """Argument sets covering the policies' literals: every combination of absent or a value per argument."""
    props = schema.get("properties") or {}
    options: list[tuple[str, list[Any]]] = []
    for name, spec in props.items():
        kind = spec.get("type")
        if kind == "integer":
            values: list[Any] = int_literals(text) or [0]
        elif kind == "string":
            values = string_literals(text, principal)
        elif kind == "boolean":
            values = [True, False]
        elif kind == "array":
            values = [[], ["x"], *([s] for s in string_literals(text, principal)[:4])]
        else:
            continue
        options.append((name, [_ABSENT, *values]))
    out = []
    for combo in itertools.product(*(vals for _, vals in options)):
        out.append({name: v for (name, _), v in zip(options, combo, strict=True) if v is not _ABSENT})
        if len(out) >= limit:
            break
    return out


@dataclass
class Tally:
    """How many checks fell in each category, so a test can insist both directions were exercised."""

    counts: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def add(self, category: str) -> None:
        self.counts[category] = self.counts.get(category, 0) + 1


def _permit_alone_depends_on_args(
    engine_for: Callable[[str], PolicyEngine],
    permits: Iterable[str],
    check: Callable[[PolicyEngine, dict[str, Any]], bool],
    args_family: list[dict[str, Any]],
) -> bool:
    """Whether some permit, alone, allows for some arguments of the family and not for others."""
    for text in permits:
        engine = engine_for(text)
        outcomes = {check(engine, args) for args in args_family}
        if outcomes == {True, False}:
            return True
    return False


def check_listing(
    engine: PolicyEngine,
    policy_text: str,
    principal: Principal,
    upstream: str,
    tool: str,
    settings: ToolSettings,
    schema: Mapping[str, Any],
    tally: Tally,
    engine_for: Callable[[str], PolicyEngine] | None = None,
    now: datetime | None = None,
    session_tainted: bool = False,
) -> None:
    """One (principal, tool): `listable` against full decisions over the family."""
    listed = tool in engine.listable(
        principal, "call_tool", upstream, [tool], lambda _: settings, now=now, session_tainted=session_tainted
    )
    args_family = family(policy_text, principal, schema)

    def allowed(eng: PolicyEngine, args: dict[str, Any]) -> bool:
        d = eng.decide(
            principal, "call_tool", upstream, tool, args, settings, now, session_tainted=session_tainted
        )
        return d.effect != "deny"

    unlocking = [a for a in args_family if allowed(engine, a)]
    lt = engine.decide(
        principal, "list_tools", upstream, tool, {}, settings, now, session_tainted=session_tainted
    )
    list_forbidden = lt.effect == "deny" and any(r.policy != "default-deny" for r in lt.reasons)
    where = f"{principal.sub} {upstream}/{tool}"
    if list_forbidden:
        tally.add("hidden: list_tools forbidden")
        if listed:
            tally.failures.append(f"{where}: listed although a forbid denies list_tools ({lt.policy_ids})")
        return
    if unlocking and not listed:
        tally.failures.append(f"{where}: hidden although {unlocking[0]} is allowed")
    elif unlocking:
        tally.add("listed: all arguments" if len(unlocking) == len(args_family) else "listed: some arguments")
    elif not listed:
        permits = "\n".join(p.text for p in engine.policies if p.effect == "permit")
        some_permit = (
            bool(permits)
            and engine_for is not None
            and any(allowed(engine_for(permits), a) for a in args_family)
        )
        tally.add("hidden: forbids refuse every argument set" if some_permit else "hidden: no permit applies")
    else:
        permits = [p.text for p in engine.policies if p.effect == "permit"]
        if engine_for is not None and _permit_alone_depends_on_args(
            engine_for, permits, allowed, args_family
        ):
            tally.add("listed: argument-dependent permit, no witness")
        else:
            tally.failures.append(f"{where}: listed although no arguments of {len(args_family)} unlock it")


def engine_factory(root: Path, schema: str, tools: Mapping[str, Any]) -> Callable[[str], PolicyEngine]:
    """Engines of one policy each, for judging whether a permit alone depends on the arguments."""
    cache: dict[str, PolicyEngine] = {}

    def build(text: str) -> PolicyEngine:
        if text not in cache:
            directory = root / f"single-{len(cache)}"
            directory.mkdir(parents=True)
            (directory / "schema.cedarschema").write_text(schema)
            (directory / "p.cedar").write_text(text)
            cache[text] = PolicyEngine.load(PolicyConfig(dir=directory), tools)
        return cache[text]

    return build
