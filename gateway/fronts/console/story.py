"""One call's story on one page: what was asked, by whom, what decided it and why (and where that
policy is written), what was redacted and charged, the humans who approved it, what the upstream
answered, the other records of the same call, and where the record sits in its chain.

`POST /console/calls/{id}/verify` shows the same page with a check of the record on top: its own
hash recomputed, its place in the chain's index, the links to the records before and after it,
and the signed checkpoint that covers it (the chain walked from the record up to it, and its
Ed25519 signature checked with the configured key). `bastion audit verify` checks every chain in
full; this checks one record and its neighbourhood, in a few queries.

Every value taken from a record, an approval or a policy file goes through `esc`.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from audit.chain import document_hash
from audit.checkpoint import Checkpoint, SigningKeyError, key_id, load_public_key, signature_ok
from audit.record import PENDING, format_ts
from gateway.fronts.console.context import Context
from gateway.fronts.console.html import Page, esc, hidden_token, link, table
from gateway.policy.engine import PolicyEngine, PolicyInfo
from gateway.state.db import STATE_ERRORS

MAX_ID = 64
"""Record ids are UUIDs (the column holds 64 characters): a longer one is not looked up, and no
more of it is shown."""
SAME_CALL = 20
"""Records of the same `call_id` listed under Correlation (the audit search shows them all)."""
WALK_MAX = 5000
"""Most records walked from a record to the checkpoint that covers it (checkpoints are written
every `audit.checkpoint_every` records, 1,000 by default)."""
_WALK_BATCH = 500
_UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")
_NOT_POLICIES: Mapping[str, str] = {
    "default-deny": "Cedar's default: no policy permits the call",
    "policy-error": "the policy set could not evaluate the request",
    "invalid-arguments": "the arguments do not fit the tool's schema",
    "approval": "the approvals stage (a human's decision)",
    "approvals-unavailable": "the approvals stage: the state DB was unavailable",
    "audit-unavailable": "the audit store was unavailable: the call was not forwarded",
}
"""Reason ids that name a stage's rule rather than a Cedar policy."""

State = Literal["ok", "failed", "warn"]


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    """Also the row's id (`check-<name>`): a constant, never a value from a record."""
    label: str
    state: State
    detail: str


# Small pieces ------------------------------------------------------------------------------------


def _none(text: str = "none") -> str:
    return f'<span class="muted">{esc(text)}</span>'


def _val(value: Any, empty: str = "none") -> str:
    """A scalar as text (None and empty values muted), a list or object as compact JSON."""
    if value is None or value == "" or value == [] or value == {}:
        return _none(empty)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (dict, list)):
        return f"<code>{esc(json.dumps(value, ensure_ascii=False))}</code>"
    return esc(value)


def _code(value: Any, ident: str = "", empty: str = "none") -> str:
    """A value in `<code>`; `ident` is kept on the muted placeholder when there is none."""
    if value is None or value == "":
        return f'<span class="muted"{_id_attr(ident)}>{esc(empty)}</span>'
    return f"<code{_id_attr(ident)}>{esc(value)}</code>"


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def _facts(rows: Iterable[tuple[str, str, str]]) -> str:
    """A two-column table of (label, id of the value cell or "", value HTML)."""
    body = "".join(
        f'<tr><th scope="row">{esc(label)}</th><td{_id_attr(ident)}>{value}</td></tr>'
        for label, ident, value in rows
    )
    return f"<table><tbody>{body}</tbody></table>"


def _id_attr(ident: str) -> str:
    return f' id="{esc(ident)}"' if ident else ""


def _parsed(text: str | None) -> dict[str, Any] | None:
    """A stored record's document, or None when the text is missing or not a JSON object."""
    if text is None:
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _section(ident: str, title: str, body: str) -> str:
    return f'<section id="{ident}"><h2>{esc(title)}</h2>{body}</section>'


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _effect_class(effect: Any) -> str:
    if effect in ("deny", "denied", "failed", "error", "timeout", "dead_letter"):
        return "deny"
    if effect in ("allow", "transform", "completed", "approved", "consumed"):
        return "allow"
    return "warn"


def _story_href(record_id: str) -> str:
    return f"/console/calls/{quote(record_id, safe='')}"


def _short(record_id: str) -> str:
    return record_id if len(record_id) <= MAX_ID else record_id[:MAX_ID] + "…"


