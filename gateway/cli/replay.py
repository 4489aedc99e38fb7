"""`bastion policy replay`: what a candidate policy set would have decided on recorded traffic.

Each audit record keeps what Cedar saw (`replay`: the caller's issuer, groups, roles, scopes,
the session's taint, the policy stage's own verdict) beside the user, agent chain, time,
arguments and PII found. A record is re-decided with the candidate set on exactly that, and
compared with the recorded policy verdict:

- unchanged / newly denied / newly allowed / changed obligation (both allow, with another
  obligation: transform or approval);
- indeterminate: the candidate's decision depends on a value the record does not hold (an
  argument kept only redacted or as its shape, the budget state of a call the budgets never
  saw, the caller's e-mail address).
  Cedar's partial evaluation tells, never a guess;
- not replayable: the policy never ran on the call (refused before it: credentials, pinning,
  a malformed message), or the record predates `replay`.

The audit store is read, never written (`create=False`), in pages (constant memory), twice when
the candidate's `context.args` must be typed from the recorded arguments (no `--tools`).
"""

from __future__ import annotations

import argparse
import asyncio
import html
import json
import re
import sys
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast

from audit.record import AuditRecord
from audit.store import AuditStore, RecordFilters
from gateway.call import Effect, Principal
from gateway.config import Config, ShadowConfig, ToolSettings
from gateway.errors import ConfigError
from gateway.policy.engine import UNKNOWN, PolicyEngine
from gateway.stages.policy import shadow_kind
from gateway.upstreams.agents import message_schemas

Kind = Literal[
    "unchanged", "newly_denied", "newly_allowed", "changed_obligation", "indeterminate", "not_replayable"
]
KINDS: tuple[Kind, ...] = (
    "unchanged",
    "newly_denied",
    "newly_allowed",
    "changed_obligation",
    "indeterminate",
    "not_replayable",
)
EXAMPLES = 10
"""Example records kept per kind (the report stays small whatever the trail's size)."""
MAX_KEYS = 10_000
"""Distinct users, tools and policies counted; past it, the rest count under `(others)`."""
_PLACEHOLDER = re.compile(
    r"<(?:[A-Z][A-Z0-9_]*(?::[0-9a-f]{16})?|string:\d+|bytes:\d+|unscanned:\d+|int|float|bool|null)>"
)
"""What the audit stores instead of a value: a finding's type (or its pseudonym), or a shape."""
_SHAPES = {"<int>": "integer", "<float>": "number", "<bool>": "boolean"}
_DEFAULT_TOOL = ToolSettings()


@dataclass(frozen=True, slots=True)
class Replayed:
    """One record, re-decided."""

    kind: Kind
    before: str | None
    """The recorded policy verdict's effect."""
    after: str | None
    """The candidate's effect (None: indeterminate or not replayable)."""
    policies: tuple[str, ...] = ()
    """The candidate's deciding policies (for a change: the ones that caused it)."""
    why: str = ""


