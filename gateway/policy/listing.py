"""Candidate values for what a listing leaves unknown: tool arguments and a template's URI.

A listing asks whether a call could be allowed for SOME arguments. Cedar's partial evaluation
answers most cases outright; when it leaves residual policies, the engine looks for a witness:
concrete arguments, built from the literals the residuals compare an argument with (and one
step either side of them, so `<`, `!=` and `like` can go both ways), that a full evaluation
allows. This module only proposes candidates; it never decides anything, so a gap here can
hide or show an item but never lets a call through.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from gateway.policy.context import CedarType

__all__ = [
    "UNKNOWN_ARGS",
    "UNKNOWN_URI",
    "Literals",
    "argument_candidates",
    "template_pattern",
    "uri_candidates",
]

UNKNOWN_ARGS: dict[str, Any] = {"__extn": {"fn": "unknown", "arg": "args"}}
"""`context.args` as a Cedar unknown, for partial evaluation."""
UNKNOWN_URI: dict[str, Any] = {"__extn": {"fn": "unknown", "arg": "uri"}}
"""A resource's `uri` attribute as a Cedar unknown (resource templates)."""

_Path = tuple[str, ...]
_ORDER = ("<", "<=", ">", ">=", "lessThan", "lessThanOrEqual", "greaterThan", "greaterThanOrEqual")
_EQUALITY = ("==", "!=")
_STEP = Decimal("0.0001")
_MISSING = object()
"""A known entity or record that lacks the attribute: reading it is an error, never a match."""


def _target(expr: Any) -> _Path | None:
    """`context.args.a.b` (or the unknown `args`) as `("args", "a", "b")`; `resource.uri` as `("uri",)`."""
    if not isinstance(expr, Mapping):
        return None
    unknown = expr.get("unknown")
    if isinstance(unknown, list) and unknown and isinstance(unknown[0], Mapping):
        name = unknown[0].get("Value")
        return (name,) if name in ("args", "uri") else None
    access = expr.get(".")
    if not isinstance(access, Mapping) or not isinstance(access.get("attr"), str):
        return None
    left, attr = access.get("left"), access["attr"]
    var = left.get("Var") if isinstance(left, Mapping) else None
    if var == "context" and attr == "args":
        return ("args",)
    if var == "resource" and attr == "uri":
        return ("uri",)
    inner = _target(left)
    return (*inner, attr) if inner is not None and inner[0] == "args" else None


def _known(expr: Any, env: Mapping[str, Any]) -> Any:
    """The value of a literal or of a known attribute chain (`principal.tenant`), else None."""
    if not isinstance(expr, Mapping):
        return None
    if "Value" in expr:
        value = expr["Value"]
        return value if isinstance(value, str | int | bool) else None
    if "Set" in expr and isinstance(expr["Set"], list):
        items = [_known(e, env) for e in expr["Set"]]
        return items if all(i is not None for i in items) else None
    neg = expr.get("neg")
    if isinstance(neg, Mapping):
        value = _known(neg.get("arg"), env)
        return -value if isinstance(value, int) and not isinstance(value, bool) else None
    dec = expr.get("decimal")
    if isinstance(dec, list) and len(dec) == 1:
        text = _known(dec[0], env)
        try:
            return Decimal(text) if isinstance(text, str) else None
        except InvalidOperation:
            return None
    if "Var" in expr:
        return env.get(expr["Var"])
    access = expr.get(".")
    if isinstance(access, Mapping) and _target(expr) is None:
        base = _known(access.get("left"), env)
        if isinstance(base, Mapping):
            return base.get(access.get("attr"), _MISSING)
        return _MISSING if base is _MISSING else None
    return None


def _near(value: Any) -> list[Any]:
    """Values on each side of a comparison with `value` (integers are expanded later, by region)."""
    if isinstance(value, bool):
        return [value, not value]
    if isinstance(value, Decimal):
        return [float(v) for v in (value, value - _STEP, value + _STEP)]
    if isinstance(value, str):
        return [value, ""]
    return []


def _like_examples(pattern: Any) -> list[str]:
    if not isinstance(pattern, list):
        return []
    outs = []
    for fill in ("", "x"):
        parts = [p["Literal"] if isinstance(p, Mapping) else fill for p in pattern]
        if all(isinstance(p, str) for p in parts):
            outs.append("".join(parts))
    return outs