def _target(doc: Mapping[str, Any]) -> str:
    return f"{doc.get('upstream')}/{doc.get('tool')}"


def _not_found(record_id: str) -> Page:
    return Page("Call", f'<p class="deny">No audit record {esc(_short(record_id))}.</p>', status=404)


# The page --------------------------------------------------------------------------------------


async def call_page(ctx: Context, record_id: str) -> Page:
    return await _story(ctx, record_id, check=False)


async def verify(ctx: Context, record_id: str) -> Page:
    return await _story(ctx, record_id, check=True)


async def _story(ctx: Context, record_id: str, *, check: bool) -> Page:
    if not record_id or len(record_id) > MAX_ID:
        return _not_found(record_id)
    text = await ctx.store.get(record_id)
    if text is None:
        return _not_found(record_id)
    doc = _parsed(text)
    parts: list[str] = []
    if check:
        parts.append(_verification(await _verify(ctx, record_id, doc)))
    if doc is None:
        parts.append(
            '<p class="deny">The stored record is not a JSON object (edited?): its text as stored:</p>'
            f'<pre id="raw-record">{esc(text)}</pre>'
        )
        return Page("Call", "".join(parts))
    parts += [
        _summary(record_id, doc),
        _request(doc),
        _identity(doc),
        _decision(ctx, doc),
        _redactions(doc),
        _budget(doc),
        await _approvals(ctx, record_id, doc),
        _outcome(doc),
        await _correlation(ctx, record_id, doc),
        await _chain(ctx, record_id, doc),
    ]
    return Page("Call", "".join(parts))


def _summary(record_id: str, doc: Mapping[str, Any]) -> str:
    decision, outcome = _dict(doc.get("decision")), _dict(doc.get("outcome"))
    effect, status = decision.get("effect"), outcome.get("status")
    return (
        f'<p id="summary"><code id="record-id">{esc(record_id)}</code> · <span id="ts">{esc(doc.get("ts"))}'
        f"</span> · {esc(doc.get('user') or 'anonymous')} → {esc(_target(doc))} "
        f'({esc(doc.get("action"))}) · <span class="{_effect_class(effect)}">{esc(effect)}</span> · '
        f'<span class="{_effect_class(status)}">{esc(status)}</span></p>'
    )


def _request(doc: Mapping[str, Any]) -> str:
    rows = [
        ("protocol", "protocol", _val(doc.get("protocol"))),
        ("target (upstream / tool)", "target", esc(_target(doc))),
        ("action", "action", _val(doc.get("action"))),
        ("client", "client", _val(doc.get("client"), "none declared")),
    ]
    llm, a2a = doc.get("llm"), doc.get("a2a")
    if isinstance(llm, dict):
        rows.append(("model", "llm", f"{esc(llm.get('provider'))} / {esc(llm.get('model'))}"))
    if isinstance(a2a, dict):
        rows += [
            ("A2A method", "a2a-method", _val(a2a.get("method"))),
            ("A2A task", "a2a-task", _val(a2a.get("task_id"))),
            ("A2A context", "a2a-context", _val(a2a.get("context_id"))),
        ]
    rows.append(
        (
            "arguments HMAC",
            "",
            _code(doc.get("args_hmac"), "args-hmac")
            + ' <span class="muted">(HMAC-SHA256 of the original arguments: confirms a value with '
            "audit.hmac_key_file)</span>",
        )
    )
    args = (
        f'<h3>Arguments as recorded</h3><pre id="args">{esc(_pretty(doc.get("args_redacted")))}</pre>'
        '<p class="muted">Detected personal data and secrets are replaced by typed placeholders '
        "(audit.arguments; docs/audit.md).</p>"
    )
    return _section("request", "Request", _facts(rows) + args)


