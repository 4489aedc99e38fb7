"""Policy test cases: YAML files of requests and the decisions they must get.

Policies are data, so they get tests like code (`opa test`, Cedar's corpus tests). A case file
names the policy set it tests (by default the directory that holds its `tests/` folder), the
tools and prompts it talks about (a tool's risk, tags and input schema, a prompt's argument
names, since those shape `context.args` and the resource) and a list of cases: who, which tool,
resource or prompt, which arguments, which agent chain, when, and the expected effect and
deciding policies, or whether a listing shows the item. A principal is named as the gateway
would name it (`User::"<sub>"` for the first issuer, `<issuer>#<sub>` for the others), from the
deployment's `issuers` the suite lists. Cases run against the real engine, offline: no gateway,
upstream or identity provider is needed. See docs/policy.md for the format.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, cast, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from gateway.call import API_KEY_ISSUER, Action, Decision, Effect, Identities, Principal
from gateway.config import PolicyConfig, ToolSettings
from gateway.errors import ConfigError
from gateway.policy.engine import RESOURCE_TYPES, PolicyEngine

__all__ = [
    "DEFAULT_TIME",
    "Case",
    "CaseError",
    "CaseResult",
    "Suite",
    "discover",
    "find_schema",
    "load_suite",
    "run_suite",
]

DEFAULT_ISSUER = "policy-test"
"""The issuer of a case's principal when the suite lists no `issuers`: the first, so its ids are
bare subjects."""
DEFAULT_TIME = "2025-01-06T12:00:00"
"""When a case gives no `time`: a Monday at noon in the suite's time zone, so results never
depend on when the tests run."""

_EFFECTS = frozenset(get_args(Effect))
_ACTIONS = frozenset(get_args(Action))
_SUITE_KEYS = frozenset(
    {"policies", "schema", "entities", "timezone", "tools", "prompts", "principals", "cases", "issuers"}
)
_CASE_KEYS = frozenset(
    {"name", "principal", "agent", "action", "tool", "resource", "prompt", "args", "time", "expect"}
    | {"policies", "reason", "session"}
)
_KINDS: dict[str, tuple[str, str]] = {
    "tool": ("Tool", "call_tool"),
    "resource": ("Resource", "read_resource"),
    "prompt": ("Prompt", "get_prompt"),
}
"""Each case key naming what is asked for: its Cedar resource type and its default (call) action."""
_LISTING = frozenset({"listed", "hidden"})
_PROMPT_KEYS = frozenset({"arguments"})
_PRINCIPAL_KEYS = frozenset({"sub", "issuer", "groups", "roles", "tenant", "email", "claims"})
_AGENT_KEYS = frozenset({"id", "chain", "scopes"})
_TOOL_KEYS = frozenset({"risk", "tags", "input_schema"})


class CaseError(ValueError):
    """A case file that cannot be run; the message starts with `file:line:`."""


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    line: int
    principal: Principal
    action: str
    upstream: str
    tool: str
    """The tool's name, the resource's URI or the prompt's name (see `kind`)."""
    args: Mapping[str, Any]
    settings: ToolSettings
    time: datetime
    expect: Effect | Literal["listed", "hidden"]
    policies: frozenset[str] | None
    reason: str | None
    session_tainted: bool = False
    kind: Literal["tool", "resource", "prompt"] = "tool"


