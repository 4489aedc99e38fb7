"""The console's first page: the last 24 hours at a glance, and what waits for a human.

Counts come from the audit trail (every replica's records) by COUNT queries over `ts` ranges that
the store's indexes answer without reading a record, hour by hour (an hour long past is counted
once and kept), plus one GROUP BY tool over the denials. Approver decisions (records with action
`approve`) are events about a held call, not calls, so they are counted apart. Bastion's added time comes from
this process's `bastion_stage_seconds` histogram (since it started), as quantiles estimated from
its buckets the way Prometheus' `histogram_quantile` does.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.sql.elements import ColumnElement
from starlette.requests import Request

from audit.report import DENY_COLOUR, bars
from audit.store import audit_records
from gateway import metrics
from gateway.fronts.console.context import Context
from gateway.fronts.console.html import Page, esc, link, table
from gateway.state.pins import list_pins

HOURS = 24
TOP_DENIED = 10
ALLOWED = ("allow", "transform")
EFFECTS = ("allow", "transform", "approval_required", "deny")
FAILED = ("failed", "timeout", "error", "interrupted")
"""Outcomes of calls that were let through but did not complete (as the audit sinks count them)."""
DECISION_ACTION = "approve"
EVENT_STATUSES = ("approved", "denied", "expired")
"""The outcome statuses of the records `Approvals.record` writes (action `approve`)."""
MAX_PENDING_SHOWN = 1000
_CALLS_COLOUR = "#8aa4c8"


@dataclass(slots=True)
class Traffic:
    """What the audit trail says about [start, end): calls per hour, and the totals."""

    start: datetime
    end: datetime
    calls_per_hour: list[int] = field(default_factory=list)
    denied_per_hour: list[int] = field(default_factory=list)
    effects: Counter[str] = field(default_factory=Counter)
    failed: int = 0
    decisions: int = 0
    """Approver decisions and expiries recorded in the period (not calls)."""
    denied_tools: list[tuple[str, str, int]] = field(default_factory=list)
    """(upstream, tool, denials), most denied first."""

    @property
    def calls(self) -> int:
        return sum(self.calls_per_hour)

    @property
    def allowed(self) -> int:
        return sum(self.effects[e] for e in ALLOWED)

    def edge(self, i: int) -> datetime:
        return self.start + timedelta(hours=i)


@dataclass(frozen=True, slots=True)
class _Hour:
    """One hour's counts; `events` are approver decisions and expiries (by effect), not calls."""

    calls: int
    denied: int
    effects: dict[str, int]
    failed: int
    events: dict[str, int]
    denied_tools: dict[tuple[str, str], int]
    """Denials per (upstream, tool); the `DENIED_TOOLS_MAX` most denied of the hour."""


DENIED_TOOLS_MAX = 1000
SETTLE = timedelta(minutes=10)
"""An hour's counts are kept once it ended this long ago (calls still in flight then are done)."""
_hours: dict[tuple[str, datetime], _Hour] = {}


async def _count_hour(conn: Any, a: datetime, b: datetime) -> _Hour:
    """Counts of the records with `ts` in [a, b): each answered from an index alone, but for the
    approver events, narrowed by outcome status before their action is read."""
    t = audit_records.c
    within = (t.ts >= a, t.ts < b)

    async def count(*where: ColumnElement[bool]) -> int:
        query = select(func.count()).select_from(audit_records).where(*where, *within)
        return int((await conn.execute(query)).scalar_one() or 0)

    events = (
        select(t.effect, func.count())
        .where(t.status.in_(EVENT_STATUSES), t.action == DECISION_ACTION, *within)
        .group_by(t.effect)
    )
    n = func.count().label("n")
    denied = (
        select(t.upstream, t.tool, n)
        .where(t.effect == "deny", t.action != DECISION_ACTION, *within)
        .group_by(t.upstream, t.tool)
        .order_by(n.desc())
        .limit(DENIED_TOOLS_MAX)
    )
    return _Hour(
        denied_tools={(str(r.upstream), str(r.tool)): int(r.n) for r in (await conn.execute(denied)).all()},
        calls=await count(),
        denied=await count(t.effect == "deny"),
        effects={e: await count(t.effect == e) for e in EFFECTS},
        failed=await count(t.status.in_(FAILED)),
        events={str(e): int(n) for e, n in (await conn.execute(events)).all()},
    )