def _identity(doc: Mapping[str, Any]) -> str:
    chain = _list(doc.get("delegation_chain"))
    chain_html = (
        '<ol id="delegation-chain">' + "".join(f"<li>{esc(c)}</li>" for c in chain) + "</ol>"
        if chain
        else f'<span id="delegation-chain">{_none("none: no delegation")}</span>'
    )
    rows = [
        ("user", "user", _val(doc.get("user"), "not identified")),
        ("tenant", "tenant", _val(doc.get("tenant"))),
        ("agent", "agent", _val(doc.get("agent"))),
        ("delegation chain (outermost first)", "", chain_html),
    ]
    replay = doc.get("replay")
    if isinstance(replay, dict):
        for key in ("issuer", "groups", "roles", "scopes", "has_email", "tainted", "skill"):
            if key in replay:
                value = replay[key]
                shown = ", ".join(str(v) for v in value) if isinstance(value, list) else value
                label = {"has_email": "had an e-mail address", "tainted": "session tainted"}.get(key, key)
                rows.append((label, f"replay-{key.replace('_', '-')}", _val(shown)))
        for key, value in replay.items():
            if key not in ("issuer", "groups", "roles", "scopes", "has_email", "tainted", "skill", "policy"):
                rows.append((str(key), "", _val(value)))
    else:
        rows.append(("caller's facts", "", _none("not recorded (refused before anyone was identified)")))
    return _section("identity", "Identity", _facts(rows))


def _policy_index(engine: PolicyEngine | None) -> dict[str, PolicyInfo]:
    return {} if engine is None else {p.id: p for p in engine.policies}


def _where(pid: str, policies: Mapping[str, PolicyInfo], engine: PolicyEngine | None, stage: str) -> str:
    """Where policy `pid` is written, or what else the id names."""
    info = policies.get(pid)
    if info is not None and engine is not None:
        return f'<code class="source">{esc(engine.source_of(pid) or info.source)}</code>'
    if pid in _NOT_POLICIES:
        return _none(f"not a Cedar policy: {_NOT_POLICIES[pid]}")
    if pid.startswith("budget"):
        return _none("not a Cedar policy: the budget stage (budgets:)")
    if engine is None:
        return _none("no policy set is loaded")
    return _none(f"not in the live policy set (stage {stage or '?'})")


def _decision(ctx: Context, doc: Mapping[str, Any]) -> str:
    decision = _dict(doc.get("decision"))
    engine = ctx.gw.policy
    policies = _policy_index(engine)
    effect, stage = decision.get("effect"), str(decision.get("stage") or "")
    version = decision.get("policy_version")
    version_html = _val(version, "none (decided before policy ran)")
    if engine is not None and version is not None and version != engine.version:
        version_html += (
            f' <span class="warn">(the live policy set is now version {esc(engine.version)}: the '
            "locations and texts below are of the live set)</span>"
        )
    reasons = [_dict(r) for r in _list(decision.get("reasons"))]
    reason_rows = [
        [
            esc(r.get("policy")),
            esc(r.get("reason")),
            _where(str(r.get("policy")), policies, engine, stage),
        ]
        for r in reasons
    ]
    rows = [
        ("effect", "effect", f'<span class="{_effect_class(effect)}">{esc(effect)}</span>'),
        ("decided by stage", "stage", _val(stage)),
        ("policy version", "policy-version", version_html),
    ]
    replay = _dict(doc.get("replay"))
    verdict = replay.get("policy")
    if isinstance(verdict, dict) and (stage != "policy" or verdict.get("effect") != effect):
        verdict_ids = ", ".join(str(p) for p in _list(verdict.get("policy_ids")))
        rows.append(
            (
                "the policy stage's own verdict",
                "policy-verdict",
                f"{esc(verdict.get('effect'))} ({esc(verdict_ids) or _none()})",
            )
        )
    ids = [str(p) for p in _list(decision.get("policy_ids"))]
    if "obligations" in decision:
        obligations = _val(decision.get("obligations"))
    else:
        derived = [
            f"{esc(policies[p].obligation)} (from {esc(p)})"
            for p in ids
            if p in policies and policies[p].obligation and effect != "deny"
        ]
        obligations = ", ".join(derived) or _none()
    rows.append(("obligations", "obligations", obligations))
    shadow = decision.get("shadow")
    if isinstance(shadow, dict):
        shadow_ids = ", ".join(str(p) for p in _list(shadow.get("policy_ids")))
        rows.append(
            (
                "shadow policy set",
                "shadow",
                f'<span class="warn">{esc(shadow.get("kind"))}</span>: would have decided '
                f"{esc(shadow.get('effect'))} ({esc(shadow_ids) or _none()}), shadow version "
                f"{esc(shadow.get('policy_version'))}"
                + (f", error: {esc(shadow.get('error'))}" if shadow.get("error") else ""),
            )
        )
    else:
        rows.append(("shadow policy set", "shadow", _none("agreed, or none configured")))
    stage_rows = [
        [esc(st.get("stage")), esc(st.get("verdict")), esc(st.get("ms"))]
        for st in (_dict(x) for x in _list(decision.get("stages")))
    ]
    body = (
        _facts(rows)
        + "<h3>Stages, in the order they ran</h3>"
        + table(
            ("stage", "verdict", "ms"), stage_rows, "not recorded (records before stage timings)", id="stages"
        )
        + "<h3>Reasons</h3>"
        + table(("policy", "reason", "written at"), reason_rows, "no reasons recorded", id="reasons")
    )
    body += _sources(ctx, ids, policies, decision)
    return _section("decision", "Decision", body)


