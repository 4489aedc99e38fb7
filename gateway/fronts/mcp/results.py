"""Bastion's own answers to a `tools/call`: a refusal or a held call as a tool result the model
can read, and a repeated call_id answered with the first call's response."""

from __future__ import annotations

import json
from typing import Any

from jsonschema.validators import validator_for
from referencing import Registry

from gateway.call import Decision
from gateway.fronts import jsonrpc
from gateway.fronts.wire import explained
from gateway.state.idempotency import Previous

DECISION_META = "bastion/decision"


def repeat_answer(previous: Previous, msg_id: Any, modern: bool) -> bytes:
    """The first call's response (with this request's id) when it was kept; else a tool error."""
    if previous.same_call and previous.response is not None:
        try:
            first = json.loads(previous.response)
        except ValueError:
            first = None
        if isinstance(first, dict):
            first["id"] = msg_id
            result = first.get("result")
            if isinstance(result, dict):
                meta = result.get("_meta")
                result["_meta"] = {
                    **(meta if isinstance(meta, dict) else {}),
                    "bastion/duplicate_of": previous.audit_id,
                }
            return jsonrpc.dumps(first)
    answer: dict[str, Any] = {
        "content": [{"type": "text", "text": previous.message}],
        "isError": True,
        "_meta": {"bastion/duplicate_of": previous.audit_id},
    }
    if modern:
        answer["resultType"] = "complete"
    return jsonrpc.result(msg_id, answer)


def denied_result(
    decision: Decision, audit_id: str, output_schema: Any = None, approval: dict[str, str] | None = None
) -> dict[str, Any]:
    """A denial as a tool result the model can read and act on (not a protocol error).

    A call held for a human (`approval`: id, URL, approvers) reads "approval required: <id>; ask
    <approvers>", and the id and URL are added to `structuredContent` and `_meta`.

    The machine-readable decision is in `structuredContent` and in `_meta["bastion/decision"]`.
    When the tool declares an `outputSchema`, `structuredContent` must conform to it: TypeScript
    SDK v1 clients validate it even on `isError` results and would turn the denial into a
    protocol error. Required string properties then carry the denial text; if the decision still
    does not conform, `structuredContent` is left out and only `_meta` carries it.
    """
    reasons, structured = explained(decision, audit_id, approval)
    if approval is not None:
        reasons += ", then make the same call again"
    result: dict[str, Any] = {
        "content": [{"type": "text", "text": reasons}],
        "isError": True,
        "_meta": {DECISION_META: dict(structured)},
    }
    if output_schema is not None:
        fitted = fit_to_schema(structured, reasons, output_schema)
        if fitted is None:
            return result
        structured = fitted
    result["structuredContent"] = structured
    return result


def fit_to_schema(structured: dict[str, Any], text: str, schema: Any) -> dict[str, Any] | None:
    """`structured`, with required string properties set to `text`, if that conforms to `schema`."""
    try:
        validator = validator_for(schema)(schema, registry=Registry())
        if validator.is_valid(structured):
            return structured
        props = schema.get("properties") or {}
        fitted = dict(structured)
        for name in schema.get("required") or []:
            prop = props.get(name)
            if name not in fitted and isinstance(prop, dict) and prop.get("type") == "string":
                fitted[name] = text
        return fitted if validator.is_valid(fitted) else None
    except Exception:  # an unusable schema: no structuredContent rather than one that may not conform
        return None


REFUSED = -32003
"""JSON-RPC error code of a governed message (not a tool call) that Bastion refused."""


def refused_error(
    msg_id: Any, decision: Decision, audit_id: str, approval: dict[str, str] | None = None
) -> bytes:
    """A refused resource read, prompt or completion: a JSON-RPC error naming the policy and
    reason, with the decision in `data` (tool calls get a result the model can read instead)."""
    text, data = explained(decision, audit_id, approval)
    return jsonrpc.error(msg_id, REFUSED, text, data)
