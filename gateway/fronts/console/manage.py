"""Approvals, tools, policy and budgets pages.

Approvals are decided through `gateway.fronts.admin_api.decide_approval`, the one place the rules
live (an admin, Cedar permitting `approve` on the held call's tool, never one's own call): the
console decides exactly as the API, the CLI's page and `/approvals/{id}` do. Tool pins show the
definitions awaiting review as a line diff against the approved one; approving them stays with
`bastion tools approve`, which is what the page names.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import time
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request

from gateway import metrics
from gateway.errors import ApprovalError
from gateway.fronts.admin_api import AdminAPI, decide_approval
from gateway.fronts.console.context import Context
from gateway.fronts.console.html import Page, esc, hidden_token, link, table
from gateway.policy.reload import snapshot
from gateway.stages.budget import usage
from gateway.stages.policy import SHADOW_KINDS
from gateway.state.approvals import Approval, Approvals
from gateway.state.pins import PINNED_FIELDS, Pin, list_pins

DECIDED_SHOWN = 50
MAX_PENDING = 500
MAX_REASON = 2000
MAX_BUDGET_ROWS = 1000
FINAL = ("approved", "consumed", "denied", "expired")


def _iso(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _args(value: Any) -> str:
    return f"<pre>{esc(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False))}</pre>"


# -- approvals ---------------------------------------------------------------------------------


def _approvals(ctx: Context) -> Approvals:
    if ctx.gw.approvals is None:
        raise ApprovalError("approvals are not running", 503)
    return ctx.gw.approvals


def _for_whom(ctx: Context, a: Approval) -> str:
    user = ctx.gw.auth.identities.id_of(a.issuer, a.subject)
    return f'{esc(user)} <span class="muted">({esc(a.subject)} at {esc(a.issuer)})</span>'


def _pending_row(ctx: Context, a: Approval) -> list[str]:
    form = (
        f'<form method="post" action="/console/approvals/{esc(a.id)}">{hidden_token(ctx.form_token)}'
        f'<label>reason <input type="text" name="reason" maxlength="{MAX_REASON}"></label> '
        '<button type="submit" name="decision" value="approve">Approve</button> '
        '<button type="submit" name="decision" value="deny">Deny</button></form>'
    )
    return [
        f'<span data-approval="{esc(a.id)}">{esc(_iso(a.created_ms))}</span>',
        esc(a.agent or "-"),
        _for_whom(ctx, a),
        esc(f"{a.upstream}/{a.tool}"),
        esc(a.policy_reason),
        _args(a.args_shown),
        esc(_iso(a.expires_ms)),
        link(f"/console/calls/{a.audit_id}", "held call"),
        form,
    ]


def _decided_row(ctx: Context, a: Approval) -> list[str]:
    status = a.effective_status
    cls = "allow" if status in ("approved", "consumed") else "deny" if status == "denied" else "muted"
    used = link(f"/console/calls/{a.used_by}", "ran") if a.used_by else ""
    return [
        f'<span data-approval="{esc(a.id)}" class="{cls}">{esc(status)}</span>',
        esc(_iso(a.decided_ms)),
        esc(a.decided_by or "-"),
        esc(a.note or ""),
        esc(a.agent or "-"),
        _for_whom(ctx, a),
        esc(f"{a.upstream}/{a.tool}"),
        link(f"/console/calls/{a.audit_id}", "held call") + (" · " + used if used else ""),
    ]


async def _decided(approvals: Approvals) -> list[Approval]:
    """The last `DECIDED_SHOWN` final requests, the most recently decided (or used) first."""
    found: list[Approval] = []
    for status in FINAL:
        found += await approvals.list(status, DECIDED_SHOWN)
    found.sort(key=lambda a: (a.used_ms or a.decided_ms or a.expires_ms, a.id), reverse=True)
    return found[:DECIDED_SHOWN]


async def _approvals_page(ctx: Context, message: str = "") -> Page:
    approvals = _approvals(ctx)
    pending = await approvals.list("pending", MAX_PENDING)
    decided = await _decided(approvals)
    parts = []
    if message:
        parts.append(f'<p class="allow" id="message">{esc(message)}</p>')
    parts.append(
        f'<h2>Waiting <span class="muted" data-pending="{len(pending)}">({len(pending)})</span></h2>'
    )
    if len(pending) == MAX_PENDING:
        parts.append(f'<p class="warn">Showing the newest {MAX_PENDING} only.</p>')
    parts.append(
        table(
            ("asked", "who asks (agent)", "for whom", "tool", "policy reason", "arguments (redacted)",
             "expires", "call", "decide"),
            (_pending_row(ctx, a) for a in pending),
            "nothing waits for a decision",
            id="pending",
        )
    )  # fmt: skip
    parts.append(f"<h2>Decided (last {DECIDED_SHOWN})</h2>")
    parts.append(
        table(
            ("status", "decided", "by", "reason", "who asked (agent)", "for whom", "tool", "call"),
            (_decided_row(ctx, a) for a in decided),
            "none yet",
            id="decided",
        )
    )
    return Page("Approvals", "".join(parts), "/console/approvals")


async def approvals_page(ctx: Context, request: Request) -> Page:
    return await _approvals_page(ctx)


async def decide(ctx: Context, approval_id: str, form: dict[str, str]) -> Page:
    """Approve or deny a held call as the viewer, by the API's rules; a refusal is an ApprovalError."""
    verb = form.get("decision")
    if verb not in ("approve", "deny"):
        raise ApprovalError("decision must be approve or deny", 400)
    approvals = _approvals(ctx)
    policy = ctx.gw.policy
    if policy is None:
        raise ApprovalError("no policy set is loaded", 503)
    approval = await approvals.get(approval_id) if 0 < len(approval_id) <= 64 else None
    if approval is None:
        raise ApprovalError(f"no approval {approval_id[:64]!r}", 404)
    reason = (form.get("reason") or "").strip()[:MAX_REASON] or None
    admin = AdminAPI(ctx.gw.cfg, ctx.gw.auth, ctx.gw.state, ctx.gw.base_url)
    settings = ctx.gw.settings_for(approval.upstream, approval.tool)
    approve = verb == "approve"
    await decide_approval(approvals, policy, settings, admin, approval, ctx.principal, approve, reason)
    done = "approved" if approve else "denied"
    return await _approvals_page(ctx, f"{done} by {ctx.principal.id}: {approval.upstream}/{approval.tool}")