def _sources(
    ctx: Context, ids: list[str], policies: Mapping[str, PolicyInfo], decision: Mapping[str, Any]
) -> str:
    """Each deciding Cedar policy: where it is written and its text (live set; shadow set for the
    shadow decision's own policies)."""
    rows: list[list[str]] = []
    for pid in dict.fromkeys(ids):
        info = policies.get(pid)
        if info is not None:
            rows.append(_source_row(pid, info, ctx.gw.policy, "live"))
    shadow = decision.get("shadow")
    if isinstance(shadow, dict) and ctx.gw.shadow is not None:
        in_shadow = _policy_index(ctx.gw.shadow)
        for pid in dict.fromkeys(str(p) for p in _list(shadow.get("policy_ids"))):
            info = in_shadow.get(pid)
            if info is not None:
                rows.append(_source_row(pid, info, ctx.gw.shadow, "shadow"))
    if not rows:
        return ""
    return "<h3>Deciding policies</h3>" + table(
        ("policy", "set", "effect", "written at", "text"), rows, id="policy-sources"
    )


def _source_row(pid: str, info: PolicyInfo, engine: PolicyEngine | None, which: str) -> list[str]:
    where = (engine.source_of(pid) if engine is not None else None) or info.source
    return [
        esc(pid),
        esc(which),
        esc(info.effect + (f' @obligation("{info.obligation}")' if info.obligation else "")),
        f'<code class="source">{esc(where)}</code>',
        f"<pre>{esc(info.text)}</pre>",
    ]


def _counts(name: str, counts: Any) -> str:
    rows = [[esc(k), esc(v)] for k, v in sorted(_dict(counts).items())]
    return table(("entity type", "count"), rows, "nothing found", id=f"pii-{name}")


def _redactions(doc: Mapping[str, Any]) -> str:
    pii = _dict(doc.get("pii"))
    body = (
        "<h3>In the arguments</h3>" + _counts("input", pii.get("input"))
        + "<h3>In the result</h3>" + _counts("output", pii.get("output"))
    )  # fmt: skip
    unscanned = pii.get("unscanned_bytes")
    if unscanned:
        body += (
            '<p class="warn" id="pii-unscanned">Not scanned (beyond the scan limit), bytes: '
            f"{_val(unscanned)}</p>"
        )
    return _section("redactions", "Redactions", body)


_BUDGET_COLUMNS = ("budget", "subject", "cost", "used", "limit", "remaining", "resets_at")


def _budget(doc: Mapping[str, Any]) -> str:
    budget = doc.get("budget")
    if budget is None:
        return _section(
            "budget", "Budget", f'<p id="budget-none">{_none("no budget applies to this call")}</p>'
        )
    body = ""
    if isinstance(budget, dict):
        charged = [_dict(c) for c in _list(budget.get("charged"))]
        rows = [[esc(c.get(k)) for k in _BUDGET_COLUMNS] for c in charged]
        exceeded = budget.get("exceeded")
        if isinstance(exceeded, dict):
            rows.append(
                [f'<span class="deny">{esc(exceeded.get("budget"))} (exceeded)</span>']
                + [esc(exceeded.get(k)) for k in _BUDGET_COLUMNS[1:]]
            )
        body += table(_BUDGET_COLUMNS, rows, "nothing charged", id="budget-charges")
    body += f'<h3>As recorded</h3><pre id="budget-recorded">{esc(_pretty(budget))}</pre>'
    return _section("budget", "Budget", body)