def _regions(ints: Iterable[int]) -> list[int]:
    """One integer per region the literals cut the line into: each literal, each gap, both ends."""
    ordered = sorted(set(ints))
    out = [ordered[0] - 1]
    for i, n in enumerate(ordered):
        out.append(n)
        if i + 1 == len(ordered) or n + 1 < ordered[i + 1]:
            out.append(n + 1)
    return out


_LOGICAL = ("&&", "||")
_COMPARISONS = frozenset({*_EQUALITY, *_ORDER, "contains", "containsAll", "containsAny", "in"})


class Literals:
    """What residual policies compare the unknowns with: candidate values per path.

    `opaque` is set when an unknown is used in a way this analysis does not model (arithmetic,
    two arguments compared with each other, an entity-typed argument, ...): then trying the
    candidates is no proof that no arguments could be allowed.
    """

    def __init__(self) -> None:
        self.values: dict[_Path, list[Any]] = {}
        self.ints: dict[_Path, set[int]] = {}
        self.patterns: dict[_Path, list[str]] = {}
        self.opaque = False

    def add(self, path: _Path, values: Iterable[Any] = ()) -> None:
        known = self.values.setdefault(path, [])
        seen = {json.dumps(v, sort_keys=True, default=str) for v in known}
        for v in values:
            key = json.dumps(v, sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                known.append(v)

    def collect(self, node: Any, env: Mapping[str, Any]) -> Literals:
        """Walk a Cedar JSON expression (or whole policies) and record what it says about unknowns."""
        if isinstance(node, list):
            for item in node:
                self.collect(item, env)
            return self
        if not isinstance(node, Mapping):
            return self
        path = _target(node)
        if path is not None:
            self.add(path)
            self.opaque = True
            return self
        for op, operand in node.items():
            self._operation(op, operand, env)
        return self

    def _boolean(self, node: Any, env: Mapping[str, Any]) -> None:
        path = _target(node)
        if path is not None:
            self.add(path, [True, False])
        else:
            self.collect(node, env)

    def _operation(self, op: str, operand: Any, env: Mapping[str, Any]) -> None:
        if isinstance(operand, Mapping):
            if op in _LOGICAL:
                self._boolean(operand.get("left"), env)
                self._boolean(operand.get("right"), env)
                return
            if op == "!":
                self._boolean(operand.get("arg"), env)
                return
            if op == "if-then-else":
                for part in ("if", "then", "else"):
                    self._boolean(operand.get(part), env)
                return
            if op in ("has", "like", "isEmpty"):
                key = "arg" if op == "isEmpty" else "left"
                base = _target(operand.get(key))
                if base is None:
                    self.collect(operand.get(key), env)
                elif op == "has" and isinstance(operand.get("attr"), str):
                    self.add((*base, operand["attr"]))
                elif op == "like":
                    examples = _like_examples(operand.get("pattern"))
                    self.add(base, examples)
                    self.patterns.setdefault(base, []).extend(examples[:1])
                elif op == "isEmpty":
                    self.add(base, [[]])
                else:
                    self.opaque = True
                return
            if op in _COMPARISONS and "left" in operand and "right" in operand:
                self._compare(op, operand["left"], operand["right"], env)
                return
        elif isinstance(operand, list) and len(operand) == 2 and op in _ORDER:
            self._compare(op, operand[0], operand[1], env)
            return
        self.collect(operand, env)

    def _compare(self, op: str, left: Any, right: Any, env: Mapping[str, Any]) -> None:
        lpath, rpath = _target(left), _target(right)
        if lpath is None and rpath is None:
            self.collect(left, env)
            self.collect(right, env)
            return
        path = lpath or rpath
        value = _known(right if lpath is not None else left, env)
        if value is _MISSING:
            return
        if path is None or value is None or (lpath is not None and rpath is not None):
            self.opaque = True
            return
        if isinstance(value, list):
            if rpath is not None and op in ("contains", "in"):
                self.add(path, [v for item in value for v in _near(item)])
                self.ints.setdefault(path, set()).update(
                    v for v in value if isinstance(v, int) and not isinstance(v, bool)
                )
            elif op == "in":
                self.add(path, value)
            else:
                self.add(path, [value, [], *([v] for v in value)])
        elif isinstance(value, int) and not isinstance(value, bool) and op in (*_EQUALITY, *_ORDER):
            self.add(path)
            self.ints.setdefault(path, set()).add(value)
        elif op in _EQUALITY or op in _ORDER:
            self.add(path, _near(value))
        elif op == "contains" and lpath is not None:
            self.add(path, [[value], []])
        else:
            self.opaque = True

    def options(self, path: _Path) -> list[Any]:
        """Candidate values for one path: recorded values, integer regions, `like` combinations."""
        values = list(self.values.get(path, []))
        if path in self.ints:
            values += [n for n in _regions(self.ints[path]) if n not in values]
        patterns = self.patterns.get(path, [])
        values += [a + b for a, b in itertools.permutations(patterns, 2) if a + b not in values]
        return values


def _defaults(shape: CedarType | None) -> list[Any]:
    if shape == "Long":
        return [0, 1]
    if shape == "String":
        return ["x"]
    if shape == "Bool":
        return [True, False]
    if shape == "decimal":
        return [0.5]
    if isinstance(shape, tuple):
        return [[], *([d] for d in _defaults(shape[1])[:1])]
    if isinstance(shape, dict):
        return [{}]
    return ["x", 1, True]


def _shape(types: Mapping[str, CedarType] | None, path: _Path) -> CedarType | None:
    shape: CedarType | None = dict(types) if types is not None else None
    for name in path:
        shape = shape.get(name) if isinstance(shape, dict) else None
    return shape


def _fits(value: Any, shape: CedarType | None) -> bool:
    if shape is None:
        return True
    if isinstance(shape, tuple):
        return isinstance(value, list) and all(_fits(v, shape[1]) for v in value)
    if isinstance(shape, dict):
        return isinstance(value, dict)
    if shape == "String":
        return isinstance(value, str)
    if shape == "Bool":
        return isinstance(value, bool)
    if shape == "Long":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, int | float) and not isinstance(value, bool)