async def traffic(ctx: Context, end: datetime, hours: int = HOURS) -> Traffic:
    """Aggregates of the records with `ts` from the start of the hour `hours - 1` hours before
    `end`'s, to `end`, hour by hour.

    An hour that ended more than `SETTLE` ago is counted once and kept (per store, in this
    process), so a page load counts the current hour and little else: the cost does not grow
    with the day's volume (docs/console.md). The top denied tools add up each hour's own top
    `DENIED_TOOLS_MAX` (exact unless an hour saw denials of more tools than that)."""
    top_hour = end.replace(minute=0, second=0, microsecond=0)
    edges = [top_hour - timedelta(hours=hours - 1 - i) for i in range(hours)] + [end]
    out = Traffic(edges[0], end)
    url = ctx.store.url
    for key in [k for k in _hours if k[0] == url and k[1] < edges[0]]:
        del _hours[key]  # fell out of the window
    denied: Counter[tuple[str, str]] = Counter()
    async with ctx.store.engine.connect() as conn:
        for a, b in itertools.pairwise(edges):
            hour = _hours.get((url, a))
            if hour is None:
                hour = await _count_hour(conn, a, b)
                if b - a == timedelta(hours=1) and b <= end - SETTLE:
                    _hours[(url, a)] = hour
            events = sum(hour.events.values())
            out.calls_per_hour.append(hour.calls - events)
            out.denied_per_hour.append(hour.denied - hour.events.get("deny", 0))
            for effect in EFFECTS:
                out.effects[effect] += hour.effects[effect] - hour.events.get(effect, 0)
            out.failed += hour.failed
            out.decisions += events
            denied.update(hour.denied_tools)
    top = sorted(denied.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_DENIED]
    out.denied_tools = [(up, tool, k) for (up, tool), k in top]
    return out


# -- Bastion's added time ---------------------------------------------------------------------


def quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """The q-quantile from cumulative histogram buckets `(upper bound, count)` sorted by bound,
    interpolated linearly within a bucket (Prometheus' `histogram_quantile`); None: no samples.
    In the `+Inf` bucket the answer is the highest finite bound."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    low, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return low
            if count == below:
                return bound
            return low + (bound - low) * (rank - below) / (count - below)
        low, below = bound, count
    return low


@dataclass(frozen=True, slots=True)
class StageTime:
    stage: str
    count: int
    p50: float | None
    p99: float | None


def stage_times(metric: Any = metrics.STAGE_SECONDS) -> list[StageTime]:
    """p50 and p99 of each governance stage, in seconds, from this process's histogram."""
    buckets: dict[str, list[tuple[float, float]]] = {}
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                stage = str(sample.labels.get("stage", ""))
                buckets.setdefault(stage, []).append((float(sample.labels["le"]), float(sample.value)))
    out = []
    for stage, rows in sorted(buckets.items()):
        rows.sort()
        out.append(StageTime(stage, int(rows[-1][1]), quantile(0.5, rows), quantile(0.99, rows)))
    return out


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f}"


def _total(times: Iterable[StageTime], attr: str) -> float | None:
    values = [getattr(s, attr) for s in times if getattr(s, attr) is not None]
    return sum(values) if values else None


# -- rendering --------------------------------------------------------------------------------


def _card(key: str, label: str, value: Any, note: str = "", cls: str = "") -> str:
    """One card; `value` is shown and carried in `data-value` (`note` is HTML already)."""
    shown = f"{value:,}" if isinstance(value, int) else str(value)
    klass = f' class="{cls}"' if cls else ""
    return (
        f'<div class="card" id="card-{esc(key)}"><div class="muted">{esc(label)}</div>'
        f'<strong{klass} data-metric="{esc(key)}" data-value="{esc(value)}">{esc(shown)}</strong>'
        f"{f'<div>{note}</div>' if note else ''}</div>"
    )