async def _approvals(ctx: Context, record_id: str, doc: Mapping[str, Any]) -> str:
    """Approvals that name this call: the one it was held for or used (looked up by audit id), the
    one it waited on (named in the decision's reasons), or, for an approval's own record (whose
    call_id is the approval id), that approval."""
    decision = _dict(doc.get("decision"))
    named: list[str] = []
    for r in _list(decision.get("reasons")):
        r = _dict(r)
        first = _UUID.search(str(r.get("reason") or "")) if r.get("policy") == "approval" else None
        if first:  # the approval's id comes first (a human's note may follow, with anything in it)
            named.append(first.group(0))
    if doc.get("action") == "approve" and isinstance(doc.get("call_id"), str):
        named.append(doc["call_id"])
    if ctx.gw.approvals is not None:
        named += [a.id for a in await ctx.gw.approvals.for_audit(record_id)]
    named = list(dict.fromkeys(named))
    more = f"<p>{link('/console/approvals', 'All approvals')}</p>"
    if ctx.gw.approvals is None:
        return _section(
            "approvals", "Approval trail", f"<p>{_none('approvals are not configured')}</p>" + more
        )
    rows: list[list[str]] = []
    try:
        for aid in named:
            found = await ctx.gw.approvals.get(aid)
            if found is None:
                rows.append([esc(aid), _none("no longer stored")] + [""] * 7)
                continue
            a = found.to_json()
            if found.audit_id == record_id:
                role = "held this call"
            elif found.used_by == record_id:
                role = "used by this call"
            elif doc.get("action") == "approve":
                role = "this record's approval"
            else:
                role = "this call waited on it"
            events = await ctx.store.page(SAME_CALL, call_id=found.id)
            trail = " ".join(
                link(_story_href(rid), _dict((_parsed(t) or {}).get("outcome")).get("status") or "record")
                for _, rid, t in reversed(events)
                if rid != record_id
            )
            rows.append(
                [
                    esc(found.id),
                    esc(role),
                    f'<span class="{_effect_class(a["status"])}">{esc(a["status"])}</span>',
                    _val(a["created_at"])
                    + (
                        f" (expires {_val(a['expires_at'])})"
                        if a["status"] in ("pending", "approved")
                        else ""
                    ),
                    f"{_val(a['decided_by'], 'nobody yet')} {_val(a['decided_at'], '')}",
                    _val(a["note"]),
                    link(_story_href(found.audit_id), "held call")
                    if found.audit_id != record_id
                    else "this call",
                    (link(_story_href(found.used_by), "call") if found.used_by != record_id else "this call")
                    + f" {_val(a['used_at'], '')}"
                    if found.used_by
                    else _none("not used"),
                    trail or _none(),
                ]
            )
    except STATE_ERRORS as exc:
        rows.append([_none(f"the approvals state DB is unavailable: {type(exc).__name__}")] + [""] * 8)
    body = table(
        ("approval", "role", "status", "requested", "decided by", "note", "held call", "used by", "audit"),
        rows,
        "no approval is linked to this call",
        id="approval-trail",
    )
    return _section("approvals", "Approval trail", body + more)


def _outcome(doc: Mapping[str, Any]) -> str:
    outcome = _dict(doc.get("outcome"))
    status = outcome.get("status")
    latency = outcome.get("latency_ms")
    rows = [
        ("status", "status", f'<span class="{_effect_class(status)}">{esc(status)}</span>'),
        ("upstream status", "upstream-status", _val(outcome.get("upstream_status"))),
        (
            "latency",
            "latency",
            esc(f"{latency:.1f} ms") if isinstance(latency, (int, float)) else _val(latency),
        ),
        ("error", "error", _val(outcome.get("error"))),
        ("result SHA-256", "", _code(doc.get("result_sha256"), "result-sha256", "no result")),
    ]
    if status == PENDING:
        rows.append(("", "", '<span class="warn">pending: the outcome is not known yet</span>'))
    return _section("outcome", "Upstream outcome", _facts(rows))