def _place(args: dict[str, Any], path: _Path, value: Any) -> bool:
    node = args
    for name in path[:-1]:
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            return False
        node = child
    if path[-1] in node:
        return False
    node[path[-1]] = value
    return True


def argument_candidates(
    literals: Literals, types: Mapping[str, CedarType] | None, limit: int
) -> tuple[list[dict[str, Any]], bool]:
    """Argument sets to try, fewest arguments first, and whether they are all there are.

    Every combination of "absent" or one candidate per argument path, at most `limit` of them;
    the flag is False when the combinations did not fit. `types` (the tool's argument types; for
    a prompt every argument is a string) drop values a real call could not carry; paths only
    tested with `has` get a value of their type.
    """
    options: list[tuple[_Path, list[Any]]] = []
    for path in literals.values:
        if len(path) < 2 or path[0] != "args":
            continue
        shape = _shape(types, path[1:])
        values = literals.options(path)
        fitting = [v for v in values if _fits(v, shape)] or [v for v in _defaults(shape) if _fits(v, shape)]
        if fitting:
            options.append((path[1:], fitting))
    out: list[dict[str, Any]] = []
    for k in range(len(options) + 1):
        for chosen in itertools.combinations(options, k):
            for combo in itertools.product(*(vals for _, vals in chosen)):
                if len(out) >= limit:
                    return out, False
                args: dict[str, Any] = {}
                if all(_place(args, path, v) for (path, _), v in zip(chosen, combo, strict=True)):
                    out.append(args)
    return out, True


_EXPRESSION = re.compile(r"\{[^{}]*\}")


def template_pattern(template: str) -> re.Pattern[str]:
    """The URIs an RFC 6570 template can expand to, loosely: every expression matches anything.

    Loose on purpose: a listing must not hide a template because one of its expansions was
    judged impossible, so this may match more than the template can produce.
    """
    parts = _EXPRESSION.split(template)
    return re.compile(".*".join(re.escape(p) for p in parts), re.S)


def uri_candidates(literals: Literals, template: str, limit: int) -> list[str]:
    """URIs to try for a template: those the residuals name that the template matches, then expansions."""
    pattern = template_pattern(template)
    named = [v for v in literals.options(("uri",)) if isinstance(v, str)]
    fills = ["x", "", *named]
    expansions = [_EXPRESSION.sub(fill.replace("\\", "\\\\"), template) for fill in fills]
    out: list[str] = []
    for uri in [*named, *expansions]:
        if uri not in out and pattern.fullmatch(uri):
            out.append(uri)
    return out[:limit]
