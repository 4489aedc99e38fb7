"""Redaction in the pipeline: scan arguments before policy, transform them after, redact results.

Three moments, one object (`Redactor`, built once at start-up):

1. `__call__` (a stage, first in the pipeline): scans the arguments so that Cedar's
   `context.pii` can name what they hold, and the audit record can store them with every
   finding replaced. A `deny` action or an over-limit message with `over_limit: deny` ends the
   call here, before anything is charged.
2. `transform` (after policy and budget, right before forwarding): applies the configured action
   per entity type. A policy `@obligation("redact")` upgrades `none` to `replace` in both
   directions. When anything changed, the decision becomes `transform`.
3. `redact_result`: the upstream's result (text content, structured content, embedded
   resources) is scanned and transformed the same way before the client sees it.

A failure inside Presidio fails closed: the call is denied (or the result withheld).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from presidio_anonymizer import AnonymizerEngine
from presidio_anonymizer.entities import OperatorConfig, RecognizerResult

from gateway.call import RESULT_FIELDS, Decision, Reason, ToolCall
from gateway.config import DirectionRule, RedactionAction, RedactionConfig
from gateway.redaction.engine import Scanner, build_scanner
from gateway.redaction.walk import Hit, Scan, apply, leaves, rebuild, scan_json

__all__ = ["ActionMap", "Redactor"]

log = logging.getLogger("bastion.redaction")

THREAD_ABOVE = 16 * 1024
"""Payloads larger than this (bytes of text) are scanned in a worker thread, off the event loop."""
_DIGITY = frozenset({"CREDIT_CARD", "US_SSN", "PHONE_NUMBER", "IBAN_CODE", "US_BANK_NUMBER", "US_ITIN"})


@dataclass(frozen=True, slots=True)
class ActionMap:
    """The action for each entity type in one direction of one tool."""

    per: Mapping[str, RedactionAction]
    other: RedactionAction

    @classmethod
    def of(cls, rule: DirectionRule) -> ActionMap:
        if isinstance(rule, str):
            return cls({}, rule)
        return cls({k: v for k, v in rule.items() if k != "*"}, rule.get("*", "none"))

    def __call__(self, entity: str) -> RedactionAction:
        return self.per.get(entity, self.other)

    @property
    def inactive(self) -> bool:
        return self.other == "none" and all(a == "none" for a in self.per.values())

    def forced(self) -> ActionMap:
        """Under a redact obligation, nothing passes as is."""
        return ActionMap(
            {k: "replace" if v == "none" else v for k, v in self.per.items()}, self._up(self.other)
        )

    @staticmethod
    def _up(action: RedactionAction) -> RedactionAction:
        return "replace" if action == "none" else action


@dataclass(slots=True)
class _ArgState:
    scan: Scan
    forced: bool = False


class Redactor:
    """Presidio analyzer + anonymizer and the per-tool rules; one per gateway, thread-safe."""

    name = "redaction"

    def __init__(self, cfg: RedactionConfig, hmac_key: bytes, scanner: Scanner | None = None) -> None:
        self.cfg = cfg
        self.scanner = scanner or build_scanner(cfg)
        self._key = hmac_key
        self._anonymizer = AnonymizerEngine()  # type: ignore[no-untyped-call]
        self._rules: dict[tuple[str, str], tuple[ActionMap, ActionMap]] = {}

    # -- rules --------------------------------------------------------------------------------

    def rules(self, upstream: str, tool: str) -> tuple[ActionMap, ActionMap]:
        """(arguments, results) actions: `<upstream>/<tool>`, else `<upstream>/*`, else the default."""
        key = (upstream, tool)
        found = self._rules.get(key)
        if found is None:
            d = self.cfg.default
            args, results = d.arguments, d.results
            for name in (f"{upstream}/*", f"{upstream}/{tool}"):
                rule = self.cfg.tools.get(name)
                if rule is not None:
                    args = rule.arguments if rule.arguments is not None else args
                    results = rule.results if rule.results is not None else results
            found = (ActionMap.of(args), ActionMap.of(results))
            if len(self._rules) > 4096:
                self._rules.clear()
            self._rules[key] = found
        return found

    # -- arguments ----------------------------------------------------------------------------

    async def __call__(self, call: ToolCall) -> Decision | None:
        """Scan the arguments; deny when an entity's action is `deny` or the message is over the limit."""
        call.redaction = _ArgState(Scan())
        if not call.arguments:
            return None
        try:
            scan = await self._scan(call.arguments)
        except Exception as exc:  # fail closed on anything the analyzer raises
            log.error("redaction scan failed for %s: %s", call.audit_id, type(exc).__name__)
            return Decision.deny(self.name, "redaction-error", "the arguments could not be scanned for PII")
        call.redaction = _ArgState(scan)
        call.pii_input = dict(sorted(scan.counts.items()))
        call.redacted_args = self._audit_view(scan, call.arguments)
        if scan.unscanned_bytes:
            call.pii_unscanned["input"] = scan.unscanned_bytes
            if self.cfg.over_limit == "deny":
                return Decision.deny(
                    self.name,
                    "scan-limit",
                    f"the arguments exceed redaction.scan_limit_bytes ({self.cfg.scan_limit_bytes} bytes)",
                )
        actions, _ = self.rules(call.upstream, call.tool)
        if denied := sorted(t for t in scan.types if actions(t) == "deny"):
            return Decision.deny(
                self.name, "pii-denied", f"{call.resource} may not receive {', '.join(denied)}"
            )
        return None

    async def transform(self, call: ToolCall, decision: Decision) -> Decision:
        """Apply the argument actions to an allowed call; the forwarded arguments go in `forward_args`."""
        state = call.redaction
        forced = decision.effect == "transform"
        if isinstance(state, _ArgState):
            state.forced = forced
        actions, _ = self.rules(call.upstream, call.tool)
        if forced:
            actions = actions.forced()
        if not isinstance(state, _ArgState) or not state.scan.hits or actions.inactive:
            return decision
        touched = sorted(t for t in state.scan.types if actions(t) != "none")
        if not touched:
            return decision
        try:
            call.forward_args = apply(state.scan, call.arguments, lambda h: self._render(h, actions))
        except Exception as exc:
            log.error("redaction failed for %s: %s", call.audit_id, type(exc).__name__)
            return Decision.deny(self.name, "redaction-error", "the arguments could not be redacted")
        return _as_transform(decision, f"{', '.join(touched)} redacted in the arguments")

    # -- results ------------------------------------------------------------------------------

    async def redact_result(
        self, call: ToolCall, decision: Decision, result: dict[str, Any]
    ) -> tuple[dict[str, Any] | None, Decision]:
        """The result to send instead of `result` (None: unchanged) and the decision to audit."""
        _, actions = self.rules(call.upstream, call.tool)
        state = call.redaction
        if isinstance(state, _ArgState) and state.forced:
            actions = actions.forced()
        if actions.inactive:
            return None, decision
        body = {k: result[k] for k in RESULT_FIELDS if k in result}
        try:
            scan = await self._scan(body)
        except Exception as exc:
            log.error("redaction scan of a result failed for %s: %s", call.audit_id, type(exc).__name__)
            return _withheld("the result could not be scanned for PII", result), Decision.deny(
                self.name, "redaction-error", "the result could not be scanned for PII"
            )
        call.pii_output = dict(sorted(scan.counts.items()))
        if scan.unscanned_bytes:
            call.pii_unscanned["output"] = scan.unscanned_bytes
            if self.cfg.over_limit == "deny":
                why = f"the result exceeds redaction.scan_limit_bytes ({self.cfg.scan_limit_bytes} bytes)"
                return _withheld(why, result), Decision.deny(self.name, "scan-limit", why)
        if denied := sorted(t for t in scan.types if actions(t) == "deny"):
            why = f"the result of {call.resource} held {', '.join(denied)}"
            return _withheld(why, result), Decision.deny(self.name, "pii-denied", why)
        touched = sorted(t for t in scan.types if actions(t) != "none")
        if not touched:
            return None, decision
        redacted = apply(scan, body, lambda h: self._render(h, actions))
        return {**result, **redacted}, _as_transform(decision, f"{', '.join(touched)} redacted in the result")

    # -- free text ----------------------------------------------------------------------------

    async def redact_texts(self, texts: list[str]) -> tuple[list[str], dict[str, int]]:
        """Every finding in free text replaced by its type (`<EMAIL_ADDRESS>`): a conversation on
        its way to a model. Returns the texts and the entity counts; ValueError when the text
        cannot be scanned, or is over the scan limit with `over_limit: deny`."""
        try:
            scan = await self._scan(texts)
        except Exception as exc:  # fail closed on anything the analyzer raises
            raise ValueError(f"the text could not be scanned for PII ({type(exc).__name__})") from exc
        if scan.unscanned_bytes and self.cfg.over_limit == "deny":
            limit = self.cfg.scan_limit_bytes
            raise ValueError(f"the text exceeds redaction.scan_limit_bytes ({limit} bytes)")
        if not scan.hits:
            return texts, {}
        redacted = apply(scan, texts, lambda h: self._render(h, _REPLACE))
        return (redacted if isinstance(redacted, list) else texts), dict(sorted(scan.counts.items()))

    # -- helpers ------------------------------------------------------------------------------

    async def _scan(self, value: Any) -> Scan:
        limit = self.cfg.scan_limit_bytes
        size = sum(len(text) for _, text in leaves(value))
        if size > THREAD_ABOVE:
            return await asyncio.to_thread(scan_json, self.scanner, value, limit)
        return scan_json(self.scanner, value, limit)

    def _audit_view(self, scan: Scan, args: dict[str, Any]) -> dict[str, Any]:
        """The arguments as the audit stores them: findings replaced, unscanned leaves by their shape."""
        view = apply(scan, args, lambda h: self._render(h, _REPLACE, tail=False))
        if scan.unscanned:
            view = rebuild(view, {p: f"<unscanned:{_leaf_size(args, p)}>" for p in scan.unscanned})
        return view if isinstance(view, dict) else {}

    def _render(self, hit: Hit, actions: ActionMap, tail: bool = True) -> str:
        results = [RecognizerResult(f.entity, f.start, f.end, f.score) for f in hit.findings]
        operators = {f.entity: self._operator(f.entity, actions(f.entity)) for f in hit.findings}
        text = self._anonymizer.anonymize(hit.text, results, operators, merge_entities_with_spaces=False).text
        return text + hit.tail if tail else text

    def _operator(self, entity: str, action: RedactionAction) -> OperatorConfig:
        if action == "replace" or action == "deny":
            return OperatorConfig("replace", {"new_value": f"<{entity}>"})
        if action == "mask":
            return OperatorConfig("custom", {"lambda": _mask})
        if action == "hash":
            return OperatorConfig("custom", {"lambda": lambda v: f"<{entity}:{self.pseudonym(entity, v)}>"})
        return OperatorConfig("keep", {})

    def pseudonym(self, entity: str, value: str) -> str:
        """A keyed hash of the value's canonical form: equal values link, without being revealed."""
        if entity in _DIGITY:
            value = "".join(c for c in value if c.isalnum()).upper()
        elif entity == "EMAIL_ADDRESS":
            value = value.lower()
        msg = f"{entity}\x00{value}".encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()[:16]


_REPLACE = ActionMap({}, "replace")


def _mask(value: str) -> str:
    """All but the last four characters (of values long enough to keep four) become `*`."""
    keep = 4 if len(value) >= 12 else 0
    return "*" * (len(value) - keep) + value[len(value) - keep :]


def _leaf_size(value: Any, path: tuple[str | int, ...]) -> int:
    for step in path:
        value = value[step]
    return len(value) if isinstance(value, str) else len(str(value))


def _as_transform(decision: Decision, why: str) -> Decision:
    stage = decision.stage if decision.effect == "transform" else "redaction"
    return Decision(
        "transform", (*decision.reasons, Reason("redaction", why)), stage, decision.policy_version
    )


def _withheld(why: str, result: Mapping[str, Any]) -> dict[str, Any]:
    out = {"content": [{"type": "text", "text": f"result withheld by redaction: {why}"}], "isError": True}
    if "resultType" in result:
        out["resultType"] = result["resultType"]
    return out
