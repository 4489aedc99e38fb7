"""Each tool call a model asks for, decided by the pipeline as an MCP call of the same tool is.

A dialect (one per model API) finds the tool calls in a model's answer and asks the `Judge`; the
judge turns each into a `ToolCall` (`protocol: "llm"`, `call_id` = the model's tool call id,
resource `Tool::"<namespace>/<name>"` or the mapped upstream tool), runs the pipeline's decision
(identity, Cedar, budgets, redaction, approvals, audit) and answers a `Verdict`: release the call
with these arguments, or replace it with this text. What the agent receives is exactly what was
decided: a released call carries the arguments the decision saw (redacted, when transformed),
re-serialised by Bastion, never the model's original bytes.

The other direction goes through here too: tool results the agent sends back to the model are
redacted and scanned for prompt injection (`returned`), and the conversation's text is redacted
when `llm.redact_prompts` is on.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import Iterable, MutableMapping, MutableSequence
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway import metrics
from gateway.call import Decision, Principal, Reason, ToolCall
from gateway.config import LLMTools
from gateway.errors import UpstreamError
from gateway.fronts.jsonrpc import parse_json
from gateway.pipeline import Pipeline
from gateway.stages.taint import session_key
from gateway.state.db import STATE_ERRORS

MAX_TOOL_CALLS = 128
"""Most tool calls one model answer may hold; more fails the answer (nothing is released)."""
MAX_NAME = 200
_NAME = re.compile(r"[A-Za-z0-9_.:/-]{1,200}")


@dataclass(slots=True)
class Asked:
    """One tool call in a model's answer, as the model wrote it."""

    id: Any
    """The model's id for the call (a string, unless the model misbehaves)."""
    name: Any
    arguments: Any
    """The parsed input (a dict for a well-formed call; anything else is refused)."""
    malformed: str | None = None
    """Why the input could not be read (invalid JSON): the call is refused, not guessed at."""


@dataclass(slots=True)
class Verdict:
    """What becomes of an asked tool call: released (with `arguments`) or replaced by `text`."""

    released: bool
    arguments: dict[str, Any] = field(default_factory=dict)
    text: str = ""

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False, separators=(",", ":"))


@dataclass(slots=True)
class Slot:
    """A string inside a request body, to be read and replaced in place (redaction)."""

    holder: MutableMapping[str, Any] | MutableSequence[Any]
    key: Any

    @property
    def text(self) -> str:
        value = self.holder[self.key]
        return value if isinstance(value, str) else ""

    def set(self, text: str) -> None:
        self.holder[self.key] = text


@dataclass(slots=True)
class ToolResult:
    """A tool's result in a request, going back to the model."""

    call_id: str
    name: str | None
    """The tool's name, from the model's call earlier in the conversation (None: not in it)."""
    slots: list[Slot]
    latest: bool
    """Sent after the model's last answer: new in this request, so it is recorded (older ones,
    resent with the history, were recorded when they were new, and are only redacted again)."""


def parse_arguments(text: Any) -> tuple[Any, str | None]:
    """A tool call's arguments as the model wrote them (a JSON text): parsed strictly (no duplicate
    keys, bounded depth), or the reason they cannot be read."""
    if not isinstance(text, str):
        return None, "the arguments are not a JSON text"
    if not text.strip():
        return {}, None
    try:
        return parse_json(text.encode("utf-8", "surrogatepass")), None
    except Exception as exc:  # ProtocolError, or bytes that are not UTF-8
        return None, f"the arguments are not valid JSON ({str(exc)[:120]})"


def clip(name: Any) -> str:
    """A name from the model, safe to quote in a message."""
    text = name if isinstance(name, str) else repr(name)
    return text[:MAX_NAME].encode("unicode_escape").decode("ascii")