# -- tools -------------------------------------------------------------------------------------


def readable(definition: str | None) -> list[str]:
    """A pinned definition (canonical JSON, one line) as lines worth diffing: each field in pinned
    order, text fields line by line, the rest as indented JSON."""
    if not definition:
        return []
    try:
        doc = json.loads(definition)
    except ValueError:
        return definition.splitlines()
    if not isinstance(doc, dict):
        return [definition]
    lines: list[str] = []
    for key in [*PINNED_FIELDS, *sorted(set(doc) - set(PINNED_FIELDS))]:
        if key not in doc:
            continue
        value = doc[key]
        if isinstance(value, str):
            lines.append(f"{key}:")
            lines += [f"  {line}" for line in value.splitlines() or [""]]
        else:
            text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)
            lines.append(f"{key}:")
            lines += [f"  {line}" for line in text.splitlines()]
    return lines


def diff(old: str | None, new: str) -> str:
    """The line diff of two definitions as HTML (removed lines `diff-del`, added `diff-add`)."""
    out = []
    before = "approved" if old else "approved (none)"
    for line in difflib.unified_diff(readable(old), readable(new), before, "served now", lineterm=""):
        if line.startswith(("---", "+++", "@@")):
            out.append(f'<span class="muted">{esc(line)}</span>')
        elif line.startswith("-"):
            out.append(f'<span class="diff-del">{esc(line)}</span>')
        elif line.startswith("+"):
            out.append(f'<span class="diff-add">{esc(line)}</span>')
        else:
            out.append(esc(line))
    return "<pre>" + "\n".join(out) + "</pre>"


def _pin_row(p: Pin) -> list[str]:
    status = p.status
    cls = {"approved": "allow", "rejected": "deny"}.get(status, "warn")
    findings = "; ".join(f"{f.kind} in {f.where}: {f.excerpt}" for f in p.findings)
    decided = f"{p.decided_by or '-'} at {p.decided_at}" if p.decided_at else "-"
    return [
        esc(p.ref),
        f'<span class="{cls}" data-pin="{esc(p.ref)}" data-status="{esc(status)}">{esc(status)}</span>',
        f"<code>{esc(p.current_sha256[:12])}</code>",
        esc(p.first_seen),
        esc(p.changed_at),
        esc(decided),
        f'<span class="warn">{esc(findings)}</span>' if findings else '<span class="muted">none</span>',
    ]