def _when(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def hourly_chart(tr: Traffic) -> str:
    """One bar per hour: all calls, with the denied ones drawn over it from the bottom. Each hour's
    numbers are in its `<g>`'s `data-start`, `data-calls` and `data-denied`."""
    width, height, pad = 760, 170, 40
    plot = height - 30
    slot = (width - pad) / len(tr.calls_per_hour)
    peak = max(tr.calls_per_hour, default=0) or 1
    out = [
        f'<svg id="hourly" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'data-peak="{peak}"><title>calls and denials per hour, last {len(tr.calls_per_hour)} h</title>',
        f'<text x="0" y="12">{peak}</text><text x="0" y="{plot}">0</text>',
        f'<rect x="{width - 170}" y="0" width="10" height="10" fill="{_CALLS_COLOUR}"/>'
        f'<text x="{width - 155}" y="9">calls</text>'
        f'<rect x="{width - 100}" y="0" width="10" height="10" fill="{DENY_COLOUR}"/>'
        f'<text x="{width - 85}" y="9">denied</text>',
    ]
    for i, (calls, denied) in enumerate(zip(tr.calls_per_hour, tr.denied_per_hour, strict=True)):
        x, w = pad + i * slot, max(1.0, slot * 0.8)
        start = tr.edge(i)
        out.append(
            f'<g data-start="{esc(start.isoformat())}" data-calls="{calls}" data-denied="{denied}">'
            f"<title>{esc(start.strftime('%H:%M'))} + 1 h: {calls} calls, {denied} denied</title>"
        )
        for n, colour in ((calls, _CALLS_COLOUR), (denied, DENY_COLOUR)):
            if n:
                h = n / peak * (plot - 16)
                out.append(
                    f'<rect x="{x:.1f}" y="{plot - h:.1f}" width="{w:.1f}" height="{h:.1f}" fill="{colour}"/>'
                )
        out.append("</g>")
        if i % 4 == 0:
            out.append(f'<text x="{x:.1f}" y="{plot + 16}">{esc(start.strftime("%H:%M"))}</text>')
    out.append("</svg>")
    return "".join(out)


async def _waiting(ctx: Context) -> tuple[str, str]:
    """Cards: approvals waiting, pins awaiting review."""
    if ctx.gw.approvals is None:
        approvals = _card("approvals-waiting", "approvals waiting", "-", "approvals are not running")
    else:
        pending = await ctx.gw.approvals.list("pending", MAX_PENDING_SHOWN)
        n = len(pending)
        approvals = _card(
            "approvals-waiting",
            "approvals waiting",
            n if n < MAX_PENDING_SHOWN else f"{n}+",
            link("/console/approvals", "review"),
            "warn" if n else "",
        )
    pins = ctx.gw.pins
    if pins is None or not pins.enabled:
        review = _card(
            "pins-review", "tools awaiting review", "-", '<span class="muted">pinning is off</span>'
        )
    else:
        waiting = sum(p.status in ("new", "changed") for p in await list_pins(pins.engine))
        review = _card(
            "pins-review",
            "tools awaiting review",
            waiting,
            link("/console/tools", "review"),
            "warn" if waiting else "",
        )
    return approvals, review


def _policy_card(ctx: Context) -> str:
    policy = ctx.gw.policy
    version = policy.version if policy is not None else "-"
    watcher = ctx.gw.policy_watcher
    if watcher is None:
        note, cls = '<span class="muted">not watched (policy.watch is off)</span>', ""
    else:
        status = watcher.status().to_json()
        if status.get("error"):
            note = (
                f'<span class="deny">reload refused at {esc(status.get("refused_at"))}: the files on disk do '
                "not load; this set keeps serving</span>"
            )
            cls = "deny"
        else:
            note = f'<span class="allow">watched: {esc(status.get("reloads"))} reload(s)</span>'
            cls = ""
    return _card(
        "policy-version", "policy set", version, note + " " + link("/console/policy", "details"), cls
    )


def _sinks_card(ctx: Context) -> str:
    if ctx.gw.sinks is None:
        return ""
    status: dict[str, dict[str, Any]] = ctx.gw.sinks.status()
    if not status:
        return ""
    lines = []
    for name, s in sorted(status.items()):
        state = str(s.get("state"))
        cls = "allow" if state == "up" else "warn" if state == "backlog" else "deny"
        lines.append(
            f'<div data-sink="{esc(name)}" data-state="{esc(state)}">{esc(name)}: '
            f'<span class="{cls}">{esc(state)}</span> <span class="muted">lag {esc(s.get("lag_records"))}'
            "</span></div>"
        )
    down = sum(s.get("state") != "up" for s in status.values())
    return _card("sinks", "audit sinks", f"{len(status) - down}/{len(status)} up", "".join(lines))


def _latency(times: list[StageTime]) -> tuple[str, str]:
    """The card (per-call estimate) and the per-stage table."""
    p50, p99 = _total(times, "p50"), _total(times, "p99")
    note = (
        f'<span class="muted" id="added-time" data-p50-ms="{esc(_ms(p50))}" data-p99-ms="{esc(_ms(p99))}">'
        f"p99 ≈ {esc(_ms(p99))} ms · this replica, since start</span>"
    )
    card = _card("added-p50", "Bastion's added time per call, p50 (ms)", _ms(p50), note)
    rows = [
        [esc(s.stage), f'<span data-stage="{esc(s.stage)}" data-count="{s.count}">{s.count:,}</span>',
         esc(_ms(s.p50)), esc(_ms(s.p99))]
        for s in times
    ]  # fmt: skip
    detail = (
        "<h2>Bastion's added time (this replica, since start)</h2>"
        '<p class="muted">Per governance stage, from the <code>bastion_stage_seconds</code> histogram of '
        "this process, estimated from its buckets. The per-call figures above add the stages' quantiles up: "
        "an estimate (quantiles do not add exactly), not a measurement.</p>"
        + table(("stage", "observations", "p50 (ms)", "p99 (ms)"), rows, "no calls yet", id="stage-times")
    )
    return card, detail


async def overview_page(ctx: Context, request: Request) -> Page:
    now = datetime.now(UTC)
    tr = await traffic(ctx, now)
    approvals, review = await _waiting(ctx)
    latency_card, latency_table = _latency(stage_times())
    denied_effects = tr.effects["deny"]
    cards = [
        _card("calls", "calls, last 24 h", tr.calls),
        _card("allowed", "allowed", tr.allowed,
              f'<span class="muted">{tr.effects["transform"]:,} of them transformed</span>', "allow"),
        _card("denied", "denied", denied_effects, link("/console/audit", "search", decision="deny"),
              "deny" if denied_effects else ""),
        _card("approval-asked", "approval asked", tr.effects["approval_required"],
              f'<span class="muted" data-metric="decisions" data-value="{tr.decisions}">'
              f"{tr.decisions:,} approver decision(s) and expiries</span>"),
        _card("failed", "failed (failed, timeout, error, interrupted)", tr.failed, "",
              "warn" if tr.failed else ""),
        approvals, review, _policy_card(ctx), _sinks_card(ctx), latency_card,
    ]  # fmt: skip
    if tr.denied_tools:
        since = tr.start.strftime("%Y-%m-%dT%H:%M:%S")
        rows = [(f"{up}/{tool}", n) for up, tool, n in tr.denied_tools]
        denied = bars("denied-tools-chart", rows, DENY_COLOUR) + table(
            ("tool", "denied"),
            ([link("/console/audit", f"{up}/{tool}", target=up, tool=tool, decision="deny", since=since),
              f'<span data-tool="{esc(f"{up}/{tool}")}" data-denied="{n}">{n:,}</span>']
             for up, tool, n in tr.denied_tools),
            id="denied-tools",
        )  # fmt: skip
    else:
        denied = '<p class="muted" id="denied-tools">no denials in the last 24 h</p>'
    body = (
        f'<p class="muted" id="period" data-since="{esc(tr.start.isoformat())}" '
        f'data-until="{esc(tr.end.isoformat())}">Last 24 h: {esc(_when(tr.start))} to {esc(_when(tr.end))}, '
        "from the audit trail (all replicas). Approver decisions are events, not calls: they are "
        "counted apart.</p>"
        f'<div class="cards">{"".join(cards)}</div>'
        f"<h2>Calls and denials per hour</h2>{hourly_chart(tr)}"
        f"<h2>Top denied tools, last 24 h</h2>{denied}"
        f"{latency_table}"
    )
    return Page("Overview", body, "/console")
