"""`bastion audit report`: one self-contained HTML file for a reviewer.

Inline CSS and SVG only (no script, no font, no network), so the file opens anywhere and can be
attached to a review as it is. Records are aggregated while streaming, so a long period costs
time, not memory. Every number sits in an element with an `id` or `data-*` attribute, so the
report can be checked by a program as well as read.
"""

from __future__ import annotations

import asyncio
import html
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from audit.record import format_ts, parse_ts
from audit.store import AuditStore
from audit.verify import VerifyResult, verify

TOP = 15
ALLOWED = ("allow", "transform")


@dataclass(slots=True)
class PolicyVersion:
    calls: int = 0
    first: str = ""
    last: str = ""


@dataclass(slots=True)
class Summary:
    """Everything the report shows, gathered in one pass over the records."""

    total: int = 0
    effects: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    hours: dict[datetime, Counter[str]] = field(default_factory=dict)
    denied_tools: Counter[str] = field(default_factory=Counter)
    denied_reasons: Counter[str] = field(default_factory=Counter)
    users: dict[str, Counter[str]] = field(default_factory=dict)
    agents: dict[str, Counter[str]] = field(default_factory=dict)
    pii: dict[str, Counter[str]] = field(default_factory=dict)
    budgets: Counter[str] = field(default_factory=Counter)
    approvals: Counter[str] = field(default_factory=Counter)
    policies: dict[str, PolicyVersion] = field(default_factory=dict)
    first: str | None = None
    last: str | None = None

    def add(self, doc: dict[str, Any]) -> None:
        decision = doc.get("decision") or {}
        outcome = doc.get("outcome") or {}
        effect = str(decision.get("effect"))
        denied = effect not in ALLOWED
        ts = str(doc.get("ts"))
        self.total += 1
        self.first = ts if self.first is None or ts < self.first else self.first
        self.last = ts if self.last is None or ts > self.last else self.last
        self.effects[effect] += 1
        self.statuses[str(outcome.get("status"))] += 1
        hour = parse_ts(ts).replace(minute=0, second=0, microsecond=0)
        self.hours.setdefault(hour, Counter())["deny" if denied else "allow"] += 1
        tool = f"{doc.get('upstream')}/{doc.get('tool')}"
        reasons = [r for r in decision.get("reasons") or [] if isinstance(r, dict)]
        if denied:
            self.denied_tools[tool] += 1
            for r in reasons[:1]:
                self.denied_reasons[f"{r.get('policy')}: {r.get('reason')}"] += 1
        for table, key in ((self.users, doc.get("user")), (self.agents, doc.get("agent"))):
            row = table.setdefault(str(key) if key else "(none)", Counter())
            row["calls"] += 1
            row["denied"] += denied
        pii = doc.get("pii") or {}
        for direction in ("input", "output"):
            found = pii.get(direction) or {}
            if isinstance(found, dict):
                for kind, n in found.items():
                    if isinstance(n, int) and n > 0:
                        self.pii.setdefault(str(kind), Counter())[direction] += n
        if decision.get("stage") == "budget" and denied:
            self.budgets[str(reasons[0].get("policy")) if reasons else "budget"] += 1
        if effect == "approval_required" or decision.get("stage") == "approval":
            self.approvals[f"{tool} ({outcome.get('status')})"] += 1
        version = decision.get("policy_version")
        if version:
            pv = self.policies.setdefault(str(version), PolicyVersion(first=ts, last=ts))
            pv.calls += 1
            pv.first, pv.last = min(pv.first, ts), max(pv.last, ts)


async def summarize(store: AuditStore, since: datetime | None, until: datetime | None) -> Summary:
    summary = Summary()
    async for text in store.iter_raw(since=since, until=until):
        summary.add(json.loads(text))
    return summary


def run_report(
    url: str,
    output: str,
    *,
    since: datetime | None,
    until: datetime | None,
    public_key: Ed25519PublicKey | None,
) -> Summary:
    """Write the report to `output` (through `output.partial` and a rename); return its numbers."""
    summary, result = asyncio.run(_gather(url, since, until, public_key))
    page = render(summary, result, since, until, datetime.now(UTC))
    partial = f"{output}.partial"
    try:
        with open(partial, "w", encoding="utf-8") as f:
            f.write(page)
        os.replace(partial, output)
    except BaseException:
        if os.path.exists(partial):
            os.unlink(partial)
        raise
    return summary