async def _correlation(ctx: Context, record_id: str, doc: Mapping[str, Any]) -> str:
    call_id = doc.get("call_id")
    rows = [("trace id", "", _code(doc.get("trace_id"), "trace-id"))]
    if not isinstance(call_id, str) or not call_id:
        rows.append(("call id", "call-id", _none("the client sent none")))
        return _section("correlation", "Correlation", _facts(rows))
    rows.append(
        (
            "call id",
            "",
            _code(call_id, "call-id")
            + " · "
            + link("/console/audit", "every record of this call", call_id=call_id),
        )
    )
    same: list[list[str]] = []
    for ts, rid, text in await ctx.store.page(SAME_CALL, call_id=call_id):
        other = _parsed(text) or {}
        effect = _dict(other.get("decision")).get("effect")
        same.append(
            [
                "this record" if rid == record_id else link(_story_href(rid), format_ts(ts)),
                esc(other.get("protocol")),
                esc(_target(other)),
                esc(other.get("action")),
                f'<span class="{_effect_class(effect)}">{esc(effect)}</span>',
                esc(_dict(other.get("outcome")).get("status")),
            ]
        )
    body = _facts(rows) + table(
        ("record", "protocol", "target", "action", "decision", "status"), same, id="same-call"
    )
    return _section("correlation", "Correlation", body)


async def _chain(ctx: Context, record_id: str, doc: Mapping[str, Any]) -> str:
    seq, instance = doc.get("seq"), doc.get("instance")
    rows = [("instance", "chain-instance", _val(instance))]
    if isinstance(seq, int) and isinstance(instance, str):
        rows.append(("seq", "chain-seq", esc(seq)))
        prev = await ctx.store.record_at(instance, seq - 1) if seq > 1 else None
        after = await ctx.store.record_at(instance, seq + 1)
        near = " · ".join(
            part
            for part in (
                link(_story_href(prev[0]), "previous record") if prev else "",
                link(_story_href(after[0]), "next record") if after else "",
            )
            if part
        )
        if near:
            rows.append(("neighbours", "", near))
    else:
        status = _dict(doc.get("outcome")).get("status")
        why = "not chained yet (pending)" if status == PENDING else "outside the chain"
        rows.append(("seq", "chain-seq", _none(why)))
    rows += [
        ("prev_hash", "", _code(doc.get("prev_hash"), "chain-prev-hash")),
        ("hash", "", _code(doc.get("hash"), "chain-hash")),
    ]
    form = (
        f'<form method="post" action="{esc(_story_href(record_id))}/verify" id="verify-form">'
        f'{hidden_token(ctx.form_token)}<button type="submit">Verify this record</button></form>'
    )
    return _section("chain", "Chain", _facts(rows) + form)


# Verification ------------------------------------------------------------------------------------


def _verification(checks: list[Check]) -> str:
    failed = [c for c in checks if c.state == "failed"]
    if failed:
        verdict = f'<p id="verify-result" class="deny">failed: {esc(failed[0].detail)}</p>'
    elif any(c.name == "chain" for c in checks):
        verdict = f'<p id="verify-result" class="warn">{esc(checks[-1].detail)}</p>'
    else:
        notes = any(c.state == "warn" for c in checks)
        why = "no check failed (see the notes below)" if notes else "every check below passed"
        verdict = f'<p id="verify-result" class="allow">ok: {why}</p>'
    rows = "".join(
        f'<tr id="check-{c.name}"><td>{esc(c.label)}</td><td class="{_CLASS[c.state]}">'
        f"{esc(_WORD[c.state])}</td><td>{esc(c.detail)}</td></tr>"
        for c in checks
    )
    checks_table = (
        '<table id="verify-checks"><thead><tr><th>check</th><th>result</th><th>why</th></tr></thead>'
        f"<tbody>{rows}</tbody></table>"
    )
    return _section("verification", "Verification", verdict + checks_table)


_CLASS: Mapping[State, str] = {"ok": "allow", "failed": "deny", "warn": "warn"}
_WORD: Mapping[State, str] = {"ok": "ok", "failed": "failed", "warn": "note"}


def _hash_of(doc: Mapping[str, Any]) -> str | None:
    try:
        return document_hash(dict(doc))
    except (ValueError, TypeError, OverflowError):
        return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


