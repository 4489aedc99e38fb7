"""The values that flow through the pipeline, free of any wire protocol.

A front turns wire traffic into a `ToolCall`; stages read it and answer with a `Decision`;
the pipeline adds an `Outcome` once the upstream has answered. Nothing here knows HTTP or MCP.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from audit.record import new_id

Effect = Literal["allow", "deny", "transform", "approval_required"]
Action = Literal[
    "call_tool",
    "list_tools",
    "read_resource",
    "get_prompt",
    "approve",
    "approve_own",
    "send_message",
    "message",
]
"""Cedar actions, and `message`: an MCP message refused before any action applies (its method
is the record's `tool`)."""
OutcomeStatus = Literal[
    "completed", "failed", "timeout", "denied", "error", "decided", "dead_letter", "duplicate", "held"
]


RESULT_FIELDS = ("content", "structuredContent", "contents", "messages", "completion")
"""What a client reads in a result (tool content, resource contents, prompt messages, completion
values): redaction and the injection scan cover these; `_meta` and the rest are protocol."""


API_KEY_ISSUER = "bastion:api-key"
"""The `issuer` of every principal authenticated by an API key: API keys are an issuer of their own."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking: made once by the identity stage from a verified credential, never re-parsed.

    `agent` is the software acting (OAuth `azp`/`client_id`), `delegation_chain` the `act` claims
    (RFC 8693), the current actor first, so a policy can tell "alice" from "an agent for alice".
    `id` names the user wherever one is named (see `Identities`); left empty, it is `sub`.
    """

    sub: str
    issuer: str
    groups: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    tenant: str | None = None
    email: str | None = None
    agent: str | None = None
    delegation_chain: tuple[str, ...] = ()
    scopes: frozenset[str] = frozenset()
    """Effective OAuth scopes: a delegate never holds more than its delegator."""
    claims: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)
    id: str = ""
    """The user as Cedar (`User::"<id>"`), budgets, admin rights, approvals and the audit name it,
    set by the Authenticator from (issuer, sub) so that nobody derives it again."""

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", self.sub)

    @property
    def key(self) -> str:
        """A stable identity across tokens: the same subject of the same issuer."""
        return f"{self.issuer}\x00{self.sub}"


