"""Loading a policy set: reading the files, parsing each policy, checking it against the schema.

Cedar reports no positions and refuses nothing Bastion would consider unsafe, so this module
splits files into single policies (keeping their offsets for `file:line:col` messages), refuses
what Bastion cannot evaluate faithfully (templates, action groups, duplicate ids, unknown
obligations) and generates the schema types that depend on the gateway (`ToolArgs`,
`BudgetContext`). The result is a `LoadedSet`; `PolicyEngine.load` turns it into an engine.
"""

from __future__ import annotations

import bisect
import fnmatch
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import cedarpy

from gateway.call import Effect
from gateway.config import PolicyConfig
from gateway.errors import ConfigError
from gateway.policy.context import (
    CedarType,
    arg_types_from_input_schema,
    render_record,
    tool_args_record,
)
from gateway.policy.entities import load_entities

__all__ = [
    "OBLIGATIONS",
    "REQUEST_ACTIONS",
    "LoadedSet",
    "PolicyInfo",
    "budget_context_type",
    "load_set",
    "policy_files",
]

OBLIGATIONS: Mapping[str, Effect] = {"redact": "transform", "approval": "approval_required"}
"""`@obligation` values a permit may carry, and the effect each turns an allow into."""
REQUEST_ACTIONS = frozenset(
    {"call_tool", "list_tools", "read_resource", "get_prompt", "approve", "approve_own", "send_message"}
)
"""The actions Bastion puts in requests. Action groups are not evaluated (see `_check_scope`)."""


_ID_OK = re.compile(r"^[^\x00-\x1f\x7f`\"\\]{1,128}$")
_POLICY_N = re.compile(r"^policy(\d+)$")
_FOR_POLICY = re.compile(r"^for policy `[^`]*`, ")
_ACTION_REF = re.compile(r'Action::"[^"]*"')
_TICKED = re.compile(r"`([^`]*)`")
_OTHER_TYPE = re.compile(r"on entity type `(Resource|Prompt|Agent)` not found")
_OTHER_TYPE_HINT = (
    " (the policy's actions include read_resource, get_prompt or send_message, whose resources are "
    "Resource, Prompt and Agent: list the tool actions in its scope, or test `resource is Tool` first)"
)
_TOOLARGS_DEF = re.compile(r"(?:^|[\s;{}])type\s+ToolArgs\s*=")
_BUDGET_DEF = re.compile(r"(?:^|[\s;{}])type\s+BudgetContext\s*=")
_BUDGET_STATE = "type BudgetState = { remaining: Long, limit: Long, used: Long };\n"


def budget_context_type(names: Iterable[str]) -> str:
    """`context.budget`'s Cedar type: one optional `BudgetState` per configured budget name."""
    fields = ", ".join(f'"{n}"?: BudgetState' for n in sorted(set(names)))
    return _BUDGET_STATE + f"type BudgetContext = {{ {fields} }};\n"


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


@dataclass(frozen=True, slots=True)
class LoadedSet:
    """A parsed, validated policy set and what deciding needs from its files."""

    version: str
    """First 16 hex digits of a SHA-256 over file names and contents, schema, generated types."""
    policies: list[PolicyInfo]
    est: dict[str, dict[str, Any]]
    """Each policy's Cedar JSON (EST) by id, for building per-request subsets."""
    tz: ZoneInfo
    arg_types: dict[str, dict[str, CedarType]]
    warnings: list[str]
    base_entities: cedarpy.Entities | None
    uses_budget: bool


def load_set(
    cfg: PolicyConfig,
    tool_schemas: Mapping[str, Mapping[str, Any]] = {},
    budget_names: Iterable[str] = (),
    prompt_arguments: Mapping[str, Iterable[str]] = {},
) -> LoadedSet:
    """Read, parse and validate every `*.cedar` under `cfg.dir`; any problem is a ConfigError.

    `tool_schemas` maps `<upstream>/<tool>` to the tool's MCP `inputSchema` and
    `prompt_arguments` maps `<upstream>/<prompt>` to its argument names (strings): together they
    give `context.args` its Cedar type (`ToolArgs`). `budget_names` give `context.budget` its
    type (`BudgetContext`).
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
    generated = ""
    args_record: dict[str, CedarType] | None = None
    if not _TOOLARGS_DEF.search(_code_only(user_schema)):
        schemas = dict(tool_schemas)
        for key, names in prompt_arguments.items():
            props = {name: {"type": "string"} for name in names}
            schemas[f"\x00prompt\x00{key}"] = {"type": "object", "properties": props}
        args_record = tool_args_record(schemas)
        generated = f"type ToolArgs = {render_record(args_record)};\n"
    if not _BUDGET_DEF.search(_code_only(user_schema)):
        generated += budget_context_type(budget_names)
    try:
        schema = cedarpy.Schema.from_str(user_schema.rstrip() + "\n\n" + generated)
    except ValueError as exc:
        raise ConfigError(f"invalid policy schema:\n  {schema_path}: {exc}") from exc

    digest = hashlib.sha256()
    chunks, errors = _read_chunks(directory, digest.update, cfg.exclude)
    digest.update(b"schema\x00" + user_schema.encode() + b"\x00" + generated.encode())
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
        known_args = tool_schemas or prompt_arguments
        if generated and not known_args and any("args" in e for _, e in errors + warnings):
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
    return LoadedSet(
        version=digest.hexdigest()[:16],
        policies=[info for _, info, _ in parsed],
        est={info.id: est for _, info, est in parsed},
        tz=tz,
        arg_types={k: v for k, v in arg_types.items() if v},
        warnings=[w for _, w in sorted(warnings)],
        base_entities=base_entities,
        uses_budget=any("context.budget" in chunk.text for chunk, _, _ in parsed),
    )


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
            hint = _OTHER_TYPE_HINT if _OTHER_TYPE.search(msg) else ""
            errors.append((owner.order if owner else -1, f"{where}: {msg}{hint}"))


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