async def _verify(ctx: Context, record_id: str, doc: dict[str, Any] | None) -> list[Check]:
    if doc is None:
        return [Check("record", "stored text", "failed", "the stored record is not a JSON object: edited")]
    checks: list[Check] = []
    if doc.get("id") != record_id:
        checks.append(Check("record", "stored text", "failed", "the stored record names another id: edited"))
    seq, instance, status = doc.get("seq"), doc.get("instance"), _dict(doc.get("outcome")).get("status")
    if seq is None:
        if status == PENDING:
            why = (
                "not chained yet: the record is pending (its outcome is not known); it is chained when final"
            )
            return [*checks, Check("chain", "chain", "warn", why)]
        if doc.get("schema_version", 1) == 1:
            why = "written before tamper evidence (schema version 1): it has no hash to check"
            return [*checks, Check("chain", "chain", "warn", why)]
        return [*checks, Check("chain", "chain", "failed", "a final record outside the chain: inserted")]
    if not _is_int(seq) or seq < 1 or not isinstance(instance, str):
        return [*checks, Check("record", "stored text", "failed", "seq or instance is malformed: edited")]
    recorded = doc.get("hash")
    computed = _hash_of(doc)
    if computed is not None and computed == recorded:
        checks.append(Check("hash", "own hash", "ok", f"SHA-256 of the canonical record is {computed}"))
    else:
        checks.append(
            Check(
                "hash",
                "own hash",
                "failed",
                f"the record does not match its hash: edited (recomputed {computed}, recorded {recorded})",
            )
        )
    checks.append(await _check_index(ctx, record_id, instance, seq, recorded))
    cps = await ctx.store.checkpoints(instance)
    checks.append(await _check_previous(ctx, instance, seq, doc.get("prev_hash"), cps))
    checks.append(await _check_next(ctx, instance, seq, recorded, cps))
    checks += await _check_checkpoints(ctx, instance, seq, recorded, cps)
    return checks


async def _check_index(ctx: Context, record_id: str, instance: str, seq: int, recorded: Any) -> Check:
    at = await ctx.store.record_at(instance, seq)
    label = "place in the chain"
    if at is None:
        return Check("index", label, "failed", f"the index has no record at seq {seq} of {instance}: edited")
    if at[0] != record_id:
        return Check(
            "index", label, "failed", f"seq {seq} of {instance} is record {at[0]}: this one was edited"
        )
    if at[1] != recorded:
        return Check("index", label, "failed", "the indexed hash column disagrees with the record: edited")
    return Check("index", label, "ok", f"record {seq} of instance {instance}, indexed with this hash")


async def _check_previous(
    ctx: Context, instance: str, seq: int, prev_hash: Any, cps: list[Checkpoint]
) -> Check:
    label = "link to the previous record"
    anchor = next((c for c in cps if c.kind == "purge" and c.seq == seq - 1), None)
    if seq == 1:
        if prev_hash is None:
            return Check("previous", label, "ok", "seq 1 starts the chain: prev_hash is null")
        return Check("previous", label, "failed", "seq 1 must have a null prev_hash: edited")
    before = await ctx.store.record_at(instance, seq - 1)
    if before is None:
        if anchor is not None:
            if anchor.hash == prev_hash:
                why = f"seq 1..{anchor.seq} were purged: the purge checkpoint's hash is prev_hash"
                return Check("previous", label, "ok", why)
            return Check("previous", label, "failed", "prev_hash differs from the purge checkpoint's hash")
        purged = any(c.kind == "purge" and c.seq >= seq - 1 for c in cps)
        if purged:
            return Check("previous", label, "warn", f"seq {seq - 1} was purged (retention)")
        return Check("previous", label, "failed", f"seq {seq - 1} is missing: a record was deleted")
    prev_id, prev_column = before
    if prev_column != prev_hash:
        why = f"prev_hash does not match record {prev_id} (seq {seq - 1}): deleted, inserted or reordered"
        return Check("previous", label, "failed", why)
    prev_doc = _parsed(await ctx.store.get(prev_id))
    if prev_doc is None or _hash_of(prev_doc) != prev_doc.get("hash") or prev_doc.get("hash") != prev_hash:
        why = f"the previous record {prev_id} (seq {seq - 1}) does not match its own hash: it was edited"
        return Check("previous", label, "failed", why)
    return Check("previous", label, "ok", f"prev_hash is the hash of record {prev_id} (seq {seq - 1})")


