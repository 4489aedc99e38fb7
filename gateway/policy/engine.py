"""The policy stage: every call is decided by Cedar, and nothing else may turn a deny into an allow.

The policy set is read, parsed, schema-validated and indexed once (`PolicyEngine.load`); a
decision only builds the request and evaluates it. Cedar itself is lenient in ways that would be
security bugs here, so this module allows only on a clean `Allow` (no evaluation errors: Cedar
skips a `forbid` whose condition fails), never passes the schema at request time (it would
refuse any undeclared context field), and hands Cedar only sanitised arguments.
"""

from __future__ import annotations

import bisect
import fnmatch
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import cedarpy

from gateway.call import Decision, Effect, Principal, Reason
from gateway.config import PolicyConfig, ToolSettings
from gateway.errors import ConfigError
from gateway.policy.context import (
    ArgumentError,
    CedarType,
    arg_types_from_input_schema,
    render_record,
    sanitize_args,
    tool_args_record,
)
from gateway.policy.entities import load_entities

__all__ = ["OBLIGATIONS", "REQUEST_ACTIONS", "PolicyEngine", "PolicyInfo", "policy_files"]

OBLIGATIONS: Mapping[str, Effect] = {"redact": "transform", "approval": "approval_required"}
"""`@obligation` values a permit may carry, and the effect each turns an allow into."""
REQUEST_ACTIONS = frozenset(
    {"call_tool", "list_tools", "read_resource", "get_prompt", "approve", "approve_own"}
)
"""The actions Bastion puts in requests. Action groups are not evaluated (see `_check_scope`)."""

_STRICTNESS: Mapping[Effect, int] = {"allow": 0, "transform": 1, "approval_required": 2, "deny": 3}
_ID_OK = re.compile(r"^[^\x00-\x1f\x7f`\"\\]{1,128}$")
_POLICY_N = re.compile(r"^policy(\d+)$")
_FOR_POLICY = re.compile(r"^for policy `[^`]*`, ")
_ACTION_REF = re.compile(r'Action::"[^"]*"')
_EVAL_ERROR = re.compile(r"^error while evaluating policy `([^`]*)`: (.*)$", re.S)
_TICKED = re.compile(r"`([^`]*)`")
_TOOLARGS_DEF = re.compile(r"(?:^|[\s;{}])type\s+ToolArgs\s*=")
_BUDGET_DEF = re.compile(r"(?:^|[\s;{}])type\s+BudgetContext\s*=")
_BUDGET_STATE = "type BudgetState = { remaining: Long, limit: Long, used: Long };\n"


def budget_context_type(names: Iterable[str]) -> str:
    """`context.budget`'s Cedar type: one optional `BudgetState` per configured budget name."""
    fields = ", ".join(f'"{n}"?: BudgetState' for n in sorted(set(names)))
    return _BUDGET_STATE + f"type BudgetContext = {{ {fields} }};\n"


_CACHE_MAX = 4096


@dataclass(frozen=True, slots=True)
class PolicyInfo:
    """One policy as loaded: what a decision needs to explain itself, without asking Cedar."""

    id: str
    effect: Literal["permit", "forbid"]
    reason: str
    obligation: str | None
    source: str
    """`file:line:col` of the policy's first character."""
    text: str


@dataclass(frozen=True, slots=True)
class _Chunk:
    order: int
    path: Path
    rel: str
    text: str
    start: int
    source_text: str
    newlines: tuple[int, ...]
    """Offsets of the file's newlines, shared by its chunks: positions without rescanning the file."""

    def where(self, offset: int = 0) -> str:
        pos = self.start + offset
        line = bisect.bisect_left(self.newlines, pos) + 1
        col = pos - (self.newlines[line - 2] + 1 if line > 1 else 0) + 1
        return f"{self.path}:{line}:{col}"

    @property
    def line(self) -> int:
        return bisect.bisect_left(self.newlines, self.start) + 1