@dataclass(frozen=True, slots=True)
class Identities:
    """How a verified (issuer, subject) becomes a user id, and how config entries name one.

    Subjects are unique only within their issuer, so ids are qualified: `<issuer>#<sub>`. The first
    issuer (of `identity.issuers`; API keys come after every configured issuer) keeps bare
    subjects, so a deployment with one issuer names its users as before. Issuers grouped in
    `same` are one identity on purpose: each of them names its users as the group's earliest
    issuer does. A bare subject that would read as a qualified id (`<known issuer>#...`) is
    qualified too, so that no two (issuer, subject) pairs share an id by accident.
    """

    issuers: tuple[str, ...] = ()
    """The configured issuers, in configuration order."""
    same: tuple[tuple[str, ...], ...] = ()
    """Groups of issuers whose subjects are the same users (`identity.same_identity`)."""
    _order: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _canonical: Mapping[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """ValueError for what would make ids ambiguous (the message names the issuer)."""
        for name in self.issuers:
            if name == API_KEY_ISSUER or "#" in name:
                raise ValueError(f"issuer {name!r}: an issuer may not be {API_KEY_ISSUER} nor contain '#'")
        order = (*self.issuers, API_KEY_ISSUER)
        rank = {name: i for i, name in enumerate(order)}
        canonical: dict[str, str] = {}
        for group in self.same:
            if len(group) < 2:
                raise ValueError("a group of issuers needs at least two of them")
            if unknown := [name for name in group if name not in rank]:
                raise ValueError(f"{unknown[0]!r} is neither a configured issuer nor {API_KEY_ISSUER}")
            earliest = min(group, key=rank.__getitem__)
            for name in group:
                if name in canonical:
                    raise ValueError(f"issuer {name!r} is named twice")
                canonical[name] = earliest
        object.__setattr__(self, "_order", order)
        object.__setattr__(self, "_canonical", canonical)

    @property
    def first(self) -> str:
        """The issuer whose subjects are ids as they are."""
        return self._order[0]

    def id_of(self, issuer: str, sub: str) -> str:
        """The id of `sub` of `issuer`: bare for the first issuer (and those grouped with it)."""
        issuer = self._canonical.get(issuer, issuer)
        if issuer == self.first and self._issuer_of(sub) is None:
            return sub
        return f"{issuer}#{sub}"

    def resolve(self, entry: str) -> str:
        """The id a config entry names: `<issuer>#<subject>`, or a bare subject of the first issuer.

        ValueError for `x#y` where `x` is not a known issuer: a mistyped issuer would otherwise
        name nobody, silently (a subject containing `#` is written `<first issuer>#<subject>`)."""
        if not entry:
            raise ValueError("a user entry must not be empty")
        issuer = self._issuer_of(entry)
        if issuer is not None:
            if len(entry) == len(issuer) + 1:
                raise ValueError(f"{entry!r}: no subject after the issuer")
            return self.id_of(issuer, entry[len(issuer) + 1 :])
        if "#" in entry:
            raise ValueError(
                f"{entry!r}: {entry.split('#', 1)[0]!r} is not a configured issuer (nor {API_KEY_ISSUER});"
                f" write <issuer>#<subject>, or {self.first}#<subject> for a subject containing '#'"
            )
        return self.id_of(self.first, entry)

    def _issuer_of(self, text: str) -> str | None:
        name, sep, _ = text.partition("#")
        return name if sep and name in self._order else None


@dataclass(frozen=True, slots=True)
class Reason:
    """One reason for a decision: the policy (or stage) that determined it and its text."""

    policy: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"policy": self.policy, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class Decision:
    """What the pipeline decided and why. `stage` names the stage that decided."""

    effect: Effect
    reasons: tuple[Reason, ...] = ()
    stage: str = "policy"
    policy_version: str | None = None
    retry_after_s: int | None = None
    """Set when waiting helps (a budget window resets): HTTP fronts send it as `Retry-After`."""

    @property
    def allowed(self) -> bool:
        return self.effect in ("allow", "transform")

    @property
    def policy_ids(self) -> list[str]:
        return [r.policy for r in self.reasons]

    def to_json(self) -> dict[str, Any]:
        return {
            "effect": self.effect,
            "reasons": [r.to_json() for r in self.reasons],
            "policy_ids": self.policy_ids,
            "policy_version": self.policy_version,
            "stage": self.stage,
        }

    @classmethod
    def deny(cls, stage: str, policy: str, reason: str, policy_version: str | None = None) -> Decision:
        return cls("deny", (Reason(policy, reason),), stage, policy_version)


def new_trace_id() -> str:
    """W3C trace ids need to be unique, not secret (OpenTelemetry's SDKs draw them the same way);
    `uuid4` asks the kernel for bytes on every call."""
    return f"{random.getrandbits(128):032x}"


@dataclass(slots=True)
class ToolCall:
    """One governed call, whatever protocol it arrived on.

    `audit_id` is assigned up front so that a denial can name its audit record before the record
    is written. `arguments` are the caller's raw arguments: only stages that need them read them,
    and the audit stage stores them redacted.
    """

    upstream: str
    tool: str
    """The tool's name; for `read_resource` the resource's URI, for `get_prompt` the prompt's name."""
    arguments: dict[str, Any]
    protocol: Literal["mcp", "http", "llm", "a2a"] = "mcp"
    action: Action = "call_tool"
    principal: Principal | None = None
    call_id: str | None = None
    client: str | None = None
    """The framework the caller declared (`X-Bastion-Client`), unverified; for the audit record."""
    llm: dict[str, str] | None = None
    """For a tool call a model asked for: the `provider` and `model` (the audit record keeps them)."""
    a2a: dict[str, str] | None = None
    """For an A2A message: its `method`, and the `task_id` / `context_id` once known (audited)."""
    skill: str | None = None
    """For an A2A message that names a skill: Cedar's `context.skill`."""
    policy_verdict: Decision | None = None
    """The policy stage's own verdict (the record keeps it: `bastion policy replay` compares with it)."""
    stages: list[tuple[str, str, float]] = field(default_factory=list)
    """Each governance stage that ran: (name, its verdict: `pass` or an effect, milliseconds). The
    record keeps them as `decision.stages`, for a reviewer reading one call's story."""
    session: str | None = None
    """The client's MCP session id, when it has one (taint is tracked per session)."""
    session_tainted: bool = False
    """An earlier result in this session carried prompt injection: Cedar's `context.session.tainted`."""
    trace_id: str = field(default_factory=lambda: new_trace_id())
    audit_id: str = field(default_factory=new_id)
    dry_run: bool = False
    """Decide only (`bastion explain`): stages must not consume anything (budgets peek instead)."""
    budget: dict[str, Any] | None = None
    """What the budget stage charged (or which budget was exceeded), for the audit record."""
    pii_input: dict[str, int] = field(default_factory=dict)
    """Entity types found in the arguments, with counts: Cedar's `context.pii` and the audit's pii.input."""
    pii_output: dict[str, int] = field(default_factory=dict)
    pii_unscanned: dict[str, int] = field(default_factory=dict)
    """Bytes per direction (input, output) beyond redaction.scan_limit_bytes that were not scanned."""
    redacted_args: dict[str, Any] | None = None
    """The arguments as the audit stores them (findings replaced); None when no scan ran."""
    forward_args: dict[str, Any] | None = None
    """The arguments to forward when redaction changed them; None: forward `arguments`."""
    redaction: Any = None
    """The redaction stage's argument scan, kept from before policy to the transformation after it."""
    approval_id: str | None = None
    """The human approval this call uses (approved, to be consumed) or waits for (held)."""
    shadow: dict[str, Any] | None = None
    """When the shadow policy set decided otherwise than the live one (`policy.shadow`):
    `{effect, policy_ids, policy_version, kind}`, kind one of newly_denied, newly_allowed,
    changed_obligation, error. None when they agree (or no shadow set is configured). Audited
    as `decision.shadow`; never enforced."""
    ts: datetime = field(default_factory=lambda: datetime.now(UTC))
    started: float = field(default_factory=time.perf_counter)
    recorded: bool = False
    """The final record has been made (or is being made): nothing may record the call again."""
    forwarded: float | None = None
    """`perf_counter()` when the call was handed to the upstream: `bastion_upstream_seconds` starts here."""

    def upstream_seconds(self) -> float:
        return time.perf_counter() - (self.forwarded or self.started)

    @property
    def resource(self) -> str:
        """The Cedar resource id: `<upstream>/<tool>`."""
        return f"{self.upstream}/{self.tool}"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened after the decision: forwarded and answered, failed, or never forwarded."""

    status: OutcomeStatus
    latency_ms: float
    upstream_status: int | None = None
    error: str | None = None
    result_sha256: str | None = None
