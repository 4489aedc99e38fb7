"""Prometheus metrics, defined once. Updating one costs about 2 µs, so the hot path may use them.

Several worker processes: set `PROMETHEUS_MULTIPROC_DIR` to an empty directory before start-up
(prometheus-client then keeps values in per-process files) and `/metrics` reports the sum over
live processes (see docs/operations.md). Labels that a client controls (tool names) are bounded
by `tool_label`, so a caller cannot grow the series count without limit.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

if TYPE_CHECKING:
    from gateway.call import Decision

REGISTRY = CollectorRegistry(auto_describe=True)
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

REQUESTS = Counter(
    "bastion_mcp_requests", "MCP HTTP requests by method and status", ["method", "status"], registry=REGISTRY
)
DECISIONS = Counter(
    "bastion_decisions",
    "Tool-call decisions by effect, upstream and tool",
    ["effect", "upstream", "tool"],
    registry=REGISTRY,
)
STAGE_SECONDS = Histogram(
    "bastion_stage_seconds",
    "Time spent in each governance stage of a tool call (identity, policy, budget, ..., audit)",
    ["stage"],
    buckets=(0.00005, 0.0001, 0.00025, *_LATENCY_BUCKETS),
    registry=REGISTRY,
)
UPSTREAM_SECONDS = Histogram(
    "bastion_upstream_seconds",
    "Time from forwarding a tools/call to its result, per upstream",
    ["upstream"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
UPSTREAM_ERRORS = Counter(
    "bastion_upstream_errors",
    "Forwarded tool calls that failed at the upstream: timeout, unreachable, http, jsonrpc, stream",
    ["upstream", "kind"],
    registry=REGISTRY,
)
LLM_REQUESTS = Counter(
    "bastion_llm_requests",
    "Model API calls through /llm by provider, API and HTTP status (a stream counts when it starts)",
    ["provider", "api", "status"],
    registry=REGISTRY,
)
LLM_DECISION_SECONDS = Histogram(
    "bastion_llm_decision_seconds",
    "Time to decide one tool call of a model's answer (a streamed call is held back this long)",
    buckets=(0.0001, 0.00025, *_LATENCY_BUCKETS),
    registry=REGISTRY,
)
UPSTREAM_RETRIES = Counter(
    "bastion_upstream_retries",
    "Retries of idempotent tool calls after an upstream failure, per upstream",
    ["upstream"],
    registry=REGISTRY,
)
INFLIGHT = Gauge(
    "bastion_inflight_calls",
    "Tool calls being governed or forwarded right now",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
AUDIT_BACKLOG = Gauge(
    "bastion_audit_backlog",
    "Audit records waiting to be committed",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
BUDGET_DENIALS = Counter(
    "bastion_budget_denials", "Calls refused because a budget was exhausted", ["budget"], registry=REGISTRY
)
BUDGET_STORE_ERRORS = Counter(
    "bastion_budget_store_errors",
    "Calls refused because the budget store (state.url) could not be read or written (fail closed)",
    registry=REGISTRY,
)
PII_FINDINGS = Counter(
    "bastion_pii_findings",
    "PII and secrets found, by entity type and direction (input: arguments, output: results)",
    ["entity", "direction"],
    registry=REGISTRY,
)
CIRCUIT_STATE = Gauge(
    "bastion_circuit_state",
    "Upstream circuit breaker: 0 closed, 1 half-open, 2 open",
    ["upstream"],
    registry=REGISTRY,
    multiprocess_mode="livemax",
)
AUTH_FAILURES = Counter("bastion_auth_failures", "Requests refused with 401", registry=REGISTRY)
REFUSALS_SUPPRESSED = Counter(
    "bastion_refusals_suppressed",
    "Refused credentials answered 429 and not recorded: the source was over listen.refusals_per_s",
    registry=REGISTRY,
)
CORRELATION_REFUSED = Counter(
    "bastion_mcp_correlation_refused",
    "Cancellations and answers to server requests dropped: not about the sender's own requests",
    ["kind"],
    registry=REGISTRY,
)
TOOLS_OMITTED = Counter(
    "bastion_mcp_tools_omitted",
    "Tools left out of tools/list on /mcp: their namespaced name would read two ways",
    ["upstream", "reason"],
    registry=REGISTRY,
)
AUDIT_FAILURES = Counter(
    "bastion_audit_write_failures", "Audit records that could not be written", registry=REGISTRY
)
POLICY_VERSION = Gauge(
    "bastion_policy_info",
    "The active policy set",
    ["version"],
    registry=REGISTRY,
    multiprocess_mode="liveall",
)
APPROVAL_EVENTS = Counter(
    "bastion_approval_events",
    "Human approval events: requested, approved, denied, expired, consumed",
    ["event"],
    registry=REGISTRY,
)
WEBHOOK_DELIVERIES = Counter(
    "bastion_approval_webhook_deliveries",
    "Approval webhook deliveries by outcome: delivered, retried (one per failed attempt), dropped",
    ["outcome"],
    registry=REGISTRY,
)
POLICY_RELOADS = Counter("bastion_policy_reloads", "Policy sets swapped in by hot reload", registry=REGISTRY)
POLICY_RELOAD_FAILURES = Counter(
    "bastion_policy_reload_failures",
    "Changed policy files refused by hot reload (the previous set kept serving)",
    registry=REGISTRY,
)
POLICY_RELOAD_REFUSED = Gauge(
    "bastion_policy_reload_refused",
    "1 while the policy files on disk are refused and an older set is serving",
    registry=REGISTRY,
)
SHADOW_DISAGREEMENTS = Counter(
    "bastion_policy_shadow_disagreements",
    "Calls the shadow policy set decided differently from the live one (kind: newly_denied, "
    "newly_allowed, changed_obligation; error: the shadow could not decide)",
    ["kind"],
    registry=REGISTRY,
)
SHADOW_VERSION = Gauge(
    "bastion_policy_shadow_info",
    "The shadow policy set (decided beside the live one, never enforced)",
    ["version"],
    registry=REGISTRY,
    multiprocess_mode="liveall",
)
SHADOW_RELOADS = Counter(
    "bastion_policy_shadow_reloads", "Shadow policy sets swapped in by hot reload", registry=REGISTRY
)
SHADOW_RELOAD_FAILURES = Counter(
    "bastion_policy_shadow_reload_failures",
    "Changed shadow policy files refused by hot reload (the previous shadow set kept deciding)",
    registry=REGISTRY,
)
SHADOW_RELOAD_REFUSED = Gauge(
    "bastion_policy_shadow_reload_refused",
    "1 while the shadow policy files on disk are refused and an older shadow set is evaluated",
    registry=REGISTRY,
)

SINK_LAG = Gauge(
    "bastion_audit_sink_lag_records",
    "Chained audit records not yet confirmed by the sink, over the chains this replica delivers",
    ["sink"],
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
SINK_DELIVERED = Counter(
    "bastion_audit_sink_delivered_records",
    "Audit records confirmed by the sink (a batch sent again after a failure counts again)",
    ["sink"],
    registry=REGISTRY,
)
SINK_FAILURES = Counter(
    "bastion_audit_sink_failures",
    "Deliveries to the sink that failed and will be retried",
    ["sink"],
    registry=REGISTRY,
)
SINK_UP = Gauge(
    "bastion_audit_sink_up",
    "1 while the sink's last delivery succeeded (or nothing was due), 0 after a failure",
    ["sink"],
    registry=REGISTRY,
    multiprocess_mode="livemin",
)
SINK_BACKLOG = Gauge(
    "bastion_audit_sink_backlog",
    "1 while the sink's lag is past its max_lag_records (the backlog alarm)",
    ["sink"],
    registry=REGISTRY,
    multiprocess_mode="livemax",
)


MAX_TOOL_LABELS = 1000
OTHER = "_other"
_tool_labels: set[tuple[str, str]] = set()
_tool_lock = threading.Lock()


UNKNOWN = "unknown"
_upstreams: frozenset[str] = frozenset()


def known_upstreams(names: Iterable[str]) -> None:
    """Add the configured upstream names (and `*`, the aggregate `/mcp`) to the only values the
    `upstream` label may take. A caller can send any name; it must not mint a series."""
    global _upstreams
    _upstreams = _upstreams | {*names, "*"}


def upstream_label(upstream: str) -> str:
    return upstream if upstream in _upstreams else UNKNOWN


_children: dict[tuple[Any, tuple[str, ...]], Any] = {}


def labelled(metric: Any, *values: str) -> Any:
    """`metric.labels(*values)`, remembered: prometheus-client validates the values and takes a
    lock on every `labels` call, and the governed path asks for the same few children each call.
    Label values are bounded where they are chosen (`upstream_label`, `tool_label`)."""
    key = (metric, values)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*values)
    return child


def tool_label(upstream: str, tool: str) -> str:
    """`tool`, or `_other` once `MAX_TOOL_LABELS` distinct tools have been seen (any name can be sent)."""
    key = (upstream, tool)
    if key in _tool_labels:
        return tool
    with _tool_lock:
        if len(_tool_labels) >= MAX_TOOL_LABELS:
            return OTHER
        _tool_labels.add(key)
    return tool


def exposition() -> bytes:
    """The text for `/metrics`: this process's registry, or every live worker's in multi-process mode."""
    if not MULTIPROCESS:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


def process_exited(pid: int | None = None) -> None:
    """In multi-process mode, drop a stopped worker's live gauges (`inflight`, `audit_backlog`)."""
    if MULTIPROCESS:
        multiprocess.mark_process_dead(pid or os.getpid())  # type: ignore[no-untyped-call]


def decided(upstream: str, tool: str, decision: Decision, action: str = "call_tool") -> None:
    """Count a finished call's decision; a budget denial (reason `budget/<name>`) also by budget.

    Only tools (of configured upstreams) are labelled by name; other actions by the action
    (`read_resource`, `get_prompt`, `message`), since URIs and refused method names are the
    caller's to choose."""
    label = upstream_label(upstream)
    what = tool_label(label, tool) if action == "call_tool" and label != UNKNOWN else action
    labelled(DECISIONS, decision.effect, label, what).inc()
    if decision.stage == "budget" and decision.effect == "deny":
        for reason in decision.reasons:
            if reason.policy.startswith("budget/"):
                BUDGET_DENIALS.labels(reason.policy.removeprefix("budget/")).inc()


def pii_found(arguments: Mapping[str, int], results: Mapping[str, int]) -> None:
    """Count a finished call's PII findings by entity type (`input`: arguments, `output`: results)."""
    for direction, found in (("input", arguments), ("output", results)):
        for entity, count in found.items():
            if count:
                PII_FINDINGS.labels(entity, direction).inc(count)