async def _check_next(ctx: Context, instance: str, seq: int, recorded: Any, cps: list[Checkpoint]) -> Check:
    label = "link from the next record"
    after = await ctx.store.record_at(instance, seq + 1)
    if after is None:
        newest = max((c.seq for c in cps), default=0)
        if newest > seq:
            why = (
                f"the chain ends at seq {seq} but a signed checkpoint shows it reached seq {newest}: cut off"
            )
            return Check("next", label, "failed", why)
        return Check("next", label, "ok", f"none yet: seq {seq} is the newest record of {instance}")
    next_id = after[0]
    next_doc = _parsed(await ctx.store.get(next_id))
    if next_doc is None:
        return Check("next", label, "failed", f"the next record {next_id} is not a JSON object: edited")
    if next_doc.get("prev_hash") != recorded:
        why = (
            f"the next record {next_id} (seq {seq + 1}) links to another hash: edited, inserted or reordered"
        )
        return Check("next", label, "failed", why)
    return Check("next", label, "ok", f"record {next_id} (seq {seq + 1}) links to this record's hash")


def _key_file(ctx: Context) -> Path:
    cfg = ctx.gw.cfg
    return cfg.audit.signing_key_file or cfg.data_dir / "audit-signing.key"


async def _signature(ctx: Context, cp: Checkpoint) -> tuple[State, str]:
    try:
        public = await asyncio.to_thread(load_public_key, _key_file(ctx))
    except SigningKeyError as exc:
        return "warn", f"signature not checked: {exc}"
    have = key_id(public)
    if signature_ok(cp, public):
        return "ok", f"signature ok (key {have})"
    if cp.key_id != have:
        return (
            "failed",
            f"bad signature: signed as key {cp.key_id}, the configured key is {have} (rotated, or forged)",
        )
    return "failed", f"bad signature (key {have}): forged or altered"


async def _walk(ctx: Context, instance: str, seq: int, own: Any, cp: Checkpoint) -> tuple[State, str]:
    """Follow the chain from this record to the checkpoint's seq; its hash there must be the
    checkpoint's."""
    if cp.seq - seq > WALK_MAX:
        return "warn", f"{cp.seq - seq} records away, more than {WALK_MAX}: run `bastion audit verify`"
    prev, expected = own, seq + 1
    while expected <= cp.seq:
        rows = await ctx.store.chained_after(instance, expected - 1, min(_WALK_BATCH, cp.seq - expected + 1))
        if not rows:
            return (
                "failed",
                f"the chain ends at seq {expected - 1}, before the checkpoint at seq {cp.seq}: cut off",
            )
        for at, text in rows:
            if at != expected:
                return "failed", f"seq {expected}..{at - 1} are missing: deleted"
            doc = _parsed(text)
            if doc is None or _hash_of(doc) != doc.get("hash"):
                return "failed", f"the record at seq {at} does not match its hash: edited"
            if doc.get("prev_hash") != prev:
                return "failed", f"the link breaks at seq {at}: deleted, inserted or reordered"
            prev, expected = doc.get("hash"), expected + 1
    if prev != cp.hash:
        return (
            "failed",
            f"the record at seq {cp.seq} differs from the signed checkpoint: the chain was rewritten",
        )
    walked = cp.seq - seq
    how = (
        "this record's hash is the checkpoint's"
        if walked == 0
        else f"the chain walked {walked} record(s) to it"
    )
    return "ok", how


def _describe(cp: Checkpoint) -> str:
    return f"the {cp.kind} checkpoint at seq {cp.seq} (signed {format_ts(cp.ts)}, key {cp.key_id})"


async def _check_checkpoints(
    ctx: Context, instance: str, seq: int, own: Any, cps: list[Checkpoint]
) -> list[Check]:
    covering = [c for c in cps if c.seq >= seq]
    if not covering:
        cfg = ctx.gw.cfg.audit
        why = (
            f"no signed checkpoint at or after seq {seq} yet: the chain alone protects this record until "
            f"the next one (every {cfg.checkpoint_every} records or {cfg.checkpoint_interval_s:g} s)"
        )
        return [Check("checkpoint", "signed checkpoint", "warn", why)]
    nearest = min(covering, key=lambda c: (c.seq, c.ts))
    state, how = await _walk(ctx, instance, seq, own, nearest)
    signed, sig = await _signature(ctx, nearest)
    worst: State = "failed" if "failed" in (state, signed) else "warn" if "warn" in (state, signed) else "ok"
    out = [Check("checkpoint", "signed checkpoint", worst, f"covered by {_describe(nearest)}: {how}; {sig}")]
    newest = max(covering, key=lambda c: (c.seq, c.ts))
    if newest is not nearest:
        signed, sig = await _signature(ctx, newest)
        out.append(Check("newest-checkpoint", "newest checkpoint", signed, f"{_describe(newest)}: {sig}"))
    return out