def _review(p: Pin) -> str:
    what = "new: no definition was approved before" if p.status == "new" else "changed since it was approved"
    findings = "".join(f"<li>{esc(f.kind)} in {esc(f.where)}: {esc(f.excerpt)}</li>" for f in p.findings)
    return (
        f'<section class="review" data-review="{esc(p.ref)}"><h3>{esc(p.ref)} '
        f'<span class="warn">({esc(what)})</span></h3>'
        + (f'<p class="warn">The scan flagged it:</p><ul>{findings}</ul>' if findings else "")
        + diff(p.approved_definition, p.current_definition)
        + f"<p>To approve this definition: <code>bastion tools approve {esc(p.ref)} --sha "
        f"{esc(p.current_sha256[:12])}</code> (or <code>bastion tools reject {esc(p.ref)}</code>).</p>"
        "</section>"
    )


async def tools_page(ctx: Context, request: Request) -> Page:
    pins = ctx.gw.pins
    if pins is None or not pins.enabled:
        return Page(
            "Tools", '<p class="muted" id="pinning">Tool pinning is off (pinning.mode).</p>', "/console/tools"
        )
    found = await list_pins(pins.engine)
    waiting = [p for p in found if p.status in ("new", "changed")]
    parts = [
        f'<p id="pinning" data-mode="{esc(pins.cfg.mode)}">Pinning mode <code>{esc(pins.cfg.mode)}</code>: '
        f"{len(found):,} tool(s) pinned, "
        f'<span class="{"warn" if waiting else "allow"}" data-waiting="{len(waiting)}">{len(waiting):,} '
        "awaiting review</span>. A tool awaiting review is withheld from agents until approved.</p>",
    ]
    if waiting:
        parts.append("<h2>Awaiting review</h2>" + "".join(_review(p) for p in waiting))
    parts.append("<h2>Pinned tools</h2>")
    parts.append(
        table(
            ("tool", "status", "sha256", "first seen", "changed", "decided", "scan findings"),
            (_pin_row(p) for p in found),
            "no tool has been seen yet",
            id="pins",
        )
    )
    return Page("Tools", "".join(parts), "/console/tools")


# -- policy ------------------------------------------------------------------------------------


def counter_by(metric: Any, label: str) -> dict[str, float]:
    """A labelled counter's values (its `_total` samples) by one label, in this process."""
    out: dict[str, float] = {}
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                key = str(sample.labels.get(label, ""))
                out[key] = out.get(key, 0.0) + float(sample.value)
    return out