class Seen:
    """Tool results already redacted and scanned, per caller and conversation, so that a long
    conversation resent on every turn is not scanned again each time (the last `SIZE` kept)."""

    SIZE = 4096
    _UNCHANGED: dict[str, Any] = {}

    def __init__(self) -> None:
        self._known: OrderedDict[bytes, dict[str, Any]] = OrderedDict()

    @staticmethod
    def key(principal: str, session: str | None, resource: str, texts: list[str]) -> bytes:
        digest = hashlib.sha256(f"{principal}\x00{session}\x00{resource}".encode())
        for text in texts:
            digest.update(b"\x00" + text.encode("utf-8", "surrogatepass"))
        return digest.digest()

    def get(self, key: bytes) -> dict[str, Any] | Literal[False] | None:
        """The redacted result (None: unchanged) when seen; False when not."""
        found = self._known.get(key)
        if found is None:
            return False
        self._known.move_to_end(key)
        return None if found is self._UNCHANGED else found

    def put(self, key: bytes, redacted: dict[str, Any] | None) -> None:
        self._known[key] = self._UNCHANGED if redacted is None else redacted
        if len(self._known) > self.SIZE:
            self._known.popitem(last=False)


class Judge:
    """Decides the tool calls of one model answer for one caller; see the module docstring."""

    def __init__(
        self,
        pipeline: Pipeline,
        tools: LLMTools,
        principal: Principal,
        *,
        provider: str,
        model: str,
        client: str | None,
        session: str | None,
        trace_id: str,
        seen: Seen | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.tools = tools
        self.principal = principal
        self.llm = {"provider": provider, "model": model[:200]}
        self.client = client
        self.session = session
        self.trace_id = trace_id
        self.asked = 0
        self.changed = False
        """A tool result or the conversation's text was rewritten: the request must be re-serialised."""
        self.seen = seen if seen is not None else Seen()

    def target(self, name: str) -> tuple[str, str]:
        """(upstream, tool) of a model's tool name: mapped, else in the namespace."""
        mapped = self.tools.map.get(name)
        if mapped is not None:
            upstream, _, tool = mapped.partition("/")
            return upstream, tool
        return self.tools.namespace, name[:MAX_NAME]

    def call(self, call_id: str, name: str, arguments: dict[str, Any]) -> ToolCall:
        upstream, tool = self.target(name)
        return ToolCall(
            upstream,
            tool,
            arguments,
            protocol="llm",
            principal=self.principal,
            call_id=call_id[:200] or None,
            client=self.client,
            llm=self.llm,
            session=self.session,
            trace_id=self.trace_id,
        )

    async def all(self, asked: list[Asked]) -> list[Verdict]:
        """Decide the tool calls of a whole answer at once (their records share group commits)."""
        if self.asked + len(asked) > MAX_TOOL_CALLS:
            raise UpstreamError(f"the model asked for more than {MAX_TOOL_CALLS} tool calls in one answer")
        return list(await asyncio.gather(*(self(one) for one in asked)))

    async def __call__(self, asked: Asked) -> Verdict:
        """Decide one asked tool call (and record it); refusals carry the text the model reads."""
        started = time.perf_counter()
        try:
            return await self._decide(asked)
        finally:
            metrics.LLM_DECISION_SECONDS.observe(time.perf_counter() - started)

    async def _decide(self, asked: Asked) -> Verdict:
        self.asked += 1
        if self.asked > MAX_TOOL_CALLS:
            raise UpstreamError(f"the model asked for more than {MAX_TOOL_CALLS} tool calls in one answer")
        name = asked.name if isinstance(asked.name, str) and asked.name else "(unnamed)"
        arguments = asked.arguments if isinstance(asked.arguments, dict) else {}
        call = self.call(asked.id if isinstance(asked.id, str) else "", name, arguments)
        malformed = asked.malformed
        if malformed is None and not isinstance(asked.arguments, dict):
            malformed = "the arguments are not a JSON object"
        if not isinstance(asked.name, str) or not _NAME.fullmatch(asked.name):
            # the model APIs allow far less; a name policy would read one way and the agent another
            malformed = f"the tool name is not 1 to {MAX_NAME} characters of letters, digits and _.:/-"
        up = self.pipeline.upstreams.get(call.upstream)
        missing = sorted(set(up.cfg.required_scopes) - self.principal.scopes) if up is not None else []
        if malformed is not None:
            decision = await self.pipeline.refuse(call, "protocol", "malformed-tool-call", malformed)
        elif missing:
            why = f"the token lacks the scope(s) {' '.join(missing)} that {call.upstream} requires"
            decision = await self.pipeline.refuse(call, "identity", "insufficient_scope", why)
        else:
            decision = await self.pipeline.decide_only(call, hold=True)
        if decision.allowed:
            released = call.forward_args if call.forward_args is not None else arguments
            return Verdict(True, released)
        return Verdict(False, text=self._refusal(call, name, decision))

    def _refusal(self, call: ToolCall, name: str, decision: Decision) -> str:
        reasons = "; ".join(f"{r.reason} ({r.policy})" for r in decision.reasons) or "no reason given"
        held = self.pipeline.approval_of(call, decision)
        if held is not None:
            ask = f" ask {held['approvers']}" if held.get("approvers") else ""
            return (
                f"[Bastion] The tool call {clip(name)} was not run: it needs a human's approval "
                f"({held['approval_id']}, {held['approval_url']});{ask} once approved, the same call "
                f"is allowed. Reason: {reasons}. Audit record {call.audit_id}."
            )
        verb = "over budget" if decision.retry_after_s is not None else "denied"
        return (
            f"[Bastion] The tool call {clip(name)} was {verb} and not run. Reason: {reasons}. "
            f"Audit record {call.audit_id}."
        )

    # -- the other direction: what goes to the model ---------------------------------------------

    async def offered(self, names: list[str | None]) -> list[bool]:
        """For each tool the caller declares (None: one Bastion does not govern, kept), whether
        the model may be offered it: Cedar could allow `call_tool` on it for some arguments in
        this conversation, as `tools/list` decides on /mcp. Fails closed: unreadable taint hides."""
        tainted = False
        taint = self.pipeline.taint
        if taint is not None and (key := session_key(self.principal, self.session)) is not None:
            try:
                tainted = await taint.is_tainted(key)
            except STATE_ERRORS:
                return [name is None for name in names]
        by_upstream: dict[str, list[str]] = {}
        for name in names:
            if name is not None and _NAME.fullmatch(name):
                upstream, tool = self.target(name)
                by_upstream.setdefault(upstream, []).append(tool)
        allowed = {
            (upstream, tool)
            for upstream, tools in by_upstream.items()
            for tool in self.pipeline.policy.listable(
                self.principal, "call_tool", upstream, tools, tainted, False
            )
        }
        return [
            name is None or (_NAME.fullmatch(name) is not None and self.target(name) in allowed)
            for name in names
        ]

    async def returned(self, results: Iterable[ToolResult]) -> None:
        """Redact and scan each tool result on its way to the model, in place; the new ones are
        recorded. Injection found in any of them taints the session (`context.session.tainted`)."""
        allow = Decision("allow", (Reason("result", "a tool result in the conversation"),), "result")
        for found in results:
            if not found.slots:
                continue
            call = self.call(found.call_id, found.name or "(unknown)", {})
            texts = [slot.text for slot in found.slots]
            result = {"content": [{"type": "text", "text": text} for text in texts]}
            if found.latest:
                redacted, _ = await self.pipeline.returned(call, result)
            else:
                # resent with the history: scanned once per conversation, then answered from memory
                key = self.seen.key(self.principal.key, self.session, call.resource, texts)
                if (known := self.seen.get(key)) is not False:
                    redacted = known
                else:
                    redacted, _ = await self.pipeline.redact_result(call, allow, result)
                    self.seen.put(key, redacted)
            if redacted is not None:
                _write_back(found.slots, redacted)
                self.changed = True

    async def redact_prompts(self, slots: list[Slot]) -> dict[str, int]:
        """Replace PII and secrets in the conversation's text (`llm.redact_prompts`) in place;
        returns the entity types found, with counts. Fails closed: text that cannot be scanned
        is not sent."""
        redactor = self.pipeline.redactor
        if redactor is None or not slots:
            return {}
        try:
            texts, found = await redactor.redact_texts([slot.text for slot in slots])
        except ValueError as exc:
            raise UpstreamError(f"{exc}, so the conversation was not sent to the provider") from None
        for slot, text in zip(slots, texts, strict=True):
            if isinstance(text, str) and text != slot.text:
                slot.set(text)
                self.changed = True
        return found


def _write_back(slots: list[Slot], redacted: dict[str, Any]) -> None:
    """Put a redacted result's texts back where they came from (a withheld result: its notice
    in the first slot, the others emptied)."""
    content = redacted.get("content")
    texts = [b.get("text", "") for b in content if isinstance(b, dict)] if isinstance(content, list) else []
    if len(texts) != len(slots):
        texts = (texts[:1] or ["result withheld by redaction"]) + [""] * (len(slots) - 1)
    for slot, text in zip(slots, texts, strict=False):
        slot.set(text if isinstance(text, str) else "")