def _split(text: str) -> list[tuple[int, int]]:
    """Spans of the policies in a file: from the first code character to the closing `;`.

    Cedar reports no positions, so each policy is parsed on its own and its offset kept. Only
    strings and `//` comments can hide a `;`, so this is all the lexing needed.
    """
    spans: list[tuple[int, int]] = []
    start: int | None = None
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            if start is None:
                start = i
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
        elif c == "/" and text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j + 1
        elif c == ";":
            spans.append((i if start is None else start, i + 1))
            start = None
            i += 1
        else:
            if start is None and not c.isspace():
                start = i
            i += 1
    if start is not None:
        spans.append((start, n))
    return spans


def _code_only(text: str) -> str:
    """`text` with comments and string contents blanked, for looking for declarations."""
    out = list(text)
    i, n = 0, len(text)
    while i < n:
        if text[i] == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            for k in range(i + 1, min(j, n)):
                out[k] = " "
            i = j + 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            for k in range(i, j):
                out[k] = " "
            i = j
        else:
            i += 1
    return "".join(out)


def _locate(chunk: _Chunk, message: str) -> str:
    """The most precise position for an error: a quoted fragment found exactly once, else the start."""
    for fragment in _TICKED.findall(_FOR_POLICY.sub("", message)):
        if len(fragment) >= 2 and chunk.text.count(fragment) == 1:
            return chunk.where(chunk.text.index(fragment))
    return chunk.where()


def _group_by_action(messages: Iterable[str]) -> list[str]:
    """Cedar repeats a type error once per action; say it once, naming the actions."""
    groups: dict[str, list[str]] = {}
    for msg in messages:
        actions = _ACTION_REF.findall(msg)
        key = _ACTION_REF.sub("\x00", msg) if len(actions) == 1 else msg
        groups.setdefault(key, []).extend(actions if len(actions) == 1 else [])
    out = []
    for key, actions in groups.items():
        if actions:
            key = key.replace("\x00", ", ".join(sorted(set(actions))))
        out.append(key)
    return out


def _action_matches(scope: Mapping[str, Any], action: str) -> bool:
    op = scope.get("op")
    if op in ("==", "in") and "entity" in scope:
        return bool(scope["entity"] == {"type": "Action", "id": action})
    if op == "in" and isinstance(scope.get("entities"), list):
        return {"type": "Action", "id": action} in scope["entities"]
    return True


def _resource_matches(scope: Mapping[str, Any], upstream: str, tool: str) -> bool:
    """Whether a resource scope can hold for `Tool::"<upstream>/<tool>"`.

    Exact because Bastion builds the resource entity itself: its only ancestor is
    `Upstream::"<upstream>"`. Anything unrecognised counts as a match (kept, never dropped).
    """
    uid = {"type": "Tool", "id": f"{upstream}/{tool}"}
    parent = {"type": "Upstream", "id": upstream}
    op = scope.get("op")
    if op == "==" and "entity" in scope:
        return bool(scope["entity"] == uid)
    if op == "in" and "entity" in scope:
        return scope["entity"] in (uid, parent)
    if op == "is":
        if scope.get("entity_type") != "Tool":
            return False
        inner = scope.get("in")
        return not isinstance(inner, Mapping) or inner.get("entity") in (uid, parent)
    return True


def _check_scope(est: Mapping[str, Any]) -> str | None:
    """Refuse action scopes naming actions Bastion never sends (e.g. action groups).

    Bastion evaluates without the action hierarchy, so `action in Action::"writes"` would never
    match: harmless in a permit, but a forbid that silently never applies is a hole.
    """
    scope = est.get("action", {})
    refs = [scope["entity"]] if "entity" in scope else list(scope.get("entities", []))
    for ref in refs:
        if (
            not isinstance(ref, Mapping)
            or ref.get("type") != "Action"
            or ref.get("id") not in REQUEST_ACTIONS
        ):
            name = ref.get("id") if isinstance(ref, Mapping) else ref
            known = ", ".join(sorted(REQUEST_ACTIONS))
            return (
                f"action {name!r} is not one Bastion evaluates (one of {known}); "
                "action groups are not supported: list the actions"
            )
    return None