def _stamp(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _files_changed(cfg: Any) -> str:
    """When the newest file of a set last changed (the set on disk; stat calls only)."""
    stamps = [mtime for _, mtime, _, _ in snapshot(cfg) if mtime > 0]
    if not stamps:
        return "-"
    return datetime.fromtimestamp(max(stamps) / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _watch(watcher: Any, what: str) -> str:
    if watcher is None:
        return (
            f'<p class="muted">{esc(what)}: not watched (policy.watch is off): changes load at restart.</p>'
        )
    status = watcher.status().to_json()
    state = str(status.get("status"))
    line = (
        f'<p data-reload="{esc(state)}">{esc(what)}: watched, '
        f"{esc(status.get('reloads'))} reload(s), {esc(status.get('failures'))} refused.</p>"
    )
    if status.get("error"):
        line += (
            f'<p class="deny">Last reload refused at {esc(status.get("refused_at"))}; the set above keeps '
            f'serving:</p><pre class="deny" id="{esc(what.split()[0])}-reload-error">'
            f"{esc(status['error'])}</pre>"
        )
    return line


def _policies(engine: Any) -> str:
    rows = [
        [f"<code>{esc(p.id)}</code>",
         f'<span class="{"deny" if p.effect == "forbid" else "allow"}">{esc(p.effect)}</span>',
         esc(p.obligation or ""), esc(p.reason), esc(p.source),
         f"<details><summary>text</summary><pre>{esc(p.text)}</pre></details>"]
        for p in engine.policies
    ]  # fmt: skip
    return table(("id", "effect", "obligation", "reason", "source", ""), rows, "no policies", id="policies")


async def policy_page(ctx: Context, request: Request) -> Page:
    cfg = ctx.gw.cfg.policy
    engine = ctx.gw.policy
    if engine is None:
        return Page("Policy", '<p class="deny">No policy set is loaded.</p>', "/console/policy", status=503)
    changed = await asyncio.to_thread(_files_changed, cfg)
    parts = [
        '<div class="cards">'
        f'<div class="card"><div class="muted">live set version</div><strong id="policy-version">'
        f'{esc(engine.version)}</strong><div class="muted">loaded <span id="policy-loaded">'
        f"{esc(_stamp(engine.loaded_at))}</span></div></div>"
        f'<div class="card"><div class="muted">loaded from</div><code id="policy-dir">{esc(cfg.dir)}</code>'
        f'<div class="muted">files last changed {esc(changed)}</div></div>'
        f'<div class="card"><div class="muted">policies</div><strong data-policies="{len(engine.policies)}">'
        f"{len(engine.policies):,}</strong></div></div>",
        _watch(ctx.gw.policy_watcher, "live set"),
    ]
    if engine.warnings:
        items = "".join(f"<li>{esc(w)}</li>" for w in engine.warnings)
        parts.append(f'<p class="warn">Warnings from loading:</p><ul>{items}</ul>')
    shadow = ctx.gw.shadow
    shadow_cfg = cfg.shadow_set()
    if shadow is not None and shadow_cfg is not None:
        counts = counter_by(metrics.SHADOW_DISAGREEMENTS, "kind")
        kinds = tuple(SHADOW_KINDS)
        rows = []
        for k in [*kinds, *sorted(set(counts) - set(kinds))]:
            n = int(counts.get(k, 0))
            rows.append([esc(k), f'<span data-kind="{esc(k)}" data-count="{n}">{n:,}</span>'])
        parts.append(
            "<h2>Shadow set (decided beside the live one, never enforced)</h2>"
            f'<p>Version <strong id="shadow-version">{esc(shadow.version)}</strong>, from '
            f"<code>{esc(shadow_cfg.dir)}</code>, {len(shadow.policies):,} policies.</p>"
            + _watch(ctx.gw.shadow_watcher, "shadow set")
            + '<p class="muted">Disagreements with the live set (this replica, since start); each call '
            "that had one carries it in its audit record (<code>decision.shadow</code>).</p>"
            + table(("kind", "calls"), rows, id="shadow-disagreements")
        )
    else:
        parts.append('<p class="muted" id="shadow">No shadow set is configured (policy.shadow).</p>')
    parts.append("<h2>Live policies</h2>" + _policies(engine))
    return Page("Policy", "".join(parts), "/console/policy")


# -- budgets -----------------------------------------------------------------------------------


def _used(r: dict[str, Any]) -> str:
    used, limit = int(r["used"]), int(r["limit"])
    cls = "deny" if used >= limit else "warn" if used * 5 >= limit * 4 else "allow"
    return (
        f'<span class="{cls}" data-budget="{esc(r["budget"])}" data-subject="{esc(r["subject"])}" '
        f'data-used="{used}" data-limit="{limit}">{used:,}</span>'
    )


async def budgets_page(ctx: Context, request: Request) -> Page:
    rules = ctx.gw.cfg.budgets
    if ctx.gw.state is None or not rules:
        return Page(
            "Budgets", '<p class="muted" id="budgets">No budgets are configured.</p>', "/console/budgets"
        )
    rows = await usage(ctx.gw.state, rules, None)
    used = {r["budget"] for r in rows}
    shown = rows[:MAX_BUDGET_ROWS]
    cells = [
        [esc(r["budget"]), esc(r["subject"]), _used(r), f'{int(r["limit"]):,}', esc(r["window"]),
         esc(r["resets_at"])]
        for r in shown
    ]  # fmt: skip
    parts = [
        f'<p class="muted">Current windows (aligned to UTC), as of {esc(_iso(int(time.time() * 1000)))}.</p>',
        table(
            ("budget", "subject", "used", "limit", "window", "resets at"),
            cells,
            "no budget is in use",
            id="budgets",
        ),
    ]
    if len(rows) > MAX_BUDGET_ROWS:
        parts.append(
            f'<p class="warn">Showing {MAX_BUDGET_ROWS:,} of {len(rows):,} rows: '
            "<code>bastion budgets show --user U</code> narrows it.</p>"
        )
    idle = [r.name for r in rules if r.name not in used]
    if idle:
        parts.append(
            '<p class="muted" id="idle-budgets">Configured, not used in the current window: '
            + ", ".join(f"<code>{esc(n)}</code>" for n in idle)
            + ".</p>"
        )
    return Page("Budgets", "".join(parts), "/console/budgets")