@dataclass(frozen=True, slots=True)
class Suite:
    path: Path
    policy: PolicyConfig
    tool_schemas: Mapping[str, Mapping[str, Any]]
    cases: tuple[Case, ...]
    prompt_arguments: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CaseResult:
    suite: Path
    case: Case
    decision: Decision | None
    """The decision, for a case that expects an effect (None for `listed`/`hidden`)."""
    problems: tuple[str, ...] = field(default=())
    listed: bool | None = None
    """Whether the listing shows the item, for a case that expects `listed`/`hidden`."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        where = f"{self.suite}:{self.case.line}: case {self.case.name!r}: " + ", ".join(self.problems)
        if self.decision is None:
            return where + f" (got {'listed' if self.listed else 'hidden'})"
        got = f"{self.decision.effect} {self.decision.policy_ids}"
        reasons = "; ".join(f"{r.policy}: {r.reason}" for r in self.decision.reasons)
        return where + f" (got {got}; reasons: {reasons or 'none'})"


class _LineLoader(yaml.SafeLoader):
    """A safe loader that remembers the line of every mapping, for `file:line` messages."""

    lines: dict[int, int]


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    mapping = loader.construct_mapping(node, deep=True)
    loader.lines[id(mapping)] = node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def find_schema(directory: Path) -> Path | None:
    """`schema.cedarschema` in `directory` or the nearest parent that has one (examples share one)."""
    for d in [directory, *directory.resolve().parents]:
        candidate = d / "schema.cedarschema"
        if candidate.is_file():
            return candidate
    return None


def discover(paths: Iterable[Path]) -> list[Path]:
    """Case files: each file given, and every `*.yaml`/`*.yml` in a `tests` folder under each directory."""
    found: list[Path] = []
    for path in paths:
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            for pattern in ("*.yaml", "*.yml"):
                if path.name == "tests":
                    found.extend(path.glob(pattern))
                found.extend(path.glob(f"**/tests/{pattern}"))
        else:
            raise CaseError(f"{path}: no such file or directory")
    return sorted(set(found))


def _strings(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CaseError(f"{where}: expected a list of strings")
    return value


def _unknown(data: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    extra = sorted(set(data) - allowed)
    if extra:
        raise CaseError(f"{where}: unknown key {extra[0]!r} (known: {', '.join(sorted(allowed))})")


def _principal(spec: Any, agent: Any, named: Mapping[str, Any], ids: Identities, where: str) -> Principal:
    """The case's principal, named (`User::"<id>"`) as the gateway would with the suite's issuers."""
    if isinstance(spec, str):
        if spec not in named:
            raise CaseError(f"{where}: principal {spec!r} is not defined under `principals`")
        spec = named[spec]
    if not isinstance(spec, Mapping):
        raise CaseError(f"{where}: principal must be a name from `principals` or a mapping")
    _unknown(spec, _PRINCIPAL_KEYS, f"{where}: principal")
    claims = spec.get("claims") or {}
    if not isinstance(claims, Mapping):
        raise CaseError(f"{where}: principal.claims must be a mapping of token claims")
    sub = spec.get("sub", claims.get("sub"))
    if not isinstance(sub, str) or not sub:
        raise CaseError(f"{where}: principal needs a `sub`")
    issuer = spec.get("issuer", claims.get("iss", ids.first))
    if issuer not in (*ids.issuers, API_KEY_ISSUER):
        listed = ", ".join(ids.issuers) if ids.issuers != (DEFAULT_ISSUER,) else "none"
        raise CaseError(
            f"{where}: principal.issuer {issuer!r} is not {API_KEY_ISSUER} nor listed in the"
            f" suite's `issuers` ({listed}); list the deployment's identity.issuers, in order"
        )
    agent = agent or {}
    if not isinstance(agent, Mapping):
        raise CaseError(f"{where}: agent must be a mapping {{id, chain, scopes}}")
    _unknown(agent, _AGENT_KEYS, f"{where}: agent")
    act_chain: list[str] = []
    act = claims.get("act")
    while isinstance(act, Mapping) and isinstance(act.get("sub"), str):
        act_chain.append(act["sub"])
        act = act.get("act")
    scope_claim = claims.get("scope", claims.get("scp"))
    scopes = scope_claim.split() if isinstance(scope_claim, str) else _strings(scope_claim, where)

    def text(key: str) -> str | None:
        value = spec.get(key, claims.get(key))
        if value is not None and not isinstance(value, str):
            raise CaseError(f"{where}: principal.{key} must be a string")
        return value

    agent_id = agent.get("id", claims.get("azp", claims.get("client_id")))
    if agent_id is not None and not isinstance(agent_id, str):
        raise CaseError(f"{where}: agent.id must be a string")
    return Principal(
        sub=sub,
        issuer=issuer,
        groups=frozenset(_strings(spec.get("groups", claims.get("groups")), f"{where}: groups")),
        roles=frozenset(_strings(spec.get("roles", claims.get("roles")), f"{where}: roles")),
        tenant=text("tenant"),
        email=text("email"),
        agent=agent_id,
        delegation_chain=tuple(_strings(agent.get("chain"), f"{where}: agent.chain") or act_chain),
        scopes=frozenset(
            _strings(agent.get("scopes"), f"{where}: agent.scopes") if "scopes" in agent else scopes
        ),
        claims=dict(claims),
        id=ids.id_of(issuer, sub),
    )


def _time(value: Any, tz: ZoneInfo, where: str) -> datetime:
    if isinstance(value, datetime):
        moment = value
    else:
        try:
            moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError as exc:
            raise CaseError(f"{where}: time {value!r} is not ISO 8601 (2025-01-06T09:30)") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=tz)


def _path(base: Path, value: Any, where: str) -> Path:
    if not isinstance(value, str):
        raise CaseError(f"{where}: expected a path")
    return (base / value).resolve()


def load_suite(path: Path) -> Suite:
    """Parse and check one case file; any problem is a CaseError naming `file:line`."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CaseError(f"{path}: cannot read: {exc}") from exc
    loader = _LineLoader(text)
    loader.lines = {}
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise CaseError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    finally:
        loader.dispose()
    lines = loader.lines

    def at(node: Any) -> str:
        return f"{path}:{lines.get(id(node), 1)}"

    if not isinstance(data, Mapping):
        raise CaseError(f"{path}:1: expected a mapping with `cases`")
    _unknown(data, _SUITE_KEYS, at(data))
    base = path.parent
    default_set = base.parent if base.name == "tests" else base
    set_dir = _path(base, data["policies"], at(data)) if "policies" in data else default_set.resolve()
    schema = _path(base, data["schema"], at(data)) if "schema" in data else find_schema(set_dir)
    if schema is None:
        raise CaseError(f"{at(data)}: no schema.cedarschema in {set_dir} or above it; set `schema`")
    entities = _path(base, data["entities"], at(data)) if "entities" in data else None
    tz_name = data.get("timezone", "UTC")
    try:
        tz = ZoneInfo(str(tz_name))
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise CaseError(f"{at(data)}: unknown timezone {tz_name!r}") from exc
    policy = PolicyConfig(dir=set_dir, schema_file=schema, entities=entities, timezone=str(tz_name))

    tools = data.get("tools") or {}
    if not isinstance(tools, Mapping):
        raise CaseError(f"{at(data)}: tools must map UPSTREAM/TOOL to {{risk, tags, input_schema}}")
    settings: dict[str, ToolSettings] = {}
    schemas: dict[str, Mapping[str, Any]] = {}
    for key, spec in tools.items():
        where = f"{at(spec)}: tools.{key}"
        if not isinstance(key, str) or key.count("/") != 1:
            raise CaseError(f"{at(tools)}: tool {key!r} must be written UPSTREAM/TOOL")
        spec = spec or {}
        if not isinstance(spec, Mapping):
            raise CaseError(f"{where}: expected a mapping")
        _unknown(spec, _TOOL_KEYS, where)
        try:
            settings[key] = ToolSettings(risk=spec.get("risk", "read"), tags=spec.get("tags", []))
        except ValueError as exc:
            raise CaseError(f"{where}: {exc}") from exc
        schemas[key] = spec.get("input_schema") or {}

    prompts = data.get("prompts") or {}
    if not isinstance(prompts, Mapping):
        raise CaseError(f"{at(data)}: prompts must map UPSTREAM/PROMPT to {{arguments: [names]}}")
    prompt_arguments: dict[str, tuple[str, ...]] = {}
    for key, spec in prompts.items():
        if not isinstance(key, str) or key.count("/") != 1:
            raise CaseError(f"{at(prompts)}: prompt {key!r} must be written UPSTREAM/PROMPT")
        spec = spec or {}
        if not isinstance(spec, Mapping):
            raise CaseError(f"{at(prompts)}: prompts.{key}: expected a mapping")
        _unknown(spec, _PROMPT_KEYS, f"{at(spec)}: prompts.{key}")
        prompt_arguments[key] = tuple(_strings(spec.get("arguments"), f"{at(spec)}: prompts.{key}.arguments"))

    issuers = _strings(data.get("issuers"), f"{at(data)}: issuers") or [DEFAULT_ISSUER]
    try:
        ids = Identities(tuple(issuers))
    except ValueError as exc:
        raise CaseError(f"{at(data)}: issuers: {exc}") from None
    named = data.get("principals") or {}
    if not isinstance(named, Mapping):
        raise CaseError(f"{at(data)}: principals must map names to principals")
    raw_cases = data.get("cases")
    if not isinstance(raw_cases, list) or not raw_cases:
        raise CaseError(f"{at(data)}: `cases` must be a non-empty list")
    reference = _time(DEFAULT_TIME, tz, str(path))
    cases = []
    for i, raw in enumerate(raw_cases):
        if not isinstance(raw, Mapping):
            raise CaseError(f"{path}: cases[{i}] must be a mapping")
        where = at(raw)
        _unknown(raw, _CASE_KEYS, where)
        name = str(raw.get("name") or f"case {i + 1}")
        kind, upstream, item = _target(raw, where)
        rtype, call_action = _KINDS[kind]
        action = raw.get("action", call_action)
        if action not in _ACTIONS:
            raise CaseError(f"{where}: action must be one of {', '.join(sorted(_ACTIONS))}")
        if RESOURCE_TYPES.get(action) != rtype:
            raise CaseError(
                f"{where}: action {action} does not apply to a {kind} (its resource is not {rtype})"
            )
        expect = raw.get("expect")
        if expect not in _EFFECTS | _LISTING:
            raise CaseError(f"{where}: expect must be one of {', '.join(sorted(_EFFECTS | _LISTING))}")
        if expect in _LISTING:
            if action != call_action:
                raise CaseError(f"{where}: expect: {expect} checks the listing, derived from {call_action}")
            extra = sorted({"args", "policies", "reason"} & set(raw))
            if extra:
                raise CaseError(
                    f"{where}: {extra[0]} does not apply to expect: {expect} (a listing has no arguments)"
                )
        args = raw.get("args") or {}
        if not isinstance(args, Mapping):
            raise CaseError(f"{where}: args must be a mapping")
        reason = raw.get("reason")
        session = raw.get("session") or {}
        if not isinstance(session, Mapping) or set(session) - {"tainted"}:
            raise CaseError(f"{where}: session must be a mapping with `tainted: true|false`")
        if not isinstance(session.get("tainted", False), bool):
            raise CaseError(f"{where}: session.tainted must be true or false")
        key = f"{upstream}/{item}"
        cases.append(
            Case(
                name=name,
                line=lines.get(id(raw), 1),
                principal=_principal(raw.get("principal"), raw.get("agent"), named, ids, where),
                action=action,
                upstream=upstream,
                tool=item,
                args=args,
                settings=settings.get(key, ToolSettings()) if kind == "tool" else ToolSettings(),
                time=_time(raw["time"], tz, where) if "time" in raw else reference,
                expect=cast(Effect, expect),
                policies=(
                    frozenset(_strings(raw["policies"], f"{where}: policies")) if "policies" in raw else None
                ),
                reason=str(reason) if reason is not None else None,
                session_tainted=bool(session.get("tainted", False)),
                kind=kind,
            )
        )
    return Suite(path, policy, schemas, tuple(cases), prompt_arguments)