def _redact(message: str, policy_text: str) -> str:
    """Cedar quotes values in its errors (`the values `5000` and `1``): keep only policy text."""
    return _TICKED.sub(lambda m: m.group(0) if m.group(1) in policy_text else "`…`", message)


class PolicyEngine:
    """A loaded, validated, immutable policy set. Reloading builds a new engine and swaps it in."""

    def __init__(
        self,
        *,
        version: str,
        policies: list[PolicyInfo],
        est: dict[str, Any],
        tz: ZoneInfo,
        arg_types: dict[str, dict[str, CedarType]],
        warnings: Iterable[str] = (),
        base_entities: cedarpy.Entities | None = None,
    ) -> None:
        self.version = version
        self.warnings: tuple[str, ...] = tuple(warnings)
        """Problems that do not stop loading but deserve a log line (`file:line:col: message`)."""
        self.policies: tuple[PolicyInfo, ...] = tuple(policies)
        self._by_id = {p.id: p for p in policies}
        self._order = {p.id: i for i, p in enumerate(policies)}
        self._est = est
        self._tz = tz
        self._arg_types = arg_types
        self._base_entities = base_entities
        self.uses_budget = False
        """Whether a policy reads `context.budget` (only then is the budget state looked up)."""
        # Bounded caches, emptied when full: plain dicts stay safe if decisions run in threads.
        self._sets: dict[tuple[str, str, str], cedarpy.PolicySet] = {}
        self._sets_by_ids: dict[tuple[str, ...], cedarpy.PolicySet] = {}
        self._entities: dict[tuple[Any, ...], cedarpy.Entities] = {}

    # Loading ---------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        cfg: PolicyConfig,
        tool_schemas: Mapping[str, Mapping[str, Any]] = {},
        budget_names: Iterable[str] = (),
    ) -> PolicyEngine:
        """Read, parse and validate every `*.cedar` under `cfg.dir`; any problem is a ConfigError.

        `tool_schemas` maps `<upstream>/<tool>` to the tool's MCP `inputSchema`: they give
        `context.args` its Cedar type (`ToolArgs`) and the per-tool argument types.
        `budget_names` (the configured budgets) give `context.budget` its type (`BudgetContext`).
        """
        directory = cfg.dir
        if not directory.is_dir():
            raise ConfigError(f"policy.dir: {directory} is not a directory")
        schema_path = cfg.schema_path
        try:
            user_schema = schema_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"policy.schema: cannot read {schema_path}: {exc}") from exc
        try:
            tz = ZoneInfo(cfg.timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ConfigError(f"policy.timezone: unknown time zone {cfg.timezone!r}") from exc
        tool_args = ""
        args_record: dict[str, CedarType] | None = None
        if not _TOOLARGS_DEF.search(_code_only(user_schema)):
            args_record = tool_args_record(tool_schemas)
            tool_args = f"type ToolArgs = {render_record(args_record)};\n"
        if not _BUDGET_DEF.search(_code_only(user_schema)):
            tool_args += budget_context_type(budget_names)
        try:
            schema = cedarpy.Schema.from_str(user_schema.rstrip() + "\n\n" + tool_args)
        except ValueError as exc:
            raise ConfigError(f"invalid policy schema:\n  {schema_path}: {exc}") from exc

        digest = hashlib.sha256()
        chunks, errors = _read_chunks(directory, digest.update, cfg.exclude)
        digest.update(b"schema\x00" + user_schema.encode() + b"\x00" + tool_args.encode())
        base_entities: cedarpy.Entities | None = None
        entities_path = cfg.entities_path
        if entities_path is not None:
            try:
                base_entities, raw = load_entities(entities_path, schema)
            except ValueError as exc:
                errors.append((len(chunks) + 1, str(exc)))
            else:
                digest.update(b"entities\x00" + raw)
        parsed = _parse(chunks, errors)
        warnings: _Errors = []
        if parsed:
            _validate(parsed, schema, errors)
            if args_record is not None:
                _check_args_tests(parsed, args_record, warnings)
            if tool_args and not tool_schemas and any("args" in e for _, e in errors + warnings):
                note = (
                    f"{schema_path}: note: no tool input schemas were known, so ToolArgs has no "
                    "attributes and no policy can read context.args (are the upstreams reachable?)"
                )
                (errors if errors else warnings).append((len(chunks), note))
        elif not errors:
            errors.append(
                (
                    0,
                    f"{directory}: no policies (*.cedar) found; an empty policy set would deny every "
                    "call, so it is refused as a misconfiguration",
                )
            )
        if errors:
            raise ConfigError("invalid policy set:\n  " + "\n  ".join(e for _, e in sorted(errors)))

        arg_types = {key: arg_types_from_input_schema(s) for key, s in tool_schemas.items()}
        uses_budget = any("context.budget" in chunk.text for chunk, _, _ in parsed)
        engine = cls(
            version=digest.hexdigest()[:16],
            policies=[info for _, info, _ in parsed],
            est={info.id: est for _, info, est in parsed},
            tz=tz,
            arg_types={k: v for k, v in arg_types.items() if v},
            warnings=[w for _, w in sorted(warnings)],
            base_entities=base_entities,
        )
        engine.uses_budget = uses_budget
        try:
            for key in list(tool_schemas)[: _CACHE_MAX // 4]:
                upstream, _, tool = key.partition("/")
                for action in ("call_tool", "list_tools"):
                    engine._policy_set(action, upstream, tool)
        except ValueError as exc:
            raise ConfigError(f"invalid policy set: Cedar refused the assembled set: {exc}") from exc
        return engine

    # Deciding --------------------------------------------------------------------------------

    def _policy_set(self, action: str, upstream: str, tool: str) -> cedarpy.PolicySet:
        """The policies whose scope can match this action and tool, parsed once and cached.

        Cedar's cost is linear in the number of policies; most are scoped to other tools and can
        never match, so dropping them changes no decision and no diagnostic.
        """
        key = (action, upstream, tool)
        found = self._sets.get(key)
        if found is not None:
            return found
        ids = tuple(
            pid
            for pid, est in self._est.items()
            if _action_matches(est.get("action", {}), action)
            and _resource_matches(est.get("resource", {}), upstream, tool)
        )
        found = self._sets_by_ids.get(ids)
        if found is None:
            doc = {
                "staticPolicies": {pid: self._est[pid] for pid in ids},
                "templates": {},
                "templateLinks": [],
            }
            found = cedarpy.PolicySet.from_json_str(json.dumps(doc))
            if len(self._sets_by_ids) >= _CACHE_MAX:
                self._sets_by_ids.clear()
            self._sets_by_ids[ids] = found
        if len(self._sets) >= _CACHE_MAX:
            self._sets.clear()
        self._sets[key] = found
        return found

    def _entities_for(
        self, principal: Principal, upstream: str, tool: str, settings: ToolSettings
    ) -> cedarpy.Entities:
        key = (
            principal.sub,
            principal.groups,
            principal.roles,
            principal.tenant,
            principal.email,
            upstream,
            tool,
            settings.risk,
            tuple(settings.tags),
        )
        found = self._entities.get(key)
        if found is not None:
            return found
        attrs: dict[str, Any] = {"groups": sorted(principal.groups), "roles": sorted(principal.roles)}
        if principal.tenant is not None:
            attrs["tenant"] = principal.tenant
        if principal.email is not None:
            attrs["email"] = principal.email
        doc = [
            {
                "uid": {"type": "User", "id": principal.sub},
                "attrs": attrs,
                "parents": [{"type": "Group", "id": g} for g in sorted(principal.groups)]
                + [{"type": "Role", "id": r} for r in sorted(principal.roles)],
            },
            {
                "uid": {"type": "Tool", "id": f"{upstream}/{tool}"},
                "attrs": {"risk": settings.risk, "tags": list(settings.tags)},
                "parents": [{"type": "Upstream", "id": upstream}],
            },
        ]
        text = json.dumps(doc)
        if self._base_entities is not None:
            found = self._base_entities.with_added_json_str(text)
        else:
            found = cedarpy.Entities.from_json_str(text)
        if len(self._entities) >= _CACHE_MAX:
            self._entities.clear()
        self._entities[key] = found
        return found

    def decide(
        self,
        principal: Principal,
        action: str,
        upstream: str,
        tool: str,
        args: Mapping[str, Any],
        settings: ToolSettings,
        now: datetime | None = None,
        pii: Iterable[str] = (),
        budget: Mapping[str, Any] | None = None,
        session_tainted: bool = False,
    ) -> Decision:
        """Evaluate one request. Anything but a clean Allow is a deny that says why.

        `pii`: the entity types redaction found in the arguments (`context.pii`); `budget`: per
        matching budget, `{remaining, limit, used}` before this call (`context.budget`)."""
        key = f"{upstream}/{tool}"
        try:
            clean = sanitize_args(args, self._arg_types.get(key))
        except ArgumentError as exc:
            return self._deny(Reason("invalid-arguments", str(exc)))
        local = (now or datetime.now(self._tz)).astimezone(self._tz)
        chain = list(principal.delegation_chain)
        context: dict[str, Any] = {
            "args": clean,
            "agent": {
                "id": principal.agent or "",
                "chain": chain,
                "depth": len(chain),
                "scopes": sorted(principal.scopes),
            },
            "risk": settings.risk,
            "time": {"hour": local.hour, "weekday": local.isoweekday()},
            "pii": sorted(pii),
            "budget": dict(budget or {}),
            "session": {"tainted": session_tainted},
        }
        request = {
            "principal": {"type": "User", "id": principal.sub},
            "action": {"type": "Action", "id": action},
            "resource": {"type": "Tool", "id": key},
            "context": json.dumps(context),
        }
        try:
            result = cedarpy.is_authorized(
                request,
                self._policy_set(action, upstream, tool),
                self._entities_for(principal, upstream, tool, settings),
            )
        except Exception as exc:  # fail closed on anything the binding raises
            return self._deny(
                Reason("policy-error", f"the request could not be evaluated ({type(exc).__name__})")
            )
        return self._interpret(result, action, key)

    def _interpret(self, result: cedarpy.AuthzResult, action: str, key: str) -> Decision:
        diagnostics = result.diagnostics
        determining = sorted(
            (self._by_id[pid] for pid in diagnostics.reasons if pid in self._by_id),
            key=lambda p: self._order[p.id],
        )
        errors = [self._error_text(e) for e in diagnostics.errors]
        if result.decision == cedarpy.Decision.Allow and not errors:
            effect: Effect = "allow"
            for p in determining:
                obliged = OBLIGATIONS.get(p.obligation or "", "allow")
                if _STRICTNESS[obliged] > _STRICTNESS[effect]:
                    effect = obliged
            ordered = sorted(determining, key=lambda p: OBLIGATIONS.get(p.obligation or "") != effect)
            reasons = tuple(Reason(p.id, p.reason) for p in ordered)
            return Decision(effect, reasons, "policy", self.version)
        forbids = [Reason(p.id, p.reason) for p in determining if p.effect == "forbid"]
        if result.decision == cedarpy.Decision.Deny and forbids:
            extra = (Reason("policy-error", "; ".join(errors)),) if errors else ()
            return Decision("deny", (*forbids, *extra), "policy", self.version)
        if errors or result.decision != cedarpy.Decision.Deny:
            return self._deny(Reason("policy-error", "; ".join(errors) or "Cedar reached no decision"))
        return self._deny(Reason("default-deny", f"no policy permits {action} on {key}"))

    def _error_text(self, error: str) -> str:
        m = _EVAL_ERROR.match(error)
        if m and m.group(1) in self._by_id:
            info = self._by_id[m.group(1)]
            return f"policy {info.id} could not be evaluated: {_redact(m.group(2), info.text)}"
        return f"the request could not be evaluated: {_redact(error, '')}"

    def _deny(self, reason: Reason) -> Decision:
        return Decision("deny", (reason,), "policy", self.version)

    def allowed_tools(
        self,
        principal: Principal,
        upstream: str,
        tools: list[str],
        settings_for: Callable[[str], ToolSettings],
    ) -> set[str]:
        """The tools `tools/list` shows this caller: those on which `list_tools` is not denied.

        Listing is its own action so that a permit conditioned on arguments (`call_tool` when
        `context.args.amount < 100`) does not hide the tool; `context.args` is `{}` here.
        """
        return {
            name
            for name in tools
            if self.decide(principal, "list_tools", upstream, name, {}, settings_for(name)).effect != "deny"
        }

    def source_of(self, policy_id: str) -> str | None:
        """Where a policy is written (`file:line:col`), for explaining a decision."""
        info = self._by_id.get(policy_id)
        return info.source if info else None


_Errors = list[tuple[int, str]]
"""Problems found while loading, keyed by the policy's position so they print in file order."""


def _excluded(rel: str, patterns: Iterable[str]) -> bool:
    for pattern in patterns:
        pattern = pattern.strip("/")
        if fnmatch.fnmatchcase(rel, pattern) or fnmatch.fnmatchcase(rel, pattern + "/*"):
            return True
    return False


def policy_files(directory: Path, exclude: Iterable[str] = ()) -> list[Path]:
    """The `*.cedar` files that make up the set in `directory`, in load order."""
    patterns = list(exclude)
    found = [
        (rel, p)
        for p in directory.rglob("*.cedar")
        if p.is_file() and not _excluded(rel := p.relative_to(directory).as_posix(), patterns)
    ]
    return [p for _, p in sorted(found)]


def _read_chunks(
    directory: Path, feed: Callable[[bytes], object], exclude: Iterable[str] = ()
) -> tuple[list[_Chunk], _Errors]:
    """Every policy's text and position, files in sorted order; each file's name and bytes go to `feed`."""
    chunks: list[_Chunk] = []
    errors: _Errors = []
    for path in policy_files(directory, exclude):
        rel = path.relative_to(directory).as_posix()
        try:
            raw = path.read_bytes()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            errors.append((len(chunks), f"{path}: cannot read: {exc}"))
            continue
        feed(b"file\x00" + rel.encode() + b"\x00" + raw + b"\x00")
        newlines = tuple(i for i, c in enumerate(text) if c == "\n")
        for s, e in _split(text):
            chunks.append(_Chunk(len(chunks), path, rel, text[s:e], s, text, newlines))
    return chunks, errors


def _parse(chunks: list[_Chunk], errors: _Errors) -> list[tuple[_Chunk, PolicyInfo, dict[str, Any]]]:
    """Each chunk as exactly one static policy with sound annotations; problems go to `errors`."""
    parsed: list[tuple[_Chunk, PolicyInfo, dict[str, Any]]] = []
    first_seen: dict[str, str] = {}
    for chunk in chunks:
        try:
            doc = json.loads(cedarpy.policies_to_json_str(chunk.text))
        except ValueError as exc:
            msg = str(exc)
            if "end of input" in msg and not chunk.text.endswith(";"):
                msg += " (is the `;` at the end of the policy missing?)"
            errors.append((chunk.order, f"{_locate(chunk, msg)}: {msg}"))
            continue
        static = list(doc.get("staticPolicies", {}).values())
        problem: str | None = None
        if doc.get("templates"):
            problem = "templates (?principal / ?resource) are not supported"
        elif len(static) != 1:
            problem = "expected one policy ending in `;`"
        else:
            info, problem = _info(chunk, static[0])
            problem = problem or _check_scope(static[0])
            if problem is None and info.id in first_seen:
                problem = f"duplicate @id {info.id!r} (first at {first_seen[info.id]})"
        if problem is not None:
            errors.append((chunk.order, f"{chunk.where()}: {problem}"))
            continue
        first_seen[info.id] = info.source
        parsed.append((chunk, info, static[0]))
    return parsed


def _validate(
    parsed: list[tuple[_Chunk, PolicyInfo, dict[str, Any]]], schema: cedarpy.Schema, errors: _Errors
) -> None:
    """Schema-check all policies in one call; Cedar's positional `policyN` is the N-th chunk."""
    result = cedarpy.validate_policies("\n".join(c.text for c, _, _ in parsed), schema)
    by_policy: dict[int, list[str]] = {}
    for err in result.errors:
        m = _POLICY_N.match(err.policy_id)
        by_policy.setdefault(int(m.group(1)) if m else -1, []).append(_FOR_POLICY.sub("", err.error))
    for index, messages in by_policy.items():
        owner = parsed[index][0] if 0 <= index < len(parsed) else None
        for msg in _group_by_action(messages):
            where = _locate(owner, msg) if owner else "policy set"
            errors.append((owner.order if owner else -1, f"{where}: {msg}"))


def _context_path(expr: Any) -> list[str] | None:
    """`context.a.b` as `["a", "b"]`; None for any other expression."""
    path: list[str] = []
    while isinstance(expr, Mapping):
        if expr.get("Var") == "context":
            return path[::-1]
        access = expr.get(".")
        if not isinstance(access, Mapping) or not isinstance(access.get("attr"), str):
            return None
        path.append(access["attr"])
        expr = access.get("left")
    return None


def _has_tests(node: Any) -> Iterable[tuple[list[str], str]]:
    if isinstance(node, Mapping):
        test = node.get("has")
        if isinstance(test, Mapping) and isinstance(test.get("attr"), str):
            path = _context_path(test.get("left"))
            if path is not None:
                yield path, test["attr"]
        for value in node.values():
            yield from _has_tests(value)
    elif isinstance(node, list):
        for value in node:
            yield from _has_tests(value)


def _check_args_tests(
    parsed: list[tuple[_Chunk, PolicyInfo, dict[str, Any]]], args: dict[str, CedarType], warnings: _Errors
) -> None:
    """Warn about `context.args has x` for an `x` no known tool takes.

    Cedar's validator types such a test as always false and accepts it, so a misspelt argument
    in a forbid would silently never apply. It is a warning, not an error, because the tool
    may belong to an upstream that was unreachable at load: the test still works at run time.
    """
    for chunk, _info, est in parsed:
        for path, attr in _has_tests(est.get("conditions", [])):
            if not path or path[0] != "args":
                continue
            record: CedarType | None = args
            for name in path[1:]:
                record = record.get(name) if isinstance(record, dict) else None
            if isinstance(record, dict) and attr not in record:
                where = ".".join(["context", *path])
                msg = (
                    f"no known tool takes an argument `{attr}`, so `{where} has {attr}` can only "
                    "be true for tools whose schema was not known (is the name misspelt?)"
                )
                warnings.append((chunk.order, f"{_locate(chunk, msg)}: {msg}"))


def _info(chunk: _Chunk, est: Mapping[str, Any]) -> tuple[PolicyInfo, str | None]:
    """The policy's id, reason and obligation from its annotations, or the problem with them."""
    notes = est.get("annotations") or {}
    effect: Literal["permit", "forbid"] = "forbid" if est.get("effect") == "forbid" else "permit"
    pid = notes.get("id")
    reason = notes.get("reason") or ""
    obligation = notes.get("obligation")
    info = PolicyInfo(
        id=pid if pid else f"{chunk.rel}:{chunk.line}",
        effect=effect,
        reason=reason,
        obligation=obligation,
        source=chunk.where(),
        text=chunk.text,
    )
    if "id" in notes and not (isinstance(pid, str) and _ID_OK.match(pid)):
        return (
            info,
            "@id must be 1-128 characters without quotes, backquotes, backslashes or control characters",
        )
    if obligation is not None:
        if effect == "forbid":
            return info, "@obligation applies to permit policies only"
        if obligation not in OBLIGATIONS:
            return info, f"unknown @obligation {obligation!r} (known: {', '.join(sorted(OBLIGATIONS))})"
    return info, None