async def _gather(
    url: str, since: datetime | None, until: datetime | None, public_key: Ed25519PublicKey | None
) -> tuple[Summary, VerifyResult]:
    store = await AuditStore.open(url, create=False)
    try:
        return await summarize(store, since, until), await verify(store, public_key)
    finally:
        await store.close()


# -- rendering --------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:1000px;color:#222;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0}
td,th{border:1px solid #ddd;padding:.25rem .6rem;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
dl{display:grid;grid-template-columns:max-content auto;gap:.2rem 1rem}
dt{color:#555}.ok{color:#17692b;font-weight:600}.bad{color:#b3261e;font-weight:600}.none{color:#777;font-style:italic}
svg text{font:11px system-ui,sans-serif;fill:#444}pre{background:#f6f6f6;padding:.6rem;white-space:pre-wrap}
"""

_ALLOW_COLOUR, DENY_COLOUR = "#3a8a4f", "#c0392b"


def render(
    s: Summary, result: VerifyResult, since: datetime | None, until: datetime | None, now: datetime
) -> str:
    e = html.escape
    period = (
        f"{format_ts(since) if since else s.first or '-'} to {format_ts(until) if until else s.last or '-'}"
    )
    allowed = sum(s.effects[x] for x in ALLOWED)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>Bastion audit review</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Bastion audit review</h1>",
        f'<p>Period: <span id="period">{e(period)}</span>. Generated {e(format_ts(now))}.</p>',
        '<section id="summary"><h2>Summary</h2><dl>',
        _metric("total", "tool calls", s.total),
        _metric("allowed", "allowed", allowed),
        _metric("denied", "denied", s.total - allowed),
        *(_metric(f"status-{k}", f"outcome: {k}", v) for k, v in sorted(s.statuses.items())),
        "</dl></section>",
        '<section id="decisions"><h2>Decisions over time</h2>',
        _timeline(s.hours) if s.hours else _none(),
        "</section>",
        '<section id="denied"><h2>Top denied tools and reasons</h2>',
    ]
    if s.denied_tools:
        parts += [
            bars("denied-tools-chart", s.denied_tools.most_common(TOP), DENY_COLOUR),
            _table("denied-tools", ("tool", "denied"), s.denied_tools.most_common(TOP)),
            _table("denied-reasons", ("policy: reason", "denied"), s.denied_reasons.most_common(TOP)),
        ]
    else:
        parts.append(_none())
    parts.append("</section>")
    parts += [
        '<section id="users"><h2>Calls per user and agent</h2>',
        bars("users-chart", [(k, v["calls"]) for k, v in _top(s.users)], _ALLOW_COLOUR),
        _table(
            "users", ("user", "calls", "denied"), [(k, v["calls"], v["denied"]) for k, v in _top(s.users)]
        ),
        _table(
            "agents", ("agent", "calls", "denied"), [(k, v["calls"], v["denied"]) for k, v in _top(s.agents)]
        ),
        "</section>",
        '<section id="pii"><h2>PII findings by type</h2>',
        _table(
            "pii-types",
            ("type", "in arguments", "in results"),
            [(k, v["input"], v["output"]) for k, v in sorted(s.pii.items())],
        )
        if s.pii
        else _none(),
        "</section>",
        '<section id="budgets"><h2>Budget exhaustion</h2>',
        _table("budget-denials", ("budget", "calls refused"), s.budgets.most_common())
        if s.budgets
        else _none(),
        "</section>",
        '<section id="approvals"><h2>Approvals</h2>',
        _table("approval-calls", ("tool (outcome)", "calls"), s.approvals.most_common())
        if s.approvals
        else _none(),
        "</section>",
        '<section id="chain"><h2>Chain verification and policy versions</h2>',
        f'<p id="verify-result" class="{"ok" if result.ok else "bad"}">'
        f"{'verified: every chain and checkpoint checks out' if result.ok else 'FAILED'}</p>",
        f"<pre>{e(chr(10).join(result.lines()))}</pre>",
        _table(
            "policy-versions",
            ("policy version", "calls", "first seen", "last seen"),
            [
                (k, v.calls, v.first, v.last)
                for k, v in sorted(s.policies.items(), key=lambda kv: kv[1].first)
            ],
        )
        if s.policies
        else _none(),
        "</section>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _top(table: dict[str, Counter[str]]) -> list[tuple[str, Counter[str]]]:
    return sorted(table.items(), key=lambda kv: (-kv[1]["calls"], kv[0]))[:TOP]


def _none() -> str:
    return '<p class="none">none recorded</p>'


def _metric(key: str, label: str, value: int) -> str:
    return f'<dt>{html.escape(label)}</dt><dd data-metric="{html.escape(key)}">{value}</dd>'


def _table(ident: str, header: tuple[str, ...], rows: list[Any]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="n">{v}</td>' if isinstance(v, int) else f"<td>{e(str(v))}</td>" for v in row)
        + "</tr>"
        for row in rows
    )
    return f'<table id="{e(ident)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def bars(ident: str, rows: list[tuple[str, int]], colour: str) -> str:
    """Horizontal bars, one per row, labelled with the name and the count."""
    if not rows:
        return ""
    e = html.escape
    peak = max(v for _, v in rows) or 1
    label_w, bar_w, row_h = 260, 560, 20
    height = row_h * len(rows) + 6
    out = [
        f'<svg id="{e(ident)}" xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + 60}" '
        f'height="{height}" role="img">'
    ]
    for i, (name, v) in enumerate(rows):
        y = i * row_h + 3
        w = max(1, round(v / peak * bar_w))
        short = name if len(name) <= 40 else name[:39] + "…"
        out.append(f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end">{e(short)}</text>')
        out.append(f'<rect x="{label_w}" y="{y}" width="{w}" height="{row_h - 5}" fill="{colour}"/>')
        out.append(f'<text x="{label_w + w + 4}" y="{y + 13}">{v}</text>')
    out.append("</svg>")
    return "".join(out)


def _timeline(hours: dict[datetime, Counter[str]]) -> str:
    """Stacked bars of allowed and denied calls per hour (per day beyond three days)."""
    start, end = min(hours), max(hours)
    step = timedelta(hours=1) if end - start <= timedelta(days=3) else timedelta(days=1)
    buckets: dict[datetime, Counter[str]] = {}
    for hour, counts in hours.items():
        key = hour if step == timedelta(hours=1) else hour.replace(hour=0)
        buckets.setdefault(key, Counter()).update(counts)
    first = min(buckets)
    keys = []
    t = first
    while t <= max(buckets):
        keys.append(t)
        t += step
    width, height, pad = 900, 220, 40
    slot = (width - pad) / len(keys)
    peak = max(sum(c.values()) for c in buckets.values()) or 1
    fmt = "%m-%d %H:00" if step == timedelta(hours=1) else "%Y-%m-%d"
    out = [
        f'<svg id="decisions-chart" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height + 40}" role="img"><title>allowed and denied calls over time</title>',
        f'<text x="0" y="12">{peak}</text><text x="0" y="{height}">0</text>',
        f'<rect x="{width - 170}" y="0" width="10" height="10" fill="{_ALLOW_COLOUR}"/>'
        f'<text x="{width - 155}" y="9">allowed</text>'
        f'<rect x="{width - 90}" y="0" width="10" height="10" fill="{DENY_COLOUR}"/>'
        f'<text x="{width - 75}" y="9">denied</text>',
    ]
    label_every = max(1, len(keys) // 8)
    for i, key in enumerate(keys):
        c = buckets.get(key, Counter())
        x = pad + i * slot
        w = max(1.0, slot * 0.8)
        base = float(height)
        for kind, colour in (("allow", _ALLOW_COLOUR), ("deny", DENY_COLOUR)):
            h = c[kind] / peak * (height - 20)
            if h:
                base -= h
                out.append(
                    f'<rect x="{x:.1f}" y="{base:.1f}" width="{w:.1f}" height="{h:.1f}" fill="{colour}" '
                    f'data-bucket="{key.strftime(fmt)}" data-kind="{kind}" data-count="{c[kind]}"/>'
                )
        if i % label_every == 0:
            out.append(f'<text x="{x:.1f}" y="{height + 16}">{key.strftime(fmt)}</text>')
    out.append("</svg>")
    return "".join(out)