def unknown_args(value: Any) -> Any:
    """The recorded arguments with every leaf the record does not hold made `UNKNOWN`."""
    if isinstance(value, dict):
        return {k: unknown_args(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unknown_args(v) for v in value]
    if isinstance(value, str) and _PLACEHOLDER.search(value):
        return UNKNOWN
    return value


def replay_one(engine: PolicyEngine, cfg: Config, record: AuditRecord) -> Replayed:
    """Re-decide one record with `engine`; see the module docstring for the kinds."""
    inputs = record.replay
    verdict = inputs.get("policy") if isinstance(inputs, dict) else None
    if inputs is None or not isinstance(verdict, dict) or record.user is None:
        why = "the record predates replay inputs" if inputs is None else "the policy never ran on it"
        return Replayed("not_replayable", None, None, (), why)
    before = str(verdict.get("effect"))
    principal = Principal(
        sub=record.user,
        issuer=str(inputs.get("issuer", "")),
        groups=frozenset(inputs.get("groups", [])),
        roles=frozenset(inputs.get("roles", [])),
        tenant=record.tenant,
        agent=record.agent,
        delegation_chain=tuple(record.delegation_chain),
        scopes=frozenset(inputs.get("scopes", [])),
        id=record.user,
    )
    up = cfg.upstreams.get(record.upstream)
    settings = up.tools.get(record.tool, _DEFAULT_TOOL) if up is not None else _DEFAULT_TOOL
    args = unknown_args(record.args_redacted)
    if not isinstance(args, dict):
        args = {}
    budget = _budget_before(record) if cfg.budgets else {}  # no budgets: nothing unknown there
    tainted, has_email = inputs.get("tainted"), bool(inputs.get("has_email", True))
    decision, unknowns = engine.decide_recorded(
        principal,
        record.action,
        record.upstream,
        record.tool,
        args,
        settings,
        record.ts,
        pii=(record.pii.get("input") or {}).keys(),
        budget=budget,
        session_tainted=tainted if isinstance(tainted, bool) else None,
        skill=inputs.get("skill"),
        has_email=has_email,
    )
    if decision is None:
        return Replayed("indeterminate", before, None, (), f"depends on {', '.join(unknowns)}")
    return _compared(before, decision.effect, tuple(decision.policy_ids))


def _budget_before(record: AuditRecord) -> dict[str, Any] | None:
    """`context.budget` as it was before the call, from what the budget stage charged (each
    counter's state after the charge, less its cost); None when the record cannot tell (the
    budgets never ran, or one was exceeded and the others were not looked at)."""
    spent = record.budget
    if not isinstance(spent, dict) or spent.get("exceeded") is not None:
        return None
    view: dict[str, Any] = {}
    for state in spent.get("charged") or []:
        try:
            used = int(state["used"]) - int(state["cost"])
            limit = int(state["limit"])
            name = str(state["budget"])
        except (KeyError, TypeError, ValueError):
            return None
        before = {"remaining": max(0, limit - used), "limit": limit, "used": used}
        if name not in view or before["remaining"] < view[name]["remaining"]:
            view[name] = before
    return view


def _compared(before: str, after: Effect, ids: tuple[str, ...]) -> Replayed:
    """Sorted the way shadow mode sorts a disagreement (`shadow_kind`), so that both read alike."""
    kind = shadow_kind(cast(Effect, before), after) or "unchanged"
    return Replayed(cast(Kind, kind), before, after, ids)


@dataclass
class Tally:
    """Counts and examples, bounded whatever the number of records."""

    counts: Counter[str] = field(default_factory=Counter)
    by_policy: dict[str, Counter[str]] = field(default_factory=dict)
    by_user: dict[str, Counter[str]] = field(default_factory=dict)
    by_tool: dict[str, Counter[str]] = field(default_factory=dict)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def add(self, record: AuditRecord, result: Replayed) -> None:
        self.counts[result.kind] += 1
        if result.kind in ("unchanged", "not_replayable"):
            return
        changed = result.kind != "indeterminate"
        for pid in result.policies if changed else ():
            _bump(self.by_policy, pid, result.kind)
        _bump(self.by_user, record.user or "-", result.kind)
        _bump(self.by_tool, f"{record.upstream}/{record.tool}", result.kind)
        kept = self.examples.setdefault(result.kind, [])
        if len(kept) < EXAMPLES:
            kept.append(
                {
                    "id": record.id,
                    "ts": record.to_json()["ts"],
                    "user": record.user,
                    "protocol": record.protocol,
                    "action": record.action,
                    "target": f"{record.upstream}/{record.tool}",
                    "before": result.before,
                    "after": result.after,
                    "policies": list(result.policies),
                    "why": result.why,
                }
            )

    def to_json(self, candidate: str, version: str, filters: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "candidate": candidate,
            "candidate_version": version,
            "filters": {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in filters.items()},
            "counts": {k: self.counts.get(k, 0) for k in KINDS},
            "by_policy": {k: dict(v) for k, v in sorted(self.by_policy.items())},
            "by_user": {k: dict(v) for k, v in sorted(self.by_user.items())},
            "by_tool": {k: dict(v) for k, v in sorted(self.by_tool.items())},
            "examples": self.examples,
        }


def _bump(table: dict[str, Counter[str]], key: str, kind: str) -> None:
    if key not in table and len(table) >= MAX_KEYS:
        key = "(others)"
    table.setdefault(key, Counter())[kind] += 1


async def _records(url: str, filters: RecordFilters, limit: int | None) -> AsyncIterator[AuditRecord]:
    store = await AuditStore.open(url, create=False)
    try:
        n = 0
        async for record in store.iter_records(**filters):
            if limit is not None and n >= limit:
                return
            n += 1
            yield record
    finally:
        await store.close()


async def inferred_schemas(url: str, filters: RecordFilters, limit: int | None) -> dict[str, Any]:
    """Input schemas of the recorded tools, read from their recorded arguments (so that a candidate
    may read `context.args`): a value's JSON type, a shape's type, a finding's string."""
    schemas: dict[str, dict[str, Any]] = {}
    async for record in _records(url, filters, limit):
        if record.action in ("call_tool", "get_prompt") and isinstance(record.args_redacted, dict):
            key = f"{record.upstream}/{record.tool}"
            if key in schemas or len(schemas) < MAX_KEYS:
                _merge_schema(
                    schemas.setdefault(key, {"type": "object", "properties": {}}), record.args_redacted
                )
    return schemas


def _merge_schema(schema: dict[str, Any], value: Any) -> None:
    props = schema.setdefault("properties", {})
    for k, v in value.items():
        found = _schema_of(v)
        if found is None:
            continue
        known = props.get(k)
        if known is None:
            props[k] = found
        elif known.get("type") == "object" and found.get("type") == "object":
            _merge_schema(known, v)
        elif known.get("type") != found.get("type"):
            props[k] = {}  # two types recorded: left untyped (Cedar then cannot read it)


def _schema_of(value: Any) -> dict[str, Any] | None:
    if isinstance(value, bool):
        return {"type": "boolean"}
    if isinstance(value, int):
        return {"type": "integer"}
    if isinstance(value, float):
        return {"type": "number"}
    if isinstance(value, str):
        return {"type": _SHAPES.get(value, "string")}
    if isinstance(value, dict):
        inner: dict[str, Any] = {"type": "object", "properties": {}}
        _merge_schema(inner, value)
        return inner
    if isinstance(value, list):
        return {"type": "array"}
    return None


def load_candidate(cfg: Config, directory: Path, tools: Mapping[str, Any]) -> PolicyEngine:
    """The candidate set, typed like the live one would be (ConfigError when it does not load)."""
    if not directory.is_dir():
        raise ConfigError(f"--candidate: {directory} is not a directory")
    # read as a shadow set would be: its own schema and entities file when it has them, else the live ones
    policy = cfg.policy.model_copy(update={"shadow": ShadowConfig(dir=directory)}).shadow_set()
    assert policy is not None
    schemas = {**tools, **message_schemas(cfg.agents)}
    return PolicyEngine.load(policy, schemas, [b.name for b in cfg.budgets])


async def run(
    cfg: Config,
    candidate: Path,
    filters: RecordFilters,
    limit: int | None,
    tools: Mapping[str, Any] | None,
    progress: bool,
) -> tuple[PolicyEngine, Tally]:
    url = cfg.audit.url
    if tools is None:
        tools = await inferred_schemas(url, filters, limit)
    engine = load_candidate(cfg, candidate, tools)
    tally = Tally()
    n = 0
    async for record in _records(url, filters, limit):
        tally.add(record, replay_one(engine, cfg, record))
        n += 1
        if progress and n % 1000 == 0:
            print(f"\rreplayed {n} records", end="", file=sys.stderr, flush=True)
    if progress and n >= 1000:
        print(f"\rreplayed {n} records", file=sys.stderr)
    return engine, tally


def render_text(report: Mapping[str, Any]) -> str:
    counts = report["counts"]
    lines = [f"candidate {report['candidate']} (policy set {report['candidate_version']})"]
    lines += [f"  {k.replace('_', ' '):<20} {counts[k]}" for k in KINDS]
    for pid, kinds in report["by_policy"].items():
        lines.append(f"  policy {pid}: " + ", ".join(f"{k.replace('_', ' ')} {n}" for k, n in kinds.items()))
    return "\n".join(lines)


def render_html(report: Mapping[str, Any]) -> str:
    """A self-contained page (no script, nothing loaded from elsewhere); every value escaped."""
    e = html.escape

    def table(title: str, rows: Mapping[str, Mapping[str, int]]) -> str:
        head = "".join(f"<th>{e(k.replace('_', ' '))}</th>" for k in KINDS[1:5])
        body = "".join(
            f"<tr><td>{e(name)}</td>" + "".join(f"<td>{kinds.get(k, 0)}</td>" for k in KINDS[1:5]) + "</tr>"
            for name, kinds in rows.items()
        )
        return f"<h2>{e(title)}</h2><table><tr><th></th>{head}</tr>{body}</table>"

    counts = "".join(
        f"<tr><td>{e(k.replace('_', ' '))}</td><td>{v}</td></tr>" for k, v in report["counts"].items()
    )
    examples = ""
    for kind, items in report["examples"].items():
        rows = "".join(
            "<tr>"
            + "".join(
                f"<td>{e(str(item[c] if not isinstance(item[c], list) else ', '.join(item[c])))}</td>"
                for c in ("ts", "id", "user", "target", "before", "after", "policies", "why")
            )
            + "</tr>"
            for item in items
        )
        cols = "".join(
            f"<th>{c}</th>"
            for c in ("time", "record", "user", "target", "before", "after", "policies", "why")
        )
        examples += f"<h3>{e(kind.replace('_', ' '))}</h3><table><tr>{cols}</tr>{rows}</table>"
    style = (
        "body{font:14px system-ui,sans-serif;margin:2em;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em}th{background:#f3f3f3}"
        "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Policy replay</title>"
        f"<style>{style}</style></head><body>"
        f"<h1>Policy replay: {e(report['candidate'])}</h1>"
        f"<p>Candidate policy set {e(report['candidate_version'])}; "
        f"filters {e(json.dumps(report['filters']))}.</p>"
        f"<table>{counts}</table>"
        + table("Changes by policy", report["by_policy"])
        + table("By user", report["by_user"])
        + table("By tool", report["by_tool"])
        + f"<h2>Examples</h2>{examples}</body></html>"
    )


def cmd_replay(args: argparse.Namespace, cfg: Config, tools: Mapping[str, Any] | None) -> int:
    filters: RecordFilters = {}
    for name in ("since", "until"):
        value = getattr(args, name)
        if value is not None:
            try:
                at = datetime.fromisoformat(value)
                filters[name] = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
            except ValueError:
                raise ConfigError(f"--{name}: {value!r} is not an ISO 8601 time") from None
    if args.user:
        filters["user"] = args.user
    if args.tool:
        filters["tool"] = args.tool
    progress = sys.stderr.isatty()
    engine, tally = asyncio.run(run(cfg, Path(args.candidate), filters, args.limit, tools, progress))
    report = tally.to_json(args.candidate, engine.version, filters)
    print(render_text(report))
    if args.output:
        out = Path(args.output)
        text = render_html(report) if out.suffix in (".html", ".htm") else json.dumps(report, indent=2)
        out.write_text(text, encoding="utf-8")
        print(f"report written to {out}")
    failing = [k for k in args.fail_on or [] if report["counts"][k.replace("-", "_")]]
    if failing:
        print(f"failing: {', '.join(failing)}", file=sys.stderr)
        return 1
    return 0
