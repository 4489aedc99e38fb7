"""Audit search: filters on the store's indexed columns, newest first, paged by key, and a live tail.

Pages follow the (ts, id) key (`before=`), never an offset, so the hundredth page of a large trail
costs what the first does. A policy id has no index: it narrows the query by the text of the
stored record and each row is then checked, at most `SCAN_MAX` rows per page (the page says so
when it stopped early: narrow the time range).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from audit.store import RecordFilters
from gateway.fronts.console.context import Context
from gateway.fronts.console.html import Page, esc, link, table

PAGE = 50
SCAN_MAX = 5000
EFFECTS = ("allow", "deny", "transform", "approval_required")
STATUSES = ("completed", "denied", "failed", "timeout", "error", "interrupted", "pending", "dead_letter")
PROTOCOLS = ("mcp", "http", "llm", "a2a")
_TEXT = ("user", "agent", "target", "tool", "policy", "call_id")
MAX_FIELD = 256


class BadQuery(ValueError):
    pass


def _when(name: str, value: str) -> datetime:
    try:
        ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadQuery(f"{name}: not a date and time (e.g. 2026-12-02T09:00): {value[:40]!r}") from None
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def _cursor(value: str) -> tuple[datetime, str]:
    ts, sep, record_id = value.partition(",")
    if not sep or not record_id or len(record_id) > 64:
        raise BadQuery("the page cursor is malformed")
    return _when("cursor", ts), record_id


def key_of(ts: datetime, record_id: str) -> str:
    return f"{ts.astimezone(UTC).isoformat()},{record_id}"


def parse(query: Any) -> tuple[dict[str, str], RecordFilters, str | None]:
    """(the filters as given, for the form and links; as store filters; the policy id, if any)."""
    given: dict[str, str] = {}
    for name in (*_TEXT, "since", "until", "decision", "status", "protocol"):
        value = (query.get(name) or "").strip()
        if len(value) > MAX_FIELD:
            raise BadQuery(f"{name}: longer than {MAX_FIELD} characters")
        if value:
            given[name] = value
    for name, allowed in (("decision", EFFECTS), ("status", STATUSES), ("protocol", PROTOCOLS)):
        if name in given and given[name] not in allowed:
            raise BadQuery(f"{name}: one of {', '.join(allowed)}")
    filters: RecordFilters = {
        "since": _when("since", given["since"]) if "since" in given else None,
        "until": _when("until", given["until"]) if "until" in given else None,
        "user": given.get("user"),
        "agent": given.get("agent"),
        "upstream": given.get("target"),
        "tool": given.get("tool"),
        "effect": given.get("decision"),
        "status": given.get("status"),
        "protocol": given.get("protocol"),
        "call_id": given.get("call_id"),
    }
    policy = given.get("policy")
    if policy is not None:
        filters["contains"] = json.dumps(policy, ensure_ascii=False)
    return given, filters, policy


def _matches(doc: dict[str, Any], policy: str | None) -> bool:
    return policy is None or policy in ((doc.get("decision") or {}).get("policy_ids") or [])


async def _rows(
    ctx: Context, filters: RecordFilters, policy: str | None, *, before: Any = None, after: Any = None
) -> tuple[list[tuple[datetime, str, dict[str, Any]]], bool]:
    """Up to PAGE matching records and whether the scan stopped at SCAN_MAX before filling the page."""
    out: list[tuple[datetime, str, dict[str, Any]]] = []
    scanned = 0
    while len(out) < PAGE and scanned < SCAN_MAX:
        batch = PAGE if policy is None else 200
        got = await ctx.store.page(batch, before=before, after=after, **filters)
        scanned += len(got)
        for ts, rid, text in got:
            doc = json.loads(text)
            if _matches(doc, policy):
                out.append((ts, rid, doc))
                if len(out) == PAGE:
                    break
        if len(got) < batch or policy is None:
            return out, False
        if after is not None:
            after = (got[-1][0], got[-1][1])
        else:
            before = (got[-1][0], got[-1][1])
    return out, len(out) < PAGE


def summary(doc: dict[str, Any]) -> dict[str, Any]:
    """One record as the search table (and the live tail's JSON) shows it."""
    decision = doc.get("decision") or {}
    outcome = doc.get("outcome") or {}
    return {
        "id": doc.get("id"),
        "ts": doc.get("ts"),
        "user": doc.get("user"),
        "agent": doc.get("agent"),
        "protocol": doc.get("protocol"),
        "target": f"{doc.get('upstream')}/{doc.get('tool')}",
        "action": doc.get("action"),
        "effect": decision.get("effect"),
        "status": outcome.get("status"),
        "latency_ms": outcome.get("latency_ms"),
        "policies": ", ".join(str(p) for p in decision.get("policy_ids") or []),
    }


COLUMNS = ("time", "user", "agent", "protocol", "target", "action", "decision", "status", "ms", "policies")


def _cells(s: dict[str, Any]) -> list[str]:
    effect = str(s["effect"])
    cls = "deny" if effect == "deny" else "allow" if effect in ("allow", "transform") else "warn"
    return [
        link(f"/console/calls/{s['id']}", s["ts"]),
        esc(s["user"]), esc(s["agent"]), esc(s["protocol"]), esc(s["target"]), esc(s["action"]),
        f'<span class="{cls}">{esc(effect)}</span>', esc(s["status"]),
        esc("" if s["latency_ms"] is None else f"{s['latency_ms']:.1f}"), esc(s["policies"]),
    ]  # fmt: skip


def _form(given: dict[str, str]) -> str:
    def field(name: str, label: str, kind: str = "text") -> str:
        return (
            f'<label>{esc(label)}<input type="{kind}" name="{name}" value="{esc(given.get(name, ""))}" '
            f'maxlength="{MAX_FIELD}"></label>'
        )

    def choice(name: str, label: str, options: tuple[str, ...]) -> str:
        opts = '<option value="">any</option>' + "".join(
            f"<option{' selected' if given.get(name) == o else ''}>{esc(o)}</option>" for o in options
        )
        return f'<label>{esc(label)}<select name="{name}">{opts}</select></label>'

    return (
        '<form class="filters" method="get" action="/console/audit">'
        + field("since", "from (UTC)") + field("until", "to (UTC)") + field("user", "user")
        + field("agent", "agent") + field("target", "target (upstream, agent, model namespace)")
        + field("tool", "tool / resource") + choice("decision", "decision", EFFECTS)
        + choice("status", "status", STATUSES) + choice("protocol", "protocol", PROTOCOLS)
        + field("policy", "policy id") + field("call_id", "call id")
        + '<label>&nbsp;<button type="submit">Search</button></label></form>'
    )  # fmt: skip


async def audit_page(ctx: Context, request: Request) -> Page:
    try:
        given, filters, policy = parse(request.query_params)
        before = _cursor(request.query_params["before"]) if request.query_params.get("before") else None
    except BadQuery as exc:
        return Page("Audit", _form({}) + f'<p class="deny">{esc(exc)}</p>', "/console/audit", status=400)
    rows, cut = await _rows(ctx, filters, policy, before=before)
    summaries = [summary(doc) for _, _, doc in rows]
    parts = [_form(given)]
    if cut:
        parts.append(
            f'<p class="warn">Scanned {SCAN_MAX:,} records for the policy id without filling the page: '
            "narrow the time range.</p>"
        )
    newest = key_of(rows[0][0], rows[0][1]) if rows and before is None else ""
    attrs = {"id": "results"}
    if newest:
        attrs |= {"data_tail": newest, "data_query": urlencode(given)}
    parts.append(table(COLUMNS, (_cells(s) for s in summaries), "no records match", **attrs))
    nav = []
    if before is not None:
        nav.append(link("/console/audit", "newest", **given))
    if len(rows) == PAGE or cut:
        nav.append(link("/console/audit", "older", **given, before=key_of(rows[-1][0], rows[-1][1])))
    if newest:
        nav.append('<label><input type="checkbox" id="live"> live tail</label>')
    parts.append(f'<p id="pager">{" · ".join(nav)}</p>')
    return Page("Audit", "".join(parts), "/console/audit", script=bool(newest))


async def tail(ctx: Context, request: Request) -> Response:
    """Records after the `after` key, oldest first (the page's script adds them on top)."""
    try:
        _, filters, policy = parse(request.query_params)
        after = _cursor(request.query_params.get("after") or "")
    except BadQuery as exc:
        return JSONResponse({"error": "invalid_request", "message": str(exc)}, 400)
    rows, _ = await _rows(ctx, filters, policy, after=after)
    cursor = key_of(rows[-1][0], rows[-1][1]) if rows else request.query_params.get("after")
    return JSONResponse({"rows": [summary(doc) for _, _, doc in rows], "cursor": cursor})