def _target(raw: Mapping[str, Any], where: str) -> tuple[Literal["tool", "resource", "prompt"], str, str]:
    """Which of `tool`, `resource`, `prompt` the case names, split into upstream and name."""
    given = [k for k in ("tool", "resource", "prompt") if k in raw]
    if len(given) != 1:
        raise CaseError(
            f"{where}: name exactly one of tool: UPSTREAM/TOOL, resource: UPSTREAM/URI, "
            "prompt: UPSTREAM/PROMPT"
        )
    kind = cast(Literal["tool", "resource", "prompt"], given[0])
    value = raw[kind]
    upstream, _, name = value.partition("/") if isinstance(value, str) else ("", "", "")
    if not upstream or not name or (kind == "tool" and "/" in name):
        shape = {"tool": "UPSTREAM/TOOL", "resource": "UPSTREAM/URI", "prompt": "UPSTREAM/PROMPT"}[kind]
        raise CaseError(f"{where}: {kind} must be written {shape}")
    return kind, upstream, name


def run_suite(suite: Suite) -> list[CaseResult]:
    """Every case of `suite` against a freshly loaded engine; ConfigError if the set does not load."""
    engine = PolicyEngine.load(suite.policy, suite.tool_schemas, prompt_arguments=suite.prompt_arguments)
    results = []
    for case in suite.cases:
        if case.expect in _LISTING:
            listed = bool(
                engine.listable(
                    case.principal,
                    case.action,
                    case.upstream,
                    [case.tool],
                    _always(case.settings),
                    now=case.time,
                    session_tainted=case.session_tainted,
                )
            )
            wrong = listed != (case.expect == "listed")
            missing = (f"expected {case.expect} in the {case.kind}s listing",) if wrong else ()
            results.append(CaseResult(suite.path, case, None, missing, listed))
            continue
        decision = engine.decide(
            case.principal,
            case.action,
            case.upstream,
            case.tool,
            case.args,
            case.settings,
            now=case.time,
            session_tainted=case.session_tainted,
        )
        problems: list[str] = []
        if decision.effect != case.expect:
            problems.append(f"expected {case.expect}")
        if case.policies is not None and set(decision.policy_ids) != case.policies:
            problems.append(f"expected deciding policies {sorted(case.policies)}")
        if case.reason is not None and not any(case.reason in r.reason for r in decision.reasons):
            problems.append(f"expected a reason containing {case.reason!r}")
        results.append(CaseResult(suite.path, case, decision, tuple(problems)))
    return results


def _always(settings: ToolSettings) -> Callable[[str], ToolSettings]:
    return lambda _name: settings


def run_paths(paths: Iterable[Path]) -> tuple[list[CaseResult], list[str]]:
    """All case files under `paths`: the results, and the files that could not be run (with why)."""
    results: list[CaseResult] = []
    errors: list[str] = []
    for file in discover(paths):
        try:
            results.extend(run_suite(load_suite(file)))
        except CaseError as exc:
            errors.append(str(exc))
        except ConfigError as exc:
            errors.append(f"{file}: the policy set does not load:\n  {exc.message}")
    return results, errors
